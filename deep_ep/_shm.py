"""Same-host shared-memory transport for CPU tensors: the all-to-all of deep_ep's CPU paths without gloo.

When every rank of a Buffer is a process on this host, each rank maps one anonymous shared-memory
region per rank (``memfd_create``; the peers map it through ``/proc/<pid>/fd``). Nothing is ever
created in ``/dev/shm`` or any file system, so a normal exit, a crash or a SIGKILL of any rank leaves
nothing behind: the kernel frees a region when its last mapping goes away.

Region of rank ``r``: a control block (its posting and its acknowledgements, 8-byte words, each
written only by ``r``), then its data area (the sizes the user gave the Buffer, like the GPU path's
buffers: ``num_nvl_bytes + num_rdma_bytes``, or with ``low_latency_mode`` ``num_nvl_bytes``; at least
`MIN_DATA_BYTES`), then with ``low_latency_mode`` its engine area of ``num_rdma_bytes`` (the
low-latency engine's receive slots, `engine_area`: peers write into it directly, see below).

An all-to-all (``all_to_all``) is pull-based and synchronous:

* the sender puts its send buffer into its own data area (the engines gather their rows straight into
  it, `send_buffer`; anything else is copied in), writes the per-destination offsets and lengths, and
  then publishes a new post counter;
* every receiver copies its segment straight out of the sender's data area into its output tensor and
  acknowledges the post counter;
* a send larger than the data area goes in several rounds (each waits for every peer's
  acknowledgement of the previous one).

The low-latency engine moves its rows by *push* instead (one copy instead of two): after its header
exchange (which every rank enters only once it is done with the slot's previous contents) each sender
writes its rows straight into the receivers' engine areas, then `fence_round` (a barrier on a counter
word per rank) tells every receiver that its peers' writes are complete and visible.

Synchronisation is by those counters in shared memory (x86-64 only: its stores are seen in program
order, and a locked instruction before each counter store orders the non-temporal stores of large
copies too). Waiting polls a few times and then sleeps on a *doorbell*: a word of the waiter's control
block that the peers write (a stamp that never repeats) after each counter store the waiter may be
waiting for, followed by a ``FUTEX_WAKE`` on it (through deep_ep's native helpers, `deep_ep._native`);
the waiter reads its doorbell before it checks the
counters and sleeps in ``FUTEX_WAIT`` only while the doorbell still holds that value, so a store is
never missed and a waiter wakes once, when a peer moved, instead of polling (with more ranks than
cores, every poll takes CPU time from the ranks being waited for). Without the native helpers (or
with ``DEEP_EP_SHM_WAIT=sleep``) it sleeps in growing steps (at most 0.2 ms) instead. Either way
it wakes at least once per heartbeat period. While it waits, the `Communicator`'s diagnosis runs as for gloo: a
peer whose process is gone fails the call at once, and after ``DEEP_EP_TIMEOUT_S`` the error names
the peers that did not answer (gone, frozen, or elsewhere) through the heartbeats.
"""

from __future__ import annotations

import errno
import mmap
import os
import platform
import sys
import threading
import time
import zlib
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

import torch

from . import _env, _native

if TYPE_CHECKING:  # pragma: no cover
    from ._comm import Communicator

__all__ = ["ShmTransport", "MIN_DATA_BYTES", "setup"]

MIN_DATA_BYTES = 4 << 20
_PAGE = 4096
# Control words of one region (int64). The posting words are written by the owner before the post
# counter; the acknowledgement words (one per sender) start on their own cache line, and so does the
# doorbell (`_Bells`), the one word the peers write.
_W_POST, _W_SEQ, _W_ROUND, _W_ROUNDS, _W_LO, _W_HI, _W_TAG, _W_UNUSED, _W_FENCE = range(9)
_W_SEGS = 9                      # [_W_SEGS, +R): offset of each destination's segment; [+R, +2R): length
_OP_TEXT_BYTES = 128             # the op's name, for a readable divergence error


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class _Layout:
    def __init__(self, size: int, data_bytes: int, engine_bytes: int = 0) -> None:
        self.size = size
        self.ack = _round_up(_W_SEGS + 2 * size, 8)          # first ack word
        self.bell = self.ack + _round_up(size, 8)             # the doorbell word, on a cache line of its own
        self.text = (self.bell + 8) * 8                       # byte offset of the op text
        self.data = _round_up(self.text + _OP_TEXT_BYTES, _PAGE)
        self.data_bytes = _round_up(max(int(data_bytes), 1), _PAGE)
        self.engine = self.data + self.data_bytes             # byte offset of the engine area
        self.engine_bytes = _round_up(max(int(engine_bytes), 0), _PAGE)
        self.total = self.engine + self.engine_bytes


