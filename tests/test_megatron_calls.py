"""The calls Megatron-Core's DeepEP token dispatcher makes, in the same order, work unchanged.

Megatron (see shared/spec/peers-and-consumers.md §4) imports ``Buffer`` from ``deep_ep`` and
``EventHandle, EventOverlap`` from ``deep_ep.utils``; sizes the buffer from the max of the dispatch
and combine configs' size hints with ``hidden_bytes = hidden * max(element_size, 2)``; re-creates the
buffer only when the group changed or a size is too small; wraps layout + dispatch and combine in
autograd functions with ``previous_event=EventOverlap(EventHandle())``, ``async_finish`` and
``allocate_on_comm_stream``; waits with ``current_stream_wait()``; turns the per-expert list into a
tensor; and runs a cached dispatch with the forward handle in combine's backward. This test is an
independent re-statement of that call sequence (no Megatron code).
"""

import pytest
import torch

from dist_utils import make_seed, run_ranks


def _megatron_like_worker(rank, num_ranks, group, seed, async_finish, allocate_on_comm_stream):
    from deep_ep import Buffer
    from deep_ep.utils import EventHandle, EventOverlap

    state = {"buffer": None, "creations": 0}

    def get_buffer(group, hidden_bytes):
        num_nvl_bytes, num_rdma_bytes = 0, 0
        for config in (Buffer.get_dispatch_config(group.size()), Buffer.get_combine_config(group.size())):
            num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size()), num_nvl_bytes)
            num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, group.size()), num_rdma_bytes)
        buf = state["buffer"]
        if buf is None or buf.group != group or buf.num_nvl_bytes < num_nvl_bytes or \
                buf.num_rdma_bytes < num_rdma_bytes:
            state["buffer"] = Buffer(group, num_nvl_bytes, num_rdma_bytes)
            state["creations"] += 1
        return state["buffer"]

    def hidden_bytes(x):
        return x.size(1) * max(x.element_size(), 2)

    class FusedDispatch(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, token_indices, token_probs, num_experts, group):
            previous_event = EventOverlap(EventHandle()) if async_finish else None
            buffer = get_buffer(group, hidden_bytes(x))
            (num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank,
             event) = buffer.get_dispatch_layout(token_indices, num_experts, previous_event=previous_event,
                                                 async_finish=async_finish,
                                                 allocate_on_comm_stream=allocate_on_comm_stream)
            (recv_x, recv_token_indices, recv_token_probs, num_recv_tokens_per_expert_list, handle,
             after_event) = buffer.dispatch(x, topk_idx=token_indices, topk_weights=token_probs,
                                            num_tokens_per_rank=num_tokens_per_rank,
                                            num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
                                            is_token_in_rank=is_token_in_rank,
                                            num_tokens_per_expert=num_tokens_per_expert,
                                            previous_event=event if async_finish else None,
                                            async_finish=async_finish,
                                            allocate_on_comm_stream=allocate_on_comm_stream)
            if async_finish:
                after_event.current_stream_wait()
            ctx.group, ctx.handle = group, handle
            tokens_per_expert = torch.tensor(num_recv_tokens_per_expert_list)
            return recv_x, recv_token_indices, recv_token_probs, tokens_per_expert, handle

        @staticmethod
        def backward(ctx, grad_output, grad_token_indices, grad_token_probs, grad_tokens_per_expert, grad_handle):
            buffer = get_buffer(ctx.group, hidden_bytes(grad_output))
            previous_event = EventOverlap(EventHandle()) if async_finish else None
            grad_x, grad_token_probs, after_event = buffer.combine(
                grad_output.contiguous(), ctx.handle, topk_weights=grad_token_probs.float(),
                previous_event=previous_event, async_finish=async_finish,
                allocate_on_comm_stream=allocate_on_comm_stream)
            if async_finish:
                after_event.current_stream_wait()
            return grad_x, None, grad_token_probs, None, None

    class FusedCombine(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, group, handle):
            previous_event = EventOverlap(EventHandle()) if async_finish else None
            buffer = get_buffer(group, hidden_bytes(x))
            combined_x, _, after_event = buffer.combine(x, handle=handle, async_finish=async_finish,
                                                       previous_event=previous_event,
                                                       allocate_on_comm_stream=allocate_on_comm_stream)
            if async_finish:
                after_event.current_stream_wait()
            ctx.handle, ctx.group = handle, group
            return combined_x

        @staticmethod
        def backward(ctx, grad_output):
            buffer = get_buffer(ctx.group, hidden_bytes(grad_output))
            previous_event = EventOverlap(EventHandle()) if async_finish else None
            grad_x, _, _, _, _, after_event = buffer.dispatch(
                grad_output.contiguous(), handle=ctx.handle, previous_event=previous_event,
                async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)
            if async_finish:
                after_event.current_stream_wait()
            return grad_x, None, None

    Buffer.set_num_sms(20)
    hidden, num_experts, num_topk, num_tokens = 256, 4 * num_ranks, 4, 32
    g = torch.Generator().manual_seed(seed)
    all_x = [torch.randn(num_tokens, hidden, generator=g) for _ in range(num_ranks)]
    all_probs = [torch.rand(num_tokens, num_experts, generator=g) for _ in range(num_ranks)]
    all_dy = [torch.randn(num_tokens, hidden, generator=g) for _ in range(num_ranks)]

    for step in range(2):  # the second step reuses the buffer
        x = all_x[rank].to(torch.bfloat16).requires_grad_()
        probs, idx = torch.topk(all_probs[rank], num_topk, dim=-1)
        probs = probs.float().requires_grad_()   # Megatron requires fp32 probs
        recv_x, recv_idx, recv_probs, tokens_per_expert, handle = FusedDispatch.apply(x, idx, probs, num_experts,
                                                                                     group)
        assert tokens_per_expert.dtype == torch.int64 and tokens_per_expert.numel() == num_experts // num_ranks
        assert int(tokens_per_expert.sum()) == int((recv_idx >= 0).sum())
        # "experts": scale each received row by the sum of the probabilities of its local experts
        local_probs = torch.where(recv_idx >= 0, recv_probs, torch.zeros_like(recv_probs))
        y = recv_x * local_probs.sum(1, keepdim=True).to(recv_x.dtype)
        out = FusedCombine.apply(y, group, handle)
        (out.float() * all_dy[rank].to(torch.bfloat16).float()).sum().backward()

        # Reference: out = x * sum_k probs_k; d/dx = dy * sum_k probs_k; d/dprobs_k = <dy, x>.
        ref_out = x.detach().float() * probs.detach().sum(1, keepdim=True)
        assert torch.allclose(out.float(), ref_out, rtol=3e-2, atol=3e-2)
        dy = all_dy[rank].to(torch.bfloat16).float()
        ref_gx = dy * probs.detach().sum(1, keepdim=True)
        assert torch.allclose(x.grad.float(), ref_gx, rtol=3e-2, atol=3e-2)
        ref_gp = (dy * x.detach().float()).sum(1, keepdim=True).expand(-1, num_topk)
        assert torch.allclose(probs.grad, ref_gp, rtol=5e-2, atol=5e-1), (probs.grad - ref_gp).abs().max()
    assert state["creations"] == 1
    return True


@pytest.mark.parametrize("async_finish,allocate_on_comm_stream", [(False, False), (True, True)])
def test_megatron_call_sequence(async_finish, allocate_on_comm_stream):
    assert run_ranks(_megatron_like_worker, 2, make_seed(), async_finish, allocate_on_comm_stream) == [True, True]
