"""The gloo transport's row streams (deep_ep/_rowsock.py): how they are chosen, and that dispatch through
them gives bit for bit what it gives with the rows on gloo (``DEEP_EP_GLOO_ROWS=gloo``).

Failures inside an exchange (a rank killed after a header went out) are in ``test_faults.py``
(``dispatch-midstream-sigkill@gloo``); the whole gloo pass of ``make test`` runs through the streams.
"""

import pytest
import torch

from dist_utils import make_seed, run_ranks

GLOO = {"DEEP_EP_TRANSPORT": "gloo"}


def _dispatch_cases(rank, num_ranks, group, seed, python_ranks=()):
    """Dispatch several routings; return every output (and the transport's description). The ranks in
    `python_ranks` run the streams' exchange loop in Python instead of the native one."""
    import deep_ep
    from test_loopback import listening_sockets
    before = listening_sockets()
    nvl = max(c.get_nvl_buffer_size_hint(7168 * 2, num_ranks)
              for c in (deep_ep.Buffer.get_dispatch_config(num_ranks), deep_ep.Buffer.get_combine_config(num_ranks)))
    buf = deep_ep.Buffer(group, num_nvl_bytes=nvl, explicitly_destroy=True)
    out = {"reason": buf.engine_reason, "streams": buf._comm.rows is not None,
           "native": buf._comm.rows is not None and buf._comm.rows._native is not None,
           "listening_added": sorted(set(listening_sockets()) - set(before))}
    if rank in python_ranks and buf._comm.rows is not None:
        buf._comm.rows._native = None
    num_experts = 4 * num_ranks
    gen = torch.Generator().manual_seed(seed * 31 + rank)
    # (tokens, hidden, top-k, mode): dense routings send long runs of consecutive tokens (one iovec per
    # run); sparse ones short runs: of small rows (gathered into one buffer), of 2 KiB rows (an iovec per
    # run, over 1000 of them per destination: several sendmsg calls); rank 1 has no tokens in one case.
    cases = [(200, 1008, 8, "dense"), (300, 256, 1, "sparse"), (6000, 1024, 1, "sparse"),
             (0 if rank == 1 else 64, 7168, 4, "dense"), (96, 384, 3, "all -1 on rank 0")]
    results = []
    for tokens, hidden, topk, mode in cases:
        x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
        scores = torch.rand(tokens, num_experts, generator=gen)
        idx = scores.topk(topk, dim=1).indices
        if mode == "sparse":  # every token to one expert of a random rank: runs of about one token
            idx = torch.randint(0, num_experts, (tokens, 1), generator=gen)
        if mode.startswith("all -1") and rank == 0:
            idx = torch.full_like(idx, -1)
        weights = torch.rand(tokens, topk, generator=gen)
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, num_experts)
        recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
            x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=idx, topk_weights=weights)
        # FP8 rows (bytes of another width) through the same path
        x8 = x.to(torch.float8_e4m3fn)
        scales = torch.rand(tokens, (hidden + 127) // 128, generator=gen)
        (recv_x8, recv_s8), *_ = buf.dispatch((x8, scales), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                              num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=weights)
        # ... and back: combine's exchanges (agreement, weights, rows) go over the streams too
        combined_x, combined_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
        results.append([recv_x, recv_idx, recv_w, torch.tensor(counts), *handle, recv_x8.view(torch.uint8), recv_s8,
                        combined_x, combined_w])
    out["results"] = results
    buf.destroy()
    return out


@pytest.mark.parametrize("loop", ["native", "python", "mixed"])
def test_dispatch_through_row_streams_equals_rows_on_gloo(loop):
    """The streams' exchange loop in C (``sock_exchange``), in Python (without the native helpers), and
    both at once (rank 1 in Python: the same bytes on the wire) give what gloo gives."""
    seed = make_seed()
    python_ranks = {"native": (), "python": (0, 1, 2), "mixed": (1,)}[loop]
    streams = run_ranks(_dispatch_cases, 3, seed, python_ranks, env=GLOO)
    plain = run_ranks(_dispatch_cases, 3, seed, env=dict(GLOO, DEEP_EP_GLOO_ROWS="gloo"))
    for rank in range(3):
        assert streams[rank]["streams"], streams[rank]["reason"]
        if loop != "python":
            assert streams[rank]["native"], "the native exchange loop is not in use"
        assert "exchanges over deep_ep's own TCP connections (127.0.0.1, sendmsg)" in streams[rank]["reason"]
        assert not plain[rank]["streams"]
        assert "exchanges over gloo (row streams unavailable on rank 0: DEEP_EP_GLOO_ROWS=gloo)" in \
            plain[rank]["reason"], plain[rank]["reason"]
        # the set-up's listener is closed once every rank has connected: no more listening sockets than gloo's
        added = streams[rank]["listening_added"]
        assert len(added) == len(plain[rank]["listening_added"]), (added, plain[rank]["listening_added"])
        assert all(addr == "127.0.0.1" for addr, _ in added), added
        for case, (a, b) in enumerate(zip(streams[rank]["results"], plain[rank]["results"])):
            for field, (u, v) in enumerate(zip(a, b)):
                if isinstance(u, torch.Tensor):
                    assert u.dtype == v.dtype and u.shape == v.shape and torch.equal(u, v), \
                        f"seed {seed}, rank {rank}, case {case}, output {field} differs"
                else:
                    assert u == v, (seed, rank, case, field)


def _bad_value(rank, num_ranks, group):
    import deep_ep
    try:
        deep_ep.Buffer(group, num_nvl_bytes=1 << 20)
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("value", ["tcp"])
def test_bad_gloo_rows_value_is_a_clear_error(value):
    texts = run_ranks(_bad_value, 2, env=dict(GLOO, DEEP_EP_GLOO_ROWS=value))
    for text in texts:
        assert text is not None and "DEEP_EP_GLOO_ROWS must be 'sockets' or 'gloo'" in text, text


def _diverged_sizes(rank, num_ranks, group):
    """Rank 1 sends rank 0 one byte more than rank 0 expects: rank 0 names it, before reading any body
    byte; the Buffer is unusable afterwards."""
    import deep_ep
    from deep_ep._comm import CommError
    buf = deep_ep.Buffer(group, num_nvl_bytes=1 << 20)
    rows = buf._comm.rows
    assert rows is not None, buf.engine_reason
    inp = torch.arange(64, dtype=torch.uint8)
    out = torch.zeros(64, dtype=torch.uint8)
    sizes = [8, 8]
    in_sizes = [9, 8] if rank == 1 else [8, 8]
    try:
        rows.all_to_all(out, inp, sizes, in_sizes, "test (diverged)")
    except CommError as exc:
        return "error", str(exc), buf._comm.failed is not None
    return "ok", "", buf._comm.failed is not None


@pytest.mark.parametrize("loop", ["native", "python"])
def test_diverged_message_sizes_are_named(loop):
    env = dict(GLOO) if loop == "native" else dict(GLOO, DEEP_EP_CPU_NATIVE="0")
    out = run_ranks(_diverged_sizes, 2, env=env)
    kind, text, failed = out[0]
    assert kind == "error" and failed, out[0]
    assert "rank 1's row message does not match this rank's call (message #" in text, text
    assert "of 9 bytes, expected #" in text and "of 8 bytes" in text, text