_FENCE = threading.Lock()

_MAX_BELL_WAIT = 0.05            # seconds a doorbell wait lasts at most before the waiter looks again


def _futex_lib() -> Optional[Any]:
    """deep_ep's native helpers when they provide futexes (`deep_ep._native`: ``futex_wait``,
    ``futex_wake``), else None (then the waits sleep)."""
    if sys.byteorder != "little":
        return None  # the doorbell is the low half of an int64 word
    try:
        lib = _native.library()
    except RuntimeError:
        return None  # DEEP_EP_CPU_NATIVE=1 without the helpers: Buffer creation reports it elsewhere
    return lib if lib is not None and getattr(lib, "HAVE_FUTEX", 0) else None


class _Bells:
    """The ranks' doorbells (module docstring): a peer `ring`s after each counter store this rank may wait
    for; `wait` sleeps until this rank's doorbell no longer holds the value read before the wait's
    condition was checked (or a timeout)."""

    def __init__(self, lib: Any, ctrl: List[memoryview], addrs: List[int], word: int, rank: int) -> None:
        self._wait, self._wake = lib.futex_wait, lib.futex_wake
        self._ctrl = ctrl            # every rank's control words
        self._addrs = addrs          # the address of every rank's doorbell word in this process
        self._word = word
        self._rank = rank
        self._rings = 0
        self.waits = 0               # futex waits so far, and how many of them ran out their timeout
        self.timeouts = 0

    def read(self) -> int:
        """This rank's doorbell now (read it before checking what the wait is for)."""
        return self._ctrl[self._rank][self._word]

    def ring(self, peers: Sequence[int]) -> None:
        """Tell `peers` that this rank stored a counter (call it after the store). The stamp (ring
        count, rank) differs from any value the doorbell held recently, so it always changes it."""
        self._rings = (self._rings + 1) & 0xFFFFF
        stamp = (self._rings << 11) | (self._rank & 0x7FF)  # below 2**31: the futex word's value as is
        ctrl, word, wake, addrs = self._ctrl, self._word, self._wake, self._addrs
        for p in peers:
            ctrl[p][word] = stamp
            wake(addrs[p])

    def wait(self, seen: int, timeout_s: float) -> None:
        """Sleep while this rank's doorbell holds `seen`, at most `timeout_s` (returns early on a ring,
        a signal, or when the doorbell moved already)."""
        self.waits += 1
        if self._wait(self._addrs[self._rank], seen & 0x7FFFFFFF, int(max(0.0, timeout_s) * 1e9)) == errno.ETIMEDOUT:
            self.timeouts += 1


