"""Row streams: deep_ep's own TCP connections for the gloo transport's exchanges of CPU tensors.

A gloo message is one contiguous buffer, so a dispatch over gloo first gathers each destination's
rows of ``x`` into a send buffer: on a machine whose cores are busy that copy costs as much as a
third of gloo's own (``benchmarks/gloo_dispatch_floor.py``). Over a socket, ``sendmsg`` takes a list
of buffers (iovecs): the kernel's copy into the socket gathers the rows straight from ``x``, and the
receiver reads each source's rows straight into its place in ``recv_x``. Once the streams exist, every
all-to-all of CPU tensors of the gloo transport takes them too (`Communicator.all_to_all_single`: each
call's agreement exchange, combine's rows, the low-latency messages): done in the calling thread, a
small exchange costs a third of gloo's, which hands it to its own threads.

Set-up (`setup`, collective, when CPU tensors use the gloo transport): every rank listens on the
address its peers reach it by, chosen as gloo chooses its own (127.0.0.1 when all ranks are on this
host; else the address of ``GLOO_SOCKET_IFNAME``, or of this host's name), the addresses are
all-gathered over the private gloo group, each rank connects to the lower ranks and accepts the
higher ones (a hello and its reply carry a per-communicator token and both ranks, checked on both
sides), and the listener is closed.
Every rank gets the same outcome: when any rank cannot set up (or ``DEEP_EP_GLOO_ROWS=gloo``), all
use gloo. ``Buffer.engine_reason`` says which.

Exchange (`RowSockets.exchange_table`, `RowSockets.all_to_all`): one message per ordered pair of ranks
and call, a 16-byte header (magic, per-pair sequence number, byte count) and the bytes, all peers at once
on non-blocking sockets in one loop in the calling thread: the native helpers' ``sock_exchange``
(``poll``, ``sendmsg``/``recvmsg`` from and into byte ranges given as a table, the GIL released), else a
``selectors`` loop in Python (`RowSockets.exchange`); both put the same bytes on the wire. A header that
does not match the receiver's call stops the exchange before any byte of its body is read. Waiting follows gloo's rules (`Communicator`): past a
heartbeat period the peers are watched, a gone peer or one that raised in its own call fails the call
at once, a silent one at ``DEEP_EP_TIMEOUT_S``; the error is `Communicator.error`'s (names the peer and
why). A closed connection is a gone peer. After an error the streams are out of step: the Buffer is
unusable, as after any `CommError`.
"""

from __future__ import annotations

import fcntl
import os
import selectors
import socket
import struct
import time
import uuid
from array import array
from itertools import accumulate
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import torch

from . import _native

if TYPE_CHECKING:  # pragma: no cover
    from ._comm import Communicator

__all__ = ["RowSockets", "setup", "mode"]

_MAGIC = 0x44455052                 # "DEPR"
_HEADER = struct.Struct("<IIQ")     # magic, sequence number (mod 2**32), byte count
_HELLO = struct.Struct("<I32sII")   # magic, communicator token, from rank, to rank (the reply: swapped)
_IOV_MAX = 1000                     # iovecs per sendmsg (Linux allows 1024)
# sock_exchange's progress columns per peer (deep_ep/native/cpu_kernels.c): header bytes sent, send range,
# offset in it, header bytes received, receive range, offset in it
_ST_HEAD_OUT, _ST_RANGE_OUT, _ST_OFF_OUT, _ST_HEAD_IN, _ST_RANGE_IN, _ST_OFF_IN, _ST_COLS = range(7)
_SIOCGIFADDR = 0x8915


def mode() -> str:
    """``DEEP_EP_GLOO_ROWS``: ``sockets`` (default) sends the gloo transport's all-to-alls (the dispatch
    rows among them) over deep_ep's own TCP connections; ``gloo`` keeps them on gloo (the dispatch rows in
    a gathered send buffer)."""
    value = os.environ.get("DEEP_EP_GLOO_ROWS", "").strip().lower()
    if value in ("", "sockets"):
        return "sockets"
    if value == "gloo":
        return "gloo"
    raise ValueError(f"deep_ep: DEEP_EP_GLOO_ROWS must be 'sockets' or 'gloo', got {value!r}")


