"""The buffer-size rules are the same on every engine (`deep_ep._sizes`).

A Buffer too small for a dispatch or combine raises, on CPU as on GPU, a ValueError that names
`num_nvl_bytes` (across nodes also `num_rdma_bytes`) and the size hint to call, on every rank, before
any communication; likewise a low-latency call whose layout does not fit `num_rdma_bytes`. A Buffer
sized with the hints runs. (That the CUDA kernels never need more than the hint is checked against the
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


def _call_errors(calls):
    """{name: the ValueError's message, or None when the call ran}."""
    errors = {}
    for what, call in calls:
        try:
            call()
            errors[what] = None
        except ValueError as exc:
            errors[what] = str(exc)
    return errors


def _rdma_worker(rank, num_ranks, group):
    import deep_ep
    P = 1  # DEEP_EP_RANKS_PER_NODE=1: every rank a node of its own
    x, topk_idx, topk_weights = _inputs(rank)
    configs = deep_ep.Buffer.get_dispatch_config(R), deep_ep.Buffer.get_combine_config(R)
    nvl = max(c.get_nvl_buffer_size_hint(H * 2, R, num_ranks_per_node=P) for c in configs)
    rdma = max(c.get_rdma_buffer_size_hint(H * 2, R, num_ranks_per_node=P) for c in configs)
    good = deep_ep.Buffer(group, num_nvl_bytes=nvl, num_rdma_bytes=rdma)
    assert good.num_nodes == R
    recv_x, _, _, _, handle, _ = _dispatch(good, x, topk_idx, topk_weights)
    assert len(handle) == 10
    combined, _, _ = good.combine(recv_x, handle)
    errors = {}
    for small_rdma in (0, 128, configs[0].get_rdma_buffer_size_hint(H * 2, R, num_ranks_per_node=P) - 128):
        small = deep_ep.Buffer(group, num_nvl_bytes=nvl, num_rdma_bytes=small_rdma)
        for what, msg in _call_errors((("dispatch", lambda: _dispatch(small, x, topk_idx, topk_weights)),
                                       ("cached dispatch", lambda: small.dispatch(x, handle=handle)),
                                       ("combine", lambda: small.combine(recv_x, handle)))).items():
            errors[("normal", small_rdma, what)] = msg
        assert small.get_dispatch_layout(topk_idx, E)[0].sum() > 0  # raised before any communication

    # low-latency mode: num_rdma_bytes below the layout the hint covers
    t_max = 16
    ll_hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(t_max, H, R, E)
    ll_good = deep_ep.Buffer(group, num_rdma_bytes=ll_hint, low_latency_mode=True)
    recv, _, ll_handle, _, _ = ll_good.low_latency_dispatch(x, topk_idx, t_max, E, use_fp8=False)
    out, _, _ = ll_good.low_latency_combine(recv, topk_idx, topk_weights, ll_handle)
    for small_rdma in (0, ll_hint - 256):
        small = deep_ep.Buffer(group, num_rdma_bytes=small_rdma, low_latency_mode=True)
        for what, msg in _call_errors((
                ("low_latency_dispatch", lambda: small.low_latency_dispatch(x, topk_idx, t_max, E, use_fp8=False)),
                ("low_latency_combine", lambda: small.low_latency_combine(recv, topk_idx, topk_weights, ll_handle)),
                ("clean_low_latency_buffer", lambda: small.clean_low_latency_buffer(t_max, H, E)))).items():
            errors[("ll", small_rdma, what)] = msg
    ll_good.clean_low_latency_buffer(t_max, H, E)
    return errors, good.engine, combined.shape, out.shape


def test_too_small_rdma_buffers_raise_on_every_engine_alike():
    results = run_ranks(_rdma_worker, R, ranks_per_node=1, timeout_s=180)
    assert results[0][0] == results[1][0], "every rank raises the same error"
    errors, engine, shape, ll_shape = results[0]
    assert shape == (T, H) and ll_shape == (T, H)
    assert len(errors) == 3 * 3 + 2 * 3
    for (mode, rdma, what), msg in errors.items():
        assert msg is not None, f"num_rdma_bytes={rdma}: {what} did not raise (engine {engine})"
        assert "on every engine (CPU and GPU alike)" in msg, msg
        if mode == "normal":
            assert msg.startswith(f"deep_ep.Buffer.{what.split()[-1]}: the Buffer has num_rdma_bytes={rdma}, "
                                  f"this call across {R} nodes needs "), msg
            config = "get_combine_config" if what == "combine" else "get_dispatch_config"
            assert f"num_rdma_bytes >= Buffer.{config}({R}).get_rdma_buffer_size_hint({H * 2}, {R}, " \
                   f"num_ranks_per_node=1)" in msg, msg
        else:
            assert msg.startswith(f"deep_ep.Buffer.{what}: `num_rdma_bytes` is {rdma}, "), msg
            assert f"num_rdma_bytes >= Buffer.get_low_latency_rdma_size_hint(16, {H}, {R}, {E})" in msg, msg


def test_rdma_rule_applies_across_nodes_only():
    from deep_ep._sizes import check_normal_buffer
    import deep_ep
    cfg = deep_ep.Buffer.get_dispatch_config(8)
    nvl = cfg.get_nvl_buffer_size_hint(512, 8)
    check_normal_buffer("deep_ep.Buffer.dispatch", nvl, 512, 8, 8, cfg, "config", num_rdma_bytes=0)  # one node
    multi_nvl = cfg.get_nvl_buffer_size_hint(512, 8, num_ranks_per_node=4)
    need = cfg.get_rdma_buffer_size_hint(512, 8, num_ranks_per_node=4)
    check_normal_buffer("deep_ep.Buffer.dispatch", multi_nvl, 512, 8, 4, cfg, "config", num_rdma_bytes=need)
    with pytest.raises(ValueError, match=rf"num_rdma_bytes={need - 128}, this call across 2 nodes needs {need} .*"
                                         r"config\.get_rdma_buffer_size_hint\(512, 8, num_ranks_per_node=4\)"):
        check_normal_buffer("deep_ep.Buffer.dispatch", multi_nvl, 512, 8, 4, cfg, "config",
                            num_rdma_bytes=need - 128)
    # the nvl rule is named first when both are short
    with pytest.raises(ValueError, match="num_nvl_bytes=0"):
        check_normal_buffer("deep_ep.Buffer.dispatch", 0, 512, 8, 4, cfg, "config", num_rdma_bytes=0)