def _store_fence() -> None:
    """A full memory fence before a flag store: taking a lock runs a locked instruction, which on x86-64
    also orders earlier non-temporal stores (large copies may use them), not only ordinary ones."""
    with _FENCE:
        pass


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` (flat uint8); large contiguous copies through the native helpers, whose
    non-temporal stores do not first read the destination into the cache (`deep_ep._native`)."""
    n = dst.numel()
    lib = _native.library() if n >= _native.COPY_BYTES_MIN else None
    if lib is not None and dst.is_contiguous() and src.is_contiguous():
        _native.copy_bytes(lib, dst, src)
    else:
        dst.copy_(src)


def _op_tag(op: str) -> int:
    return zlib.crc32(op.encode("utf-8", "replace"))


class ShmTransport:
    """The mapped regions of all ranks and the all-to-all over them (see the module docstring)."""

    def __init__(self, comm: "Communicator", layout: _Layout, maps: List[mmap.mmap], doorbells: bool = True) -> None:
        self.comm = comm
        self.rank, self.size = comm.rank, comm.size
        self.layout = layout
        self.data_bytes = layout.data_bytes
        self._maps = maps
        self._ctrl = [memoryview(m)[:layout.data].cast("q") for m in maps]
        self._data = [torch.frombuffer(m, dtype=torch.uint8, offset=layout.data, count=layout.data_bytes)
                      for m in maps]
        self._engine = [torch.frombuffer(m, dtype=torch.uint8, offset=layout.engine, count=layout.engine_bytes)
                        if layout.engine_bytes else torch.empty(0, dtype=torch.uint8) for m in maps]
        self.engine_bytes = layout.engine_bytes
        self._mine = self._ctrl[self.rank]
        self._my_data = self._data[self.rank]
        self._seq = 0                   # shared-memory all-to-alls so far (the same on every rank)
        self._fences = 0                # fence rounds so far (the same on every rank)
        self._posted = 0                # this rank's post counter
        self._acked = [0] * self.size   # per sender: the post counter this rank consumed last
        self._broken: Optional[str] = None
        self._held: List[Tuple[int, int]] = []  # (sender, post) read in place, not yet acknowledged
        lib = _futex_lib() if doorbells else None
        self._bells: Optional[_Bells] = None
        if lib is not None:
            addrs = [d.data_ptr() - layout.data + 8 * layout.bell for d in self._data]
            self._bells = _Bells(lib, self._ctrl, addrs, layout.bell, self.rank)
        self._peers = [r for r in range(self.size) if r != self.rank]

    @property
    def uses_doorbells(self) -> bool:
        """Whether waits sleep on the futex doorbell (else: growing sleeps)."""
        return self._bells is not None

    def _ring(self, peers: Sequence[int]) -> None:
        if self._bells is not None:
            self._bells.ring(peers)

    # ---------------------------------------------------------------------------------- life cycle
    def close(self) -> None:
        """Drop this rank's mappings (the memory goes once every rank has dropped them)."""
        self._bells = None
        self._ctrl = []
        self._data = []
        self._engine = []
        self._mine = None
        self._my_data = None
        maps, self._maps = self._maps, []
        for m in maps:
            try:
                m.close()
            except (BufferError, ValueError):
                pass  # a view still exported (a tensor handed out): the mapping goes with its last user

    # --------------------------------------------------------------------------- engine areas
    def engine_area(self, rank: int) -> torch.Tensor:
        """Rank `rank`'s engine area (uint8, `engine_bytes`), mapped in this process: the low-latency
        engine's receive slots, written directly by the peers (module docstring). An engine writes into a
        peer's area only where the peer's own progress guarantees that the peer is done with the old
        contents, and reads its own area only after a `fence_round` that follows the peers' writes."""
        if self._broken is not None:
            raise RuntimeError(f"deep_ep: the shared-memory transport failed earlier ({self._broken})")
        return self._engine[rank]

    def fence_round(self, op: str) -> None:
        """A barrier: when it returns on a rank, every store that any rank made before entering it (into
        any region) is visible to this rank. Each rank counts its fences in its own control word and
        waits until every peer's count has reached its own (a peer may already be further on). Waits,
        times out and fails like an exchange."""
        if self._broken is not None:
            raise RuntimeError(f"deep_ep: `{op}`: the shared-memory transport failed earlier ({self._broken})")
        ctrl, me = self._ctrl, self.rank
        peers = [r for r in range(self.size) if r != me]
        started = self.comm._begin(op)
        try:
            self._fences += 1
            count = self._fences
            _store_fence()              # this rank's earlier stores are visible before its count
            self._mine[_W_FENCE] = count
            self._ring(peers)
            waiter = None
            while not all(ctrl[r][_W_FENCE] >= count for r in peers):
                if waiter is None:
                    waiter = _Waiter(self.comm, op, started, self._bells)
                waiter.idle()
        except BaseException as exc:
            self._broken = f"`{op}`: {type(exc).__name__}"
            raise
        finally:
            self.comm._end()

    # ------------------------------------------------------------------------------------ sending
    def send_buffer(self, num_bytes: int, op: str) -> Optional[torch.Tensor]:
        """This rank's data area as a uint8 tensor of `num_bytes`, for a sender to gather its rows into
        (the next `all_to_all` then moves them without another copy), or None when they do not fit.
        Waits until every peer consumed this rank's previous posting."""
        if num_bytes > self.data_bytes or self._my_data is None:
            return None
        self._wait_acks(op)
        return self._my_data[:num_bytes]

    def _all_acked(self) -> bool:
        me, posted = self.rank, self._posted
        ack = self.layout.ack
        return all(self._ctrl[r][ack + me] == posted for r in range(self.size) if r != me)

    def _wait_acks(self, op: str) -> None:
        if self._all_acked():
            return
        started = self.comm._begin(op)
        try:
            waiter = _Waiter(self.comm, op, started, self._bells)
            while not self._all_acked():
                waiter.idle()
        finally:
            self.comm._end()

    # ------------------------------------------------------------------------------- all-to-all
    def all_to_all(self, out: Optional[torch.Tensor], inp: torch.Tensor, out_splits: Sequence[int],
                   in_splits: Sequence[int], op: str, views: Optional[List[torch.Tensor]] = None,
                   match: Optional[str] = None) -> None:
        """Uneven all-to-all of flat uint8 tensors (splits in bytes), finished when it returns.

        With `views` (a list, filled with one uint8 tensor per source) nothing is copied out where it
        can be avoided: a source's segment is a view into its shared area (its own segment a view of
        `inp`), valid until `release_views`, which must follow before the next exchange; `out` is unused.
        `match` (default `op`) is what every rank's exchange must agree on (else "the ranks diverged").
        """
        if self._broken is not None:
            raise RuntimeError(f"deep_ep: `{op}`: the shared-memory transport failed earlier ({self._broken})")
        R, me, lay = self.size, self.rank, self.layout
        cap = self.data_bytes
        self._seq += 1
        seq, tag = self._seq, _op_tag(match or op)
        in_off = [0] * R
        out_off = [0] * R
        for d in range(1, R):
            in_off[d] = in_off[d - 1] + in_splits[d - 1]
            out_off[d] = out_off[d - 1] + out_splits[d - 1]
        total = in_off[-1] + in_splits[-1]
        if out_splits[me] != in_splits[me]:
            raise RuntimeError(f"deep_ep: `{op}`: rank {me} sends itself {in_splits[me]} bytes but expects "
                               f"{out_splits[me]}")
        if views is not None:
            views[:] = [None] * R
            views[me] = inp[in_off[me]:in_off[me] + in_splits[me]]
        elif in_splits[me]:
            _copy(out[out_off[me]:out_off[me] + in_splits[me]], inp[in_off[me]:in_off[me] + in_splits[me]])
        zero_copy = total > 0 and inp.data_ptr() == self._my_data.data_ptr() and total <= cap
        rounds = 1 if zero_copy else max(1, -(-total // cap))
        mine, ctrl, data = self._mine, self._ctrl, self._data
        started = self.comm._begin(op)
        waiter = None
        try:
            next_round = 0
            pending = [s for s in range(R) if s != me]
            mismatch: List[Tuple[int, int, int]] = []
            while True:
                progress = False
                if next_round < rounds and self._all_acked():
                    lo = next_round * cap
                    hi = min(total, lo + cap)
                    if not zero_copy and hi > lo:
                        _copy(self._my_data[:hi - lo], inp[lo:hi])
                    if next_round == 0:
                        for d in range(R):
                            mine[_W_SEGS + d] = in_off[d]
                            mine[_W_SEGS + R + d] = in_splits[d]
                        text = op.encode("utf-8", "replace")[:_OP_TEXT_BYTES - 1]
                        raw = memoryview(self._maps[me])
                        raw[lay.text:lay.text + _OP_TEXT_BYTES] = text.ljust(_OP_TEXT_BYTES, b"\0")
                        del raw
                    mine[_W_SEQ] = seq
                    mine[_W_ROUND] = next_round
                    mine[_W_ROUNDS] = rounds
                    mine[_W_LO] = lo
                    mine[_W_HI] = hi
                    mine[_W_TAG] = tag
                    self._posted += 1
                    _store_fence()
                    mine[_W_POST] = self._posted      # the flag: everything above is visible before it
                    self._ring(self._peers)
                    next_round += 1
                    progress = True
                for s in list(pending):
                    c = ctrl[s]
                    post = c[_W_POST]
                    if post == self._acked[s]:
                        continue
                    if c[_W_SEQ] != seq or c[_W_TAG] != tag:
                        self._diverged(op, s, seq, c)
                    k, k_total, lo, hi = c[_W_ROUND], c[_W_ROUNDS], c[_W_LO], c[_W_HI]
                    seg_off, seg_len = c[_W_SEGS + me], c[_W_SEGS + R + me]
                    if k == 0 and seg_len != out_splits[s]:
                        mismatch.append((s, seg_len, out_splits[s]))
                    a = max(lo, seg_off)
                    b = min(hi, seg_off + min(seg_len, out_splits[s]))
                    if views is not None and k_total == 1:
                        # Read in place; acknowledged by release_views once the caller is done with it.
                        views[s] = data[s][a - lo:a - lo + max(b - a, 0)]
                        self._held.append((s, post))
                        pending.remove(s)
                        progress = True
                        continue
                    if views is not None:  # several rounds: collect the segment in a private buffer
                        if views[s] is None:
                            views[s] = torch.empty(out_splits[s], dtype=torch.uint8)
                        if b > a:
                            _copy(views[s][a - seg_off:b - seg_off], data[s][a - lo:b - lo])
                    elif b > a:
                        dst = out_off[s] + (a - seg_off)
                        _copy(out[dst:dst + (b - a)], data[s][a - lo:b - lo])
                    self._acked[s] = post
                    _store_fence()  # the copy out of the peer's area is done before the peer may reuse it
                    mine[lay.ack + s] = post
                    self._ring((s,))
                    if k == k_total - 1:
                        pending.remove(s)
                    progress = True
                if next_round == rounds and not pending:
                    break
                if not progress:
                    if waiter is None:
                        waiter = _Waiter(self.comm, op, started, self._bells)
                    waiter.idle()
                elif waiter is not None:
                    waiter.progressed()
            if mismatch:
                s, sent, expected = mismatch[0]
                raise RuntimeError(f"deep_ep: `{op}`: rank {s} sent {sent} bytes to rank {me}, which expected "
                                   f"{expected} (ranks disagree on the traffic: different arguments?)")
        except BaseException as exc:
            self._broken = f"`{op}`: {type(exc).__name__}"
            raise
        finally:
            self.comm._end()

    def release_views(self) -> None:
        """Acknowledge the segments `all_to_all(..., views=...)` left in place (their senders may reuse
        their areas from now on)."""
        held, self._held = self._held, []
        if not held or self._mine is None:
            return
        _store_fence()
        for s, post in held:
            self._acked[s] = post
            self._mine[self.layout.ack + s] = post
        self._ring([s for s, _ in held])

    def _diverged(self, op: str, peer: int, seq: int, c) -> None:
        raw = bytes(memoryview(self._maps[peer])[self.layout.text:self.layout.text + _OP_TEXT_BYTES])
        their = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        raise RuntimeError(
            f"deep_ep: `{op}` on rank {self.rank} (its shared-memory exchange #{seq}): rank {peer} is in "
            f"`{their}` (its exchange #{c[_W_SEQ]}): the ranks diverged; every rank must issue the same "
            f"sequence of deep_ep calls with matching arguments")


class _Waiter:
    """Backoff while waiting for a peer, with the Communicator's liveness checks and timeout.

    The caller's loop is ``while not condition(): waiter.idle()``. With doorbells (`_Bells`) each `idle`
    reads the doorbell for the next one, so every wait is on the value read before the latest check."""

    # A few polls without giving up the core, then doorbell waits or sleeps of growing length. Not
    # sched_yield: on a loaded host it parks the caller behind every runnable task (measured 6 ms per call
    # at load 10 on 2 cores), where a sleeper is woken promptly.
    _SPINS = 2
    _FIRST_SLEEP = 10e-6
    _MAX_SLEEP = 2e-4

    def __init__(self, comm: "Communicator", op: str, started: float, bells: Optional[_Bells] = None) -> None:
        self.comm, self.op, self.started = comm, op, started
        self.bells = bells
        self.seen = 0
        self.idles = 0
        self.sleep = self._FIRST_SLEEP
        self.next_check = time.monotonic() + comm._period
        self.deadline = started + comm.timeout_s

    def progressed(self) -> None:
        self.idles = 0
        self.sleep = self._FIRST_SLEEP

    def idle(self) -> None:
        self.idles += 1
        bells = self.bells
        if self.idles > self._SPINS:
            if bells is not None:
                bells.wait(self.seen, min(_MAX_BELL_WAIT, self.next_check - time.monotonic()))
            else:
                time.sleep(self.sleep)
                self.sleep = min(self.sleep * 1.5, self._MAX_SLEEP)
        if bells is not None:
            self.seen = bells.read()
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + self.comm._period
        comm = self.comm
        comm._activity.op = self.op
        watch = [p for p in range(comm.size) if p != comm.rank]
        gone = comm._gone(watch)
        if gone:
            raise comm.error(self.op, None, None, self.started, gone)
        comm._read_peers(watch)
        raised = comm._raised(watch)  # a peer left its call with an error (published in its heartbeat)
        if raised:
            raise comm.error(self.op, None, None, self.started, raised=raised)
        if now >= self.deadline:
            raise comm.error(self.op, TimeoutError(f"no answer within {comm.timeout_s:g} s"), None, self.started)


def _open_region(num_bytes: int) -> Tuple[int, mmap.mmap]:
    fd = os.memfd_create("deep_ep", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, num_bytes)
        return fd, mmap.mmap(fd, num_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise


def setup(comm: "Communicator", data_bytes: int, forced: Optional[str],
          engine_bytes: int = 0) -> Tuple[Optional[ShmTransport], str]:
    """Collectively set up the transport (every rank calls it and every rank gets the same outcome).

    `data_bytes`: the data area of the all-to-all (at least `MIN_DATA_BYTES`); `engine_bytes`: the
    engine area (`ShmTransport.engine_area`, none when 0).
    Returns ``(transport or None, reason)``; `forced` is ``"gloo"``, ``"shm"`` or None (automatic).
    Raises when ``"shm"`` is forced and it cannot be set up.
    """
    if forced == "gloo":
        return None, "gloo transport (forced by DEEP_EP_TRANSPORT=gloo)"
    wait = _env.shm_wait()  # a bad value raises here, on every rank, before any exchange
    size, rank = comm.size, comm.rank
    layout = _Layout(size, max(int(data_bytes), MIN_DATA_BYTES), engine_bytes)
    why = ""
    if not comm.single_host:
        why = "the ranks span several hosts"
    elif platform.machine().lower() not in ("x86_64", "amd64"):
        why = f"the shared-memory protocol needs x86-64's store order, this is {platform.machine()}"
    elif not hasattr(os, "memfd_create"):
        why = "os.memfd_create is not available"
    elif len(comm._local_peers) != size - 1:
        why = "some peer processes are not visible through /proc (another PID namespace?)"
    fd, own = -1, None
    if not why:
        try:
            fd, own = _open_region(layout.total)
        except OSError as exc:
            why = f"memfd_create/mmap of {layout.total} bytes failed: {exc}"
    # Doorbells only where every rank rings them (a waiter would otherwise sleep out its timeouts).
    can_ring = wait == "futex" and _futex_lib() is not None
    answers = comm.all_gather_object((why, os.getpid(), fd, can_ring), op="__init__ (shared-memory set-up)")
    failed = [(r, w) for r, (w, _, _, _) in enumerate(answers) if w]
    doorbells = all(a[3] for a in answers)
    maps: List[Optional[mmap.mmap]] = [None] * size
    if not failed:
        maps[rank] = own
        for r, (_, pid, peer_fd, _) in enumerate(answers):
            if r == rank:
                continue
            try:
                pfd = os.open(f"/proc/{pid}/fd/{peer_fd}", os.O_RDWR | os.O_CLOEXEC)
                try:
                    maps[r] = mmap.mmap(pfd, layout.total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                finally:
                    os.close(pfd)
            except (OSError, ValueError) as exc:
                why = f"could not map rank {r}'s region through /proc/{pid}/fd: {exc}"
                break
        answers = comm.all_gather_object(why, op="__init__ (shared-memory set-up)")
        failed = [(r, w) for r, w in enumerate(answers) if w]
    if fd >= 0:
        os.close(fd)  # every rank has mapped it (or gave up): the mappings keep the memory
    if failed:
        for m in maps:
            if m is not None:
                m.close()
        if own is not None and not own.closed:
            own.close()
        r, w = failed[0]
        reason = f"gloo transport (shared memory unavailable on rank {r}: {w})"
        if forced == "shm":
            raise RuntimeError(f"deep_ep.Buffer: DEEP_EP_TRANSPORT=shm, but {reason[len('gloo transport ('):-1]}")
        return None, reason
    engine = f" + {layout.engine_bytes} bytes of low-latency receive slots" if layout.engine_bytes else ""
    transport = ShmTransport(comm, layout, maps, doorbells)
    waits = "futex doorbells" if transport.uses_doorbells else "sleeping waits"
    return transport, (f"same-host shared-memory transport ({layout.data_bytes} bytes per rank{engine}, memfd, "
                       f"{waits})")
