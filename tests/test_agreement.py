"""Ranks that disagree, and a rank that raises, on 2 and 4 gloo ranks (issue 14, docs/reliability.md).

Fault classes, each in normal dispatch, cached dispatch, combine, low-latency dispatch and combine:

* ``shape`` / ``dtype`` / ``flag`` / ``handle``: one rank passes a different hidden size, number of experts,
  top-k, dtype, flag, or the handle of another dispatch. Before the fix gloo aborted the process
  (SIGABRT, "Received data size doesn't match expected size") or the data was silently misread. Now every
  rank raises the same error naming the argument and each rank's value, and the Buffer stays usable.
* ``local``: one rank's arguments fail their checks (out-of-range expert id, wrong row count). Before,
  the others waited for the whole timeout and the Buffer died. Now every other rank raises at once,
  naming that rank and its message, and the Buffer stays usable.
* ``late``: one rank raises after its peers began to exchange data with it (an exception injected
  between two collectives). Every other rank raises a `CommError` naming that rank and its message
  within a heartbeat period; every later call raises "this Buffer failed earlier"; ``destroy()`` works.

After each fault every rank runs a checked dispatch/combine and low-latency round (the Buffer usable, or a
new one after ``late``). ``DEEP_EP_TIMEOUT_S=10``: every error must come within 10 s of the fault, and
every process must exit by itself with code 0 (``run_ranks(check_exit=True)``).
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Tuple

import pytest

from dist_utils import make_seed, run_ranks

TIMEOUT_S = 10.0
TOKENS = 8
HIDDEN = 256
BIG_HIDDEN = 384
TOPK = 2
LINGER_S = 2.5  # the rank that raised in a `late` case keeps its Buffer open this long


class InjectedFault(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------
# Rank side

def _inputs(rank, R, seed, step, hidden=HIDDEN, num_experts=None, topk=TOPK, dtype=None):
    import torch
    g = torch.Generator().manual_seed(seed * 1000 + step * 16 + rank)
    num_experts = num_experts or 2 * R
    # small integers: every sum below is exact in bf16
    x = torch.randint(-4, 5, (TOKENS, hidden), generator=g).to(dtype or torch.bfloat16)
    topk_idx = torch.rand(TOKENS, num_experts, generator=g).topk(topk, dim=1).indices.to(torch.int64)
    weights = torch.ones(TOKENS, topk)
    return x, topk_idx, weights, num_experts


def _dispatch(buf, x, topk_idx, weights, num_experts, **kw):
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, num_experts)
    return buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                        topk_idx=topk_idx, topk_weights=weights, **kw)


def _good_round(buf, rank, R, seed, step, num_experts=None) -> None:
    """A dispatch/cached dispatch/combine and a low-latency round, checked exactly."""
    import torch
    x, topk_idx, w, E = _inputs(rank, R, seed, step, num_experts=num_experts)
    recv_x, _, recv_w, _, handle, _ = _dispatch(buf, x, topk_idx, w, E)
    again, _, _, _, _, _ = buf.dispatch(x, handle=handle)
    assert torch.equal(again, recv_x)
    combined, _, _ = buf.combine(recv_x, handle)
    in_rank = handle[4]
    assert torch.equal(combined.float(), x.float() * in_rank.sum(1, keepdim=True).float())
    if num_experts is not None:
        return
    recv, count, ll_handle, _, _ = buf.low_latency_dispatch(x, topk_idx, TOKENS, E, use_fp8=False)
    out, _, _ = buf.low_latency_combine(recv, topk_idx, w, ll_handle)
    assert torch.equal(out.float(), x.float() * TOPK)


def _new_buffer(group, R):
    import deep_ep
    rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(TOKENS, BIG_HIDDEN, R, 4 * R)
    nvl = max(c.get_nvl_buffer_size_hint(BIG_HIDDEN * 2, R)
              for c in (deep_ep.Buffer.get_dispatch_config(R), deep_ep.Buffer.get_combine_config(R)))
    return deep_ep.Buffer(group, num_nvl_bytes=nvl, num_rdma_bytes=rdma, low_latency_mode=True,
                          explicitly_destroy=True)


def _inject(buf, op: str) -> None:
    """The next `op` exchange on this rank raises instead of starting (an exception between collectives)."""
    comm = buf._comm
    original = comm._begin

    def begin(name: str) -> float:
        if name == op:
            comm._begin = original
            raise InjectedFault(f"injected fault before `{op}`")
        return original(name)

    comm._begin = begin


def _case(name: str, buf, rank: int, R: int, seed: int):
    """Run fault case `name` on this rank. Returns nothing (the caller records what was raised)."""
    import torch
    victim = R - 1
    me = rank == victim
    mode, kind = name.split(":")
    x, topk_idx, w, E = _inputs(rank, R, seed, 1)
    if mode == "dispatch":
        if kind == "hidden" and me:
            x = _inputs(rank, R, seed, 1, hidden=BIG_HIDDEN)[0]
        if kind == "experts" and me:
            x, topk_idx, w, E = _inputs(rank, R, seed, 1, num_experts=4 * R)
        if kind == "topk" and me:
            x, topk_idx, w, E = _inputs(rank, R, seed, 1, topk=4)
        if kind == "dtype" and me:
            x = x.to(torch.float16)
        if kind == "late" and me:
            _inject(buf, "dispatch (data)")
        if kind == "local" and me:
            per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, E)
            bad = topk_idx.clone()
            bad[0, 0] = E + 5
            buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                         topk_idx=bad, topk_weights=w)
        else:
            _dispatch(buf, x, topk_idx, w, E)
        return
    # cached dispatch / combine: two dispatches, so that a rank can pass the other one's handle
    recv_a, _, _, _, handle_a, _ = _dispatch(buf, x, topk_idx, w, E)
    x2, topk2, w2, _ = _inputs(rank, R, seed, 2)
    recv_b, _, recv_wb, _, handle_b, _ = _dispatch(buf, x2, topk2, w2, E)
    if mode == "cached":
        arg, handle = x2, handle_b
        if kind == "hidden" and me:
            arg = _inputs(rank, R, seed, 2, hidden=BIG_HIDDEN)[0]
        if kind == "dtype" and me:
            arg = x2.to(torch.float16)
        if kind == "handle" and me:
            arg, handle = x, handle_a
        if kind == "local" and me:
            arg = x2[:-1]
        if kind == "late" and me:
            _inject(buf, "cached dispatch (data)")
        if kind == "method" and me:  # this rank calls combine while the others call (cached) dispatch
            buf.combine(recv_b, handle_b)
            return
        buf.dispatch(arg, handle=handle)
        return
    if mode == "combine":
        arg, handle, weights = recv_b, handle_b, recv_wb
        if kind == "hidden" and me:
            arg = torch.zeros(recv_b.size(0), BIG_HIDDEN, dtype=torch.bfloat16)
        if kind == "weights" and me:
            weights = None
        if kind == "handle" and me:
            arg, handle, weights = recv_a, handle_a, None if recv_wb is None else torch.ones(recv_a.size(0), TOPK)
        if kind == "local" and me:
            arg = torch.cat([recv_b, recv_b[:1]])
        if kind == "late" and me:
            _inject(buf, "combine (data)")
        buf.combine(arg, handle, topk_weights=weights)
        return
    raise AssertionError(name)


def _ll_case(name: str, buf, rank: int, R: int, seed: int):
    import torch
    victim = R - 1
    me = rank == victim
    mode, kind = name.split(":")
    x, topk_idx, w, E = _inputs(rank, R, seed, 3)
    if mode == "ll_dispatch":
        fp8 = False
        if kind == "hidden" and me:
            x = _inputs(rank, R, seed, 3, hidden=BIG_HIDDEN)[0]
        if kind == "fp8" and me:
            fp8 = True
        if kind == "dtype" and me:  # low-latency x must be bf16: a local error on that rank
            x = x.to(torch.float16)
        if kind == "local" and me:
            topk_idx = topk_idx.clone()
            topk_idx[0, 0] = E + 5
        if kind == "late" and me:
            _inject(buf, "low_latency_dispatch (data exchange)")
        buf.low_latency_dispatch(x, topk_idx, TOKENS, E, use_fp8=fp8)
        return
    recv_a, _, handle_a, _, _ = buf.low_latency_dispatch(x, topk_idx, TOKENS, E, use_fp8=False)
    x2, topk2, w2, _ = _inputs(rank, R, seed, 4)
    recv_b, _, handle_b, _, _ = buf.low_latency_dispatch(x2, topk2, TOKENS, E, use_fp8=False)
    arg, topk, weights, handle, logfmt = recv_b, topk2, w2, handle_b, False
    if kind == "logfmt" and me:
        logfmt = True
    if kind == "handle" and me:
        arg, topk, weights, handle = recv_a, topk_idx, w, handle_a
    if kind == "local" and me:
        weights = w2[:, :1].contiguous()
    if kind == "late" and me:
        _inject(buf, "low_latency_combine (data exchange)")
    buf.low_latency_combine(arg, topk, weights, handle, use_logfmt=logfmt)


CASES = [
    "dispatch:hidden", "dispatch:experts", "dispatch:topk", "dispatch:dtype", "dispatch:local", "dispatch:late",
    "cached:hidden", "cached:dtype", "cached:handle", "cached:method", "cached:local", "cached:late",
    "combine:hidden", "combine:weights", "combine:handle", "combine:local", "combine:late",
    "ll_dispatch:hidden", "ll_dispatch:fp8", "ll_dispatch:dtype", "ll_dispatch:local", "ll_dispatch:late",
    "ll_combine:logfmt", "ll_combine:handle", "ll_combine:local", "ll_combine:late",
]


def agreement_worker(rank: int, R: int, group, seed: int, cases: List[str]) -> Dict[str, Any]:
    import torch
    import torch.distributed as dist
    from deep_ep import CommError
    out: Dict[str, Any] = {}
    buf = _new_buffer(group, R)
    _good_round(buf, rank, R, seed, 0)
    # counts wider than the descriptor exchange's inline room: a second round, then the room grows
    _good_round(buf, rank, R, seed, 1, num_experts=128 * R)
    _good_round(buf, rank, R, seed, 2, num_experts=128 * R)
    assert buf._comm._agreement.cap >= 128 * R
    for step, name in enumerate(cases, start=10):
        dist.barrier(group)  # every rank starts the case together: the fault happens at t0
        t0 = time.monotonic()
        raised: Tuple[str, str] = ("nothing", "")
        try:
            (_ll_case if name.startswith("ll_") else _case)(name, buf, rank, R, seed)
        except Exception as exc:  # noqa: BLE001 - recorded and checked by the parent
            raised = (type(exc).__name__, str(exc))
        elapsed = time.monotonic() - t0
        later = ""
        if name.endswith(":late"):
            if rank == R - 1:
                # The rank that raised goes on with other work for a while (it does not close its connections):
                # its peers must learn of its error through its heartbeat, not from a closed socket.
                time.sleep(LINGER_S)
            # every later call raises at once; destroy() still works; a new Buffer works
            t1 = time.monotonic()
            try:
                _good_round(buf, rank, R, seed, step)
                later = "a later call succeeded"
            except CommError as exc:
                later = str(exc) if time.monotonic() - t1 < 1.0 else f"slow ({time.monotonic() - t1:.1f} s): {exc}"
            buf.destroy()
            buf = _new_buffer(group, R)
        _good_round(buf, rank, R, seed, step)
        out[name] = {"type": raised[0], "text": raised[1], "elapsed": elapsed, "later": later, "usable": True}
    buf.destroy()

    # Shrink mode (point-to-point low-latency exchanges): a rank whose arguments fail is named by every rank.
    import deep_ep
    rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(TOKENS, HIDDEN, R, 2 * R)
    shrink = deep_ep.Buffer(group, num_rdma_bytes=rdma, low_latency_mode=True, enable_shrink=True,
                            explicitly_destroy=True)
    x, topk_idx, w, E = _inputs(rank, R, seed, 5)
    bad = topk_idx.clone()
    bad[0, 0] = E + 5
    dist.barrier(group)
    t0 = time.monotonic()
    try:
        shrink.low_latency_dispatch(x, bad if rank == R - 1 else topk_idx, TOKENS, E, use_fp8=False)
        raised = ("nothing", "")
    except Exception as exc:  # noqa: BLE001
        raised = (type(exc).__name__, str(exc))
    out["shrink ll_dispatch:local"] = {"type": raised[0], "text": raised[1], "elapsed": time.monotonic() - t0}
    recv, _, handle, _, _ = shrink.low_latency_dispatch(x, topk_idx, TOKENS, E, use_fp8=False)
    got, _, _ = shrink.low_latency_combine(recv, topk_idx, w, handle)
    assert torch.equal(got.float(), x.float() * TOPK)  # still usable
    shrink.destroy()

    # Buffer set-up: one rank's CUDA-engine probe raises while its peers wait for it in a set-up exchange.
    if rank == R - 1:
        from deep_ep.engines import cuda

        def broken_probe(*args, **kwargs):
            raise RuntimeError("injected probe failure")

        cuda.local_status = broken_probe
    dist.barrier(group)
    t0 = time.monotonic()
    try:
        _new_buffer(group, R).destroy()
        raised = ("nothing", "")
    except Exception as exc:  # noqa: BLE001
        raised = (type(exc).__name__, str(exc))
    out["__init__:late"] = {"type": raised[0], "text": raised[1], "elapsed": time.monotonic() - t0}
    return out


# ------------------------------------------------------------------------------------------------
# Parent side

_RESULTS: Dict[int, Any] = {}


def _run(R: int) -> List[Dict[str, Any]]:
    if R not in _RESULTS:
        seed = make_seed()
        _RESULTS[R] = run_ranks(agreement_worker, R, seed, CASES, timeout_s=300, check_exit=True,
                                env={"DEEP_EP_TIMEOUT_S": str(int(TIMEOUT_S))})
    return _RESULTS[R]


_EXPECT = {  # case -> (error type on the ranks that did nothing wrong, words their message must contain)
    "dispatch:hidden": ("ValueError", "the hidden size of `x` (columns)"),
    "dispatch:experts": ("ValueError", "the number of experts"),
    "dispatch:topk": ("ValueError", "the number of columns of `topk_idx`"),
    "dispatch:dtype": ("ValueError", "the dtype of `x`"),
    "dispatch:local": ("ValueError", "`topk_idx` holds expert ids outside"),
    "cached:hidden": ("ValueError", "the hidden size of `x` (columns)"),
    "cached:dtype": ("ValueError", "the dtype of `x`"),
    "cached:handle": ("ValueError", "the dispatch `handle` comes from"),
    "cached:method": ("RuntimeError", "the ranks diverged, they are in different calls"),
    "cached:local": ("ValueError", "`handle` was made for"),
    "combine:hidden": ("ValueError", "the hidden size of `x` (columns)"),
    "combine:weights": ("ValueError", "the number of columns of `topk_weights`"),
    "combine:handle": ("ValueError", "the dispatch `handle` comes from"),
    "combine:local": ("ValueError", "must have one row per token the dispatch received"),
    "ll_dispatch:hidden": ("ValueError", "the hidden size of `x` (columns)"),
    "ll_dispatch:fp8": ("ValueError", "`use_fp8`"),
    "ll_dispatch:dtype": ("ValueError", "must be torch.bfloat16, got torch.float16"),
    "ll_dispatch:local": ("ValueError", "`topk_idx` holds expert ids outside"),
    "ll_combine:logfmt": ("ValueError", "`use_logfmt`"),
    "ll_combine:handle": ("ValueError", "the low-latency dispatch `handle` comes from"),
    "ll_combine:local": ("ValueError", "`topk_weights` must have shape"),
}


@pytest.mark.parametrize("R", [2, 4])
def test_faults_raise_on_every_rank(R):
    per_rank = _run(R)
    victim = R - 1
    rows = []
    problems = []
    for name in CASES:
        recs = [per_rank[r][name] for r in range(R)]
        worst = max(rec["elapsed"] for rec in recs)
        rows.append(f"{R} ranks | {name:22s} | {worst:6.2f} s | "
                    f"{'new Buffer' if name.endswith(':late') else 'usable'}")
        for r, rec in enumerate(recs):
            where = f"{name}, rank {r}: {rec['type']}: {rec['text']}"
            if rec["elapsed"] > TIMEOUT_S:
                problems.append(f"{where}: raised after {rec['elapsed']:.1f} s")
            if name.endswith(":late"):
                if r == victim:
                    ok = rec["type"] == "InjectedFault"
                else:
                    ok = rec["type"] == "CommError" and f"Rank {victim}: it raised an error in its own call" in \
                        rec["text"] and "InjectedFault: injected fault" in rec["text"]
                if not ok:
                    problems.append(where)
                if r != victim and rec["elapsed"] >= LINGER_S - 0.5:
                    problems.append(f"{where}: raised after {rec['elapsed']:.1f} s, not within a heartbeat period")
                if "this Buffer failed earlier: " not in rec["later"] or "create a new Buffer" not in rec["later"]:
                    problems.append(f"{name}, rank {r}: a later call gave: {rec['later']}")
                continue
            kind, words = _EXPECT[name]
            if rec["type"] != kind or words not in rec["text"]:
                problems.append(where)
            local = name.endswith(":local") or name == "ll_dispatch:dtype"  # the victim's own checks fail
            if local and r != victim and f"rank {victim} raised ValueError: " not in rec["text"]:
                problems.append(f"{where}: does not name rank {victim} and its error")
        # a disagreement: the very same message on every rank
        if not name.endswith((":local", ":late")) and name != "ll_dispatch:dtype":
            # (diverged calls: each rank names its own method first, the rest is the same)
            texts = {per_rank[r][name]["text"].split(": ", 1)[-1] if name.endswith(":method") else
                     per_rank[r][name]["text"] for r in range(R)}
            if len(texts) != 1:
                problems.append(f"{name}: the ranks raised different messages: {texts}")
            if "no data moved on any rank, and the Buffer is still usable" not in recs[0]["text"]:
                problems.append(f"{name}: {recs[0]['text']}")
    recs = [per_rank[r]["shrink ll_dispatch:local"] for r in range(R)]
    rows.append(f"{R} ranks | {'shrink ll_dispatch:local':22s} | {max(rec['elapsed'] for rec in recs):6.2f} s | usable")
    for r, rec in enumerate(recs):
        want = "`topk_idx` holds expert ids outside" if r == victim else f"rank {victim} raised ValueError"
        if want not in rec["text"] or rec["elapsed"] > TIMEOUT_S / 2:
            problems.append(f"shrink ll_dispatch:local, rank {r}: {rec}")
    setup = [per_rank[r]["__init__:late"] for r in range(R)]
    rows.append(f"{R} ranks | {'__init__:late':22s} | {max(rec['elapsed'] for rec in setup):6.2f} s | (none made)")
    for r, rec in enumerate(setup):
        where = f"__init__:late, rank {r}: {rec['type']}: {rec['text']}"
        want = "injected probe failure"
        if r != victim:
            want = f"Rank {victim}: it raised an error in its own call to `deep_ep.Buffer(...)` (its set-up)"
            if rec["type"] != "CommError" or "injected probe failure" not in rec["text"] or "probe" in \
                    rec["text"].replace("injected probe failure", ""):
                problems.append(where)
        if want not in rec["text"] or rec["elapsed"] > TIMEOUT_S / 2:
            problems.append(f"{where} (after {rec['elapsed']:.1f} s)")
    print("\n".join(["ranks | case | slowest rank to raise | Buffer afterwards"] + rows))
    assert not problems, "\n".join(problems)
