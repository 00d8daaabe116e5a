"""Which tensors an ``async_finish=True`` call hands to ``record_stream`` (issue 12, item 5), on CPU.

With ``async_finish`` the kernels run on the comm stream and the call returns at once; every tensor the
call reads must be recorded on the comm stream, or the caching allocator may give its memory to the
next allocation on the caller's stream (a handle created or cloned on another stream and dropped right
after the call) while the comm stream still reads it. `deep_ep.buffer._Launch.finish` records its
``inputs`` and the outputs; this test wraps `_Launch` to see both lists (the CPU path computes them the
same way and skips only the CUDA calls) and checks every tensor argument, handle fields included, of:
dispatch, cached dispatch, combine, low-latency dispatch and combine.
"""

import torch

from dist_utils import make_seed, run_ranks


def _record_worker(rank: int, num_ranks: int, group, seed: int):
    import deep_ep.buffer as buffer_mod
    from deep_ep import Buffer

    recorded = []

    class RecordingLaunch(buffer_mod._Launch):
        def finish(self, outputs):
            if self.async_finish:
                recorded.append([t for t in self.inputs] + buffer_mod._flatten_tensors(outputs))
            return super().finish(outputs)

    buffer_mod._Launch = RecordingLaunch
    problems = []

    def check(what, **arguments):
        got = recorded.pop()
        for name, value in arguments.items():
            for i, t in enumerate(buffer_mod._flatten_tensors([value])):
                if not any(t is r for r in got):
                    problems.append(f"{what}: `{name}` (tensor {i}: {tuple(t.shape)} {t.dtype}) is not recorded")

    gen = torch.Generator().manual_seed(seed + rank)
    num_experts, num_tokens, hidden, t_max = 4 * num_ranks, 12, 256, 16
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
    topk_idx = torch.stack([torch.randperm(num_experts, generator=gen)[:2] for _ in range(num_tokens)])
    topk_weights = torch.rand(num_tokens, 2, generator=gen)
    nvl_bytes = max(cfg.get_nvl_buffer_size_hint(hidden * 2, num_ranks)
                    for cfg in (Buffer.get_dispatch_config(num_ranks), Buffer.get_combine_config(num_ranks)))
    buf = Buffer(group, nvl_bytes, Buffer.get_low_latency_rdma_size_hint(t_max, hidden, num_ranks, num_experts),
                 low_latency_mode=True)

    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, num_experts)
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        async_finish=True)
    check("dispatch", x=x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=per_rank,
          is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    buf.dispatch(x, handle=handle, async_finish=True)
    check("cached dispatch", x=x, handle=handle)
    buf.combine(recv_x, handle, topk_weights=recv_w, async_finish=True)
    check("combine", x=recv_x, topk_weights=recv_w, handle=handle)

    cumulative = torch.zeros(num_experts // num_ranks, dtype=torch.int32)
    wait_stats = torch.zeros(num_ranks, dtype=torch.int64)
    ll_idx = topk_idx[:t_max]
    recv, _, ll_handle, _, _ = buf.low_latency_dispatch(
        x, ll_idx, t_max, num_experts, cumulative_local_expert_recv_stats=cumulative,
        dispatch_wait_recv_cost_stats=wait_stats, use_fp8=False, async_finish=True)
    check("low_latency_dispatch", x=x, topk_idx=ll_idx, cumulative_local_expert_recv_stats=cumulative,
          dispatch_wait_recv_cost_stats=wait_stats)
    out = torch.empty(num_tokens, hidden, dtype=torch.bfloat16)
    combine_stats = torch.zeros(num_ranks, dtype=torch.int64)
    buf.low_latency_combine(recv, ll_idx, topk_weights, ll_handle, async_finish=True, out=out,
                            combine_wait_recv_cost_stats=combine_stats)
    check("low_latency_combine", x=recv, topk_idx=ll_idx, topk_weights=topk_weights, handle=ll_handle, out=out,
          combine_wait_recv_cost_stats=combine_stats)
    return problems


def test_async_calls_record_every_tensor_they_read():
    results = run_ranks(_record_worker, 2, make_seed())
    problems = [p for per_rank in results for p in per_rank]
    assert not problems, "\n".join(problems)
