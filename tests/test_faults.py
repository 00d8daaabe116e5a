"""Fault injection: a rank raises, exits or is SIGKILLed before or during a collective call.

Every other rank must raise a `deep_ep` `CommError` that names the Buffer method, the operation and
the missing peer, within the configured timeout (``DEEP_EP_TIMEOUT_S=5`` here), and every process must
exit by itself afterwards (the parent checks that no rank process is left).

The ranks are forked from a forkserver that has imported torch once (a fault scenario needs fresh
processes, and importing torch in each costs seconds on a small machine). All scenarios start
together and run concurrently (most of their time is spent waiting); each test then checks one.

Shrink mode: a rank killed during a low-latency dispatch is masked by the survivors, which keep
serving low-latency dispatch/combine among themselves; `low_latency_query_mask_buffer` reports it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import signal
import time
import traceback
from typing import Any, Dict, List

import pytest

TIMEOUT_S = 5.0               # DEEP_EP_TIMEOUT_S given to the ranks
ERROR_SLACK_S = 4.0           # an error may come this much after the timeout (diagnosis, loaded CI box)
EXIT_BOUND_S = TIMEOUT_S + 20.0  # every survivor must have exited this long after reporting

SKEWED_TIMEOUT_S = 2.0       # rank 0's timeout in the *-skewed scenario

HIDDEN = 128
TOKENS = 8
TOPK = 2

# name: (num_ranks, victim, operation, when, how, shrink)
SCENARIOS: Dict[str, tuple] = {
    "dispatch-before-raise-alive": (3, 2, "dispatch", "before", "raise_linger", False),
    # Rank 0 (which hosts the store) times out first (DEEP_EP_TIMEOUT_S=2 there), blames rank 2 and exits
    # before rank 1's timeout: rank 1 must still blame rank 2, not the rank that failed and left first.
    "dispatch-before-raise-alive-skewed": (3, 2, "dispatch", "before", "raise_linger", False),
    "dispatch-during-exit": (4, 2, "dispatch", "during", "exit", False),
    "dispatch-during-sigstop": (3, 1, "dispatch", "during", "stop", False),
    "combine-before-sigkill": (3, 1, "combine", "before", "kill", False),
    "combine-during-sigkill-rank0": (3, 0, "combine", "during", "kill", False),
    "ll_dispatch-before-exit": (3, 2, "ll_dispatch", "before", "exit", False),
    "ll_dispatch-during-sigkill": (3, 1, "ll_dispatch", "during", "kill", False),
    "ll_combine-before-raise": (3, 1, "ll_combine", "before", "raise", False),
    "ll_combine-during-exit": (3, 2, "ll_combine", "during", "exit", False),
    "shrink-ll_dispatch-during-sigkill": (4, 3, "ll_dispatch", "during", "kill", True),
    # Killed while gathering its rows into its shared-memory area (same-host transport), peers waiting.
    "dispatch-midgather-sigkill": (3, 1, "dispatch", "midgather", "kill", False),
    # The gloo transport (DEEP_EP_TRANSPORT=gloo; the scenarios above run on the default, shared memory).
    "dispatch-during-exit@gloo": (4, 2, "dispatch", "during", "exit", False),
    "dispatch-during-sigstop@gloo": (3, 1, "dispatch", "during", "stop", False),
    "ll_dispatch-during-sigkill@gloo": (3, 1, "ll_dispatch", "during", "kill", False),
    "dispatch-before-raise-alive-skewed@gloo": (3, 2, "dispatch", "before", "raise_linger", False),
    # Killed inside the row streams' exchange (deep_ep._rowsock), after a message header went out.
    "dispatch-midstream-sigkill@gloo": (3, 1, "dispatch", "midstream", "kill", False),
}

# The collective inside each operation at which a "during" victim dies: the operation has already
# completed an earlier exchange (counts / header) or posted its data when this one starts.
_DURING_OP = {
    "dispatch": "dispatch (data)",
    "combine": "combine (top-k weights)",
    "ll_dispatch": "low_latency_dispatch (data exchange)",
    "ll_combine": "low_latency_combine (data exchange)",
}
_METHOD = {"dispatch": "deep_ep.Buffer.dispatch", "combine": "deep_ep.Buffer.combine",
           "ll_dispatch": "deep_ep.Buffer.low_latency_dispatch",
           "ll_combine": "deep_ep.Buffer.low_latency_combine"}


class InjectedFault(RuntimeError):
    pass


def shrink_supported() -> bool:
    from deep_ep.engines import portable_ll
    return bool(getattr(portable_ll.PortableLowLatency, "masks_gone_peers", False))


# ------------------------------------------------------------------------------------------------
# Rank side

def _inputs(rank: int, num_ranks: int, step: int):
    import torch
    g = torch.Generator().manual_seed(1000 * step + rank)
    num_experts = 2 * num_ranks
    x = torch.randn(TOKENS, HIDDEN, generator=g).to(torch.bfloat16)
    scores = torch.rand(TOKENS, num_experts, generator=g)
    topk_idx = scores.topk(TOPK, dim=1).indices.to(torch.int64)
    topk_weights = torch.rand(TOKENS, TOPK, generator=g)
    return x, topk_idx, topk_weights, num_experts


def _normal_round(buf, rank, num_ranks, step, hook):
    x, topk_idx, topk_weights, num_experts = _inputs(rank, num_ranks, step)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, num_experts)
    hook("dispatch")
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                   num_tokens_per_expert=per_expert, topk_idx=topk_idx,
                                                   topk_weights=topk_weights)
    hook("combine")
    combined, _, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
    return combined


def _ll_round(buf, rank, num_ranks, step, hook):
    x, topk_idx, topk_weights, num_experts = _inputs(rank, num_ranks, step)
    hook("ll_dispatch")
    recv_x, recv_count, handle, _, _ = buf.low_latency_dispatch(x, topk_idx, TOKENS, num_experts, use_fp8=False)
    hook("ll_combine")
    combined, _, _ = buf.low_latency_combine(recv_x, topk_idx, topk_weights, handle)
    return x, topk_idx, topk_weights, recv_count, combined


def _die(how: str) -> None:
    if how == "exit":
        os._exit(17)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
    if how == "stop":  # frozen: the parent kills it once the others have reported
        os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(60)
    raise InjectedFault(f"injected fault ({how})")


def _ll_reference(x_all, topk_all, w_all, rank, alive):
    """combined[t] on `rank` when only the experts of `alive` ranks answer (identity experts)."""
    import torch
    num_experts_per_rank = 2
    x, topk, w = x_all[rank], topk_all[rank], w_all[rank]
    acc = torch.zeros(x.shape, dtype=torch.float32)
    for k in range(topk.size(1)):
        owner = torch.div(topk[:, k], num_experts_per_rank, rounding_mode="floor")
        ok = torch.tensor([int(o) in alive for o in owner.tolist()])
        acc = torch.where(ok.unsqueeze(1), acc + w[:, k:k + 1] * x.float(), acc)
    return acc.to(torch.bfloat16)


def _rank_main(rank: int, num_ranks: int, port: int, listener, name: str, results) -> None:
    import datetime
    timeout_s = SKEWED_TIMEOUT_S if "-skewed" in name and rank == 0 else TIMEOUT_S
    os.environ.update({"DEEP_EP_TIMEOUT_S": str(timeout_s), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
                       "DEEP_EP_TRANSPORT": "gloo" if name.endswith("@gloo") else "auto"})
    import torch
    import torch.distributed as dist
    import deep_ep
    torch.set_num_threads(1)
    _, victim, operation, when, how, shrink = SCENARIOS[name]
    ll = operation.startswith("ll_") or shrink
    started = [None]
    try:
        from deep_ep._comm import loopback_store
        dist.init_process_group("gloo", store=loopback_store(port, rank, num_ranks, 60, listener), rank=rank,
                                world_size=num_ranks, timeout=datetime.timedelta(seconds=60))
        num_experts = 2 * num_ranks
        rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(TOKENS, HIDDEN, num_ranks, num_experts) if ll else 0
        buf = deep_ep.Buffer(dist.group.WORLD, num_nvl_bytes=1 << 26, num_rdma_bytes=rdma, low_latency_mode=ll,
                             enable_shrink=shrink)
        run_round = _ll_round if ll else _normal_round
        run_round(buf, rank, num_ranks, 0, lambda op: None)    # warm-up: the buffer works
        armed = [True]

        if rank == victim and when == "during":
            comm = buf._comm
            original = comm._begin

            def begin(op: str) -> float:
                if armed[0] and op == _DURING_OP[operation]:
                    _die(how)
                return original(op)

            comm._begin = begin

        if rank == victim and when == "midgather":
            assert buf._comm.transport == "shm", buf.engine_reason
            comm = buf._comm
            original_send_buffer = comm.send_buffer

            def send_buffer(num_bytes, op="send buffer"):
                if armed[0] and started[0] is not None:
                    view = original_send_buffer(num_bytes, op)
                    view[: num_bytes // 2].fill_(7)  # half-way through writing its rows
                    _die(how)
                return original_send_buffer(num_bytes, op)

            comm.send_buffer = send_buffer

        if rank == victim and when == "midstream":
            streams = buf._comm.rows
            assert streams is not None, buf.engine_reason
            streams._native = None  # the victim sends through the Python loop (patched below); its peers do not
            original_send_some = streams._send_some

            def send_some(p, st, op, t0):
                if armed[0] and started[0] is not None:
                    st.out = st.out[:1]  # its header only: this peer will wait for rows that never come
                    original_send_some(p, st, op, t0)
                    _die(how)
                return original_send_some(p, st, op, t0)

            streams._send_some = send_some

        def hook(op: str) -> None:
            if op == operation:
                started[0] = time.monotonic()
                if rank == victim and when == "before":
                    _die(how)

        try:
            out = run_round(buf, rank, num_ranks, 1, hook)
        except InjectedFault:
            if how == "raise_linger":  # the victim's code swallowed the error and does something else
                results.put((rank, "victim", "raised and lingered"))
                time.sleep(TIMEOUT_S + 3)
                return
            raise
        if not shrink:
            results.put((rank, "no-error", "the faulted round completed"))
            return

        # Shrink mode: the faulted dispatch masked the victim; keep serving among the survivors.
        mask = torch.zeros(num_ranks, dtype=torch.int32)
        buf.low_latency_query_mask_buffer(mask)
        masks = [mask.tolist()]
        alive = {r for r in range(num_ranks) if r != victim}
        checked = 0
        for step in range(2, 5):
            x, topk, w, recv_count, combined = run_round(buf, rank, num_ranks, step, lambda op: None)
            xs = {r: _inputs(r, num_ranks, step) for r in range(num_ranks)}
            ref = _ll_reference({r: v[0] for r, v in xs.items()}, {r: v[1] for r, v in xs.items()},
                                {r: v[2] for r, v in xs.items()}, rank, alive)
            torch.testing.assert_close(combined.float(), ref.float(), rtol=0.02, atol=0.02)
            # Received counts: pairs routed to this rank's experts by the survivors only.
            want = torch.zeros(2, dtype=torch.int32)
            for r in alive:
                for e in xs[r][1].view(-1).tolist():
                    if e // 2 == rank:
                        want[e % 2] += 1
            assert recv_count.tolist() == want.tolist(), (recv_count.tolist(), want.tolist())
            checked += 1
        buf.low_latency_query_mask_buffer(mask)
        masks.append(mask.tolist())
        results.put((rank, "shrink-ok", {"masks": masks, "rounds": checked}))
    except BaseException as exc:  # noqa: BLE001 - report everything
        elapsed = time.monotonic() - started[0] if started[0] is not None else None
        later = ""
        if "buf" in locals():  # the Buffer failed: every later call raises at once, naming the cause
            t0 = time.monotonic()
            try:
                buf.get_dispatch_layout(torch.zeros((1, TOPK), dtype=torch.int64), 2 * num_ranks)
            except Exception as again:  # noqa: BLE001
                later = f"{type(again).__name__} after {time.monotonic() - t0:.2f} s: {again}"
        results.put((rank, "error", {"type": type(exc).__name__, "text": str(exc), "elapsed": elapsed,
                                     "missing": list(getattr(exc, "missing_ranks", [])), "later": later,
                                     "traceback": traceback.format_exc()}))
    finally:
        try:
            dist.destroy_process_group()
        except Exception:
            pass


# ------------------------------------------------------------------------------------------------
# Parent side

def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "deep_ep", "deep_ep.engines.portable_ll",
                                "test_faults"])
    return ctx


def run_scenarios(names: List[str], deadline_s: float = 90.0) -> Dict[str, Dict[str, Any]]:
    """Start every scenario at once; collect each rank's report, exit code and leftover state."""
    ctx = _context()
    runs: Dict[str, Dict[str, Any]] = {}
    from deep_ep._comm import start_loopback_ranks
    for name in names:
        num_ranks = SCENARIOS[name][0]
        q = ctx.Queue()
        # Rank 0 gets the store's socket already listening: no other scenario's process can take its port.
        procs = start_loopback_ranks(ctx, _rank_main, num_ranks, name, q, name=name + "-rank{rank}")
        runs[name] = {"procs": procs, "queue": q, "reports": {}, "reported_at": {}, "exited_at": {}, "exit": {},
                      "left": [], "start": time.monotonic()}
    end = time.monotonic() + deadline_s
    pending = dict(runs)
    while pending and time.monotonic() < end:
        for name, run in list(pending.items()):
            try:
                while True:
                    rank, kind, payload = run["queue"].get_nowait()
                    run["reports"][rank] = (kind, payload)
                    run["reported_at"][rank] = time.monotonic()
            except queue_module.Empty:
                pass
            for r, p in enumerate(run["procs"]):
                if p.exitcode is not None:
                    run["exited_at"].setdefault(r, time.monotonic())
            num_ranks, victim, _, _, how, _ = SCENARIOS[name]
            if how == "stop" and "stop_killed" not in run and len(run["reports"]) == num_ranks - 1:
                run["stop_killed"] = True
                run["procs"][victim].kill()  # the frozen rank cannot exit by itself
            if len(run["exited_at"]) == len(run["procs"]):
                pending.pop(name)
        time.sleep(0.05)
    for name, run in runs.items():
        # Reports that raced with the exit.
        try:
            while True:
                rank, kind, payload = run["queue"].get(timeout=0.2)
                run["reports"][rank] = (kind, payload)
        except queue_module.Empty:
            pass
        for r, p in enumerate(run["procs"]):
            if p.exitcode is None:
                run["left"].append(r)
                p.kill()
                p.join(5)
            run["exit"][r] = p.exitcode
            run.setdefault("pids", {})[r] = p.pid
        run["queue"].close()
    return runs


