"""Quantisation math of the low-latency mode: the online FP8 cast, UE8M0 scale packing and LogFMT-10.

Everything here is vectorised torch and runs unchanged on CPU and CUDA tensors. The formulas are the
ones `docs/semantics.md` pins down; where a formula leaves a floating-point detail open, the choice
made here is stated in the function's docstring (the CUDA kernels must make the same one).

* `per_token_cast_to_fp8` / `per_token_cast_back`: 1x128-block FP8 (e4m3) with float32 ``scale_inv``.
* `pack_ue8m0` / `unpack_ue8m0`: power-of-two scales stored as their exponent byte, four per int32.
* `logfmt10_encode` / `logfmt10_decode` / `logfmt10_round`: deep_ep's 10-bit logarithmic format for
  combine messages, with a BF16 fallback per 128-channel group.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["FP8_MAX", "AMAX_FLOOR", "GROUP_SIZE", "per_token_cast_to_fp8", "per_token_cast_back",
           "ceil_pow2", "pack_ue8m0", "unpack_ue8m0", "logfmt10_encode", "logfmt10_decode",
           "logfmt10_round", "LOGFMT10_GROUP_BYTES"]

FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value."""
AMAX_FLOOR = 1e-4
"""Lower bound of a block's amax (as float32), so that all-zero blocks get a finite scale."""
GROUP_SIZE = 128
"""Channels per FP8 scale block and per LogFMT group."""

# LogFMT-10: 9-bit magnitude codes, code 0 = zero, codes 1..511 cover [lo, hi] in 510 steps.
_LOGFMT_NUM_STEPS = 510
# Above this step (in log2 units) the dynamic range is too large (> 2^15.9) and the group stays BF16.
_LOGFMT_MAX_STEP = 1.0 / 32.0
# 128 values x 10 bits = 160 bytes; a group's payload slot is 256 bytes (room for the BF16 fallback).
_LOGFMT_CODE_BYTES = GROUP_SIZE * 10 // 8
LOGFMT10_GROUP_BYTES = GROUP_SIZE * 2
"""Bytes per 128-channel group in `logfmt10_encode`'s payload (the BF16 size, needed by the fallback)."""


