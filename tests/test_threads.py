"""deep_ep caps torch's intra-op threads inside its CPU calls and restores the caller's setting."""

import torch

from deep_ep._threads import ThreadCap, cores_available
from dist_utils import run_ranks


def test_thread_cap_caps_and_restores():
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        cap = ThreadCap(1)
        with cap:
            assert torch.get_num_threads() == 1
            with cap:  # re-entrant
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 3
        with ThreadCap(0):  # disabled
            assert torch.get_num_threads() == 3
        with ThreadCap(8):  # a cap above the setting leaves it
            assert torch.get_num_threads() == 3
        try:
            with cap:
                raise KeyError("boom")
        except KeyError:
            pass
        assert torch.get_num_threads() == 3
        assert ThreadCap.for_local_ranks(10 ** 6).limit == 1
        assert ThreadCap.for_local_ranks(1).limit == cores_available()
        assert ThreadCap.for_local_ranks(4, override=0).limit == 0
        wrapped = cap.wrap(lambda: torch.get_num_threads())
        assert wrapped() == 1 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(saved)


def _threads_inside_calls(rank, num_ranks, group):
    import deep_ep
    from deep_ep.engines import portable, portable_ll

    seen = {}

    def spy(cls, name, key=None):
        original = getattr(cls, name)

        def wrapper(self, *a, **k):
            seen.setdefault(key or name, torch.get_num_threads())
            return original(self, *a, **k)
        setattr(cls, name, wrapper)

    for name in ("get_dispatch_layout", "dispatch", "combine"):
        spy(portable.PortableEngine, name)
    # The hook's work: unpacking (gloo transport) or filling the handle (shared-memory push path).
    spy(portable_ll.PortableLowLatency, "_unpack_dispatch", "unpack")
    spy(portable_ll.PortableLowLatency, "_unpack_dispatch_push", "unpack")
    torch.set_num_threads(7)
    hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(8, 128, num_ranks, 4)
    nvl = max(c.get_nvl_buffer_size_hint(128 * 2, num_ranks)
              for c in (deep_ep.Buffer.get_dispatch_config(num_ranks), deep_ep.Buffer.get_combine_config(num_ranks)))
    buf = deep_ep.Buffer(group, num_nvl_bytes=nvl, num_rdma_bytes=hint, low_latency_mode=True,
                         explicitly_destroy=True)
    x = torch.randn(8, 128).to(torch.bfloat16)
    topk = torch.stack([torch.randperm(4)[:2] for _ in range(8)])
    w = torch.rand(8, 2)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk, 4)
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                   num_tokens_per_expert=per_expert, topk_idx=topk, topk_weights=w)
    buf.combine(recv_x, handle, topk_weights=recv_w)
    after_normal = torch.get_num_threads()
    rx, _, h, _, hook = buf.low_latency_dispatch(x, topk, 8, 4, use_fp8=False, return_recv_hook=True)
    hook()
    _, _, hook = buf.low_latency_combine(rx, topk, w, h, return_recv_hook=True)
    hook()
    after_ll = torch.get_num_threads()
    buf.destroy()
    return seen, after_normal, after_ll


def test_calls_run_capped_and_restore_the_callers_threads():
    results = run_ranks(_threads_inside_calls, 2)
    want = max(1, cores_available() // 2)
    for seen, after_normal, after_ll in results:
        assert seen == {"get_dispatch_layout": want, "dispatch": want, "combine": want, "unpack": want}, seen
        assert after_normal == 7 and after_ll == 7


def test_env_zero_disables_the_cap():
    results = run_ranks(_threads_inside_calls, 2, env={"DEEP_EP_CPU_THREADS": "0"})
    for seen, _, _ in results:
        assert set(seen.values()) == {7}, seen
