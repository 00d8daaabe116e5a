"""The same-host shared-memory transport (deep_ep/_shm.py) against gloo, and how it is chosen."""

import os

import pytest
import torch

from deep_ep import _native
from dist_utils import make_seed, run_ranks

# The doorbells' futex calls live in the native helpers; without them the waits sleep.
_FUTEX = getattr(_native.library(), "HAVE_FUTEX", 0) if _native.library() is not None else 0


def _exchanges(rank, num_ranks, group, seed):
    import deep_ep
    from deep_ep._shm import MIN_DATA_BYTES
    buf = deep_ep.Buffer(group, num_nvl_bytes=0, explicitly_destroy=True)
    comm = buf._comm
    info = {"transport": comm.transport, "reason": buf.engine_reason}
    if comm.shm is None:
        buf.destroy()
        return info
    assert comm.shm.data_bytes == MIN_DATA_BYTES  # num_nvl_bytes + num_rdma_bytes = 0: the floor
    gen = torch.Generator().manual_seed(seed)
    checked = []
    # (row width in bytes, max rows per pair): small, and several rounds of the data area per sender.
    for case, (width, max_rows) in enumerate([(16, 50), (4096, 700), (1000, 3000), (8, 0)]):
        counts = torch.randint(0, max_rows + 1, (num_ranks, num_ranks), generator=gen)
        if case == 1:
            # Every sender's rows exceed the 4 MiB data area (>= 2 receivers x 600 rows x 4 KiB), whatever the
            # seed: this case must run in rounds. And a rank that receives nothing.
            counts = counts.clamp(min=600)
            counts[:, 0] = 0
        in_splits, out_splits = counts[rank].tolist(), counts[:, rank].tolist()
        rows = torch.randint(0, 256, (sum(in_splits), width), dtype=torch.uint8,
                             generator=torch.Generator().manual_seed(seed + 1000 * case + rank))
        for zero_copy in (False, True):
            send = rows
            region = comm.send_buffer(rows.numel()) if zero_copy else None
            if region is not None:  # None: larger than the data area, sent from `rows` in rounds
                send = region.view(rows.shape)
                send.copy_(rows)
            got = torch.empty((sum(out_splits), width), dtype=torch.uint8)
            comm.all_to_all_single(got, send, out_splits, in_splits, op=f"test exchange {case}")
            shm, comm.shm = comm.shm, None  # the same exchange over gloo
            want = torch.empty_like(got)
            comm.all_to_all_single(want, rows, out_splits, in_splits, op=f"test exchange {case} (gloo)")
            comm.shm = shm
            assert torch.equal(got, want), (case, zero_copy)
            # In place: per-source views into the senders' areas (or private copies when in rounds).
            segs, release = comm.all_to_all_views(send, out_splits, in_splits, op=f"test exchange {case} (views)")
            try:
                assert [t.shape[0] for t in segs] == out_splits
                assert torch.equal(torch.cat(segs), want), (case, zero_copy, "views")
            finally:
                release()
            checked.append((case, region is not None, sum(in_splits) * width > shm.data_bytes))
    info["checked"] = checked
    buf.destroy()
    return info


@pytest.mark.parametrize("wait", ["futex", "sleep"])
def test_shm_all_to_all_matches_gloo_including_rounds(wait):
    results = run_ranks(_exchanges, 3, make_seed(), env={"DEEP_EP_SHM_WAIT": wait})
    for info in results:
        assert info["transport"] == "shm", info
        assert "same-host shared-memory transport" in info["reason"], info["reason"]
        assert ("futex doorbells" if wait == "futex" and _FUTEX else "sleeping waits") in info["reason"], \
            info["reason"]
        cases = {c for c, _, _ in info["checked"]}
        assert cases == {0, 1, 2, 3}
        assert any(z for _, z, _ in info["checked"]), "no zero-copy exchange ran"
    assert any(big for info in results for _, _, big in info["checked"]), "no exchange needed several rounds"


def test_gloo_forced_by_env():
    results = run_ranks(_exchanges, 2, 1, env={"DEEP_EP_TRANSPORT": "gloo"})
    for info in results:
        assert info["transport"] == "gloo" and "forced by DEEP_EP_TRANSPORT=gloo" in info["reason"], info


