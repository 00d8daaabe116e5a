"""Low-latency (LL) mode: `Buffer.low_latency_dispatch` / `low_latency_combine` and friends.

Every rank rebuilds all ranks' inputs from one shared seed (printed; replay with
``DEEP_EP_TEST_SEED``) and checks its outputs against a reference computed here from the global view,
written from `docs/semantics.md` alone (no deep_ep code in the reference path):

* dispatch: ``recv_count``, ``layout_range``, ``src_info``, every valid row (BF16 bit-exact; FP8 bytes
  and scales exact against the reference cast, dequantised error small), ``round_scale``, UE8M0 packing
  and the column-major scale strides, ``cumulative_local_expert_recv_stats``, wait-cost stats;
* combine: bit-exact (float32 sum in ``k`` order of weight * row), with LogFMT-10 rounding, zero-copy
  through `get_next_low_latency_combine_buffer`, ``out=``, receive hooks;
* double buffer (two results alive, a third call makes the oldest hook raise), `clean_low_latency_buffer`,
  shrink mode (masked ranks, "dead" masked ranks that make no call, the mask changed between dispatch
  and combine, and a rank whose process really dies: the others mask it and carry on);
* edge cases (a rank without tokens, rows of -1, one expert per rank, top-1, duplicate experts);
* bad inputs: each rule raises on every rank, naming the argument, and the buffer keeps working.

Each test spawns one set of gloo ranks and runs many cases in it (spawning dominates the run time):
2 ranks (+ bad inputs), 4 ranks (+ shrink mode), 8 ranks, and 4 ranks of which one dies.
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence

import pytest
import torch

from dist_utils import make_seed, run_ranks

FP8_MAX = 448.0
AMAX_FLOOR = 1e-4

# ==============================================================================================
# Reference math (from docs/semantics.md; independent of deep_ep.quant)


def ref_scale_pow2(s: torch.Tensor) -> torch.Tensor:
    """``2^ceil(log2(s))`` exactly, through frexp: ``s = m * 2^e`` with ``m`` in ``[0.5, 1)``."""
    mantissa, exponent = torch.frexp(s)
    exact = mantissa == 0.5
    power = torch.where(exact, exponent - 1, exponent).to(torch.float64)
    return torch.pow(torch.tensor(2.0, dtype=torch.float64), power).to(torch.float32)


def ref_fp8_cast(x: torch.Tensor, round_scale: bool):
    """``x`` ``[T, H]`` bf16 -> (e4m3 bytes ``[T, H]`` uint8, scale_inv ``[T, H/128]`` float32)."""
    num_tokens, hidden = x.shape
    groups = hidden // 128
    data = torch.empty(num_tokens, hidden, dtype=torch.uint8)
    scales = torch.empty(num_tokens, groups, dtype=torch.float32)
    for g in range(groups):
        block = x[:, g * 128:(g + 1) * 128].to(torch.float32)
        amax = block.abs().max(dim=1).values if num_tokens else torch.zeros(0)
        amax = torch.maximum(amax, torch.full_like(amax, AMAX_FLOOR))
        scale_inv = amax / torch.tensor(FP8_MAX, dtype=torch.float32)
        if round_scale:
            scale_inv = ref_scale_pow2(scale_inv)
        scaled = block * (torch.ones_like(scale_inv) / scale_inv).unsqueeze(1)
        q = scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        data[:, g * 128:(g + 1) * 128] = q.view(torch.uint8)
        scales[:, g] = scale_inv
    return data, scales


def ref_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """float32 ``[T, S]`` powers of two -> int32 ``[T, ceil(S/4)]``, block ``4q`` in the low byte."""
    num_tokens, num_scales = scales.shape
    out = torch.zeros(num_tokens, (num_scales + 3) // 4, dtype=torch.int32)
    for t in range(num_tokens):
        for q in range(out.size(1)):
            word = 0
            for i in range(4):
                g = 4 * q + i
                if g < num_scales:
                    _, e = math.frexp(float(scales[t, g]))
                    word |= (e - 1 + 127) << (8 * i)  # biased exponent of 2^(e-1)
            out[t, q] = word - (1 << 32) if word >= (1 << 31) else word
    return out


def ref_unpack_ue8m0(packed: torch.Tensor, num_scales: int) -> torch.Tensor:
    """int32 ``[..., Q]`` -> float32 ``[..., num_scales]`` = ``2^(byte - 127)``."""
    words = packed.to(torch.int64) % (1 << 32)
    out = []
    for g in range(num_scales):
        byte = (words[..., g // 4] // (1 << (8 * (g % 4)))) % 256
        out.append(torch.pow(torch.tensor(2.0, dtype=torch.float64), (byte - 127).to(torch.float64)))
    return torch.stack(out, dim=-1).to(torch.float32)


def ref_dequant(data_u8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """e4m3 bytes ``[..., H]`` and float32 ``[..., H/128]`` -> float32 ``[..., H]``."""
    values = data_u8.contiguous().view(torch.float8_e4m3fn).to(torch.float32)
    return values * scales.to(torch.float32).repeat_interleave(128, dim=-1)


def ref_logfmt10(x: torch.Tensor) -> torch.Tensor:
    """``[M, H]`` bf16 rounded through LogFMT-10 as semantics.md defines it."""
    out = x.clone()
    for g in range(x.size(1) // 128):
        xg = x[:, g * 128:(g + 1) * 128]
        a = xg.to(torch.float32).abs()
        nonzero = a > 0
        has_nonzero = nonzero.any(dim=1)
        big = torch.full_like(a, float("inf"))
        amin = torch.where(nonzero, a, big).min(dim=1).values
        amax = a.max(dim=1).values
        amin = torch.where(has_nonzero, amin, torch.ones_like(amin))
        amax = torch.where(has_nonzero, amax, torch.ones_like(amax))
        lo = torch.log2(amin).to(torch.bfloat16).to(torch.float32).unsqueeze(1)
        hi = torch.log2(amax).to(torch.bfloat16).to(torch.float32).unsqueeze(1)
        step = (hi - lo) / 510.0
        encoded = has_nonzero.unsqueeze(1) & (step <= 1.0 / 32.0)
        log_a = torch.log2(torch.where(nonzero, a, torch.ones_like(a)))
        q = torch.where(step > 0, torch.round((log_a - lo) / torch.where(step > 0, step, torch.ones_like(step))),
                        torch.zeros_like(log_a))
        code = torch.where(nonzero, 1 + q.clamp(0, 510), torch.zeros_like(q))
        magnitude = torch.exp2(lo + (code - 1) * step)
        magnitude = torch.where(code > 0, magnitude, torch.zeros_like(magnitude)).to(torch.bfloat16)
        decoded = torch.copysign(magnitude.to(torch.float32), xg.to(torch.float32)).to(torch.bfloat16)
        out[:, g * 128:(g + 1) * 128] = torch.where(encoded, decoded, xg)
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a 2-byte or 1-byte tensor, for exact comparisons (NaN-safe, sign-of-zero-aware)."""
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.uint8)


