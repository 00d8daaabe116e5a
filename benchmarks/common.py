"""Shared pieces of the deep_ep benchmarks: launch, inputs, baselines, timing, byte accounting, metadata.

Launch (``add_launch_args`` / ``launch``): a benchmark is a module-level ``worker(ctx, args)`` run on
every rank after the process group is up; what rank 0 returns comes back to the caller. Three ways:

* ``spawn`` (default on one machine): ``--num-ranks`` local processes, gloo over 127.0.0.1 through a
  rendezvous store that listens on loopback only. ``--ranks-per-node K`` exports
  ``DEEP_EP_RANKS_PER_NODE=K`` so deep_ep uses its multi-node layout (two-hop handles,
  ``num_tokens_per_rdma_rank``) on one box.
* ``env`` (several machines, one launch per node, DeepEP's convention): ``MASTER_ADDR``,
  ``MASTER_PORT``, ``WORLD_SIZE`` = number of nodes, ``RANK`` = this node's index; each launch spawns
  ``--num-ranks`` local ranks, and global rank = ``RANK * num_ranks + local rank``. Rank 0's host
  prints and writes the results.
* ``mpirun``: every MPI process is one rank (``OMPI_COMM_WORLD_*`` or ``PMI_*``). The rendezvous is
  ``MASTER_ADDR``/``MASTER_PORT`` when set, else (one host) a loopback store whose port rank 0 picks
  and broadcasts with mpi4py.
* ``torchrun`` (``torchrun`` / ``python -m torch.distributed.run``): every process is one rank;
  ``WORLD_SIZE`` is then the number of ranks (torchrun's meaning, not nodes), ``LOCAL_RANK`` /
  ``LOCAL_WORLD_SIZE`` the local ones, and the process group joins torchrun's own store as a client
  (what torch's env:// init method does).

``--launch auto`` picks ``mpirun`` under MPI, ``torchrun`` under torchrun (``TORCHELASTIC_RUN_ID`` is
set), ``env`` when ``MASTER_ADDR``, ``WORLD_SIZE`` and ``RANK`` are set, else ``spawn``.

Devices: ``--device cpu`` runs gloo ranks on CPU (the portable engine). ``--device cuda`` puts the
tensors on GPU ``local_rank % device_count`` (deep_ep then picks its CUDA engine where it can run,
see ``buffer.engine``) and runs the baselines on an NCCL group; timings synchronise the device.
``--device auto`` is ``cuda`` when a GPU is visible, else ``cpu``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

# Runnable from a checkout without installing deep_ep.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

FP8_MAX = 448.0
# DeepEP's byte accounting for FP8 normal dispatch: 1 byte per element plus a float32 scale per 128.
FP8_FACTOR = (1 + 4 / 128) / 2


# ------------------------------------------------------------------------------------------------
# Inputs (the global view: any rank can rebuild any rank's inputs)
# ------------------------------------------------------------------------------------------------
def make_inputs(seed: int, src: int, num_tokens: int, hidden: int, num_experts: int, num_topk: int,
                num_masked: int) -> Dict[str, torch.Tensor]:
    """Rank `src`'s inputs (on CPU): BF16 tokens, DeepEP-style routing (top-k of |randn|+1), weights.

    `num_masked` random (token, slot) entries of `topk_idx` are set to -1 ("no expert"), as DeepEP's
    low-latency test does.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + src)
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
    scores = torch.randn(num_tokens, num_experts, generator=gen).abs() + 1
    topk_idx = torch.topk(scores, num_topk, dim=-1, sorted=True).indices.to(torch.int64)
    topk_weights = torch.rand(num_tokens, num_topk, generator=gen) + 0.1
    if num_masked > 0 and num_tokens > 0:
        flat = torch.randperm(num_tokens * num_topk, generator=gen)[:num_masked]
        topk_idx.view(-1)[flat] = -1
    return {"x": x, "topk_idx": topk_idx, "topk_weights": topk_weights.float()}