def _doorbell_waits(rank, num_ranks, group, seed):
    import random
    import time

    import deep_ep
    import deep_ep._shm as shm_mod
    shm_mod._MAX_BELL_WAIT = 10.0  # a wait then ends by a ring, or at the heartbeat check (2 s), never sooner
    buf = deep_ep.Buffer(group, num_nvl_bytes=0, explicitly_destroy=True)
    shm = buf._comm.shm
    bells = shm._bells
    rng = random.Random(seed * 31 + rank)
    t = torch.arange(num_ranks, dtype=torch.int64) + 100 * rank
    for i in range(200):
        time.sleep(rng.random() * 1e-3)  # arrive in a random order, so that every rank waits sometimes
        if i % 2:
            shm.fence_round("test fence")
        else:
            got = torch.empty_like(t)
            buf._comm.all_to_all_single(got, t, [1] * num_ranks, [1] * num_ranks, op="test exchange")
            assert got.tolist() == [100 * s + rank for s in range(num_ranks)]
    # A long wait: rank 0 arrives 0.5 s late; the others sleep through it instead of polling.
    before = bells.waits
    if rank == 0:
        time.sleep(0.5)
    shm.fence_round("test late fence")
    out = {"waits": bells.waits, "timeouts": bells.timeouts, "late_waits": bells.waits - before}
    buf.destroy()
    return out


@pytest.mark.skipif(not _FUTEX, reason=f"no futex in the native helpers: {_native.status()}")
def test_doorbells_wake_every_waiter_and_replace_polling():
    """Every doorbell wait ends with a ring (a lost wakeup would run out its timeout), and a rank that
    waits half a second sleeps through it in a few waits (polling takes thousands)."""
    results = run_ranks(_doorbell_waits, 3, make_seed())
    assert sum(r["waits"] for r in results) > 0, results  # the ranks did wait on their doorbells
    for r in results:
        assert r["timeouts"] == 0, results
    for r in results[1:]:
        assert 1 <= r["late_waits"] <= 5, results


def test_bad_shm_wait_value_is_refused_on_every_rank():
    texts = run_ranks(_bad_wait, 2)
    assert all("DEEP_EP_SHM_WAIT" in t and "'futex' or 'sleep'" in t for t in texts), texts


def _bad_wait(rank, num_ranks, group):
    os.environ["DEEP_EP_SHM_WAIT"] = "spin"
    import deep_ep
    try:
        deep_ep.Buffer(group, num_nvl_bytes=0, explicitly_destroy=True)
    except ValueError as exc:
        return str(exc)
    return "no error"


def _diverge(rank, num_ranks, group):
    import deep_ep
    buf = deep_ep.Buffer(group, num_nvl_bytes=1 << 20, explicitly_destroy=True)
    t = torch.zeros(num_ranks, dtype=torch.int64)
    try:
        buf._comm.all_to_all_single(torch.empty_like(t), t, [1] * num_ranks, [1] * num_ranks,
                                    op="dispatch (data)" if rank == 0 else "combine (data)")
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def test_diverging_ranks_get_a_clear_error():
    texts = run_ranks(_diverge, 2, env={"DEEP_EP_TIMEOUT_S": "5"})
    assert any("diverged" in t and "combine (data)" in t and "dispatch (data)" in t for t in texts), texts


def test_no_files_in_dev_shm():
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    run_ranks(_exchanges, 2, 3)
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert not [f for f in after - before if "deep_ep" in f or "torch" in f]


def _create_destroy(rank, num_ranks, group, rounds):
    import gc
    import deep_ep

    def mapped():
        """(shared-memory transport regions, status pages of the heartbeats) mapped by this process."""
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
        return (sum(1 for line in lines if "memfd:deep_ep (deleted)" in line),
                sum(1 for line in lines if "memfd:deep_ep-status (deleted)" in line))

    def fds():
        return len(os.listdir("/proc/self/fd"))

    nvl = max(c.get_nvl_buffer_size_hint(128 * 2, num_ranks)
              for c in (deep_ep.Buffer.get_dispatch_config(num_ranks), deep_ep.Buffer.get_combine_config(num_ranks)))
    counts = []
    for i in range(rounds):
        buf = deep_ep.Buffer(group, num_nvl_bytes=nvl, explicitly_destroy=True)
        x = torch.randn(16, 128).to(torch.bfloat16)
        topk = torch.stack([torch.randperm(2 * num_ranks)[:2] for _ in range(16)])
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk, 2 * num_ranks)
        recv_x, _, _, _, handle, _ = buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                  num_tokens_per_expert=per_expert)
        buf.combine(recv_x, handle)
        during = mapped()
        buf.destroy()
        del buf, recv_x, handle
        gc.collect()
        counts.append((during, mapped(), fds()))
    return counts


def test_destroy_unmaps_and_closes_everything():
    for counts in run_ranks(_create_destroy, 2, 5):
        # One region per rank, mapped once; one status page per rank (heartbeats; _comm._StatusBoard).
        assert all(during == (2, 2) for during, _, _ in counts), counts
        assert all(after == (0, 0) for _, after, _ in counts), counts
        fds = [f for _, _, f in counts]
        # No descriptor left behind per Buffer (a leak grows by one per round; the rendezvous's own
        # sockets may come and go by one).
        assert max(fds) <= fds[0] + 1, counts
