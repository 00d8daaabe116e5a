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
def test_blocked_combine_reduce_is_bit_identical(num_tokens, hidden, num_src, density, num_bias, block):
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