def _interface_address(name: str) -> str:
    """IPv4 address of network interface `name`."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
    return socket.inet_ntoa(packed[20:24])


def _listen_address(comm: "Communicator") -> Tuple[str, str]:
    """``(address, why not)``: the address this rank's peers reach it by, chosen as gloo chooses its own
    (``GLOO_SOCKET_IFNAME``'s address, else this host name's), or 127.0.0.1 when every rank is here."""
    if comm.single_host:
        return "127.0.0.1", ""
    ifname = os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0].strip()
    addr = _interface_address(ifname) if ifname else socket.gethostbyname(socket.gethostname())
    if addr.startswith("127."):
        return addr, (f"this host's name resolves to {addr}, which the other hosts cannot reach (set "
                      f"GLOO_SOCKET_IFNAME to the interface gloo uses)")
    return addr, ""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed during the hello")
        data += chunk
    return data


def setup(comm: "Communicator") -> Tuple[Optional["RowSockets"], str]:
    """Collectively connect every pair of ranks (see the module docstring). Every rank gets the same
    outcome: ``(RowSockets, reason)``, or ``(None, reason)`` when the rows stay on gloo."""
    why = "DEEP_EP_GLOO_ROWS=gloo" if mode() == "gloo" else ""  # a bad value raises before any exchange
    listener = None
    addr, port = "", 0
    if not why:
        try:
            addr, why = _listen_address(comm)
        except OSError as exc:
            why = f"no address to listen on: {exc}"
    if not why:
        try:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind((addr, 0))
            listener.listen(max(16, comm.size))
            port = listener.getsockname()[1]
        except OSError as exc:
            why = f"could not listen for the row streams: {exc}"
    token = uuid.uuid4().hex.encode() if comm.rank == 0 else b""
    answers = comm.all_gather_object((why, addr, port, token), op="__init__ (row streams set-up)")
    token = answers[0][3]
    failed = [(r, w) for r, (w, _, _, _) in enumerate(answers) if w]
    socks: Dict[int, socket.socket] = {}
    if not failed:
        deadline = time.monotonic() + min(comm.timeout_s, 30.0)
        try:
            # Connect to the lower ranks (they accept below); each side checks that the other is the rank
            # it expects, of this communicator, before the connection is used.
            for peer in range(comm.rank):
                _, paddr, pport, _ = answers[peer]
                s = socket.create_connection((paddr, pport), timeout=max(0.1, deadline - time.monotonic()))
                socks[peer] = s
                s.sendall(_HELLO.pack(_MAGIC, token, comm.rank, peer))
                if _HELLO.unpack(_recv_exact(s, _HELLO.size)) != (_MAGIC, token, peer, comm.rank):
                    raise ConnectionError(f"the listener at {paddr}:{pport} is not rank {peer}'s")
            listener.settimeout(1.0)
            while len(socks) < comm.size - 1:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks {[p for p in range(comm.size) if p not in socks and p != comm.rank]} "
                                       f"did not connect in time")
                try:
                    conn, _ = listener.accept()
                except socket.timeout:
                    continue
                conn.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    magic, got_token, peer, target = _HELLO.unpack(_recv_exact(conn, _HELLO.size))
                except (OSError, struct.error):
                    conn.close()
                    continue
                if (magic != _MAGIC or got_token != token or target != comm.rank or not comm.rank < peer < comm.size
                        or peer in socks):
                    conn.close()  # not one of this communicator's ranks, or not for this rank
                    continue
                conn.sendall(_HELLO.pack(_MAGIC, token, comm.rank, peer))
                socks[peer] = conn
        except OSError as exc:
            why = f"could not connect the row streams: {exc}"
    if listener is not None:
        listener.close()
    if not failed:
        answers2 = comm.all_gather_object(why, op="__init__ (row streams set-up)")
        failed = [(r, w) for r, w in enumerate(answers2) if w]
    if failed:
        for s in socks.values():
            s.close()
        r, w = failed[0]
        return None, f"exchanges over gloo (row streams unavailable on rank {r}: {w})"
    for s in socks.values():
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
    where = "127.0.0.1" if comm.single_host else "each rank's address"
    lib = _native.library()
    native = lib if lib is not None and getattr(lib, "HAVE_SOCK_EXCHANGE", 0) else None
    return RowSockets(comm, socks, native), f"exchanges over deep_ep's own TCP connections ({where}, sendmsg)"


class _Peer:
    """One peer's state in an exchange."""

    __slots__ = ("out", "header", "got", "views", "at", "expected")

    def __init__(self, out: List[memoryview], views: List[memoryview]) -> None:
        self.out = out                   # what is left to send (header first)
        self.header = bytearray(_HEADER.size)
        self.got = 0                     # header bytes received
        self.views = views               # where the peer's bytes go, in order (none empty)
        self.at = -1                     # body bytes received, -1 until the header is checked
        self.expected = sum(len(v) for v in views)

    def reading(self) -> bool:
        return self.at < self.expected

    def next_view(self) -> memoryview:
        """The rest of the view the next body bytes go to."""
        at = self.at
        for v in self.views:
            if at < len(v):
                return v[at:]
            at -= len(v)
        raise AssertionError("no bytes left to receive")