# ==============================================================================================
# Inputs (identical on every rank) and the global-view reference


def make_case(seed: int, index: int, num_ranks: int, spec: dict) -> dict:
    """All ranks' ``x``, ``topk_idx``, ``topk_weights`` for one case."""
    gen = torch.Generator().manual_seed(seed * 1000 + index)
    t_max, hidden, num_experts, num_topk = spec["T_max"], spec["H"], spec["E"], spec["K"]
    xs, topks, weights = [], [], []
    for s in range(num_ranks):
        tokens = spec.get("tokens")
        if tokens is None:
            num_tokens = int(torch.randint(1, t_max + 1, (1,), generator=gen))
        elif tokens == "full":
            num_tokens = t_max
        else:
            num_tokens = tokens[s % len(tokens)]
        x = torch.randn(num_tokens, hidden, generator=gen) * 2
        rows = torch.arange(num_tokens)
        if hidden >= 256:  # a group with a huge dynamic range (LogFMT falls back to BF16)
            wide = (rows % 3 == 0)
            factor = torch.where(torch.rand(num_tokens, 128, generator=gen) < 0.5, 1e-5, 1e3)
            x[wide, 128:256] *= factor[wide]
        x[rows % 3 == 1, :128] = 0  # an all-zero group
        if hidden >= 384:  # a constant-magnitude group (LogFMT step 0)
            x[rows % 5 == 2, 256:384] = 2.5 * torch.sign(torch.randn(int((rows % 5 == 2).sum()), 128, generator=gen))
        x[torch.rand(num_tokens, hidden, generator=gen) < 0.05] = 0
        if spec.get("mode", "unique") == "unique":
            topk = torch.rand(num_tokens, num_experts, generator=gen).argsort(dim=1)[:, :num_topk]
        else:
            topk = torch.randint(0, num_experts, (num_tokens, num_topk), generator=gen)
            if num_tokens:
                topk[0, :] = topk[0, 0]  # one token picking the same expert in every slot
        topk = topk.to(torch.int64).contiguous()
        topk[torch.rand(num_tokens, num_topk, generator=gen) < spec.get("neg", 0.1)] = -1
        if s in spec.get("all_neg_ranks", ()):
            topk[:] = -1
        # A (source, expert) block holds at most T_max rows: drop duplicates beyond that.
        for e in range(num_experts):
            hits = (topk == e).nonzero()
            if hits.size(0) > t_max:
                extra = hits[t_max:]
                topk[extra[:, 0], extra[:, 1]] = -1
        xs.append(x.to(torch.bfloat16))
        topks.append(topk)
        weights.append(torch.rand(num_tokens, num_topk, generator=gen) * 2 - 0.5)
    return {"x": xs, "topk": topks, "w": weights}


