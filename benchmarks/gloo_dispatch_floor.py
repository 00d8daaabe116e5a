#!/usr/bin/env python3
"""Where the gloo transport's dispatch time goes: the floor of any dispatch whose rows gloo carries.

Issue 16's gloo target (dispatch BF16 >= 0.70x the raw gloo all-to-all of its bytes) is not met:
0.56-0.62x in ``make bench`` with the rows on gloo, 0.63-0.67x since they take deep_ep's own TCP
streams (``deep_ep/_rowsock.py``, which this measurement motivated). This script measures, on local ranks over 127.0.0.1, the same rows
(the bench shape by default: 1024 tokens/rank, hidden 2048, top-8 of 64 experts) moved three ways,
each round after a barrier, slowest rank, median of rounds; and the CPU time (user + system, every
thread of the process) per rank per round:

* **raw**: gloo ``all_to_all_single`` of pre-arranged contiguous buffers (the bench's baseline);
* **gather + gloo**: the rows gathered by destination (``index_select``), then that all-to-all; the
  least any dispatch must do when gloo moves its rows (a gloo message is one contiguous buffer), and
  still without the counts exchange and metadata a real dispatch needs;
* **sockets**: plain TCP sockets between the ranks, each destination's rows sent with ``sendmsg``
  straight from ``x`` (one iovec per run of consecutive tokens): the kernel's copy into the socket
  does the gather. This rank's own rows are copied from ``x``. Not a transport (no timeouts, no
  failure handling): what a project-owned socket transport could reach.

Every rank checks that the socket path received exactly what the gloo path did.

    python benchmarks/gloo_dispatch_floor.py                 # 4 ranks, the bench shape
    python benchmarks/gloo_dispatch_floor.py --num-ranks 8 --out benchmarks/results/gloo_floor_8.txt

On the 2-core machine, 4 ranks, 2026-12-03 (three runs): raw 12.2-12.7 ms (5.6-6.0 ms CPU/rank),
gather + gloo 0.70-0.74x raw (7.9-8.1 ms CPU), sockets 0.85-0.99x raw (6.2-6.6 ms CPU). The cores are
saturated, so time follows CPU work: the gather adds ~2.5 ms of CPU per rank to gloo's own copies,
which leaves ~0.7x before the counts round, the metadata and the bookkeeping of a real dispatch.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_IOV_MAX = 1000  # iovecs per sendmsg call (Linux allows 1024)


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _runs(tokens: List[int]) -> List[tuple]:
    """Sorted token ids -> ``[(first, last + 1), ...]`` runs of consecutive ids."""
    out = []
    i = 0
    while i < len(tokens):
        j = i
        while j + 1 < len(tokens) and tokens[j + 1] == tokens[j] + 1:
            j += 1
        out.append((tokens[i], tokens[j] + 1))
        i = j + 1
    return out


def _sendmsg_all(sock: socket.socket, views: List[memoryview]) -> None:
    """Send every byte of `views` in order (sendmsg may send part of them)."""
    for start in range(0, len(views), _IOV_MAX):
        chunk = views[start:start + _IOV_MAX]
        while chunk:
            sent = sock.sendmsg(chunk)
            rest = []
            for v in chunk:
                if sent >= len(v):
                    sent -= len(v)
                else:
                    rest.append(v[sent:])
                    sent = 0
            chunk = rest


def _mesh(store, rank: int, num_ranks: int) -> Dict[int, socket.socket]:
    """One TCP connection per pair of ranks on 127.0.0.1 (the lower rank listens)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(num_ranks)
    store.set(f"floor_port_{rank}", str(listener.getsockname()[1]))
    socks: Dict[int, socket.socket] = {}
    for peer in range(rank):
        s = socket.create_connection(("127.0.0.1", int(store.get(f"floor_port_{peer}"))))
        s.sendall(rank.to_bytes(4, "little"))
        socks[peer] = s
    for _ in range(rank + 1, num_ranks):
        conn, _ = listener.accept()
        socks[int.from_bytes(conn.recv(4, socket.MSG_WAITALL), "little")] = conn
    listener.close()
    for s in socks.values():
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return socks