def _our_shm_files() -> List[str]:
    return sorted(f for f in os.listdir("/dev/shm") if "deep_ep" in f) if os.path.isdir("/dev/shm") else []


@pytest.fixture(scope="module")
def fault_runs():
    names = [n for n, s in SCENARIOS.items() if not s[5] or shrink_supported()]
    # Build the native CPU helpers here, if this cache has not got them yet: the ranks then load them,
    # instead of waiting in their set-up for one compiler run on a machine busy with all the scenarios.
    from deep_ep import _native
    _native.library()
    t0 = time.monotonic()
    runs = run_scenarios(names)
    for run in runs.values():
        run["shm_left"] = _our_shm_files()
    print(f"[test_faults] {len(names)} scenarios in {time.monotonic() - t0:.1f} s")
    return runs


def _describe(run) -> str:
    lines = []
    for r in sorted(run["exit"]):
        kind, payload = run["reports"].get(r, ("no report", ""))
        text = payload.get("traceback", payload.get("text")) if isinstance(payload, dict) else payload
        lines.append(f"--- rank {r}: exit {run['exit'][r]}, {kind}\n{text}")
    return "\n".join(lines)


@pytest.mark.parametrize("name", [n for n, s in SCENARIOS.items() if not s[5]])
def test_fault_is_reported_by_every_other_rank(fault_runs, name):
    num_ranks, victim, operation, when, how, _ = SCENARIOS[name]
    run = fault_runs[name]
    info = _describe(run)
    assert not run["left"], f"rank(s) {run['left']} did not exit by themselves and were killed\n{info}"
    for r, t in run["reported_at"].items():
        lag = run["exited_at"][r] - t
        assert lag <= EXIT_BOUND_S, f"rank {r} exited {lag:.1f} s after reporting (bound {EXIT_BOUND_S} s)\n{info}"
    for r, pid in run["pids"].items():
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", \
            f"rank {r} (pid {pid}) is still there\n{info}"
    assert not run["shm_left"], f"files left in /dev/shm: {run['shm_left']}"
    if how in ("kill", "stop"):
        assert run["exit"][victim] == -signal.SIGKILL, info
    elif how == "exit":
        assert run["exit"][victim] == 17, info
    method = _METHOD[operation]
    for r in range(num_ranks):
        if r == victim:
            continue
        kind, payload = run["reports"].get(r, ("no report", None))
        assert kind == "error", f"rank {r}: expected a CommError, got {kind}\n{info}"
        text = payload["text"]
        print(f"[{name}] rank {r} after {payload['elapsed']:.2f} s:\n    {text}")
        assert payload["type"] == "CommError", info
        assert text.startswith(f"{method}: `"), f"the error must name the method first:\n{text}"
        assert f"failed on rank {r} of {num_ranks}" in text, text
        assert f"peer rank(s) [{victim}] did not answer" in text, text
        assert f"Rank {victim}: " in text and "DEEP_EP_TIMEOUT_S" in text, text
        assert payload["missing"] == [victim], (payload["missing"], text)
        if how == "raise_linger":
            assert "alive, but it is between calls" in text, text
        elif how == "stop":
            assert "alive, but frozen: no heartbeat" in text, text
        elif how == "raise":  # the victim's Buffer is collected as its exception unwinds, then it exits
            assert "process is gone" in text or "closed its deep_ep Buffer" in text, text
        else:
            assert "process is gone" in text, text
        if "-skewed" in name and r == 1:
            assert f"Rank 0 failed in `dispatch (count exchange)` too, blaming rank(s) [{victim}]" in text, text
        elapsed = payload["elapsed"]
        assert elapsed is not None and elapsed <= TIMEOUT_S + ERROR_SLACK_S, (elapsed, text)
        if how in ("exit", "kill"):
            # A dead peer is noticed long before the timeout (its process is watched).
            assert elapsed < TIMEOUT_S, (elapsed, text)
        later = payload["later"]
        assert later.startswith("CommError after 0.0") and "this Buffer failed earlier: " in later and \
            "create a new Buffer" in later, later
        # Every survivor exits soon after its error.
    assert all(code == 0 for r, code in run["exit"].items() if r != victim), info