class RowSockets:
    """The connections to every peer (`setup` makes them)."""

    def __init__(self, comm: "Communicator", socks: Dict[int, socket.socket], native=None) -> None:
        self._comm = comm
        self._socks = socks
        self._send_seq = {p: 0 for p in socks}
        self._recv_seq = {p: 0 for p in socks}
        self._native = native  # the native helpers when they have `sock_exchange` (deep_ep._native)

    def exchange_table(self, bases: Sequence[torch.Tensor], sends: torch.Tensor, send_counts: Sequence[int],
                       recvs: torch.Tensor, recv_counts: Sequence[int], op: str) -> None:
        """`exchange` with the buffers as tables: rows ``[base, offset, bytes]`` (int64) of ``sends`` and
        ``recvs`` are byte ranges of the contiguous CPU tensors ``bases[base]``, grouped by peer in rank
        order: ``send_counts[r]`` rows for rank ``r`` (this rank's entry is ignored, and must be 0), the
        same for ``recv_counts``. With the native helpers the whole exchange is one C loop
        (``sock_exchange``: ``poll``, ``sendmsg``/``recvmsg`` straight from and into the ranges, no Python
        object per range); without them the ranges become memoryviews for `exchange`."""
        comm = self._comm
        peers = [r for r in range(comm.size) if r != comm.rank]
        assert send_counts[comm.rank] == 0 and recv_counts[comm.rank] == 0, "a row stream to this rank itself"
        assert all(b.is_contiguous() and b.device.type == "cpu" for b in bases), "row stream buffers: contiguous CPU"
        if self._native is None:
            views = [memoryview(b.view(torch.uint8).view(-1).numpy()) if b.numel() else memoryview(b"") for b in bases]

            def by_peer(table: torch.Tensor, counts: Sequence[int]) -> Dict[int, List[memoryview]]:
                rows, out, at = table.tolist(), {}, 0
                for r in range(comm.size):
                    out[r] = [views[b][o:o + n] for b, o, n in rows[at:at + counts[r]]]
                    at += counts[r]
                return out

            self.exchange(by_peer(sends, send_counts), by_peer(recvs, recv_counts), op)
            return
        self._guarded(op, lambda started: self._run_native(
            bases, sends, [send_counts[r] for r in peers], recvs, [recv_counts[r] for r in peers], peers, op, started))

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_sizes: Sequence[int], in_sizes: Sequence[int],
                   op: str) -> None:
        """An uneven all-to-all of flat uint8 CPU tensors over the streams: ``in_sizes[r]`` bytes of ``inp``
        (in rank order) go to rank ``r``, whose bytes land in ``out`` (``out_sizes[r]`` from rank ``r``); this
        rank's own part is copied."""
        me, R = self._comm.rank, self._comm.size
        in_at = list(accumulate(in_sizes, initial=0))
        out_at = list(accumulate(out_sizes, initial=0))
        if out_sizes[me]:
            out[out_at[me]:out_at[me + 1]].copy_(inp[in_at[me]:in_at[me + 1]])
        sends = torch.tensor([[0, in_at[r], in_sizes[r]] for r in range(R) if r != me], dtype=torch.int64)
        recvs = torch.tensor([[1, out_at[r], out_sizes[r]] for r in range(R) if r != me], dtype=torch.int64)
        counts = [0 if r == me else 1 for r in range(R)]
        self.exchange_table([inp, out], sends.view(-1, 3), counts, recvs.view(-1, 3), counts, op)

    def exchange(self, sends: Dict[int, Sequence[memoryview]], recvs: Dict[int, Sequence[memoryview]],
                 op: str) -> None:
        """Send the byte buffers ``sends[p]`` (in order, as one message) to every peer ``p`` and receive
        its message into the buffers ``recvs[p]`` (filled in order; the message must be exactly their
        total size); every peer must post the mirror image. Peers missing from either dict exchange an
        empty message. Raises `CommError` as described above."""
        self._guarded(op, lambda started: self._run(sends, recvs, op, started))

    def _guarded(self, op: str, run) -> None:
        """``run(started)`` as one operation of the communicator (its start time, liveness bookkeeping)."""
        comm = self._comm
        comm._check_open(op)
        started = comm._begin(op)
        try:
            run(started)
        except BaseException as exc:
            # Whatever stopped it (a CommError, or e.g. KeyboardInterrupt), the streams are out of step now.
            if not comm.failed:
                comm.failed = (f"deep_ep.Buffer: `{op}` was interrupted on rank {comm.rank} ({type(exc).__name__}) "
                               f"with rows still in flight")
            raise
        finally:
            comm._end()

    def _fail(self, op: str, started: float, exc: Optional[BaseException], **kw) -> BaseException:
        return self._comm.error(op, exc, None, started, **kw)

    def _watch(self, peers: List[int], op: str, started: float) -> None:
        """The liveness checks of a wait past a heartbeat period: fails the call on a gone peer or one that
        raised in its own call (`Communicator.error` names it)."""
        comm = self._comm
        gone = comm._gone(peers)
        if gone:
            raise self._fail(op, started, None, gone=gone)
        comm._read_peers(peers)
        raised = comm._raised(peers)
        if raised:
            raise self._fail(op, started, None, raised=raised)

    def _run(self, sends, recvs, op: str, started: float) -> None:
        comm = self._comm
        peers = sorted(self._socks)
        state: Dict[int, _Peer] = {}
        sel = selectors.DefaultSelector()
        try:
            for p in peers:
                body = [v for v in sends.get(p, ()) if len(v)]
                nbytes = sum(len(v) for v in body)
                head = memoryview(_HEADER.pack(_MAGIC, self._send_seq[p], nbytes))
                self._send_seq[p] = (self._send_seq[p] + 1) & 0xFFFFFFFF
                state[p] = _Peer([head] + body, [v for v in recvs.get(p, ()) if len(v)])
                sel.register(self._socks[p], selectors.EVENT_READ | selectors.EVENT_WRITE, p)
            pending = set(peers)
            watch_from = started + comm._period
            while pending:
                events = sel.select(timeout=self._wait_s(op, started))
                for key, mask in events:
                    p = key.data
                    st = state[p]
                    if mask & selectors.EVENT_WRITE:
                        self._send_some(p, st, op, started)
                    if mask & selectors.EVENT_READ:
                        self._recv_some(p, st, op, started)
                    want = (selectors.EVENT_WRITE if st.out else 0) | (selectors.EVENT_READ if st.reading() else 0)
                    if want == 0:
                        sel.unregister(self._socks[p])
                        pending.discard(p)
                    elif want != key.events:
                        sel.modify(self._socks[p], want, p)
                if events or time.monotonic() < watch_from:
                    continue
                # Past a heartbeat period with nothing moving: watch the peers still to be heard from.
                self._watch(sorted(pending), op, started)
        finally:
            sel.close()

    def _wait_s(self, op: str, started: float) -> float:
        """How long one wait of an exchange loop may block: one heartbeat period at most (the loops watch
        their peers between waits), never past the timeout; raises the `CommError` once it has passed."""
        comm = self._comm
        left = started + comm.timeout_s - time.monotonic()
        if left <= 0:
            raise self._fail(op, started, TimeoutError(f"no answer within {comm.timeout_s:g} s"))
        return min(comm._period, left)

    def _run_native(self, bases, sends: torch.Tensor, send_counts: List[int], recvs: torch.Tensor,
                    recv_counts: List[int], peers: List[int], op: str, started: float) -> None:
        comm, n = self._comm, len(peers)
        sends = sends.to(torch.int64).contiguous()
        recvs = recvs.to(torch.int64).contiguous()
        # Small per-call arrays as `array`s (an address each, no tensor operation).
        fds = array("q", [self._socks[p].fileno() for p in peers])
        base_at = array("q", [b.data_ptr() for b in bases])
        base_bytes = array("q", [b.numel() * b.element_size() for b in bases])
        sbeg = array("q", accumulate(send_counts, initial=0))
        rbeg = array("q", accumulate(recv_counts, initial=0))
        seq = array("q", [v for p in peers for v in (self._send_seq[p], self._recv_seq[p])])
        state = array("q", bytes(8 * _ST_COLS * n))  # each peer's progress, kept across calls
        hdr_in = array("B", bytes(_HEADER.size * max(n, 1)))  # the headers received
        err = array("q", [0, 0, 0, 0])
        addr = lambda a: a.buffer_info()[0]  # noqa: E731
        watch_from = started + comm._period
        while True:
            wait_ms = max(1, int(1000 * self._wait_s(op, started)))
            rc = self._native.sock_exchange(addr(fds), n, addr(base_at), addr(base_bytes), len(bases),
                                            sends.data_ptr(), addr(sbeg), recvs.data_ptr(), addr(rbeg), addr(seq),
                                            addr(state), addr(hdr_in), _MAGIC, wait_ms, addr(err))
            if rc == 0:
                break
            if rc == -1:
                raise self._native_error(list(err), peers, hdr_in, op, started)
            if rc != 1 and rc != 2:
                raise AssertionError(f"deep_ep: native sock_exchange returned {rc}")
            if rc == 2 or time.monotonic() < watch_from:
                continue
            # Past a heartbeat period with nothing moving: watch the peers still to be heard from.
            at = lambda i, col: state[_ST_COLS * i + col]  # noqa: E731
            watch = [p for i, p in enumerate(peers)
                     if at(i, _ST_HEAD_OUT) < _HEADER.size or at(i, _ST_RANGE_OUT) < send_counts[i]
                     or at(i, _ST_HEAD_IN) < _HEADER.size or at(i, _ST_RANGE_IN) < recv_counts[i]]
            self._watch(watch, op, started)
        for p in peers:
            self._send_seq[p] = (self._send_seq[p] + 1) & 0xFFFFFFFF
            self._recv_seq[p] = (self._recv_seq[p] + 1) & 0xFFFFFFFF

    def _native_error(self, err: List[int], peers: List[int], hdr_in: "array", op: str,
                      started: float) -> BaseException:
        """The error `sock_exchange` reported (``err`` = [peer index, kind, errno, bytes expected]) as
        `exchange` words it."""
        i, kind, code, expected_bytes = err
        if kind == 5:
            return self._fail(op, started, OSError(code, f"poll failed: {os.strerror(code)}"))
        if kind == 6:
            return AssertionError("deep_ep: a row stream byte range lies outside its buffer")
        p = peers[i]
        if kind == 1:
            return self._fail(op, started, ConnectionError(f"sending to rank {p}: [Errno {code}] {os.strerror(code)}"))
        if kind == 2:
            return self._fail(op, started, ConnectionError(f"receiving from rank {p}: [Errno {code}] "
                                                           f"{os.strerror(code)}"))
        if kind == 3:
            return self._fail(op, started, ConnectionError(f"connection closed by peer rank {p}"))
        magic, seq, nbytes = _HEADER.unpack(bytes(hdr_in[_HEADER.size * i:_HEADER.size * (i + 1)]))
        return self._header_error(p, magic, seq, nbytes, self._recv_seq[p], expected_bytes, op, started)

    def _header_error(self, p: int, magic: int, seq: int, nbytes: int, expected: int, expected_bytes: int, op: str,
                      started: float) -> BaseException:
        return self._fail(op, started, RuntimeError(
            f"rank {p}'s row message does not match this rank's call (message #{seq} of {nbytes} bytes, "
            f"expected #{expected} of {expected_bytes} bytes{'' if magic == _MAGIC else ', bad magic'}): the "
            f"ranks' calls diverged"))

    def _send_some(self, p: int, st: _Peer, op: str, started: float) -> None:
        try:
            sent = self._socks[p].sendmsg(st.out[:_IOV_MAX])
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise self._fail(op, started, ConnectionError(f"sending to rank {p}: {exc}")) from exc
        out = st.out
        i = 0
        while i < len(out) and sent >= len(out[i]):
            sent -= len(out[i])
            i += 1
        rest = out[i:]
        if sent and rest:
            rest[0] = rest[0][sent:]
        st.out = rest

    def _recv_some(self, p: int, st: _Peer, op: str, started: float) -> None:
        sock = self._socks[p]
        try:
            if st.at < 0:
                n = sock.recv_into(memoryview(st.header)[st.got:])
            else:
                n = sock.recv_into(st.next_view())
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise self._fail(op, started, ConnectionError(f"receiving from rank {p}: {exc}")) from exc
        if n == 0:
            raise self._fail(op, started, ConnectionError(f"connection closed by peer rank {p}"))
        if st.at >= 0:
            st.at += n
            return
        st.got += n
        if st.got < _HEADER.size:
            return
        magic, seq, nbytes = _HEADER.unpack(bytes(st.header))
        expected = self._recv_seq[p]
        self._recv_seq[p] = (expected + 1) & 0xFFFFFFFF
        if magic != _MAGIC or seq != expected or nbytes != st.expected:
            raise self._header_error(p, magic, seq, nbytes, expected, st.expected, op, started)
        st.at = 0

    def close(self) -> None:
        for s in self._socks.values():
            try:
                s.close()
            except OSError:
                pass
        self._socks = {}