def _rank(rank: int, num_ranks: int, port: int, listener, args: argparse.Namespace, results) -> None:
    torch.set_num_threads(1)
    from deep_ep._comm import loopback_store
    store = loopback_store(port, rank, num_ranks, 120, listener)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=num_ranks)
    group = dist.new_group(list(range(num_ranks)))
    socks = _mesh(store, rank, num_ranks)

    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    x = torch.randn(args.num_tokens, args.hidden, generator=gen).to(torch.bfloat16)
    topk = torch.rand(args.num_tokens, args.num_experts, generator=gen).topk(args.num_topk, dim=1).indices
    in_rank = torch.zeros(args.num_tokens, num_ranks, dtype=torch.bool)
    in_rank.scatter_(1, topk // (args.num_experts // num_ranks), True)
    n_send = in_rank.sum(0).tolist()
    table = [torch.zeros(num_ranks, dtype=torch.int64) for _ in range(num_ranks)]
    dist.all_gather(table, torch.tensor(n_send), group=group)
    n_recv = [int(table[s][rank]) for s in range(num_ranks)]

    row_bytes = args.hidden * 2
    x_bytes = x.view(torch.uint8)
    _, tok_ids = in_rank.t().nonzero(as_tuple=True)
    recv_at = [0]
    for n in n_recv:
        recv_at.append(recv_at[-1] + n)
    send_at = [0]
    for n in n_send:
        send_at.append(send_at[-1] + n)
    staging = torch.empty(len(tok_ids), row_bytes, dtype=torch.uint8)
    recv = torch.empty(sum(n_recv), row_bytes, dtype=torch.uint8)
    pre_arranged = torch.randint(0, 255, (sum(n_send), row_bytes), dtype=torch.uint8)
    x_view = memoryview(x_bytes.reshape(-1).numpy())
    recv_view = memoryview(recv.reshape(-1).numpy())
    runs = {d: _runs(tok_ids[send_at[d]:send_at[d + 1]].tolist()) for d in range(num_ranks)}

    def raw() -> None:
        dist.all_to_all_single(recv, pre_arranged, n_recv, n_send, group=group)

    def gather_gloo() -> None:
        torch.index_select(x_bytes, 0, tok_ids, out=staging)
        dist.all_to_all_single(recv, staging, n_recv, n_send, group=group)

    def send_rows(peer: int) -> None:
        _sendmsg_all(socks[peer], [x_view[a * row_bytes:b * row_bytes] for a, b in runs[peer]])

    def sockets() -> None:
        senders = [threading.Thread(target=send_rows, args=(p,)) for p in range(num_ranks) if p != rank]
        for t in senders:
            t.start()
        torch.index_select(x_bytes, 0, tok_ids[send_at[rank]:send_at[rank + 1]],
                           out=recv[recv_at[rank]:recv_at[rank + 1]])
        for p in range(num_ranks):
            if p != rank:
                view = recv_view[recv_at[p] * row_bytes:recv_at[p + 1] * row_bytes]
                got = 0
                while got < len(view):
                    got += socks[p].recv_into(view[got:])
        for t in senders:
            t.join()

    # The socket path must deliver exactly what gloo delivers.
    sockets()
    via_sockets = recv.clone()
    gather_gloo()
    same = torch.equal(via_sockets, recv)

    ways = {"raw": raw, "gather + gloo": gather_gloo, "sockets": sockets}
    times: Dict[str, List[float]] = {k: [] for k in ways}
    cpus: Dict[str, List[float]] = {k: [] for k in ways}
    for _ in range(args.repeats):  # interleaved, so that a change in machine load hits every way alike
        for name, fn in ways.items():
            t_list, c_list = [], []
            for i in range(args.warmup + args.iters):
                dist.barrier(group=group)
                c0, t0 = _cpu_s(), time.perf_counter()
                fn()
                t1, c1 = time.perf_counter(), _cpu_s()
                if i >= args.warmup:
                    t_list.append(t1 - t0)
                    c_list.append(c1 - c0)
            slowest = torch.tensor([statistics.median(t_list)])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
            cpu = torch.tensor([statistics.median(c_list)])
            dist.all_reduce(cpu, group=group)
            times[name].append(float(slowest) * 1e3)
            cpus[name].append(float(cpu) / num_ranks * 1e3)
    results.put((rank, same, times, cpus))
    for s in socks.values():
        s.close()
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-ranks", type=int, default=4)
    ap.add_argument("--num-tokens", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--num-topk", type=int, default=8)
    ap.add_argument("--num-experts", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10, help="timed rounds per repeat")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (the table shows their median)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    from deep_ep._comm import start_loopback_ranks
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = start_loopback_ranks(ctx, _rank, args.num_ranks, args, results)
    reports = {}
    deadline = time.monotonic() + 900
    try:
        while len(reports) < args.num_ranks:
            try:
                rank, same, times, cpus = results.get(timeout=1.0)
            except Exception:  # queue.Empty: a rank that died does not report
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    print(f"gloo_dispatch_floor: rank(s) {dead} failed (see above)" if dead else
                          "gloo_dispatch_floor: no result within 900 s", file=sys.stderr)
                    return 2
                continue
            reports[rank] = (same, times, cpus)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    same = all(r[0] for r in reports.values())
    _, times, cpus = reports[0]
    base = statistics.median(times["raw"])
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    lines = [f"gloo dispatch floor{f' (commit {commit})' if commit else ''}: {args.num_ranks} ranks, {args.num_tokens} tokens/rank, hidden {args.hidden}, "
             f"top-{args.num_topk} of {args.num_experts}; {os.cpu_count()} cores; slowest rank, median of "
             f"{args.repeats} x {args.iters} rounds; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"{'way':<16} {'time (ms)':>10} {'raw/way':>8} {'CPU ms/rank':>12}"]
    for name in times:
        t = statistics.median(times[name])
        lines.append(f"{name:<16} {t:>10.2f} {base / t:>8.3f} {statistics.median(cpus[name]):>12.2f}")
    lines.append(f"socket path delivered the same bytes as gloo on every rank: {same}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