def per_token_cast_to_fp8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """1x128-block FP8 (e4m3) cast with float32 inverse scales `[tokens, hidden/128]`."""
    t, h = x.shape
    blocks = x.float().view(t, h // 128, 128)
    amax = blocks.abs().amax(dim=2).clamp(min=1e-4)
    q = (blocks * (FP8_MAX / amax).unsqueeze(2)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(t, h), (amax / FP8_MAX).contiguous()


# ------------------------------------------------------------------------------------------------
# Byte accounting (DeepEP's tests' formulas, reference §4.3-4.5)
# ------------------------------------------------------------------------------------------------
def normal_bytes(num_recv_rows: int, hidden: int) -> int:
    """Normal dispatch/combine, NVL bytes of one rank: the BF16 rows it receives (sends back)."""
    return num_recv_rows * hidden * 2


def normal_buffer_bytes(deep_ep, num_ranks: int, num_local_ranks: int, hidden_bytes: int) -> Tuple[int, int]:
    """``(num_nvl_bytes, num_rdma_bytes)`` for a normal-mode Buffer: the larger of the default dispatch and
    combine configs' hints, across nodes with ``num_ranks_per_node`` (``DEEP_EP_RANKS_PER_NODE`` when set,
    else the ranks on this host, as the Buffer detects it); ``num_rdma_bytes`` is 0 on one node."""
    per_node = int(os.environ.get("DEEP_EP_RANKS_PER_NODE") or num_local_ranks)
    per_node = per_node if per_node < num_ranks else None
    configs = (deep_ep.Buffer.get_dispatch_config(num_ranks), deep_ep.Buffer.get_combine_config(num_ranks))
    nvl = max(c.get_nvl_buffer_size_hint(hidden_bytes, num_ranks, num_ranks_per_node=per_node) for c in configs)
    rdma = 0 if per_node is None else \
        max(c.get_rdma_buffer_size_hint(hidden_bytes, num_ranks, num_ranks_per_node=per_node) for c in configs)
    return nvl, rdma


def rdma_token_count(topk_idx: torch.Tensor, experts_per_rank: int, ranks_per_node: int) -> int:
    """Multi-node normal dispatch: (token, destination node) pairs, the local node included."""
    valid = topk_idx >= 0
    node = torch.where(valid, topk_idx // (experts_per_rank * ranks_per_node), torch.full_like(topk_idx, -1))
    num_nodes = int(node.max().item()) + 1 if node.numel() else 0
    if num_nodes == 0:
        return 0
    hit = torch.zeros(topk_idx.shape[0], num_nodes + 1, dtype=torch.bool)
    hit.scatter_(1, (node + 1).clamp(min=0), True)
    return int(hit[:, 1:].sum())


def ll_bytes(num_selections: int, hidden: int, fp8: bool) -> int:
    """Low-latency bytes of one rank per valid (token, expert) selection: BF16 or FP8 (+scales, +16)."""
    return num_selections * ((hidden + hidden // 128 * 4 + 16) if fp8 else hidden * 2)


# ------------------------------------------------------------------------------------------------
# Baselines (plain torch.distributed)
# ------------------------------------------------------------------------------------------------
class RawAllToAll:
    """One all_to_all_single of exactly the BF16 dispatch's bytes per (src, dst) pair, pre-arranged
    (`row_bytes` per row: ``hidden * 2`` unless given)."""

    def __init__(self, group, send_rows: List[int], recv_rows: List[int], hidden: int,
                 device: torch.device = torch.device("cpu"), row_bytes: Optional[int] = None) -> None:
        row_bytes = hidden * 2 if row_bytes is None else int(row_bytes)
        self.group = group
        self.in_splits = [r * row_bytes for r in send_rows]
        self.out_splits = [r * row_bytes for r in recv_rows]
        self.send = torch.randint(0, 255, (sum(self.in_splits),), dtype=torch.uint8).to(device)
        self.recv = torch.empty(sum(self.out_splits), dtype=torch.uint8, device=device)

    def __call__(self) -> None:
        dist.all_to_all_single(self.recv, self.send, self.out_splits, self.in_splits, group=self.group)


class Memcpy:
    """A plain copy of `num_bytes` (what one rank receives) from one buffer to another on every rank at
    once: the physical floor of a same-host exchange (shared memory moves each byte at least once), run
    under deep_ep's own thread cap so that it shares the cores the way deep_ep's calls do."""

    def __init__(self, num_bytes: int, num_local_ranks: int) -> None:
        from deep_ep._threads import ThreadCap
        self.src = torch.randint(0, 255, (max(int(num_bytes), 1),), dtype=torch.uint8)
        self.dst = torch.empty_like(self.src)
        self.cap = ThreadCap.for_local_ranks(num_local_ranks)

    def __call__(self) -> None:
        with self.cap:
            self.dst.copy_(self.src)


class NaiveDispatcher:
    """One row per (token, expert) pair: sort pairs by expert, index_select, counts exchange, all-to-all.

    Buffers are handled the way deep_ep's portable dispatch handles them, so that the comparison is
    about the algorithm: the send staging buffer is kept between calls (grown when needed), and the
    received rows land in a fresh output tensor on every call (the caller owns the result).
    """

    def __init__(self, group, num_ranks: int, num_experts: int) -> None:
        self.group, self.num_ranks, self.num_experts = group, num_ranks, num_experts
        self._send: Optional[torch.Tensor] = None

    def __call__(self, x: torch.Tensor, topk_idx: torch.Tensor):
        num_topk = topk_idx.shape[1]
        flat = topk_idx.reshape(-1)
        key = torch.where(flat >= 0, flat, torch.full_like(flat, self.num_experts))
        order = torch.argsort(key, stable=True)
        counts = torch.bincount(key, minlength=self.num_experts + 1)[: self.num_experts]
        pairs = order[: int(counts.sum())]
        if self._send is None or self._send.shape[0] < pairs.numel() or self._send.shape[1:] != x.shape[1:] \
                or self._send.dtype != x.dtype or self._send.device != x.device:
            self._send = torch.empty((max(pairs.numel(), 1),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        send = self._send[: pairs.numel()]
        torch.index_select(x, 0, pairs // num_topk, out=send)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # [src rank, local expert]
        in_splits = counts.view(self.num_ranks, -1).sum(1).tolist()
        out_splits = recv_counts.view(self.num_ranks, -1).sum(1).tolist()
        recv = torch.empty((sum(out_splits),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_to_all_single(recv, send, out_splits, in_splits, group=self.group)
        return recv, recv_counts


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
def _sync(device: Optional[torch.device]) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_round_robin(ops: Dict[str, Callable[[], object]], group, warmup: int, iters: int,
                      settle: int = 1, device: Optional[torch.device] = None) -> Dict[str, dict]:
    """Median over rounds of the slowest rank's time per op, ops interleaved within each round.

    In each round every op first runs `settle` times untimed, then once timed (each run preceded by a
    barrier). The untimed runs let an op reach its own steady state instead of inheriting the
    memory-allocator state another op left behind: on CPU, freshly mapped memory must be faulted in,
    and one op's large allocations can slow the next op by 2x (measured here). On CUDA the device
    is synchronised before the clock starts and before it stops.
    """
    names = list(ops)
    samples = torch.zeros(iters, len(names), dtype=torch.float64)
    for it in range(warmup + iters):
        for i, name in enumerate(names):
            for _ in range(settle):
                dist.barrier(group=group)
                ops[name]()
            _sync(device)
            dist.barrier(group=group)
            start = time.perf_counter()
            ops[name]()
            _sync(device)
            elapsed = time.perf_counter() - start
            if it >= warmup:
                samples[it - warmup, i] = elapsed
    samples = samples.to(device) if device is not None and device.type == "cuda" else samples
    dist.all_reduce(samples, op=dist.ReduceOp.MAX, group=group)
    samples = samples.cpu()
    out = {}
    for i, name in enumerate(names):
        col = samples[:, i].tolist()
        out[name] = {"median_s": statistics.median(col), "min_s": min(col), "max_s": max(col)}
    return out


def mean_over_ranks(value: float, group, device: Optional[torch.device] = None) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64,
                     device=device if device is not None and device.type == "cuda" else "cpu")
    dist.all_reduce(t, group=group)
    return float(t.item()) / dist.get_world_size(group)


# ------------------------------------------------------------------------------------------------
# Progress and metadata
# ------------------------------------------------------------------------------------------------
class Progress:
    """A small progress bar on stderr: redrawn in place on a terminal, one line per step otherwise.

    `done` and `start` (a ``time.time()``) let a bar continue across processes (one launch per rank
    count in a sweep).
    """

    def __init__(self, total: int, label: str = "", done: int = 0, start: Optional[float] = None,
                 width: int = 24, stream=None) -> None:
        self.total, self.label, self.width = max(total, 1), label, width
        self.stream = stream or sys.stderr
        self.done = done
        self.start = time.time() if start is None else start
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def step(self, what: str = "", n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        frac = self.done / self.total
        filled = int(round(frac * self.width))
        elapsed = time.time() - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        line = (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{elapsed:4.0f}s, ~{eta:3.0f}s left  {what}")
        if self.tty:
            self.stream.write("\r" + line[:140].ljust(140) + ("\n" if self.done == self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git(*cmd: str) -> str:
    with contextlib.suppress(Exception):
        return subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    return ""


def machine_info(device: str = "cpu") -> Dict[str, object]:
    """Where and when a result was measured: for the JSON files under benchmarks/results/."""
    mem_gib = None
    with contextlib.suppress(OSError, ValueError):
        for line in open("/proc/meminfo", encoding="utf-8"):
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    load = None
    with contextlib.suppress(OSError):
        load = [round(v, 2) for v in os.getloadavg()]
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host_cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gib": mem_gib,
        "load_average_1_5_15": load,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        # Results and the pages generated from them (docs/performance.md, the README's figures block) do
        # not make the measured code dirty.
        "git_tree_dirty": any(not (path.startswith("benchmarks/results/") or path in ("docs/performance.md",
                                                                                      "README.md"))
                              for path in (line.split(maxsplit=1)[-1] for line in
                                           _git("status", "--porcelain", "--untracked-files=no").splitlines())),
        "command": " ".join([os.path.relpath(sys.argv[0], REPO_ROOT) if sys.argv else "?"] + sys.argv[1:]),
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    return info


# ------------------------------------------------------------------------------------------------
# Launch
# ------------------------------------------------------------------------------------------------
@dataclass
class RankContext:
    """What a worker gets on its rank: the process groups and where it runs."""

    rank: int
    num_ranks: int
    local_rank: int
    num_local_ranks: int
    group: object          # the world group (deep_ep.Buffer runs on it)
    bench_group: object    # a separate group of the same ranks for the baselines
    device: torch.device
    launch: str
    extra: Dict[str, object] = field(default_factory=dict)

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)


def add_launch_args(p: argparse.ArgumentParser, default_ranks: int = 4, with_device: bool = True) -> None:
    g = p.add_argument_group("launch (one machine: spawn; several: env or mpirun, see benchmarks/README.md)")
    g.add_argument("--launch", choices=("auto", "spawn", "env", "mpirun", "torchrun"), default="auto",
                   help="spawn: local processes; env: one launch per node with MASTER_ADDR, MASTER_PORT, "
                        "WORLD_SIZE (= nodes) and RANK (= node index); mpirun: one MPI process per rank; "
                        "torchrun: one torchrun process per rank (WORLD_SIZE = ranks); auto: mpirun under MPI, "
                        "torchrun under torchrun, env when MASTER_ADDR/WORLD_SIZE/RANK are set, else spawn")
    g.add_argument("--num-ranks", type=int, default=default_ranks,
                   help="local ranks to spawn (spawn: the whole group; env: ranks per node; ignored under mpirun)")
    g.add_argument("--ranks-per-node", type=int, default=0,
                   help="export DEEP_EP_RANKS_PER_NODE to emulate a multi-node layout on one machine "
                        "(0: leave it unset, deep_ep groups ranks by host name)")
    if with_device:
        g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                       help="where the tensors live; cuda uses GPU local_rank %% device_count and NCCL baselines")
    g.add_argument("--timeout", type=float, default=300, help="seconds before a stuck collective raises")
    g.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads per rank (CPU); 0: torch's default, as a user gets it (deep_ep "
                        "caps its own calls to the cores per local rank)")


def resolve_launch(args) -> str:
    if args.launch != "auto":
        return args.launch
    if "OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_SIZE" in os.environ:
        return "mpirun"
    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun: WORLD_SIZE counts ranks, not nodes
        return "torchrun"
    if all(k in os.environ for k in ("MASTER_ADDR", "WORLD_SIZE", "RANK")):
        return "env"
    return "spawn"


def resolve_device(args) -> str:
    device = getattr(args, "device", "cpu")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _loopback_listener() -> Optional[socket.socket]:
    """rank 0's store socket, already listening (None with an older deep_ep: rank 0 binds the port itself)."""
    try:
        from deep_ep._comm import loopback_listener
    except ImportError:
        return None
    return loopback_listener()


def _loopback_store(port: int, rank: int, world: int, timeout_s: float, listener: Optional[socket.socket]):
    try:
        from deep_ep._comm import loopback_store  # listens on 127.0.0.1 only
    except ImportError:  # an older deep_ep: a plain store (the address is explicit, no tcp:// init)
        timeout = datetime.timedelta(seconds=timeout_s)
        return dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=timeout, wait_for_workers=False)
    if rank != 0 or listener is None:
        if listener is not None:
            listener.close()  # every spawned rank received a copy; only rank 0 serves on it
        return loopback_store(port, rank, world, timeout_s)
    return loopback_store(port, rank, world, timeout_s, listener)


@dataclass
class _Rendezvous:
    kind: str        # "loopback", "remote" or "env" (torchrun's store, joined as a client)
    addr: str
    port: int
    world: int
    listener: Optional[socket.socket] = None  # "loopback": rank 0's store socket, already listening


def _init_rank(rank: int, local_rank: int, num_local: int, rdv: _Rendezvous, args, launch_kind: str,
               device_kind: str) -> RankContext:
    threads = int(getattr(args, "threads", 0) or 0)
    if threads > 0:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        if device_kind == "cpu":
            torch.set_num_threads(threads)
    timeout = datetime.timedelta(seconds=args.timeout)
    if rdv.kind == "env":
        # torchrun's agent already hosts the store on MASTER_ADDR:MASTER_PORT: join it as a client (what
        # torch's env:// init method does; a second store there fails to bind). Keys under torchrun's prefix.
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        store = dist.TCPStore(rdv.addr, rdv.port, rdv.world, rank == 0 and not agent, timeout=timeout,
                              wait_for_workers=False)
        store = dist.PrefixStore(f"/worker/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    elif rdv.kind == "loopback":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        store = _loopback_store(rdv.port, rank, rdv.world, args.timeout, rdv.listener)
    else:
        store = dist.TCPStore(rdv.addr, rdv.port, rdv.world, rank == 0, timeout=timeout, wait_for_workers=False)
    if device_kind == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl", store=store, rank=rank, world_size=rdv.world, timeout=timeout)
        bench_group = dist.new_group(list(range(rdv.world)), backend="nccl", timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", store=store, rank=rank, world_size=rdv.world, timeout=timeout)
        # The baselines' own gloo group (deep_ep's portable engine also runs its collectives on a
        # private gloo group, so the transports match).
        bench_group = dist.new_group(list(range(rdv.world)), backend="gloo", timeout=timeout)
    return RankContext(rank, rdv.world, local_rank, num_local, dist.group.WORLD, bench_group, device, launch_kind)


def _spawned_rank(local_rank: int, node: int, num_local: int, rdv: _Rendezvous, worker, args, launch_kind: str,
                  device_kind: str, result_queue) -> None:
    rank = node * num_local + local_rank
    try:
        ctx = _init_rank(rank, local_rank, num_local, rdv, args, launch_kind, device_kind)
        result = worker(ctx, args)
        if rank == 0:
            result_queue.put(("ok", result))
    except BaseException:
        result_queue.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))
        raise
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


class LaunchError(RuntimeError):
    pass


def _spawn(worker, args, rdv: _Rendezvous, node: int, num_local: int, launch_kind: str, device_kind: str,
           want_result: bool):
    ctx = mp.get_context("spawn")
    result_queue = ctx.Queue()
    try:
        mp.start_processes(_spawned_rank, args=(node, num_local, rdv, worker, args, launch_kind, device_kind,
                                                result_queue),
                           nprocs=num_local, join=True, start_method="spawn")
    except Exception as exc:  # a rank raised: its traceback is in the queue (and on stderr)
        messages = []
        while not result_queue.empty():
            status, payload = result_queue.get()
            if status == "error":
                messages.append(payload)
        raise LaunchError("\n".join(messages) if messages else str(exc)) from None
    if not want_result:
        return None
    status, payload = result_queue.get(timeout=60)
    if status != "ok":
        raise LaunchError(payload)
    return payload


def launch(worker: Callable[[RankContext, argparse.Namespace], object], args, prefix: str = "[bench]",
           env: Optional[Dict[str, str]] = None, quiet: bool = False):
    """Run `worker(ctx, args)` on every rank; return rank 0's result on the process that hosts rank 0
    (None elsewhere). Raises LaunchError with the failing ranks' tracebacks."""
    kind = resolve_launch(args)
    device_kind = resolve_device(args)
    if device_kind == "cuda" and not torch.cuda.is_available():
        raise LaunchError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    overrides = dict(env or {})
    if args.ranks_per_node:
        overrides["DEEP_EP_RANKS_PER_NODE"] = str(args.ranks_per_node)
    os.environ.update(overrides)  # children (spawn) inherit it; MPI ranks read it in-process
    if int(getattr(args, "threads", 0) or 0) > 0:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if kind == "spawn":
        listener = _loopback_listener()
        port = listener.getsockname()[1] if listener is not None else free_port()
        if not quiet:
            print(f"{prefix} spawning {args.num_ranks} ranks (gloo, 127.0.0.1:{port})"
                  + (f", DEEP_EP_RANKS_PER_NODE={args.ranks_per_node}" if args.ranks_per_node else ""), flush=True)
        rdv = _Rendezvous("loopback", "127.0.0.1", port, args.num_ranks, listener)
        try:
            return _spawn(worker, args, rdv, 0, args.num_ranks, kind, device_kind, True)
        finally:
            if listener is not None:
                listener.close()
    if kind == "env":
        try:
            addr, port = os.environ["MASTER_ADDR"], int(os.environ.get("MASTER_PORT", "8361"))
            nodes, node = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        except (KeyError, ValueError) as exc:
            raise LaunchError(f"--launch env needs MASTER_ADDR, MASTER_PORT, WORLD_SIZE (nodes) and RANK (node "
                              f"index): {exc}") from None
        print(f"{prefix} node {node}/{nodes}: spawning {args.num_ranks} local ranks, rendezvous {addr}:{port}",
              flush=True)
        rdv = _Rendezvous("remote", addr, port, nodes * args.num_ranks)
        return _spawn(worker, args, rdv, node, args.num_ranks, kind, device_kind, node == 0)
    if kind == "torchrun":
        try:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            local_rank = int(os.environ["LOCAL_RANK"])
            num_local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
            addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        except (KeyError, ValueError) as exc:
            raise LaunchError(f"--launch torchrun needs torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and "
                              f"MASTER_PORT: {exc}") from None
        if rank == 0 and not quiet:
            print(f"{prefix} torchrun: {world} ranks, rendezvous {addr}:{port}", flush=True)
        return _run_one_rank(worker, args, rank, local_rank, num_local, _Rendezvous("env", addr, port, world), kind,
                             device_kind)
    # mpirun: this process is one rank.
    env_ = os.environ
    rank = int(env_.get("OMPI_COMM_WORLD_RANK", env_.get("PMI_RANK", "0")))
    world = int(env_.get("OMPI_COMM_WORLD_SIZE", env_.get("PMI_SIZE", "1")))
    local_rank = int(env_.get("OMPI_COMM_WORLD_LOCAL_RANK", env_.get("MPI_LOCALRANKID", str(rank))))
    num_local = int(env_.get("OMPI_COMM_WORLD_LOCAL_SIZE", str(world)))
    if "MASTER_ADDR" in env_:
        rdv = _Rendezvous("remote", env_["MASTER_ADDR"], int(env_.get("MASTER_PORT", "8361")), world)
    else:
        try:
            from mpi4py import MPI
        except ImportError:
            raise LaunchError("--launch mpirun without MASTER_ADDR/MASTER_PORT needs mpi4py to share the port") \
                from None
        comm = MPI.COMM_WORLD
        hosts = comm.allgather(socket.gethostname())
        if len(set(hosts)) != 1:
            raise LaunchError(f"ranks span several hosts {sorted(set(hosts))}: set MASTER_ADDR and MASTER_PORT")
        port = comm.bcast(free_port() if rank == 0 else None, root=0)
        rdv = _Rendezvous("loopback", "127.0.0.1", port, world)
    if rank == 0 and not quiet:
        print(f"{prefix} mpirun: {world} ranks, rendezvous {rdv.addr}:{rdv.port}", flush=True)
    return _run_one_rank(worker, args, rank, local_rank, num_local, rdv, kind, device_kind)


def _run_one_rank(worker, args, rank: int, local_rank: int, num_local: int, rdv: _Rendezvous, kind: str,
                  device_kind: str):
    """This process is one rank (mpirun, torchrun): run the worker, return rank 0's result."""
    try:
        ctx = _init_rank(rank, local_rank, num_local, rdv, args, kind, device_kind)
        result = worker(ctx, args)
    except BaseException:
        print(f"rank {rank}:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        raise
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    return result if rank == 0 else None