def _grouped(x: torch.Tensor, what: str) -> torch.Tensor:
    """``[..., H]`` -> ``[..., H/128, 128]`` (a view); `H` must be a multiple of 128."""
    if x.size(-1) % GROUP_SIZE != 0:
        raise ValueError(f"deep_ep.quant.{what}: the last dimension must be a multiple of {GROUP_SIZE}, "
                         f"got shape {tuple(x.shape)}")
    return x.reshape(*x.shape[:-1], x.size(-1) // GROUP_SIZE, GROUP_SIZE)


def ceil_pow2(x: torch.Tensor) -> torch.Tensor:
    """``2 ** ceil(log2(x))`` for positive normal float32 ``x``, computed exactly from the bits.

    A rounded ``log2`` can land on an integer for values just above a power of two (e.g. ``2^-10 *
    (1 + 2^-23)``), so the exponent is read from the IEEE bits instead: keep the exponent when the
    mantissa is zero, otherwise add one and clear the mantissa.
    """
    bits = x.to(torch.float32).view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    mantissa_nonzero = (bits & 0x7FFFFF) != 0
    exponent = exponent + mantissa_nonzero.to(torch.int32)
    return (exponent << 23).view(torch.float32)


def per_token_cast_to_fp8(x: torch.Tensor, round_scale: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cast BF16 tokens to FP8 e4m3 with one float32 scale per token and 128-channel block.

    Per token and block ``g``, in float32: ``amax = max(max|x_g|, 1e-4)``; ``scale_inv = amax / 448``;
    with ``round_scale``, ``scale_inv = 2^ceil(log2(scale_inv))`` (exact, see `ceil_pow2`);
    ``x_fp8 = e4m3(clamp(x * (1 / scale_inv), -448, 448))`` with round-to-nearest-even.
    ``1 / scale_inv`` is an IEEE float32 division, then an IEEE float32 multiply (no fused ops).

    Args:
        x: ``[T, H]`` (any leading dims), ``torch.bfloat16`` (other float dtypes are converted to
            float32 first); ``H % 128 == 0``.
        round_scale: round ``scale_inv`` up to a power of two.

    Returns:
        ``(x_fp8, scale_inv)``: ``[T, H]`` ``torch.float8_e4m3fn`` (contiguous) and ``[T, H/128]``
        ``torch.float32`` (contiguous, row-major).
    """
    xf = _grouped(x, "per_token_cast_to_fp8").to(torch.float32)
    floor = torch.tensor(AMAX_FLOOR, dtype=torch.float32, device=x.device)
    amax = torch.maximum(xf.abs().amax(dim=-1), floor)
    scale_inv = amax / FP8_MAX
    if round_scale:
        scale_inv = ceil_pow2(scale_inv)
    inv = torch.reciprocal(scale_inv)
    q = torch.clamp(xf * inv.unsqueeze(-1), -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(x.shape), scale_inv.contiguous()


def per_token_cast_back(x_fp8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Dequantise: ``float32(x_fp8) * scale_inv`` per 128-channel block.

    Args:
        x_fp8: ``[..., H]`` ``torch.float8_e4m3fn``.
        scales: ``[..., H/128]`` float32 ``scale_inv``, or ``[..., ceil(H/512)]`` int32 packed UE8M0
            (any strides, e.g. the column-major low-latency scales).

    Returns:
        ``[..., H]`` ``torch.float32``.
    """
    num_groups = x_fp8.size(-1) // GROUP_SIZE
    if scales.dtype == torch.int32:
        scales = unpack_ue8m0(scales, num_groups)
    xf = _grouped(x_fp8, "per_token_cast_back").to(torch.float32)
    return (xf * scales.to(torch.float32).unsqueeze(-1)).reshape(x_fp8.shape)


def pack_ue8m0(scale_inv: torch.Tensor) -> torch.Tensor:
    """Pack power-of-two float32 scales as UE8M0 exponent bytes, four blocks per int32.

    Byte of block ``g`` = ``(bits(scale_inv[g]) >> 23) & 0xff``; block ``4q + i`` goes into byte ``i``
    of int32 ``q`` (block ``4q`` in the low byte); missing blocks of the last int32 are zero bytes.
    The packing is arithmetic, so it does not depend on the host's byte order.

    Args:
        scale_inv: ``[..., S]`` ``torch.float32`` (meant for powers of two: the mantissa is dropped).

    Returns:
        ``[..., ceil(S/4)]`` ``torch.int32`` (contiguous).
    """
    num_scales = scale_inv.size(-1)
    num_packed = (num_scales + 3) // 4
    exp_bytes = (scale_inv.to(torch.float32).contiguous().view(torch.int32) >> 23) & 0xFF
    padded = torch.zeros(*scale_inv.shape[:-1], num_packed * 4, dtype=torch.int64, device=scale_inv.device)
    padded[..., :num_scales] = exp_bytes
    padded = padded.reshape(*scale_inv.shape[:-1], num_packed, 4)
    word = padded[..., 0] | (padded[..., 1] << 8) | (padded[..., 2] << 16) | (padded[..., 3] << 24)
    # Reinterpret the unsigned 32-bit word as int32 (two's complement).
    word = torch.where(word >= (1 << 31), word - (1 << 32), word)
    return word.to(torch.int32)


def unpack_ue8m0(packed: torch.Tensor, num_scales: Optional[int] = None) -> torch.Tensor:
    """Inverse of `pack_ue8m0`: ``[..., Q]`` int32 -> ``[..., num_scales]`` float32 ``2^(byte - 127)``.

    Args:
        packed: ``[..., Q]`` ``torch.int32`` (any strides).
        num_scales: blocks to return (default ``4 * Q``). A zero byte decodes to 0.0.

    Returns:
        ``[..., num_scales]`` ``torch.float32`` (contiguous).
    """
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64, device=packed.device)
    exp_bytes = (words.unsqueeze(-1) >> shifts) & 0xFF
    exp_bytes = exp_bytes.reshape(*packed.shape[:-1], packed.size(-1) * 4)
    if num_scales is not None:
        exp_bytes = exp_bytes[..., :num_scales]
    return (exp_bytes.to(torch.int32) << 23).view(torch.float32).contiguous()


# ---------------------------------------------------------------------------------------------
# LogFMT-10


def logfmt10_encode(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Encode BF16 rows in LogFMT-10, per 128-channel group (deep_ep's definition, docs/semantics.md).

    Per group, in float32: ``a = |x|``. All zero: every code is 0. Otherwise ``lo = log2(min nonzero a)``
    and ``hi = log2(max a)``, each rounded to bf16; ``step = (hi - lo) / 510``. If ``step > 1/32`` (or is
    not finite: inf/NaN inputs) the group falls back to BF16. Else each element becomes ``sign << 9 | code``
    with ``code = 0`` for zero, else ``1 + clamp(round((log2 a - lo) / step), 0, 510)`` (``round`` is
    half-to-even; with ``step == 0`` every nonzero element gets code 1). All arithmetic is float32,
    one IEEE operation at a time, in the order written.

    Wire format (one group = one 256-byte payload slot plus a bf16 pair):

    * ``payload[..., g, :]``: an encoded group stores its 128 10-bit values as a little-endian bit
      stream in bytes ``0..159`` (value ``i`` in bits ``10*i .. 10*i+9``) and zeros after; a fallback
      group stores its 128 BF16 values as bytes (little-endian, i.e. ``x.view(uint8)`` on the usual hosts).
    * ``meta[..., g, :]`` = ``(lo, hi)`` as bf16; ``(0, 0)`` for an all-zero group; ``(NaN, NaN)`` marks
      a BF16 fallback group.

    Args:
        x: ``[..., H]`` ``torch.bfloat16``, ``H % 128 == 0``.

    Returns:
        ``(payload, meta)``: ``[..., H/128, 256]`` ``torch.uint8`` and ``[..., H/128, 2]`` ``torch.bfloat16``.
    """
    groups = _grouped(x, "logfmt10_encode")
    xf = groups.to(torch.float32)
    a = xf.abs()
    nonzero = a != 0
    any_nonzero = nonzero.any(dim=-1)
    inf = torch.tensor(float("inf"), dtype=torch.float32, device=x.device)
    amin = torch.where(nonzero, a, inf).amin(dim=-1)
    amax = a.amax(dim=-1)
    one = torch.ones((), dtype=torch.float32, device=x.device)
    # All-zero groups: log2 of a dummy 1.0 keeps the arithmetic finite; they are overridden below.
    lo = torch.log2(torch.where(any_nonzero, amin, one)).to(torch.bfloat16).to(torch.float32)
    hi = torch.log2(torch.where(any_nonzero, amax, one)).to(torch.bfloat16).to(torch.float32)
    step = (hi - lo) / _LOGFMT_NUM_STEPS
    fallback = any_nonzero & ~(step <= _LOGFMT_MAX_STEP)

    log_a = torch.log2(torch.where(nonzero, a, one))
    safe_step = torch.where(step > 0, step, one)
    ratio = torch.round((log_a - lo.unsqueeze(-1)) / safe_step.unsqueeze(-1))
    ratio = torch.where((step > 0).unsqueeze(-1), ratio, torch.zeros_like(ratio))
    # Clamp as float first (ratio may be +-inf/NaN in fallback groups), then to an integer code.
    ratio = torch.nan_to_num(ratio, nan=0.0).clamp(0, _LOGFMT_NUM_STEPS)
    code = torch.where(nonzero, ratio.to(torch.int64) + 1, torch.zeros_like(ratio, dtype=torch.int64))
    sign = (groups.view(torch.int16) < 0).to(torch.int64)  # the bf16 sign bit (keeps -0.0)
    value = (sign << 9) | code

    # Pack four 10-bit values into five bytes.
    quads = value.reshape(*value.shape[:-1], GROUP_SIZE // 4, 4)
    word = quads[..., 0] | (quads[..., 1] << 10) | (quads[..., 2] << 20) | (quads[..., 3] << 30)
    shifts = torch.arange(0, 40, 8, dtype=torch.int64, device=x.device)
    code_bytes = ((word.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8)
    code_bytes = code_bytes.reshape(*value.shape[:-1], _LOGFMT_CODE_BYTES)

    payload = torch.zeros(*value.shape[:-1], LOGFMT10_GROUP_BYTES, dtype=torch.uint8, device=x.device)
    payload[..., :_LOGFMT_CODE_BYTES] = code_bytes
    raw = groups.contiguous().view(torch.uint8)
    payload = torch.where(fallback.unsqueeze(-1), raw, payload)

    nan = torch.tensor(float("nan"), dtype=torch.float32, device=x.device)
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    meta_lo = torch.where(fallback, nan, torch.where(any_nonzero, lo, zero))
    meta_hi = torch.where(fallback, nan, torch.where(any_nonzero, hi, zero))
    meta = torch.stack([meta_lo, meta_hi], dim=-1).to(torch.bfloat16)
    return payload, meta


def logfmt10_decode(payload: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Decode `logfmt10_encode`'s output back to BF16 rows.

    An encoded value ``sign << 9 | code`` decodes to ``(-1)^sign * 2^(lo + (code - 1) * step)`` with
    ``step = (hi - lo) / 510`` (float32, ``exp2``), rounded to bf16; code 0 decodes to a zero that keeps
    the sign bit. Fallback groups (``meta`` NaN) are the stored BF16 values.

    Args:
        payload: ``[..., G, 256]`` ``torch.uint8``.
        meta: ``[..., G, 2]`` ``torch.bfloat16``.

    Returns:
        ``[..., G * 128]`` ``torch.bfloat16``.
    """
    lead = payload.shape[:-2]
    num_groups = payload.size(-2)
    code_bytes = payload[..., :_LOGFMT_CODE_BYTES].to(torch.int64)
    code_bytes = code_bytes.reshape(*lead, num_groups, GROUP_SIZE // 4, 5)
    shifts = torch.arange(0, 40, 8, dtype=torch.int64, device=payload.device)
    word = (code_bytes << shifts).sum(dim=-1)
    quad_shifts = torch.arange(0, 40, 10, dtype=torch.int64, device=payload.device)
    value = ((word.unsqueeze(-1) >> quad_shifts) & 0x3FF).reshape(*lead, num_groups, GROUP_SIZE)
    sign = (value >> 9) & 1
    code = value & 0x1FF

    lo = meta[..., 0].to(torch.float32)
    hi = meta[..., 1].to(torch.float32)
    step = (hi - lo) / _LOGFMT_NUM_STEPS
    exponent = lo.unsqueeze(-1) + (code - 1).to(torch.float32) * step.unsqueeze(-1)
    magnitude = torch.where(code > 0, torch.exp2(exponent), torch.zeros_like(exponent)).to(torch.bfloat16)
    # Set the sign bit in int32 and wrap back to int16 (shifting into an int16's sign bit overflows).
    bits = (magnitude.view(torch.int16).to(torch.int32) & 0xFFFF) | (sign.to(torch.int32) << 15)
    bits = torch.where(bits >= (1 << 15), bits - (1 << 16), bits).to(torch.int16)
    decoded = bits.view(torch.bfloat16)

    fallback = torch.isnan(lo)
    raw = payload.contiguous().view(torch.bfloat16)
    out = torch.where(fallback.unsqueeze(-1), raw, decoded)
    return out.reshape(*lead, num_groups * GROUP_SIZE)


def logfmt10_round(x: torch.Tensor) -> torch.Tensor:
    """Round BF16 rows through LogFMT-10 (encode then decode), as the low-latency combine does.

    Args:
        x: ``[..., H]`` ``torch.bfloat16``, ``H % 128 == 0``.

    Returns:
        ``[..., H]`` ``torch.bfloat16``: each 128-channel group either LogFMT-10-rounded, or unchanged
        when it falls back to BF16 (dynamic range above 2^15.9), or zero when it is all zero.
    """
    payload, meta = logfmt10_encode(x)
    return logfmt10_decode(payload, meta).reshape(x.shape)