def ref_expert_rows(case: dict, rank: int, num_ranks: int, num_experts: int, masked: Sequence[int] = ()) -> List[list]:
    """Per local expert of ``rank``: the ``(source, token, k)`` of its rows, in the documented order."""
    num_local = num_experts // num_ranks
    rows: List[list] = [[] for _ in range(num_local)]
    if rank in masked:
        return rows
    for s in range(num_ranks):
        if s in masked:
            continue
        topk = case["topk"][s]
        for t, k in (topk // num_local == rank).logical_and(topk >= 0).nonzero().tolist():
            rows[int(topk[t, k]) - rank * num_local].append((s, t, k))
    # nonzero() is (t, k) row-major already; group per expert keeps that order (source ascending).
    return rows


def expert_scale(e: int) -> float:
    return 0.25 * (e % 7 + 1)


def occurrence(case: dict, s: int, num_experts: int) -> Dict[tuple, int]:
    """Index of each ``(t, k)`` of source ``s`` inside its (expert, source) block."""
    counters: Dict[int, int] = {}
    occ = {}
    topk = case["topk"][s]
    for t, k in (topk >= 0).nonzero().tolist():
        e = int(topk[t, k])
        occ[(t, k)] = counters.get(e, 0)
        counters[e] = occ[(t, k)] + 1
    return occ


def ref_expert_output(x_row_f32: torch.Tensor, e: int, occ: int, with_occ: bool) -> torch.Tensor:
    """The simulated expert output for one (token, k) row (what the test feeds to combine)."""
    y = x_row_f32 * expert_scale(e)
    if with_occ:
        y = y + float(occ)
    return y.to(torch.bfloat16)


def ref_combine(case: dict, rank: int, num_ranks: int, num_experts: int, hidden: int, dispatch_kind: str,
                with_occ: bool, use_logfmt: bool, masked: Sequence[int] = ()) -> torch.Tensor:
    """``bf16(sum_k fp32(w) * fp32(y_k))`` for this rank's tokens, ``k`` ascending, skips as documented."""
    num_local = num_experts // num_ranks
    x, topk, w = case["x"][rank], case["topk"][rank], case["w"][rank]
    num_tokens, num_topk = topk.shape
    if rank in masked:
        return torch.zeros(num_tokens, hidden, dtype=torch.bfloat16)
    if dispatch_kind == "bf16":
        x_seen = x.to(torch.float32)
    else:
        data, scales = ref_fp8_cast(x, dispatch_kind != "fp8")
        x_seen = ref_dequant(data, scales)
    occ = occurrence(case, rank, num_experts)
    ys = torch.zeros(num_tokens, num_topk, hidden, dtype=torch.bfloat16)
    valid = torch.zeros(num_tokens, num_topk, dtype=torch.bool)
    for t in range(num_tokens):
        for k in range(num_topk):
            e = int(topk[t, k])
            if e < 0 or e // num_local in masked:
                continue
            valid[t, k] = True
            ys[t, k] = ref_expert_output(x_seen[t], e, occ[(t, k)], with_occ)
    if use_logfmt and num_tokens:
        ys = ref_logfmt10(ys.view(-1, hidden)).view(num_tokens, num_topk, hidden)
    acc = torch.zeros(num_tokens, hidden, dtype=torch.float32)
    for k in range(num_topk):
        term = w[:, k:k + 1] * ys[:, k].to(torch.float32)
        acc = torch.where(valid[:, k:k + 1], acc + term, acc)
    return acc.to(torch.bfloat16)


# ==============================================================================================
# Checks run on each rank


def dispatch_kind(spec: dict) -> str:
    if not spec.get("fp8"):
        return "bf16"
    if spec.get("ue8m0"):
        return "ue8m0"
    return "round" if spec.get("round") else "fp8"


def check_dispatch(case: dict, spec: dict, rank: int, num_ranks: int, recv_x, recv_count, handle,
                   masked: Sequence[int] = ()) -> List[list]:
    t_max, hidden, num_experts = spec["T_max"], spec["H"], spec["E"]
    num_local, num_rows = num_experts // num_ranks, num_ranks * t_max
    kind = dispatch_kind(spec)
    rows = ref_expert_rows(case, rank, num_ranks, num_experts, masked)
    src_info, layout_range, h_tmax, h_hidden, h_experts = handle
    assert (h_tmax, h_hidden, h_experts) == (t_max, hidden, num_experts)
    assert src_info.dtype == torch.int32 and tuple(src_info.shape) == (num_local, num_rows)
    assert layout_range.dtype == torch.int64 and tuple(layout_range.shape) == (num_local, num_ranks)
    assert recv_count.dtype == torch.int32 and tuple(recv_count.shape) == (num_local,)
    if kind == "bf16":
        data = recv_x
        assert data.dtype == torch.bfloat16
    else:
        data, scales = recv_x
        assert data.dtype == torch.float8_e4m3fn
        num_scales = hidden // 128
        if kind == "ue8m0":
            width = (hidden + 511) // 512
            assert scales.dtype == torch.int32
        else:
            width = num_scales
            assert scales.dtype == torch.float32
        assert tuple(scales.shape) == (num_local, num_rows, width)
        assert scales.stride() == (num_rows * width, 1, num_rows), scales.stride()
    assert tuple(data.shape) == (num_local, num_rows, hidden)
    ref_cast = {}
    for j in range(num_local):
        expected = rows[j]
        n = len(expected)
        assert int(recv_count[j]) == n, (j, int(recv_count[j]), n)
        begin = 0
        for s in range(num_ranks):
            count = sum(1 for row in expected if row[0] == s)
            packed = int(layout_range[j, s])
            assert (packed >> 32, packed & 0xFFFFFFFF) == (begin, count), (j, s, packed >> 32, packed & 0xFFFFFFFF)
            begin += count
        assert src_info[j, :n].tolist() == [t for _, t, _ in expected]
        assert bool((src_info[j, n:] == -1).all())
        if n == 0:
            continue
        srcs = [s for s, _, _ in expected]
        toks = [t for _, t, _ in expected]
        if kind == "bf16":
            want = torch.stack([case["x"][s][t] for s, t in zip(srcs, toks)])
            assert torch.equal(bits(data[j, :n]), bits(want)), f"expert {j}: BF16 rows differ"
            continue
        for s in set(srcs):
            if s not in ref_cast:
                ref_cast[s] = ref_fp8_cast(case["x"][s], kind != "fp8")
        want_data = torch.stack([ref_cast[s][0][t] for s, t in zip(srcs, toks)])
        want_scales = torch.stack([ref_cast[s][1][t] for s, t in zip(srcs, toks)])
        assert torch.equal(data[j, :n].view(torch.uint8), want_data), f"expert {j}: FP8 bytes differ"
        if kind == "ue8m0":
            assert torch.equal(scales[j, :n], ref_ue8m0(want_scales)), f"expert {j}: UE8M0 scales differ"
            got_scales = ref_unpack_ue8m0(scales[j, :n], hidden // 128)
        else:
            assert torch.equal(scales[j, :n], want_scales), f"expert {j}: scales differ"
            got_scales = scales[j, :n]
        if kind != "fp8":
            mantissa, _ = torch.frexp(got_scales)
            assert bool((mantissa == 0.5).all()), "round_scale must give powers of two"
        # The dequantised rows are close to the originals (e4m3 keeps 3 mantissa bits).
        x_rows = torch.stack([case["x"][s][t] for s, t in zip(srcs, toks)]).to(torch.float32)
        deq = ref_dequant(data[j, :n].view(torch.uint8), got_scales)
        bound = got_scales.repeat_interleave(128, dim=1) * 16 * (1 + 1e-5)  # half an ulp at 448
        assert bool(((deq - x_rows).abs() <= bound).all()), f"expert {j}: dequantised error too large"
    return rows


def expert_outputs(recv_x, recv_count, handle, spec: dict, rank: int, num_ranks: int, with_occ: bool) -> torch.Tensor:
    """Simulated expert GEMM: row i of expert j -> bf16(deq(x) * scale(e) [+ index in its block]);
    rows past ``recv_count`` are NaN (combine must not read them)."""
    src_info, layout_range, t_max, hidden, num_experts = handle
    num_local, num_rows = num_experts // num_ranks, num_ranks * t_max
    kind = dispatch_kind(spec)
    y = torch.full((num_local, num_rows, hidden), float("nan"), dtype=torch.bfloat16)
    for j in range(num_local):
        n = int(recv_count[j])
        if n == 0:
            continue
        if kind == "bf16":
            xf = recv_x[j, :n].to(torch.float32)
        else:
            data, scales = recv_x
            sc = ref_unpack_ue8m0(scales[j, :n], hidden // 128) if kind == "ue8m0" else scales[j, :n]
            xf = ref_dequant(data[j, :n].view(torch.uint8), sc)
        e = rank * num_local + j
        occ = torch.zeros(n)
        for s in range(num_ranks):
            packed = int(layout_range[j, s])
            begin, count = packed >> 32, packed & 0xFFFFFFFF
            occ[begin:begin + count] = torch.arange(count, dtype=torch.float32)
        yj = xf * expert_scale(e)
        if with_occ:
            yj = yj + occ.unsqueeze(1)
        y[j, :n] = yj.to(torch.bfloat16)
    return y


def expect_raises(name: str, fn, exc_types=(ValueError, TypeError, RuntimeError), contains: Optional[str] = None):
    """`fn()` must raise one of `exc_types` whose message names `` `name` ``."""
    try:
        fn()
    except exc_types as exc:
        text = str(exc)
        assert f"`{name}`" in text, f"error does not name `{name}`: {text}"
        if contains is not None:
            assert contains in text, f"error does not mention {contains!r}: {text}"
        return exc
    raise AssertionError(f"no error raised for a bad `{name}`")


def rdma_hint(specs: Sequence[dict], num_ranks: int) -> int:
    import deep_ep
    hints = [deep_ep.Buffer.get_low_latency_rdma_size_hint(s["T_max"], s["H"], num_ranks, s["E"]) for s in specs]
    return max(hints)


class _Tracker:
    """Counts this rank's LL calls: the double-buffer slot flips on each, so the next slot is ``calls % 2``."""

    def __init__(self) -> None:
        self.calls = 0


def run_case(buffer, tracker: _Tracker, case: dict, spec: dict, rank: int, num_ranks: int,
             masked: Sequence[int] = (), stats: Optional[dict] = None) -> None:
    """One dispatch + combine with the options of `spec`, checked against the reference."""
    import deep_ep.config as config
    t_max, hidden, num_experts = spec["T_max"], spec["H"], spec["E"]
    num_local = num_experts // num_ranks
    x, topk, w = case["x"][rank], case["topk"][rank], case["w"][rank]
    hook_mode = spec.get("hook", False)
    cum = stats["cum"] if stats is not None else None
    wait = torch.zeros(num_ranks, dtype=torch.int64)
    recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(
        x, topk, t_max, num_experts, cumulative_local_expert_recv_stats=cum, dispatch_wait_recv_cost_stats=wait,
        use_fp8=spec.get("fp8", False), round_scale=spec.get("round", False), use_ue8m0=spec.get("ue8m0", False),
        async_finish=spec.get("async", False), return_recv_hook=hook_mode)
    tracker.calls += 1
    if spec.get("async", False):
        event.current_stream_wait()
    if hook_mode:
        assert callable(hook)
        torch.randn(64, 64) @ torch.randn(64, 64)  # "other work" between send and receive
        hook()
    else:
        assert hook is None
    rows = check_dispatch(case, spec, rank, num_ranks, recv_x, recv_count, handle, masked)
    if stats is not None:
        stats["expected_cum"] += torch.tensor([len(r) for r in rows], dtype=torch.int32)
        assert torch.equal(cum, stats["expected_cum"])
    senders = {s for r in rows for s, _, _ in r}
    for s in range(num_ranks):
        assert (int(wait[s]) > 0) == (s in senders), (s, wait.tolist(), senders)

    with_occ = not spec.get("logfmt", False)
    y = expert_outputs(recv_x, recv_count, handle, spec, rank, num_ranks, with_occ)
    zero_copy = spec.get("zero_copy", False)
    if zero_copy:
        target = buffer.get_next_low_latency_combine_buffer(handle)
        layout = config.LowLatencyLayout(t_max, hidden, num_experts)
        msg = layout.combine_msg_bytes // 2
        num_rows = num_ranks * t_max
        assert tuple(target.shape) == (num_local, num_rows, hidden) and target.dtype == torch.bfloat16
        assert target.stride() == (num_rows * msg, msg, 1), target.stride()
        base = buffer.get_local_buffer_tensor(torch.uint8, use_rdma_buffer=True).data_ptr()
        assert target.data_ptr() == base + layout.send_offset(tracker.calls % 2)
        target.copy_(y)
        y_arg = torch.zeros_like(y)  # must be ignored with zero_copy
    else:
        y_arg = y
    out = torch.full((x.size(0), hidden), float("nan"), dtype=torch.bfloat16) if spec.get("out") else None
    cwait = torch.zeros(num_ranks, dtype=torch.int64)
    combined, event, chook = buffer.low_latency_combine(
        y_arg, topk, w, handle, use_logfmt=spec.get("logfmt", False), zero_copy=zero_copy,
        async_finish=spec.get("async", False), return_recv_hook=hook_mode, out=out,
        combine_wait_recv_cost_stats=cwait)
    tracker.calls += 1
    if spec.get("async", False):
        event.current_stream_wait()
    if hook_mode:
        chook()
    if out is not None:
        assert combined.data_ptr() == out.data_ptr()
    want = ref_combine(case, rank, num_ranks, num_experts, hidden, dispatch_kind(spec), with_occ,
                       spec.get("logfmt", False), masked)
    assert combined.dtype == torch.bfloat16 and tuple(combined.shape) == (x.size(0), hidden)
    assert torch.equal(bits(combined), bits(want)), \
        f"combine differs: max abs {(combined.float() - want.float()).abs().max()}"
    # Ranks that returned rows to this one are the owners of its (unmasked) experts.
    num_local = num_experts // num_ranks
    owners = {int(e) // num_local for e in topk.flatten().tolist() if e >= 0 and int(e) // num_local not in masked}
    if rank in masked:
        owners = set()
    for d in range(num_ranks):
        assert (int(cwait[d]) > 0) == (d in owners), (d, cwait.tolist(), owners)


def main_specs(num_ranks: int) -> List[dict]:
    R = num_ranks
    return [
        dict(name="bf16", T_max=16, H=256, E=2 * R, K=min(4, 2 * R)),
        dict(name="fp8-async", T_max=8, H=256, E=2 * R, K=2, fp8=True, **{"async": True}),
        dict(name="bf16-hook-out", T_max=8, H=384, E=3 * R, K=3, hook=True, out=True),
        dict(name="fp8", T_max=16, H=384, E=2 * R, K=4, fp8=True),
        dict(name="fp8-round", T_max=8, H=256, E=4 * R, K=6, fp8=True, round=True, out=True),
        dict(name="fp8-ue8m0-hook", T_max=8, H=640, E=2 * R, K=3, fp8=True, round=True, ue8m0=True, hook=True),
        dict(name="logfmt", T_max=16, H=384, E=2 * R, K=4, logfmt=True),
        dict(name="logfmt-fp8-hook", T_max=8, H=256, E=3 * R, K=5, fp8=True, logfmt=True, hook=True),
        dict(name="zero-copy", T_max=16, H=256, E=2 * R, K=4, zero_copy=True),
        dict(name="zero-copy-hook", T_max=8, H=384, E=4 * R, K=8, zero_copy=True, hook=True, fp8=True),
        dict(name="edges", T_max=32, H=256, E=2 * R, K=16, mode="dup", tokens=[0, 9, 5, 1], all_neg_ranks=(1,),
             neg=0.2),
        dict(name="top1-one-expert-per-rank", T_max=16, H=256, E=R, K=1, neg=0.0, tokens=[16, 3]),
        dict(name="full-fp8", T_max=32, H=384, E=4 * R, K=8, fp8=True, tokens="full", neg=0.0),
        dict(name="all-minus-one", T_max=8, H=256, E=2 * R, K=2, neg=1.0, hook=True),
    ]


def _main_suite(rank: int, num_ranks: int, group, seed: int) -> str:
    import deep_ep
    torch.set_num_threads(1)
    specs = main_specs(num_ranks)
    buffer = deep_ep.Buffer(group, 0, num_rdma_bytes=rdma_hint(specs, num_ranks), low_latency_mode=True,
                            num_qps_per_rank=max(s["E"] for s in specs) // num_ranks)
    want = "gloo" if os.environ.get("DEEP_EP_TRANSPORT") == "gloo" else "shm"
    assert buffer._comm.transport == want, buffer.engine_reason
    tracker = _Tracker()
    for index, spec in enumerate(specs):
        case = make_case(seed, index, num_ranks, spec)
        stats = None
        if index == 0:
            stats = {"cum": torch.zeros(spec["E"] // num_ranks, dtype=torch.int32)}
            stats["expected_cum"] = torch.zeros_like(stats["cum"])
        try:
            run_case(buffer, tracker, case, spec, rank, num_ranks, stats=stats)
            if stats is not None:  # the cumulative stats keep adding over calls
                run_case(buffer, tracker, make_case(seed, 100, num_ranks, spec), spec, rank, num_ranks, stats=stats)
        except AssertionError as exc:
            raise AssertionError(f"case {spec['name']} (seed {seed}): {exc}") from exc
    _double_buffer(buffer, tracker, seed, rank, num_ranks)
    _clean_buffer(buffer, tracker, seed, rank, num_ranks)
    return "ok"


def _double_buffer(buffer, tracker: _Tracker, seed: int, rank: int, num_ranks: int) -> None:
    """Two results alive work; a third LL call makes the oldest pending hook raise."""
    spec = dict(T_max=8, H=256, E=2 * num_ranks, K=3, fp8=True)
    cases = [make_case(seed, 200 + i, num_ranks, spec) for i in range(3)]

    def dispatch(case, hook):
        out = buffer.low_latency_dispatch(case["x"][rank], case["topk"][rank], spec["T_max"], spec["E"],
                                          use_fp8=True, return_recv_hook=hook)
        tracker.calls += 1
        return out

    # Two hooks pending, called in reverse order: both results are right.
    first = dispatch(cases[0], True)
    second = dispatch(cases[1], True)
    second[4]()
    first[4]()
    for case, (recv_x, recv_count, handle, _, _) in ((cases[0], first), (cases[1], second)):
        check_dispatch(case, spec, rank, num_ranks, recv_x, recv_count, handle)

    # Two pending, then a third call reuses the first one's slot: its hook must refuse.
    first = dispatch(cases[0], True)
    second = dispatch(cases[1], True)
    third = dispatch(cases[2], False)
    with pytest.raises(RuntimeError, match="two"):
        first[4]()
    with pytest.raises(RuntimeError, match="two"):  # and keeps refusing
        first[4]()
    second[4]()
    check_dispatch(cases[1], spec, rank, num_ranks, *second[:3])
    check_dispatch(cases[2], spec, rank, num_ranks, *third[:3])

    # A pending combine hook is invalidated the same way.
    recv_x, recv_count, handle, _, _ = dispatch(cases[0], False)
    y = expert_outputs(recv_x, recv_count, handle, spec, rank, num_ranks, True)
    topk, w = cases[0]["topk"][rank], cases[0]["w"][rank]
    _, _, chook = buffer.low_latency_combine(y, topk, w, handle, return_recv_hook=True)
    tracker.calls += 1
    dispatch(cases[1], True)
    dispatch(cases[2], False)
    with pytest.raises(RuntimeError, match="double"):
        chook()
    # And the buffer still works.
    combined, _, _ = buffer.low_latency_combine(y, topk, w, handle)
    tracker.calls += 1
    want = ref_combine(cases[0], rank, num_ranks, spec["E"], spec["H"], "fp8", True, False)
    assert torch.equal(bits(combined), bits(want))

    # A combine of a BF16 dispatch's own recv_x two calls later, when that combine reuses the very slot
    # recv_x lives in (on the shared-memory push path the peers write into it during the call): the
    # result is still that of the same rows kept elsewhere.
    recv_x, _, handle, _, _ = buffer.low_latency_dispatch(cases[0]["x"][rank], topk, spec["T_max"], spec["E"],
                                                          use_fp8=False)
    tracker.calls += 1
    kept = recv_x.clone()
    dispatch(cases[1], False)
    in_slot, _, _ = buffer.low_latency_combine(recv_x, topk, w, handle)
    elsewhere, _, _ = buffer.low_latency_combine(kept, topk, w, handle)
    tracker.calls += 2
    assert torch.equal(bits(in_slot), bits(elsewhere))


def _clean_buffer(buffer, tracker: _Tracker, seed: int, rank: int, num_ranks: int) -> None:
    """`clean_low_latency_buffer` zeroes the signalling words of both slots; LL calls work afterwards."""
    import deep_ep.config as config
    spec = dict(name="after-clean", T_max=16, H=256, E=2 * num_ranks, K=4)
    layout = config.LowLatencyLayout(spec["T_max"], spec["H"], spec["E"])
    raw = buffer.get_local_buffer_tensor(torch.uint8, use_rdma_buffer=True)
    raw[:2 * layout.signaling_bytes].fill_(0xAB)  # e.g. left over by the normal kernels
    buffer.clean_low_latency_buffer(spec["T_max"], spec["H"], spec["E"])
    assert bool((raw[:2 * layout.signaling_bytes] == 0).all())
    run_case(buffer, tracker, make_case(seed, 300, num_ranks, spec), spec, rank, num_ranks)


# ==============================================================================================
# Shrink mode


def _shrink_suite(rank: int, num_ranks: int, group, seed: int) -> str:
    import deep_ep
    import torch.distributed as dist
    torch.set_num_threads(1)
    spec = dict(name="shrink", T_max=16, H=256, E=2 * num_ranks, K=4)
    spec_hook = dict(spec, name="shrink-hook", hook=True, fp8=True)
    buffer = deep_ep.Buffer(group, 0, num_rdma_bytes=rdma_hint([spec], num_ranks), low_latency_mode=True,
                            num_qps_per_rank=2, enable_shrink=True)
    tracker = _Tracker()
    status = torch.full((num_ranks,), 7, dtype=torch.int32)
    buffer.low_latency_query_mask_buffer(status)
    assert status.tolist() == [0] * num_ranks

    # No mask: the ordinary collectives.
    run_case(buffer, tracker, make_case(seed, 0, num_ranks, spec), spec, rank, num_ranks)

    # Rank 1 masked on every rank (rank 1 still calls): its tokens and experts are excluded everywhere.
    buffer.low_latency_update_mask_buffer(1, True)
    buffer.low_latency_query_mask_buffer(status)
    assert status.tolist() == [1 if r == 1 else 0 for r in range(num_ranks)]
    run_case(buffer, tracker, make_case(seed, 1, num_ranks, spec), spec, rank, num_ranks, masked=(1,))
    run_case(buffer, tracker, make_case(seed, 2, num_ranks, spec_hook), spec_hook, rank, num_ranks, masked=(1,))

    # Ranks 1 and 3 "dead": they make no call at all; the others must not wait for them.
    buffer.low_latency_update_mask_buffer(3, True)
    if rank not in (1, 3):
        run_case(buffer, tracker, make_case(seed, 3, num_ranks, spec), spec, rank, num_ranks, masked=(1, 3))
        buffer.clean_low_latency_buffer(spec["T_max"], spec["H"], spec["E"])
    dist.barrier(group)

    # Unmask: everybody takes part again.
    buffer.low_latency_clean_mask_buffer()
    buffer.low_latency_query_mask_buffer(status)
    assert status.tolist() == [0] * num_ranks
    run_case(buffer, tracker, make_case(seed, 4, num_ranks, spec), spec, rank, num_ranks)

    # Rank 2 fails between dispatch and combine: the combine skips its experts (and it gets zeros).
    case = make_case(seed, 5, num_ranks, spec)
    x, topk, w = case["x"][rank], case["topk"][rank], case["w"][rank]
    recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(x, topk, spec["T_max"], spec["E"], use_fp8=False)
    check_dispatch(case, spec, rank, num_ranks, recv_x, recv_count, handle)
    buffer.low_latency_update_mask_buffer(2, True)
    y = expert_outputs(recv_x, recv_count, handle, spec, rank, num_ranks, True)
    combined, _, _ = buffer.low_latency_combine(y, topk, w, handle)
    want = ref_combine(case, rank, num_ranks, spec["E"], spec["H"], "bf16", True, False, masked=(2,))
    assert torch.equal(bits(combined), bits(want))
    buffer.low_latency_clean_mask_buffer()
    buffer.clean_low_latency_buffer(spec["T_max"], spec["H"], spec["E"])
    run_case(buffer, tracker, make_case(seed, 6, num_ranks, spec), spec, rank, num_ranks)
    return "ok"


def _gone_rank_suite(rank: int, num_ranks: int, group, seed: int) -> str:
    """Shrink mode with rank 3 masked: rank 2's process then dies, and ranks 0 and 1 mask it on their
    next low-latency call and carry on (DeepEP masks ranks that time out)."""
    import os
    import deep_ep
    import torch.distributed as dist
    torch.set_num_threads(1)
    spec = dict(name="gone", T_max=8, H=256, E=2 * num_ranks, K=3)
    buffer = deep_ep.Buffer(group, 0, num_rdma_bytes=rdma_hint([spec], num_ranks), low_latency_mode=True,
                            num_qps_per_rank=2, enable_shrink=True)
    tracker = _Tracker()
    buffer.low_latency_update_mask_buffer(3, True)
    run_case(buffer, tracker, make_case(seed, 0, num_ranks, spec), spec, rank, num_ranks, masked=(3,))
    dist.barrier(group)
    if rank == 2:
        os._exit(0)  # dies without a word
    if rank == 3:
        return "ok"  # masked and idle
    run_case(buffer, tracker, make_case(seed, 1, num_ranks, spec), spec, rank, num_ranks, masked=(2, 3))
    status = torch.zeros(num_ranks, dtype=torch.int32)
    buffer.low_latency_query_mask_buffer(status)
    assert status.tolist() == [0, 0, 1, 1], status.tolist()
    run_case(buffer, tracker, make_case(seed, 2, num_ranks, dict(spec, hook=True)), dict(spec, hook=True), rank,
             num_ranks, masked=(2, 3))
    buffer.clean_low_latency_buffer(spec["T_max"], spec["H"], spec["E"])
    return "ok"


def _gone_worker(rank: int, num_ranks: int, port: int, listener, fn, args: tuple, results) -> None:
    import os
    import traceback
    from datetime import timedelta
    import torch.distributed as dist
    os.environ.update({"DEEP_EP_TIMEOUT_S": "30", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"})
    try:
        from deep_ep._comm import loopback_store  # torch's tcp:// init method would listen on every interface
        dist.init_process_group("gloo", store=loopback_store(port, rank, num_ranks, 60, listener), rank=rank,
                                world_size=num_ranks, timeout=timedelta(seconds=60))
        group = dist.new_group(list(range(num_ranks)))
        results.put((rank, True, fn(rank, num_ranks, group, *args)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, False, traceback.format_exc()))
    results.close()
    results.join_thread()  # flush the result before leaving
    os._exit(0)  # skip the process-group teardown: a peer is gone on purpose


def run_ranks_with_a_death(fn, num_ranks: int, dead_rank: int, *args, timeout_s: float = 120) -> None:
    """Like `dist_utils.run_ranks`, but `dead_rank` is expected to exit without reporting."""
    import queue
    import time
    import torch.multiprocessing as mp
    from deep_ep._comm import start_loopback_ranks
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = start_loopback_ranks(ctx, _gone_worker, num_ranks, fn, args, results, daemon=True)
    outcome = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outcome) < num_ranks - 1 and time.monotonic() < deadline:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                continue
            outcome[rank] = (ok, value)
    finally:
        for proc in procs:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.kill()
    failures = [f"----- rank {r} -----\n{v}" for r, (ok, v) in sorted(outcome.items()) if not ok]
    missing = [r for r in range(num_ranks) if r != dead_rank and r not in outcome]
    assert not failures and not missing, "\n".join(failures + [f"no result from ranks {missing}"])


# ==============================================================================================
# Bad inputs


def _bad_inputs_suite(rank: int, num_ranks: int, group, seed: int) -> str:
    import deep_ep
    torch.set_num_threads(1)
    spec = dict(name="valid", T_max=8, H=256, E=2 * num_ranks, K=3)
    t_max, hidden, num_experts = spec["T_max"], spec["H"], spec["E"]
    hint = rdma_hint([spec], num_ranks)
    buffer = deep_ep.Buffer(group, 0, num_rdma_bytes=hint, low_latency_mode=True, num_qps_per_rank=2)
    tracker = _Tracker()
    case = make_case(seed, 0, num_ranks, spec)
    x, topk, w = case["x"][rank], case["topk"][rank], case["w"][rank]
    disp = buffer.low_latency_dispatch

    expect_raises("x", lambda: disp(x.float(), topk, t_max, num_experts))
    expect_raises("x", lambda: disp(x.unsqueeze(0), topk, t_max, num_experts))
    expect_raises("x", lambda: disp(torch.zeros(x.size(0), 200, dtype=torch.bfloat16), topk, t_max, num_experts))
    expect_raises("x", lambda: disp(torch.zeros(t_max + 1, hidden, dtype=torch.bfloat16),
                                    torch.zeros(t_max + 1, 3, dtype=torch.int64), t_max, num_experts),
                  contains="num_max_dispatch_tokens_per_rank")
    expect_raises("topk_idx", lambda: disp(x, topk.int(), t_max, num_experts))
    expect_raises("topk_idx", lambda: disp(x, torch.zeros(x.size(0), 17, dtype=torch.int64), t_max, num_experts))
    expect_raises("topk_idx", lambda: disp(x, torch.full_like(topk, num_experts), t_max, num_experts))
    expect_raises("topk_idx", lambda: disp(x, torch.full_like(topk, -2), t_max, num_experts))
    expect_raises("num_experts", lambda: disp(x, topk.clamp(max=num_experts - 2), t_max, num_experts + 1))
    expect_raises("use_ue8m0", lambda: disp(x, topk, t_max, num_experts, use_fp8=True, use_ue8m0=True))
    expect_raises("return_recv_hook", lambda: disp(x, topk, t_max, num_experts, async_finish=True,
                                                   return_recv_hook=True))
    expect_raises("cumulative_local_expert_recv_stats",
                  lambda: disp(x, topk, t_max, num_experts,
                               cumulative_local_expert_recv_stats=torch.zeros(3, dtype=torch.int32)))
    expect_raises("cumulative_local_expert_recv_stats",
                  lambda: disp(x, topk, t_max, num_experts,
                               cumulative_local_expert_recv_stats=torch.zeros(2, dtype=torch.int64)))
    expect_raises("dispatch_wait_recv_cost_stats",
                  lambda: disp(x, topk, t_max, num_experts,
                               dispatch_wait_recv_cost_stats=torch.zeros(num_ranks, dtype=torch.int32)))
    expect_raises("dispatch_wait_recv_cost_stats",
                  lambda: disp(x, topk, t_max, num_experts,
                               dispatch_wait_recv_cost_stats=torch.zeros(num_ranks + 1, dtype=torch.int64)))
    # Duplicate experts beyond a block's T_max rows (checked by the engine, raised on every rank).
    dup_topk = torch.zeros(t_max, 3, dtype=torch.int64)
    expect_raises("topk_idx", lambda: disp(torch.zeros(t_max, hidden, dtype=torch.bfloat16), dup_topk, t_max,
                                           num_experts), exc_types=(RuntimeError,))
    tracker.calls += 1  # that call reached the engine (and took a slot)
    # Arguments that are valid locally but differ between ranks: every rank raises the same error.
    expect_raises("num_experts", lambda: disp(x, topk.clamp(max=num_ranks - 1), t_max,
                                              num_experts if rank == 0 else num_ranks))
    tracker.calls += 1
    expect_raises("use_fp8", lambda: disp(x, topk, t_max, num_experts, use_fp8=(rank == 0)))
    tracker.calls += 1

    # A valid dispatch for the combine checks.
    recv_x, recv_count, handle, _, _ = disp(x, topk, t_max, num_experts, use_fp8=False)
    tracker.calls += 1
    y = expert_outputs(recv_x, recv_count, handle, spec, rank, num_ranks, True)
    comb = buffer.low_latency_combine
    expect_raises("use_logfmt", lambda: comb(y, topk, w, handle, use_logfmt=True, zero_copy=True))
    expect_raises("x", lambda: comb(y[:, :-1], topk, w, handle))
    expect_raises("x", lambda: comb(y.float(), topk, w, handle))
    expect_raises("return_recv_hook", lambda: comb(y, topk, w, handle, async_finish=True, return_recv_hook=True))
    expect_raises("handle", lambda: comb(y, topk, w, handle[:4]))
    expect_raises("handle", lambda: comb(y, topk, w, (handle[0], handle[1], t_max, hidden, num_experts + 1)))
    expect_raises("handle", lambda: comb(y, topk, w, (torch.zeros(3, 3), None, None, None, None, None)))
    expect_raises("handle", lambda: buffer.get_next_low_latency_combine_buffer("not a handle"))
    expect_raises("topk_weights", lambda: comb(y, topk, w.double(), handle))
    expect_raises("out", lambda: comb(y, topk, w, handle, out=torch.empty(x.size(0), hidden + 128,
                                                                          dtype=torch.bfloat16)))
    expect_raises("combine_wait_recv_cost_stats",
                  lambda: comb(y, topk, w, handle, combine_wait_recv_cost_stats=torch.zeros(1, dtype=torch.int64)))
    # A `topk_idx` that does not match the dispatch (rank 0 drops one of its pairs): all ranks raise.
    valid0 = (case["topk"][0] >= 0).nonzero()
    if valid0.size(0) > 0:
        bad_topk = topk.clone()
        if rank == 0:
            bad_topk[valid0[0, 0], valid0[0, 1]] = -1
        expect_raises("topk_idx", lambda: comb(y, bad_topk, w, handle), exc_types=(RuntimeError,))
        tracker.calls += 1
    # Masks need enable_shrink.
    expect_raises("enable_shrink", lambda: buffer.low_latency_update_mask_buffer(1, True))
    expect_raises("enable_shrink", lambda: buffer.low_latency_query_mask_buffer(torch.zeros(num_ranks,
                                                                                            dtype=torch.int32)))
    expect_raises("enable_shrink", lambda: buffer.low_latency_clean_mask_buffer())

    # After all of that, the very same dispatch's combine still works, and so does a new round.
    combined, _, _ = comb(y, topk, w, handle)
    tracker.calls += 1
    want = ref_combine(case, rank, num_ranks, num_experts, hidden, "bf16", True, False)
    assert torch.equal(bits(combined), bits(want))
    run_case(buffer, tracker, make_case(seed, 1, num_ranks, spec), spec, rank, num_ranks)

    # num_rdma_bytes too small for the layout.
    small = deep_ep.Buffer(group, 0, num_rdma_bytes=128 * max(1, hint // 256), low_latency_mode=True,
                           num_qps_per_rank=2)
    expect_raises("num_rdma_bytes", lambda: small.low_latency_dispatch(x, topk, t_max, num_experts))
    # Not in low-latency mode.
    normal = deep_ep.Buffer(group, 1 << 20, 0)
    expect_raises("low_latency_mode", lambda: normal.low_latency_dispatch(x, topk, t_max, num_experts))
    return "ok"


# ==============================================================================================
# Unit tests of the quantisation helpers against the reference (single process)


def test_quant_matches_reference():
    from deep_ep import quant
    gen = torch.Generator().manual_seed(1234)
    for hidden in (128, 640):
        x = (torch.randn(40, hidden, generator=gen) * torch.logspace(-6, 3, 40).unsqueeze(1)).to(torch.bfloat16)
        x[3] = 0
        x[4, :128] = -0.0
        x[5, 5] = 1e-30
        for round_scale in (False, True):
            q, s = quant.per_token_cast_to_fp8(x, round_scale)
            rq, rs = ref_fp8_cast(x, round_scale)
            assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
            assert torch.equal(q.view(torch.uint8), rq) and torch.equal(s, rs)
            if round_scale:
                packed = quant.pack_ue8m0(s)
                assert torch.equal(packed, ref_ue8m0(rs))
                assert torch.equal(quant.unpack_ue8m0(packed, s.size(1)), s)
        y = x.clone()
        y[7, 128:] = 3.0  # step 0
        y[8, :128] *= torch.where(torch.arange(128) % 2 == 0, 1e-6, 1e4).to(torch.bfloat16)  # BF16 fallback
        assert torch.equal(bits(quant.logfmt10_round(y)), bits(ref_logfmt10(y)))
    # Scales just above a power of two round up (a rounded log2 would not).
    s = torch.tensor([2.0 ** -10 * (1 + 2.0 ** -23), 0.5, 3e-7], dtype=torch.float32)
    assert torch.equal(quant.ceil_pow2(s), ref_scale_pow2(s))


# ==============================================================================================
# Multi-process tests


def _suite(rank: int, num_ranks: int, group, seed: int, extra: Optional[str]) -> str:
    """One spawn per rank count (spawning dominates the run time): the main cases, then `extra`."""
    _main_suite(rank, num_ranks, group, seed)
    if num_ranks == 4:  # the main cases once more over the gloo transport (the default is shared memory)
        os.environ["DEEP_EP_TRANSPORT"] = "gloo"
        try:
            _main_suite(rank, num_ranks, group, seed + 1)
        finally:
            os.environ["DEEP_EP_TRANSPORT"] = "auto"
    if extra == "bad_inputs":
        _bad_inputs_suite(rank, num_ranks, group, seed)
    elif extra == "shrink":
        _shrink_suite(rank, num_ranks, group, seed)
    return "ok"


@pytest.mark.parametrize("num_ranks, extra", [(2, "bad_inputs"), (4, "shrink"), (8, None)])
def test_low_latency(num_ranks, extra):
    seed = make_seed()
    run_ranks(_suite, num_ranks, seed, extra, timeout_s=300)


def test_low_latency_shrink_rank_gone():
    seed = make_seed()
    run_ranks_with_a_death(_gone_rank_suite, 4, 2, seed)


@pytest.mark.parametrize("num_tokens,hidden,num_topk,drop", [(300, 2048, 8, 0.0), (300, 2048, 8, 0.3),
                                                             (77, 7168, 9, 0.5), (5, 128, 1, 1.0), (0, 256, 4, 0.0)])
@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_ll_reduce_blocks_are_bit_identical_to_the_plain_sum(num_tokens, hidden, num_topk, drop, native,
                                                             monkeypatch):
    """The reduce of the low-latency combine, in C (deep_ep._native) and with torch's token-blocked
    operations (several blocks, a partial last block, pairs without a row), equals
    ``acc = 0; acc += fp32(w) * fp32(y)`` per k ascending, bit for bit."""
    from deep_ep import _native
    from deep_ep.engines.portable_ll import PortableLowLatency
    if native and _native.library() is None:
        pytest.skip(f"native helpers unavailable: {_native.status()}")
    if not native:
        monkeypatch.setenv("DEEP_EP_CPU_NATIVE", "0")
    g = torch.Generator().manual_seed(make_seed())
    valid = torch.rand(num_tokens, num_topk, generator=g) >= drop
    tok, kk = valid.nonzero(as_tuple=True)
    perm = torch.randperm(tok.numel(), generator=g)
    tok, kk = tok[perm], kk[perm]
    recv = (torch.randn(tok.numel() + 2, hidden, generator=g) * torch.logspace(-4, 4, hidden)).to(torch.bfloat16)
    weights = torch.rand(num_tokens, num_topk, generator=g)
    row = torch.arange(tok.numel())
    got = PortableLowLatency._reduce(recv, tok, kk, row, weights, num_tokens, num_topk, hidden)
    want = torch.zeros(num_tokens, hidden, dtype=torch.float32)
    for k in range(num_topk):
        sel = (kk == k).nonzero().view(-1)
        term = torch.zeros(num_tokens, hidden, dtype=torch.float32)
        present = torch.zeros(num_tokens, dtype=torch.bool)
        term[tok[sel]] = weights[tok[sel], k:k + 1] * recv[row[sel]].float()
        present[tok[sel]] = True
        want = torch.where(present.unsqueeze(1), want + term, want)
    assert torch.equal(got.view(torch.int16), want.to(torch.bfloat16).view(torch.int16))
