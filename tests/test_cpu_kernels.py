"""The CPU paths' building blocks, bit for bit against the straightforward formulations they replace."""

import pytest
import torch

from deep_ep.engines.portable import reduce_rows_by_token
from dist_utils import make_seed


def _plain_reduce(rows, tok_ids, bounds, num_tokens, bias):
    """The combine reduce before blocking: a full float32 accumulator, ``index_add_`` per source."""
    acc = torch.zeros((num_tokens, rows.size(1)), dtype=torch.float32)
    for b in bias:
        acc += b.float()
    rows_f = rows.float()
    for d in range(len(bounds) - 1):
        if bounds[d + 1] > bounds[d]:
            acc.index_add_(0, tok_ids[bounds[d]:bounds[d + 1]], rows_f[bounds[d]:bounds[d + 1]])
    return acc.to(rows.dtype)


@pytest.mark.parametrize("num_tokens,hidden,num_src,density,num_bias,block", [
    (1024, 2048, 4, 0.9, 0, 0), (300, 136, 3, 0.5, 2, 0), (77, 384, 8, 0.2, 1, 7), (0, 256, 2, 0.5, 0, 0),
    (50, 128, 4, 0.0, 1, 0), (33, 7168, 1, 1.0, 2, 0), (129, 256, 5, 0.7, 0, 1),
])
@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_blocked_combine_reduce_is_bit_identical(num_tokens, hidden, num_src, density, num_bias, block, native,
                                                 monkeypatch):
    """The normal combine's reduce, in C (deep_ep._native; block 0) and token-blocked in torch."""
    from deep_ep import _native
    if native and (block or _native.library() is None):
        pytest.skip("the native reduce runs only without an explicit block size, when the helpers are built")
    if not native:
        monkeypatch.setenv("DEEP_EP_CPU_NATIVE", "0")
    gen = torch.Generator().manual_seed(make_seed())
    mask = torch.rand((num_tokens, num_src), generator=gen) < density
    if num_tokens and num_src > 1:
        mask[:, 1] = False  # a source that sends nothing back
    _, tok_ids = mask.t().nonzero(as_tuple=True)
    bounds = [0] + mask.sum(0).cumsum(0).tolist()
    # Wide magnitudes (and signed zeros) make every rounding of the sum order visible.
    rows = (torch.randn((tok_ids.numel(), hidden), generator=gen) *
            torch.exp(4 * torch.randn((tok_ids.numel(), 1), generator=gen))).to(torch.bfloat16)
    if rows.numel():
        rows[0, :3] = torch.tensor([-0.0, 0.0, -0.0]).to(torch.bfloat16)
    bias = [torch.randn((num_tokens, hidden), generator=gen).to(torch.bfloat16) for _ in range(num_bias)]
    got = reduce_rows_by_token(rows, tok_ids, bounds, num_tokens, bias, block_tokens=block)
    want = _plain_reduce(rows, tok_ids, bounds, num_tokens, bias)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    # The same from per-source segments (how the shared-memory transport hands them over).
    segs = [rows[bounds[d]:bounds[d + 1]].clone() for d in range(num_src)]
    got_segs = reduce_rows_by_token(segs, tok_ids, bounds, num_tokens, bias, block_tokens=block)
    assert torch.equal(got_segs.view(torch.int16), want.view(torch.int16))


def _plain_ll_reduce(recv, row_token, row_k, row, weights, num_tokens, num_topk, hidden):
    """The low-latency combine reduce before the rewrite: a full-size ``torch.where`` per k."""
    acc = torch.zeros((num_tokens, hidden), dtype=torch.float32)
    if row.numel() == 0:
        return acc.to(torch.bfloat16)
    row_of = torch.full((num_tokens, num_topk), -1, dtype=torch.int64)
    row_of[row_token, row_k] = row
    for k in range(num_topk):
        rows = row_of[:, k]
        present = (rows >= 0).unsqueeze(1)
        y = recv[rows.clamp(min=0)].to(torch.float32)
        acc = torch.where(present, acc + weights[:, k:k + 1] * y, acc)
    return acc.to(torch.bfloat16)


@pytest.mark.parametrize("num_tokens,num_topk,hidden,density", [(128, 8, 2048, 0.9), (37, 3, 384, 0.5),
                                                                (16, 4, 128, 0.0), (0, 2, 256, 1.0),
                                                                (64, 4, 256, 1.0), (8, 6, 128, 0.9)])
def test_ll_combine_reduce_is_bit_identical(num_tokens, num_topk, hidden, density):
    from deep_ep.engines.portable_ll import PortableLowLatency
    gen = torch.Generator().manual_seed(make_seed())
    present = torch.rand((num_tokens, num_topk), generator=gen) < density
    row_token, row_k = present.nonzero(as_tuple=True)
    row = torch.randperm(row_token.numel(), generator=gen)
    recv = (torch.randn((row.numel(), hidden), generator=gen) *
            torch.exp(3 * torch.randn((row.numel(), 1), generator=gen))).to(torch.bfloat16)
    weights = torch.randn((num_tokens, num_topk), generator=gen)
    got = PortableLowLatency._reduce(recv, row_token, row_k, row, weights, num_tokens, num_topk, hidden)
    want = _plain_ll_reduce(recv, row_token, row_k, row, weights, num_tokens, num_topk, hidden)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