@pytest.mark.skipif(not shrink_supported(), reason="the low-latency engine does not mask gone peers")
def test_shrink_masks_killed_rank_and_keeps_serving(fault_runs):
    name = "shrink-ll_dispatch-during-sigkill"
    num_ranks, victim = SCENARIOS[name][:2]
    run = fault_runs[name]
    info = _describe(run)
    assert not run["left"], info
    assert run["exit"][victim] == -signal.SIGKILL, info
    for r in range(num_ranks):
        if r == victim:
            continue
        kind, payload = run["reports"].get(r, ("no report", None))
        assert kind == "shrink-ok", f"rank {r}: {kind}\n{info}"
        want = [1 if q == victim else 0 for q in range(num_ranks)]
        assert payload["masks"] == [want, want], payload
        assert payload["rounds"] == 3
        assert run["exit"][r] == 0, info


def test_diagnosis_reads_heartbeats_renewed_after_the_failure():
    """A failure diagnosed right after it began must not describe a live peer from a heartbeat older than
    the failure: on a loaded host a heartbeat thread can be late by more than a period (CI once blamed a
    live peer as "it has made no deep_ep call since set-up", thirteen calls in). The diagnosis waits for a
    renewed beat from each live peer, and for a frozen one only until it counts as frozen."""
    from deep_ep._comm import Communicator, _Activity

    comm = Communicator.__new__(Communicator)
    comm._peer_states, comm._period, comm._stall_s, comm._store_lost = {}, 0.2, 1.0, False
    t0 = time.monotonic()
    late_s = 0.6  # peer 1's next beat comes this late: past the 1.5 periods a fixed wait would give it

    def beat(n: int, seq: int, op: str) -> str:
        act = _Activity()
        act.beat, act.seq, act.op, act.inflight = n, seq, op, 1 if seq else 0
        return act.encode(1234)

    def read(peers):
        now = time.monotonic()
        for p in peers:
            if p == 1:
                text = beat(1, 0, "") if now - t0 < late_s else beat(2, 13, "dispatch (count exchange)")
            else:
                text = beat(7, 13, "dispatch (count exchange)")  # peer 2 is frozen: its beat never changes
            comm._update_state(p, text, now)

    comm._read_peers = read
    comm._gone = lambda peers: {}
    comm._await_fresh_heartbeats([1, 2])
    waited = time.monotonic() - t0
    state = comm._peer_states[1]
    assert state.seq == 13 and state.busy, state.doing()
    assert late_s <= waited, waited
    # Bounded: a peer that never beats again is let go once it counts as frozen.
    assert waited < comm._stall_s + 2 * comm._period + 1.0, waited
