"""A Mixture-of-Experts layer on deep_ep: router, experts as batched matmuls, differentiable
dispatch/combine, and a low-latency inference path.

It is a working reference for wiring `deep_ep.Buffer` into a model:

* `dispatch` and `combine` are autograd functions. The backward of dispatch is a combine (each
  source token receives the sum of the gradients of its copies, and the top-k weights get theirs);
  the backward of combine is a cached dispatch with the forward handle.
* Expert parameters are sharded: rank ``r`` holds experts ``[r*E_loc, (r+1)*E_loc)``; the router is
  replicated (all-reduce its gradient like any data-parallel parameter).

Example (every rank)::

    layer = MoELayer(buffer, hidden=256, ffn_hidden=512, num_experts=16, num_topk=4)
    y = layer(x)              # x: [num_tokens, hidden] bf16, y likewise
    y.float().sum().backward()
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .buffer import Buffer

__all__ = ["dispatch", "combine", "MoELayer", "expert_forward", "reference_moe"]


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, topk_weights: torch.Tensor, topk_idx: torch.Tensor, buffer: Buffer,
                num_experts: int, out: dict):
        num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = \
            buffer.get_dispatch_layout(topk_idx, num_experts)
        recv_x, recv_topk_idx, recv_topk_weights, _, handle, _ = buffer.dispatch(
            x, num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
            is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx,
            topk_weights=topk_weights)
        ctx.buffer, ctx.handle = buffer, handle
        out["handle"] = handle
        ctx.mark_non_differentiable(recv_topk_idx)
        return recv_x, recv_topk_weights, recv_topk_idx

    @staticmethod
    def backward(ctx, grad_recv_x, grad_recv_topk_weights, _grad_idx):
        grad_recv_x = grad_recv_x.contiguous() if grad_recv_x is not None else None
        if grad_recv_topk_weights is not None:
            grad_recv_topk_weights = grad_recv_topk_weights.contiguous()
        grad_x, grad_topk_weights, _ = ctx.buffer.combine(grad_recv_x, ctx.handle,
                                                          topk_weights=grad_recv_topk_weights)
        return grad_x, grad_topk_weights, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, buffer: Buffer, handle: tuple):
        combined_x, _, _ = buffer.combine(x, handle)
        ctx.buffer, ctx.handle = buffer, handle
        return combined_x

    @staticmethod
    def backward(ctx, grad):
        grad_x, _, _, _, _, _ = ctx.buffer.dispatch(grad.contiguous(), handle=ctx.handle)
        return grad_x, None, None


def dispatch(buffer: Buffer, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
             num_experts: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
    """Differentiable dispatch: returns ``(recv_x, recv_topk_weights, recv_topk_idx, handle)``;
    gradients flow to ``x`` and ``topk_weights``."""
    out: dict = {}
    recv_x, recv_topk_weights, recv_topk_idx = _Dispatch.apply(x, topk_weights, topk_idx, buffer, num_experts, out)
    return recv_x, recv_topk_weights, recv_topk_idx, out["handle"]


def combine(buffer: Buffer, x: torch.Tensor, handle: tuple) -> torch.Tensor:
    """Differentiable combine (plain sum over the ranks each token went to)."""
    return _Combine.apply(x, buffer, handle)


def expert_forward(x: torch.Tensor, local_idx: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor,
                   w2: torch.Tensor) -> torch.Tensor:
    """Weighted expert outputs of received tokens.

    Args:
        x: ``[n, hidden]`` received tokens.
        local_idx: ``[n, k]`` local expert ids, -1 = not an expert of this rank.
        weights: ``[n, k]`` float32 routing weights (0 where ``local_idx`` is -1).
        w1: ``[E_loc, hidden, ffn]``, w2: ``[E_loc, ffn, hidden]`` expert weights.

    Returns:
        ``[n, hidden]`` = ``sum_k weights[:, k] * expert_{local_idx[:, k]}(x)`` in ``x``'s dtype, computed
        in fp32, experts applied as one batched matmul per expert over its tokens.
    """
    n, k = local_idx.shape
    out = torch.zeros((n, x.size(1)), dtype=torch.float32, device=x.device)
    token, slot = (local_idx >= 0).nonzero(as_tuple=True)
    if token.numel() == 0:
        # No rows for this rank's experts: zeros, still connected to x, w1 and w2 (their gradients are then
        # zeros, not None, as when rows arrive). Sums of empty slices: exactly 0, whatever the values.
        zero = x.reshape(-1)[:0].sum() + w1.reshape(-1)[:0].sum() + w2.reshape(-1)[:0].sum()
        return out.to(x.dtype) + zero.to(x.dtype)
    expert = local_idx[token, slot]
    order = torch.argsort(expert, stable=True)
    token, slot, expert = token[order], slot[order], expert[order]
    counts = torch.bincount(expert, minlength=w1.size(0)).tolist()
    xs = x.float()[token]
    start = 0
    pieces = []
    for e, c in enumerate(counts):
        if c == 0:
            continue
        h = torch.nn.functional.silu(xs[start:start + c] @ w1[e].float())
        pieces.append(h @ w2[e].float())
        start += c
    y = torch.cat(pieces, 0) * weights[token, slot].unsqueeze(1)
    out = out.index_add(0, token, y)
    return out.to(x.dtype)


class MoELayer(torch.nn.Module):
    """Top-k routed MoE with experts sharded over the ranks of ``buffer``.

    Args:
        buffer: the `deep_ep.Buffer` of the EP group.
        hidden, ffn_hidden: model and expert hidden sizes.
        num_experts: total experts (a multiple of the group size); this rank owns ``num_experts // R``.
        num_topk: experts per token.
        generator: seeds the (global) parameters so every rank builds the same full model and keeps its
            shard; pass the same seed on every rank.
    """

    def __init__(self, buffer: Buffer, hidden: int, ffn_hidden: int, num_experts: int, num_topk: int,
                 generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.buffer, self.num_experts, self.num_topk = buffer, num_experts, num_topk
        num_ranks, rank = buffer.group_size, buffer.rank
        self.num_local_experts = num_experts // num_ranks
        full_router, full_w1, full_w2 = init_moe_params(hidden, ffn_hidden, num_experts, generator)
        lo, hi = rank * self.num_local_experts, (rank + 1) * self.num_local_experts
        self.router = torch.nn.Parameter(full_router)
        self.w1 = torch.nn.Parameter(full_w1[lo:hi].to(dtype).clone())
        self.w2 = torch.nn.Parameter(full_w2[lo:hi].to(dtype).clone())

    def route(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(topk_idx int64 [n, k], topk_weights float32 [n, k])`` from a softmax router."""
        scores = torch.softmax(x.float() @ self.router, dim=-1)
        topk_weights, topk_idx = torch.topk(scores, self.num_topk, dim=-1)
        return topk_idx, topk_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_idx, topk_weights = self.route(x)
        recv_x, recv_w, recv_idx, handle = dispatch(self.buffer, x, topk_idx, topk_weights, self.num_experts)
        y = expert_forward(recv_x, recv_idx, recv_w, self.w1, self.w2)
        return combine(self.buffer, y, handle)

    @torch.no_grad()
    def forward_low_latency(self, x: torch.Tensor, num_max_dispatch_tokens_per_rank: int) -> torch.Tensor:
        """Inference through the low-latency kernels (BF16 dispatch, weighted combine)."""
        topk_idx, topk_weights = self.route(x)
        recv_x, recv_count, handle, _, _ = self.buffer.low_latency_dispatch(
            x, topk_idx, num_max_dispatch_tokens_per_rank, self.num_experts, use_fp8=False)
        out = torch.zeros_like(recv_x)
        for e, c in enumerate(recv_count.tolist()):
            if c:
                h = torch.nn.functional.silu(recv_x[e, :c].float() @ self.w1[e].float())
                out[e, :c] = (h @ self.w2[e].float()).to(out.dtype)
        combined, _, _ = self.buffer.low_latency_combine(out, topk_idx, topk_weights, handle)
        return combined


def init_moe_params(hidden: int, ffn_hidden: int, num_experts: int,
                    generator: Optional[torch.Generator] = None):
    """Full (unsharded) router ``[hidden, E]`` fp32 and expert weights ``[E, hidden, ffn]``,
    ``[E, ffn, hidden]`` fp32, scaled for unit-variance activations."""
    router = torch.randn(hidden, num_experts, generator=generator) / hidden ** 0.5
    w1 = torch.randn(num_experts, hidden, ffn_hidden, generator=generator) / hidden ** 0.5
    w2 = torch.randn(num_experts, ffn_hidden, hidden, generator=generator) / ffn_hidden ** 0.5
    return router, w1, w2


def reference_moe(x: torch.Tensor, router: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  num_topk: int) -> torch.Tensor:
    """Single-process MoE with all experts: ``sum_k w_k * expert_{e_k}(x)``, same math as `MoELayer`."""
    scores = torch.softmax(x.float() @ router, dim=-1)
    topk_weights, topk_idx = torch.topk(scores, num_topk, dim=-1)
    y = expert_forward(x, topk_idx, topk_weights, w1, w2)
    return y
