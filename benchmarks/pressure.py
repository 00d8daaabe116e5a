#!/usr/bin/env python3
"""deep_ep pressure run: many iterations of random shapes and routings on local ranks.

Every iteration draws a fresh problem (hidden size, number of experts, top-k, tokens per rank
including zero, BF16 or FP8 input, with or without top-k, `num_worst_tokens`, `expert_alignment`,
channel count, -1 slots) and runs, on every rank:

* normal mode: ``get_dispatch_layout``, ``dispatch``, ``combine`` (identity experts: the combined
  rows must equal ``x`` times the number of ranks each token went to, and the combined top-k weights
  the original ones);
* handle reuse: a cached ``dispatch`` and a ``combine`` with the handle of an earlier iteration (up to
  four back, other calls in between) must reproduce that iteration's outputs bit for bit;
* low-latency mode, every third iteration: ``low_latency_dispatch``/``low_latency_combine`` (BF16
  or FP8), checked against the weighted sum of identity experts.

Every output and every handle field is hashed (SHA-256). The whole run is done twice with the same
seed (the second time on the same Buffer, after the first run's state): the hashes must be equal
(determinism). Memory must stay flat: resident set size (``/proc/self/statm``) after warm-up vs at
the end, the number of live tensors, threads and open file descriptors (and CUDA memory when the
ranks run on a GPU).

    python benchmarks/pressure.py --iters 1000            # the long run (4 ranks, two nodes of 2)
    python benchmarks/pressure.py --iters 100 --num-ranks 3 --ranks-per-node 0

The short version runs in CI as ``tests/test_pressure.py``. Ranks talk over 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import random
import sys
import threading
import time
import traceback
from datetime import timedelta
from typing import Any, Dict, List

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

LL_TOKENS = 32          # num_max_dispatch_tokens_per_rank of the low-latency calls
LL_HIDDEN = 256
POOL = 4                # earlier iterations whose handles stay available for reuse
WARMUP_FRACTION = 0.2   # memory is measured after this share of the first run


# --------------------------------------------------------------------------------------------------
# Memory probes

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensors() -> int:
    import warnings
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on deprecated torch.distributed shims warns
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def memory_snapshot(device: torch.device) -> Dict[str, int]:
    snap = {"rss": rss_bytes(), "tensors": live_tensors(), "threads": threading.active_count(), "fds": open_fds()}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        snap["cuda_allocated"] = torch.cuda.memory_allocated(device)
    return snap


# --------------------------------------------------------------------------------------------------
# Hashing

class Hasher:
    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def add(self, name: str, value: Any) -> None:
        self.h.update(name.encode())
        if value is None:
            self.h.update(b"<None>")
        elif isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            self.h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                self.h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, (tuple, list)):
            self.h.update(f"seq{len(value)}".encode())
            for i, v in enumerate(value):
                self.add(f"{name}[{i}]", v)
        else:
            self.h.update(repr(value).encode())

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def digest(**fields: Any) -> str:
    h = Hasher()
    for name in sorted(fields):
        h.add(name, fields[name])
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# One problem

def draw_problem(seed: int, it: int, rank: int, num_ranks: int, device: torch.device) -> Dict[str, Any]:
    """The same shared parameters on every rank, per-rank data."""
    shared = random.Random(seed * 1_000_003 + it)
    p: Dict[str, Any] = {}
    p["fp8"] = shared.random() < 0.3
    p["hidden"] = shared.choice([128, 256, 512, 1024] if p["fp8"] else [8, 24, 128, 136, 256, 512, 1000])
    p["num_experts"] = num_ranks * shared.choice([1, 2, 3, 4, 8])
    p["num_topk"] = shared.randint(1, min(8, p["num_experts"]))
    p["with_topk"] = shared.random() < 0.85
    p["worst"] = p["with_topk"] and shared.random() < 0.15
    p["alignment"] = shared.choice([1, 1, 2, 4, 32])
    p["num_sms"] = shared.choice([None, None, 2, 4, 8, 24])
    p["max_tokens"] = shared.choice([0, 1, 5, 16, 48])
    p["minus_one"] = shared.choice([0.0, 0.0, 0.1, 0.5])
    p["reuse"] = shared.random() < 0.6
    p["reuse_pick"] = shared.randrange(POOL)
    p["ll"] = it % 3 == 2
    p["ll_fp8"] = shared.random() < 0.5
    p["ll_topk"] = shared.randint(1, min(8, num_ranks * 2))

    local = torch.Generator().manual_seed(seed * 7919 + it * 131 + rank)
    T = int(torch.randint(0, p["max_tokens"] + 1, (1,), generator=local))
    E, K, H = p["num_experts"], p["num_topk"], p["hidden"]
    topk_idx = torch.rand(T, E, generator=local).argsort(dim=1)[:, :K].to(torch.int64).contiguous()
    if p["minus_one"] and T:
        drop = torch.rand(T, K, generator=local) < p["minus_one"]
        topk_idx = torch.where(drop, torch.full_like(topk_idx, -1), topk_idx)
    x = torch.randn(T, H, generator=local).to(torch.bfloat16)
    p["x_bf16"] = x.to(device)
    if p["fp8"]:
        xf = x.float().view(T, H // 128, 128)
        amax = xf.abs().amax(dim=2).clamp(min=1e-4)
        scales = amax / 448.0
        data = (xf / scales.unsqueeze(2)).to(torch.float8_e4m3fn).view(T, H)
        # As they come (for T == 0 and H == 128 amax() gives strides (1, 0): the engine must cope).
        p["x"] = (data.to(device), scales.contiguous().to(device))
    else:
        p["x"] = x.to(device)
    p["topk_idx"] = topk_idx.to(device)
    p["topk_weights"] = torch.rand(T, K, generator=local).to(device)

    # Low-latency inputs (fixed layout sizes).
    ll_T = int(torch.randint(0, LL_TOKENS + 1, (1,), generator=local))
    ll_E = num_ranks * 2
    p["ll_x"] = torch.randn(ll_T, LL_HIDDEN, generator=local).to(torch.bfloat16).to(device)
    ll_idx = torch.rand(ll_T, ll_E, generator=local).argsort(dim=1)[:, :p["ll_topk"]].to(torch.int64).contiguous()
    if ll_T:
        ll_idx = torch.where(torch.rand(ll_T, p["ll_topk"], generator=local) < 0.1, torch.full_like(ll_idx, -1),
                             ll_idx)
    p["ll_topk_idx"] = ll_idx.to(device)
    p["ll_topk_weights"] = torch.rand(ll_T, p["ll_topk"], generator=local).to(device)
    return p


def _dequant(x) -> torch.Tensor:
    if isinstance(x, tuple):
        data, scales = x
        H = data.size(1)
        return (data.float().view(data.size(0), H // 128, 128) * scales.float().unsqueeze(2)).view(data.size(0), H)
    return x.float()


def run_iteration(buf, it: int, seed: int, rank: int, num_ranks: int, device: torch.device,
                  pool: List[Dict[str, Any]], check: bool) -> str:
    """One iteration; returns the hash of everything it produced."""
    import deep_ep
    p = draw_problem(seed, it, rank, num_ranks, device)
    h = Hasher()
    x, topk_idx, topk_weights, E = p["x"], p["topk_idx"], p["topk_weights"], p["num_experts"]
    T = topk_idx.size(0)

    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, E)
    h.add("layout", (per_rank, per_rdma, per_expert, in_rank))
    config = deep_ep.Config(p["num_sms"]) if p["num_sms"] else None
    kwargs = dict(num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
                  num_tokens_per_expert=per_expert, expert_alignment=p["alignment"], config=config)
    if p["with_topk"]:
        kwargs.update(topk_idx=topk_idx, topk_weights=topk_weights)
    if p["worst"]:
        kwargs["num_worst_tokens"] = num_ranks * max(p["max_tokens"], 1)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(x, **kwargs)
    h.add("dispatch", (recv_x, recv_idx, recv_w, counts, handle))

    # Identity experts: send the (dequantized) rows back.
    rows = _dequant(recv_x).to(torch.bfloat16)
    combined, combined_w, _ = buf.combine(rows, handle, topk_weights=recv_w)
    h.add("combine", (combined, combined_w))
    if check:
        hits = in_rank.sum(dim=1, dtype=torch.float32).unsqueeze(1)
        want = _dequant(x).to(torch.bfloat16).float() * hits
        torch.testing.assert_close(combined.float(), want, rtol=2e-2, atol=2e-2)
        if p["with_topk"]:
            want_w = torch.where(topk_idx >= 0, topk_weights, torch.zeros_like(topk_weights))
            torch.testing.assert_close(combined_w, want_w, rtol=0, atol=0)

    # Handle reuse: an earlier iteration's handle must still reproduce that iteration's outputs.
    if p["reuse"] and len(pool) == POOL:
        old = pool[p["reuse_pick"]]
        cached = buf.dispatch(old["x"], handle=old["handle"])[0]
        again, again_w, _ = buf.combine(old["rows"], old["handle"], topk_weights=old["recv_w"])
        h.add("reuse", (cached, again, again_w))
        if check:
            got = digest(recv_x=cached)
            assert got == old["recv_digest"], f"iteration {it}: cached dispatch with the handle of iteration " \
                                              f"{old['it']} differs from that iteration's dispatch"
            assert digest(c=again, w=again_w) == old["combine_digest"], \
                f"iteration {it}: combine with the handle of iteration {old['it']} differs from that iteration's"
    pool.append({"it": it, "x": x, "handle": handle, "rows": rows, "recv_w": recv_w,
                 "recv_digest": digest(recv_x=recv_x), "combine_digest": digest(c=combined, w=combined_w)})
    if len(pool) > POOL:
        pool.pop(0)

    if p["ll"]:
        lx, lidx, lw = p["ll_x"], p["ll_topk_idx"], p["ll_topk_weights"]
        ll_E = num_ranks * 2
        recv, recv_count, ll_handle, _, _ = buf.low_latency_dispatch(lx, lidx, LL_TOKENS, ll_E, use_fp8=p["ll_fp8"])
        # Only the first recv_count rows of each expert are defined.
        data = recv[0] if isinstance(recv, tuple) else recv
        rows_of = [data[e, :int(c)] for e, c in enumerate(recv_count.tolist())]
        if isinstance(recv, tuple):
            scales = recv[1]
            rows_of += [scales[e, :int(c)] for e, c in enumerate(recv_count.tolist())]
        h.add("ll_dispatch", (rows_of, recv_count, ll_handle[0], ll_handle[1], ll_handle[2:]))
        if isinstance(recv, tuple):
            d, s = recv
            expert_out = (d.float().view(*d.shape[:2], -1, 128) * s.float().unsqueeze(-1)).view(d.shape)
            expert_out = expert_out.to(torch.bfloat16)
        else:
            expert_out = recv
        ll_out, _, _ = buf.low_latency_combine(expert_out, lidx, lw, ll_handle)
        h.add("ll_combine", ll_out)
        if check:
            valid = (lidx >= 0).float()
            want = (lw * valid).sum(dim=1, keepdim=True) * lx.float()
            tol = 0.15 if p["ll_fp8"] else 2e-2
            torch.testing.assert_close(ll_out.float(), want, rtol=tol, atol=tol)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# One rank

def pressure_rank(rank: int, num_ranks: int, group, iters: int, seed: int, repeats: int = 2,
                  check: bool = True, device: str = "cpu", log_every: int = 0) -> Dict[str, Any]:
    """Run `repeats` times `iters` iterations with the same seed on one Buffer; returns the digests,
    memory snapshots and timings of this rank."""
    import deep_ep
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    rdma_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(LL_TOKENS, LL_HIDDEN, num_ranks, num_ranks * 2)
    per_node = int(os.environ.get("DEEP_EP_RANKS_PER_NODE") or num_ranks)
    if per_node < num_ranks:  # across nodes normal mode needs the RDMA hint of every config drawn (hidden <= 1024)
        configs = (deep_ep.Config(24), deep_ep.Buffer.get_dispatch_config(num_ranks),
                   deep_ep.Buffer.get_combine_config(num_ranks))
        rdma_bytes = max([rdma_bytes] + [c.get_rdma_buffer_size_hint(1024 * 2, num_ranks, num_ranks_per_node=per_node)
                                         for c in configs])
    buf = deep_ep.Buffer(group, num_nvl_bytes=1 << 28, num_rdma_bytes=rdma_bytes, low_latency_mode=True)  # >= the hints
    warm = max(1, int(iters * WARMUP_FRACTION))
    result: Dict[str, Any] = {"digests": [], "per_iter": [], "seconds": []}
    snap_warm = None
    for rep in range(repeats):
        pool: List[Dict[str, Any]] = []
        run = hashlib.sha256()
        per_iter = []
        t0 = time.perf_counter()
        for it in range(iters):
            d = run_iteration(buf, it, seed, rank, num_ranks, dev, pool, check)
            per_iter.append(d)
            run.update(d.encode())
            if rep == 0 and it + 1 == warm:
                snap_warm = memory_snapshot(dev)
            if log_every and rank == 0 and (it + 1) % log_every == 0:
                print(f"[pressure] repeat {rep} iteration {it + 1}/{iters}, {time.perf_counter() - t0:.1f} s, "
                      f"rss {rss_bytes() / 2**20:.1f} MiB", flush=True)
        result["seconds"].append(time.perf_counter() - t0)
        result["digests"].append(run.hexdigest())
        result["per_iter"].append(per_iter)
    result["snap_warm"] = snap_warm
    result["snap_end"] = memory_snapshot(dev)
    return result


def compare(results: List[Dict[str, Any]], rss_tolerance: int, tensor_tolerance: int = 8) -> List[str]:
    """Problems found in the per-rank results (empty when the run passed)."""
    problems = []
    for rank, res in enumerate(results):
        digests = res["digests"]
        if len(set(digests)) != 1:
            first = next(i for i, (a, b) in enumerate(zip(*res["per_iter"])) if len(set((a, b))) > 1)
            problems.append(f"rank {rank}: results differ between repeats with the same seed (first at "
                            f"iteration {first})")
        warm, end = res["snap_warm"], res["snap_end"]
        if end["rss"] - warm["rss"] > rss_tolerance:
            problems.append(f"rank {rank}: RSS grew by {(end['rss'] - warm['rss']) / 2**20:.1f} MiB after warm-up "
                            f"(tolerance {rss_tolerance / 2**20:.0f} MiB)")
        if end["tensors"] - warm["tensors"] > tensor_tolerance:
            problems.append(f"rank {rank}: live tensors grew from {warm['tensors']} to {end['tensors']}")
        if end["threads"] != warm["threads"]:
            problems.append(f"rank {rank}: threads went from {warm['threads']} to {end['threads']}")
        if end["fds"] > warm["fds"]:
            problems.append(f"rank {rank}: open file descriptors grew from {warm['fds']} to {end['fds']}")
        if "cuda_allocated" in end and end["cuda_allocated"] - warm["cuda_allocated"] > rss_tolerance:
            problems.append(f"rank {rank}: CUDA memory grew from {warm['cuda_allocated']} to "
                            f"{end['cuda_allocated']} bytes")
    return problems


# --------------------------------------------------------------------------------------------------
# Launcher (the script)

def _worker(rank: int, num_ranks: int, port: int, listener, args: Dict[str, Any], queue) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    try:
        from deep_ep._comm import loopback_store  # torch's tcp:// init would listen on every interface
        dist.init_process_group("gloo", store=loopback_store(port, rank, num_ranks, 300, listener), rank=rank,
                                world_size=num_ranks, timeout=timedelta(seconds=300))
        res = pressure_rank(rank, num_ranks, dist.group.WORLD, args["iters"], args["seed"], args["repeats"],
                            not args["no_check"], args["device"], args["log_every"])
        queue.put((rank, True, res))
    except BaseException:  # noqa: BLE001
        queue.put((rank, False, traceback.format_exc()))
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def main() -> int:
    import torch.multiprocessing as mp
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=2, help="runs with the same seed (hashes must match)")
    ap.add_argument("--num-ranks", type=int, default=4)
    ap.add_argument("--ranks-per-node", type=int, default=2, help="0: one node (default 2: two nodes of 2)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (ranks share the visible GPUs)")
    ap.add_argument("--rss-tolerance-mib", type=float, default=48.0)
    ap.add_argument("--timeout-s", type=float, default=60.0, help="DEEP_EP_TIMEOUT_S for the ranks")
    ap.add_argument("--no-check", action="store_true", help="skip the per-iteration correctness checks")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--json", help="write the summary here")
    a = ap.parse_args()
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 31)
    print(f"[pressure] seed {seed}, {a.num_ranks} ranks, {a.iters} iterations x {a.repeats}", flush=True)
    env = {"DEEP_EP_TIMEOUT_S": str(a.timeout_s), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    if a.ranks_per_node:
        env["DEEP_EP_RANKS_PER_NODE"] = str(a.ranks_per_node)
    os.environ.update(env)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    from deep_ep._comm import start_loopback_ranks  # rank 0 gets the store's socket already listening
    args = {"iters": a.iters, "seed": seed, "repeats": a.repeats, "no_check": a.no_check, "device": a.device,
            "log_every": a.log_every}
    procs = start_loopback_ranks(ctx, _worker, a.num_ranks, args, queue)
    results: Dict[int, Any] = {}
    failures = []
    try:
        while len(results) + len(failures) < a.num_ranks:
            try:
                rank, ok, payload = queue.get(timeout=5)
            except Exception:
                if any(p.exitcode not in (None, 0) for p in procs):
                    failures.append("a rank process died: exit codes " + str([p.exitcode for p in procs]))
                    break
                continue
            if ok:
                results[rank] = payload
            else:
                failures.append(f"rank {rank}:\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    if failures:
        print("[pressure] FAILED\n" + "\n".join(failures), flush=True)
        return 1
    ordered = [results[r] for r in range(a.num_ranks)]
    problems = compare(ordered, int(a.rss_tolerance_mib * 2**20))
    summary = {"seed": seed, "iters": a.iters, "repeats": a.repeats, "num_ranks": a.num_ranks,
               "seconds": [r["seconds"] for r in ordered],
               "rss_mib": [(r["snap_warm"]["rss"] / 2**20, r["snap_end"]["rss"] / 2**20) for r in ordered],
               "digest_rank0": ordered[0]["digests"][0], "problems": problems}
    print(json.dumps(summary, indent=1), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)
    if problems:
        print("[pressure] FAILED:\n  " + "\n  ".join(problems), flush=True)
        return 1
    print("[pressure] passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
