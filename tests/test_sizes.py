"""The buffer-size rule of normal mode is the same on every engine (`deep_ep._sizes`).

A Buffer too small for a dispatch or combine raises, on CPU as on GPU, a ValueError that names
`num_nvl_bytes` and the size hint to call, on every rank, before any communication; a Buffer sized
with the hints runs. (That the CUDA kernels never need more than the hint is checked against the
compiled core in tests/test_core_host.py and tests/test_core_host_internode.py.)
"""

import pytest
import torch

from dist_utils import run_ranks

R, T, H, E, K = 2, 10, 256, 8, 2


def _inputs(rank):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    topk_idx = torch.rand(T, E, generator=g).argsort(dim=1)[:, :K].contiguous()
    return x, topk_idx, torch.rand(T, K, generator=g)


def _dispatch(buf, x, topk_idx, topk_weights, config=None):
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, E)
    return buf.dispatch(x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
                        num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights, config=config)


def _worker(rank, num_ranks, group):
    import deep_ep
    x, topk_idx, topk_weights = _inputs(rank)
    dispatch_cfg, combine_cfg = deep_ep.Buffer.get_dispatch_config(R), deep_ep.Buffer.get_combine_config(R)
    hint = max(c.get_nvl_buffer_size_hint(H * 2, R) for c in (dispatch_cfg, combine_cfg))
    errors = {}
    good = deep_ep.Buffer(group, num_nvl_bytes=hint)
    recv_x, _, _, _, handle, _ = _dispatch(good, x, topk_idx, topk_weights)
    combined, _, _ = good.combine(recv_x, handle)
    for nvl in (0, 128, dispatch_cfg.get_nvl_buffer_size_hint(H * 2, R) - 128):
        small = deep_ep.Buffer(group, num_nvl_bytes=nvl)
        for what, call in (("dispatch", lambda: _dispatch(small, x, topk_idx, topk_weights)),
                           ("cached dispatch", lambda: small.dispatch(x, handle=handle)),
                           ("combine", lambda: small.combine(recv_x, handle))):
            try:
                call()
                errors[(nvl, what)] = None
            except ValueError as exc:
                errors[(nvl, what)] = str(exc)
        # the Buffer stays usable: the error came before any communication
        assert small.get_dispatch_layout(topk_idx, E)[0].sum() > 0
    # a config of the caller's: its own hint is named
    tiny = deep_ep.Config(4, 6, 16, 6, 64)  # 2 channels, small rings
    small = deep_ep.Buffer(group, num_nvl_bytes=tiny.get_nvl_buffer_size_hint(H * 2, R))
    _dispatch(small, x, topk_idx, topk_weights, config=tiny)
    try:
        _dispatch(small, x, topk_idx, topk_weights)  # the default config needs more
        errors["default config"] = None
    except ValueError as exc:
        errors["default config"] = str(exc)
    return errors, good.engine, combined.shape


def test_too_small_buffers_raise_on_every_engine_alike():
    results = run_ranks(_worker, R, timeout_s=180)
    assert results[0][0] == results[1][0], "every rank raises the same error"
    errors, engine, shape = results[0]
    assert shape == (T, H)
    for (nvl, what), msg in ((k, v) for k, v in errors.items() if isinstance(k, tuple)):
        assert msg is not None, f"num_nvl_bytes={nvl}: {what} did not raise (engine {engine})"
        assert msg.startswith(f"deep_ep.Buffer.{what.split()[-1]}: the Buffer has num_nvl_bytes={nvl}"), msg
        config = "get_combine_config" if what == "combine" else "get_dispatch_config"
        assert f"Buffer.{config}({R}).get_nvl_buffer_size_hint({H * 2}, {R})" in msg, msg
    assert errors["default config"] is not None and "get_dispatch_config(2)" in errors["default config"]


@pytest.mark.parametrize("hidden,fp8", [(256, False), (384, True)])
def test_hidden_bytes_count_fp8_as_two_bytes(hidden, fp8):
    from deep_ep._sizes import check_normal_buffer
    import deep_ep
    cfg = deep_ep.Buffer.get_dispatch_config(8)
    need = cfg.get_nvl_buffer_size_hint(hidden * 2, 8)
    check_normal_buffer("deep_ep.Buffer.dispatch", need, hidden * max(1 if fp8 else 2, 2), 8, 8, cfg, "config")
    with pytest.raises(ValueError, match=r"num_nvl_bytes=\d+, this call needs " + str(need)):
        check_normal_buffer("deep_ep.Buffer.dispatch", need - 128, hidden * 2, 8, 8, cfg, "config")
    # across nodes: the two-hop kernels' hint (num_ranks_per_node named)
    multi = cfg.get_nvl_buffer_size_hint(hidden * 2, 8, num_ranks_per_node=2)
    with pytest.raises(ValueError, match=r"get_nvl_buffer_size_hint\(\d+, 8, num_ranks_per_node=2\)"):
        check_normal_buffer("deep_ep.Buffer.dispatch", multi - 128, hidden * 2, 8, 2, cfg, "config")
