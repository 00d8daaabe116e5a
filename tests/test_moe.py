"""The MoE layer on deep_ep trains like a single-process MoE with the same weights.

Every rank builds the full model from one seed, keeps its expert shard and its slice of the batch;
rank 0's view of the reference (all experts, all tokens, one process) must match the distributed
layer in outputs, input gradients, router gradients (all-reduced) and expert-weight gradients, at
every step of a few SGD steps. Distributed partial sums are rounded to bf16 once more than the
reference, hence the tolerances.
"""

import pytest
import torch
import torch.distributed as dist

from dist_utils import make_seed, run_ranks


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rel: float = 3e-2) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if a.numel() == 0:
        return
    a, b = a.float(), b.float()
    scale = b.abs().max().clamp(min=1e-6)
    err = (a - b).abs().max()
    assert err <= rel * scale, f"{what}: max error {err:.4g} vs scale {scale:.4g}"


def _train_worker(rank, num_ranks, group, seed, num_tokens, hidden, ffn, num_experts, num_topk, steps):
    import deep_ep
    from deep_ep.moe import MoELayer, init_moe_params, reference_moe

    buffer = deep_ep.Buffer(group, 1 << 26, 1 << 26, low_latency_mode=True)  # >= the size hints here
    g = torch.Generator().manual_seed(seed)
    layer = MoELayer(buffer, hidden, ffn, num_experts, num_topk, generator=g)
    g = torch.Generator().manual_seed(seed)
    router, w1, w2 = init_moe_params(hidden, ffn, num_experts, g)
    ref_router = router.clone().requires_grad_()
    ref_w1 = w1.to(torch.bfloat16).clone().requires_grad_()
    ref_w2 = w2.to(torch.bfloat16).clone().requires_grad_()
    e_loc = num_experts // num_ranks
    lo, hi = rank * e_loc, (rank + 1) * e_loc
    lr = 0.05
    for step in range(steps):
        gen = torch.Generator().manual_seed(seed + 1 + step)
        sizes = torch.randint(0, num_tokens + 1, (num_ranks,), generator=gen).tolist()
        sizes[step % num_ranks] = 0 if step == 1 else sizes[step % num_ranks]   # a rank with no tokens
        all_x = [torch.randn(n, hidden, generator=gen).to(torch.bfloat16) for n in sizes]
        all_dy = [torch.randn(n, hidden, generator=gen).to(torch.bfloat16) for n in sizes]

        x = all_x[rank].clone().requires_grad_()
        y = layer(x)
        assert y.shape == x.shape and y.dtype == torch.bfloat16
        (y.float() * all_dy[rank].float()).sum().backward()

        ref_x = torch.cat(all_x).clone().requires_grad_()
        ref_y = reference_moe(ref_x, ref_router, ref_w1, ref_w2, num_topk)
        (ref_y.float() * torch.cat(all_dy).float()).sum().backward()

        off = sum(sizes[:rank])
        _close(y, ref_y[off:off + sizes[rank]], f"step {step} output")
        _close(x.grad, ref_x.grad[off:off + sizes[rank]], f"step {step} grad x")
        _close(layer.w1.grad, ref_w1.grad[lo:hi], f"step {step} grad w1")
        _close(layer.w2.grad, ref_w2.grad[lo:hi], f"step {step} grad w2")
        router_grad = layer.router.grad.clone()
        dist.all_reduce(router_grad, group=group)
        _close(router_grad, ref_router.grad, f"step {step} grad router")

        with torch.no_grad():
            for p in (layer.router, layer.w1, layer.w2, ref_router, ref_w1, ref_w2):
                if p is layer.router:
                    p -= lr * router_grad
                else:
                    p -= lr * p.grad.to(p.dtype)
                p.grad = None

    # Low-latency inference path on the trained weights matches the reference forward.
    gen = torch.Generator().manual_seed(seed + 1000)
    all_x = [torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16) for _ in range(num_ranks)]
    y = layer.forward_low_latency(all_x[rank], num_max_dispatch_tokens_per_rank=num_tokens)
    with torch.no_grad():
        ref_y = reference_moe(torch.cat(all_x), ref_router, ref_w1, ref_w2, num_topk)
    _close(y, ref_y[rank * num_tokens:(rank + 1) * num_tokens], "low-latency forward")
    return True


@pytest.mark.parametrize("num_ranks,ranks_per_node", [(4, None), (4, 2)])
def test_moe_layer_trains_like_single_process(num_ranks, ranks_per_node):
    seed = make_seed()
    results = run_ranks(_train_worker, num_ranks, seed, 24, 128, 96, 4 * num_ranks, 3, 3,
                        ranks_per_node=ranks_per_node)
    assert results == [True] * num_ranks


def test_expert_forward_without_rows_keeps_every_gradient():
    """A rank whose experts receive no rows still returns zeros connected to x, w1 and w2: after backward
    their gradients are zeros, as when rows arrive (a None gradient broke the training test for seeds
    where one rank got no tokens in a step)."""
    from deep_ep.moe import expert_forward
    x = torch.randn(3, 8).to(torch.bfloat16).requires_grad_()
    w1 = torch.randn(2, 8, 4).to(torch.bfloat16).requires_grad_()
    w2 = torch.randn(2, 4, 8).to(torch.bfloat16).requires_grad_()
    local_idx = torch.full((3, 2), -1)
    y = expert_forward(x, local_idx, torch.rand(3, 2), w1, w2)
    assert y.dtype == torch.bfloat16 and not y.float().any()
    y.float().sum().backward()
    for t in (x, w1, w2):
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.float().any()
