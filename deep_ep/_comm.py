"""The collectives a `Buffer` runs among its ranks, and what happens when a peer does not answer.

`Communicator` bootstraps from a ``torch.distributed`` group (any backend, gloo included) or from an
mpi4py communicator, learns the topology (which ranks share a host), and then builds deep_ep's own
gloo process group with a timeout (``DEEP_EP_TIMEOUT_S``), so that a dead or diverging peer makes a
collective raise instead of hanging. The private group and its rendezvous store listen on 127.0.0.1
when all ranks share one host.

CUDA tensors travel over the user's group when its backend handles CUDA (NCCL); otherwise they are
staged through host memory on the private gloo group.

Failure reporting (see ``docs/reliability.md``):

* every rank runs a small heartbeat thread that publishes, every ``P`` seconds (``P`` = a tenth of the
  timeout, between 0.2 and 2 s), a counter and the deep_ep operation it is in, through deep_ep's own
  rendezvous store (one short message per period; nothing per call);
* a collective that is not finished after ``P`` starts watching its peers: a peer whose process is
  gone (checked through ``/proc`` for ranks on this host, by a stalled heartbeat for other hosts)
  fails the call at once; otherwise the call fails after ``DEEP_EP_TIMEOUT_S``;
* the `CommError` then names the operation, this rank, the peer ranks that did not answer and why
  (process gone, heartbeat stalled, alive but in another operation), and gloo's own message.

The happy path costs nothing extra: one wait per collective, as before.
"""

from __future__ import annotations

import datetime
import mmap
import os
import pickle
import socket
import threading
import time
import uuid
import weakref
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from . import _env
from ._threads import ThreadCap

__all__ = ["Communicator", "CommError", "P2PWork", "loopback_store"]


class CommError(RuntimeError):
    """A collective failed or timed out (a peer died, diverged, or never arrived).

    Attributes:
        op: the operation, e.g. ``"dispatch (data)"``.
        rank: the rank that raised.
        missing_ranks: peers that did not answer (gone, stalled, or elsewhere), sorted.
        gone_ranks: the subset of `missing_ranks` whose process is known to be gone.
    """

    def __init__(self, message: str, op: str = "", rank: int = -1, missing_ranks: Sequence[int] = (),
                 gone_ranks: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.op = op
        self.rank = rank
        self.missing_ranks = sorted(missing_ranks)
        self.gone_ranks = sorted(gone_ranks)


def _fmt_exc(exc: Optional[BaseException]) -> str:
    if exc is None:
        return ""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    # gloo prefixes its messages with the source location; it helps nobody here.
    if line.startswith("[") and "] " in line[:200]:
        line = line.split("] ", 1)[1]
    if " This is typically caused" in line:
        line = line.split(" This is typically caused")[0]
    line = line.strip()
    return line if line.endswith((".", "!", "?")) else line + "."


def loopback_listener() -> socket.socket:
    """A listening TCP socket on 127.0.0.1 at a port the kernel picks; pass it to rank 0's `loopback_store`.

    Picking a port by binding to port 0 and closing the socket leaves a window in which another process
    (say, gloo binding its own connections) can take the port before rank 0 binds it again. A launcher
    that creates this listener, passes it to rank 0's process (``multiprocessing`` sends sockets to
    spawned and forkserver children) and gives ``listener.getsockname()[1]`` to the others has no window.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def start_loopback_ranks(ctx: Any, target: Any, num_ranks: int, *args: Any, name: Optional[str] = None,
                         daemon: Optional[bool] = None) -> List[Any]:
    """Start ``target(rank, num_ranks, port, listener, *args)`` in `num_ranks` processes of the
    ``multiprocessing`` context `ctx` (spawn or forkserver) for a single-host launch: rank 0 gets the
    store's socket already listening (`loopback_listener`; pass it to `loopback_store`), the others
    None, all the port. `name`: a format string with ``{rank}`` for the process names.
    Returns the started processes."""
    listener = loopback_listener()
    port = listener.getsockname()[1]
    procs = [ctx.Process(target=target, args=(r, num_ranks, port, listener if r == 0 else None, *args),
                         name=name.format(rank=r) if name else None, daemon=daemon) for r in range(num_ranks)]
    try:
        for p in procs:
            p.start()
    finally:
        listener.close()  # the children hold their own copies
    return procs


def loopback_store(port: int, rank: int, world_size: int, timeout_s: float = 300.0,
                   listener: Optional[socket.socket] = None) -> dist.TCPStore:
    """A rendezvous store for ranks that all run on this host, listening on 127.0.0.1 only.

    ``dist.init_process_group(init_method="tcp://127.0.0.1:PORT")`` makes rank 0's store listen on
    every interface (``[::]:PORT``), whatever the address says; launchers of single-host runs (tests,
    benchmarks, examples) use this instead::

        store = loopback_store(port, rank, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)

    Rank 0 binds ``127.0.0.1:port`` (pick it with a bind to port 0 beforehand), or, when `listener`
    is given (see `loopback_listener`), serves on that already-listening socket and ignores `port`;
    the others connect to ``127.0.0.1:port``.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank != 0:
        return dist.TCPStore("127.0.0.1", port, world_size, False, timeout=timeout)
    if listener is not None:
        sock = listener
        port = sock.getsockname()[1]
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(max(128, world_size))
    # The store owns the descriptor from now on (detach: the socket object must not close it).
    return dist.TCPStore("127.0.0.1", port, world_size, True, timeout=timeout, wait_for_workers=False,
                         master_listen_fd=sock.detach())


_SETUP_OPS = ("CUDA ", "__init__", "all_gather_object", "NVSHMEM")


def _where(op: str) -> str:
    """``"cached dispatch (data)"`` -> ``"deep_ep.Buffer.dispatch"``; set-up steps -> ``deep_ep.Buffer.__init__``."""
    if op.startswith(_SETUP_OPS) and not op.startswith("CUDA engine destroy") and \
            not op.startswith("CUDA LL engine destroy"):
        return "deep_ep.Buffer.__init__"
    if "destroy" in op:
        return "deep_ep.Buffer.destroy"
    name = op.split(" (")[0].strip()
    if name.startswith("cached "):
        name = name[len("cached "):]
    return f"deep_ep.Buffer.{name}" if name.isidentifier() else "deep_ep"


def public_op(op: str) -> str:
    """The public call an internal operation belongs to, for messages about peers:
    ``"dispatch (count exchange)"`` -> ``"`deep_ep.Buffer.dispatch`"``, ``"CUDA engine probe"`` ->
    ``"`deep_ep.Buffer(...)` (its set-up)"``. Internal step names never explain anything to users."""
    where = _where(op)
    if where == "deep_ep.Buffer.__init__":
        return "`deep_ep.Buffer(...)` (its set-up)"
    if where == "deep_ep":
        return "a deep_ep call"
    return f"`{where}`" + (" (cached)" if op.startswith("cached ") else "")


def _c10d_slice_timeout(exc: BaseException) -> bool:
    """``Work.wait(timeout)`` ran out of time, but the operation is still running (not an error)."""
    return str(exc).startswith("Operation timed out")


# ---------------------------------------------------------------------------------------------
# Process liveness through /proc (ranks on this host)

def _proc_stat(pid: int) -> Optional[Tuple[str, str]]:
    """``(state, start time)`` of a process from ``/proc/<pid>/stat``; None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = data[data.rfind(")") + 2:].split()
    if len(fields) < 20:
        return None
    return fields[0], fields[19]


def _proc_gone(pid: int, start_time: str) -> bool:
    stat = _proc_stat(pid)
    return stat is None or stat[0] in ("Z", "X", "x") or stat[1] != start_time


# ---------------------------------------------------------------------------------------------
# Heartbeats through deep_ep's rendezvous store

class _Activity:
    """What this rank is doing in deep_ep, read by the heartbeat thread (plain attributes: no lock,
    a torn read only makes one heartbeat slightly stale)."""

    __slots__ = ("beat", "seq", "op", "inflight", "failed", "closed", "call", "error", "broken")

    def __init__(self) -> None:
        self.beat = 0         # heartbeats sent
        self.seq = 0          # operations started so far
        self.op = ""          # the latest one started, or the one being waited for
        self.inflight = 0     # operations started and not finished
        self.failed = ""      # "rank,rank" this rank blamed when `op` failed ("-" for nobody), else ""
        self.closed = False   # the Buffer was destroyed or collected
        self.call = 0         # Buffer calls begun (deep_ep._agree numbers them alike on every rank)
        self.error = ""       # "Type: message" of an exception this rank raised in its own call, else ""
        self.broken = False   # that exception left this rank out of an exchange its peers are in

    def encode(self, pid: int) -> str:
        state = "F" if self.failed else "E" if self.error else "C" if self.closed else \
            "B" if self.inflight > 0 else "I"
        error = " ".join(self.error.split())[:1500]
        return "\t".join((str(self.beat), str(pid), str(self.seq), state, self.op, self.failed, str(self.call),
                          "1" if self.broken else "0", error))


def _heartbeat_loop(store: dist.Store, key: str, period: float, activity: _Activity, pid: int,
                    stop: threading.Event, store_host: Optional[Tuple[int, str]],
                    board: Optional[_StatusBoard] = None) -> None:
    store_ok = True
    while True:
        if store_ok and store_host is not None and _proc_gone(*store_host):
            store_ok = False  # rank 0 (on this host) is gone, and its store with it
        if not store_ok and board is None:
            return  # nothing left to report to
        activity.beat += 1
        text = activity.encode(pid)
        if board is not None:
            board.write(text)
        if store_ok:
            try:
                store.set(key, text)
            except Exception:  # the store (rank 0) is gone
                store_ok = False
        if stop.wait(period):
            return


class _StatusBoard:
    """Heartbeats of the ranks on this host through shared memory, besides the store.

    Each rank owns one page (an anonymous ``memfd``; the peers on this host map it through
    ``/proc/<pid>/fd`` at set-up) holding its latest heartbeat text under a sequence lock. The store that
    carries heartbeats lives in rank 0's process and goes with it, and a rank that fails and exits may
    do so before its peers read the store again; a mapping stays readable for as long as the reader
    holds it, so the peers still see what a gone rank last published (a failure, and whom it blamed)
    and keep seeing the live ranks' heartbeats after rank 0 is gone. Advisory only: where a page
    cannot be made or mapped the store alone serves.
    """

    PAGE = 4096
    _TEXT = PAGE - 16  # [seq int64][length int64][text]

    def __init__(self) -> None:
        self.fd = -1
        self._own: Optional[mmap.mmap] = None
        self._peers: Dict[int, mmap.mmap] = {}
        self._lock = threading.Lock()
        self._seq = 0
        if hasattr(os, "memfd_create"):
            try:
                self.fd = os.memfd_create("deep_ep-status", os.MFD_CLOEXEC)
                os.ftruncate(self.fd, self.PAGE)
                self._own = mmap.mmap(self.fd, self.PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError:
                self._close()

    def attach(self, peer: int, pid: int, fd: int) -> None:
        if fd < 0:
            return
        try:
            pfd = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._peers[peer] = mmap.mmap(pfd, self.PAGE, mmap.MAP_SHARED, mmap.PROT_READ)
            finally:
                os.close(pfd)
        except (OSError, ValueError):
            pass

    def has(self, peer: int) -> bool:
        return peer in self._peers

    def write(self, text: str) -> None:
        own = self._own
        if own is None:
            return
        raw = text.encode("utf-8", "replace")[:self._TEXT]
        with self._lock:
            self._seq += 1
            try:
                own[0:8] = (2 * self._seq - 1).to_bytes(8, "little")   # odd: being written
                own[8:16] = len(raw).to_bytes(8, "little")
                own[16:16 + len(raw)] = raw
                own[0:8] = (2 * self._seq).to_bytes(8, "little")
            except ValueError:  # closed meanwhile (the heartbeat thread racing `close`)
                pass

    def read(self, peer: int) -> str:
        """`peer`'s latest heartbeat text ("" when there is none, or it is being rewritten right now)."""
        m = self._peers.get(peer)
        if m is None:
            return ""
        # The writer is a heartbeat thread that a busy process may preempt mid-write: retry a torn read
        # for a while rather than leave the caller with an older heartbeat.
        for attempt in range(200):
            try:
                before = int.from_bytes(m[0:8], "little")
                n = int.from_bytes(m[8:16], "little")
                raw = m[16:16 + min(n, self._TEXT)]
                after = int.from_bytes(m[0:8], "little")
            except ValueError:  # closed
                return ""
            if before == 0:
                return ""
            if before == after and not before % 2:
                return raw.decode("utf-8", "replace")
            time.sleep(0 if attempt < 20 else 0.001)
        return ""

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        for m in list(self._peers.values()) + ([self._own] if self._own is not None else []):
            try:
                m.close()
            except (BufferError, ValueError):
                pass
        self._peers = {}
        self._own = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _PeerState:
    """One peer as seen through its last heartbeat."""

    __slots__ = ("beat", "pid", "seq", "state", "op", "blamed", "changed_at", "call", "broken", "error")

    def __init__(self, value: str, now: float) -> None:
        parts = value.split("\t", 8)
        self.beat, self.pid, self.seq, self.state = int(parts[0]), int(parts[1]), int(parts[2]), parts[3]
        self.op = parts[4]
        self.blamed = [int(v) for v in parts[5].split(",") if v.strip().lstrip("-").isdigit()] \
            if len(parts) > 5 and parts[5] not in ("", "-") else []
        self.changed_at = now
        self.call = int(parts[6]) if len(parts) > 6 and parts[6].isdigit() else 0
        self.broken = len(parts) > 7 and parts[7] == "1"
        self.error = parts[8] if len(parts) > 8 else ""

    @property
    def busy(self) -> bool:
        return self.state == "B"

    @property
    def failed(self) -> bool:
        return self.state == "F"

    @property
    def closed(self) -> bool:
        return self.state == "C"

    @property
    def raised(self) -> bool:
        """It raised an exception in its own deep_ep call (`error`)."""
        return self.state == "E"

    def doing(self) -> str:
        if self.raised:
            return f"it raised an error in its own call to {public_op(self.op)} and left it: {self.error}"
        if self.closed and self.seq == 0:
            return "it closed its deep_ep Buffer (destroyed or garbage-collected) without using it"
        if self.seq == 0:
            return "it has made no deep_ep call since set-up"
        if self.busy:
            return f"it is in {public_op(self.op)} (its operation #{self.seq})"
        if self.closed:
            return (f"it closed its deep_ep Buffer (destroyed or garbage-collected) after {public_op(self.op)} (its "
                    f"operation #{self.seq})")
        if self.failed:
            return f"it failed in {public_op(self.op)} (its operation #{self.seq})"
        return f"it is between calls, its last one was {public_op(self.op)} (its operation #{self.seq}), finished"


class Communicator:
    """Rank/size/topology of one Buffer and the collectives it needs.

    Args:
        group: a ``torch.distributed`` ProcessGroup (any backend), or None with ``comm``.
        comm: an mpi4py communicator, used when ``group`` is None.
    """

    def __init__(self, group: Optional[dist.ProcessGroup], comm: Any = None) -> None:
        self.user_group = group
        self.mpi_comm = comm if group is None else None
        if group is not None:
            self.rank = dist.get_rank(group)
            self.size = dist.get_world_size(group)
            try:
                self._user_backend = str(dist.get_backend(group)).lower()
            except Exception:
                self._user_backend = ""
        else:
            self.rank = int(comm.Get_rank())
            self.size = int(comm.Get_size())
            self._user_backend = "mpi"
        self.timeout_s = _env.timeout_s()
        # Heartbeat period, and how long a stalled heartbeat means "gone" for a rank on another host.
        self._period = min(2.0, max(0.2, self.timeout_s / 10.0))
        self._stall_s = max(3.0 * self._period, 1.0)
        self._slice = datetime.timedelta(seconds=self._period)
        self._activity = _Activity()
        self._op_started = time.monotonic()
        self._peer_states: Dict[int, _PeerState] = {}
        self._store_lost = False
        self._stop = threading.Event()
        self._hb_thread: Optional[threading.Thread] = None
        self._diag_store = None
        self.pg = None
        # Why this communicator can no longer be used ("" while it can); set by the first unrecoverable
        # failure (`error`, or deep_ep._agree for an exception that left peers in an exchange).
        self.failed = ""
        self.shm = None  # same-host shared-memory transport for CPU tensors (`enable_shm`), else gloo
        self.rows = None  # with gloo: deep_ep's own TCP connections for the all-to-alls (`enable_row_streams`), or None

        # Topology (ranks sharing a host name form a node) and process identities for liveness checks.
        pid = os.getpid()
        own = _proc_stat(pid)
        self._board = _StatusBoard()
        ids = self.bootstrap_all_gather((socket.gethostname(), pid, own[1] if own else None, self._board.fd))
        self.hostnames: List[str] = [h for h, _, _, _ in ids]
        self.single_host = len(set(self.hostnames)) == 1
        self.pids: List[int] = [p for _, p, _, _ in ids]
        me = self.hostnames[self.rank]
        # deep_ep's CPU calls cap torch's intra-op threads to this host's cores per local rank.
        self.threads = ThreadCap.for_local_ranks(self.hostnames.count(me), _env.cpu_threads_override())
        # Peers whose process this rank can watch through /proc (same host, same PID namespace).
        self._local_peers: Dict[int, Tuple[int, str]] = {}
        for r, (host, p, start, board_fd) in enumerate(ids):
            if r != self.rank and host == me and start is not None:
                stat = _proc_stat(p)
                if stat is not None and stat[1] == start:
                    self._local_peers[r] = (p, start)
                    self._board.attach(r, p, board_fd)

        # Private gloo group with a timeout, rendezvous through a store owned by rank 0.
        store_info = None
        self._listen_sock = None
        self._store = None
        if self.rank == 0:
            if self.single_host:
                addr = "127.0.0.1"
            else:
                addr = _env.store_addr_override() or socket.gethostname()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((socket.gethostbyname(addr), 0))
            sock.listen(max(128, self.size))
            self._listen_sock = sock
            store_info = (addr, sock.getsockname()[1], uuid.uuid4().hex)
        store_info = self.bootstrap_all_gather(store_info)[0]
        addr, port, token = store_info
        self._hb_prefix = f"deep_ep/{token}/hb/"
        timeout = datetime.timedelta(seconds=self.timeout_s)
        t0 = time.monotonic()
        try:
            if self.rank == 0:
                self._store = dist.TCPStore(addr, port, self.size, True, timeout=timeout,
                                            wait_for_workers=False, master_listen_fd=self._listen_sock.fileno())
            else:
                self._store = dist.TCPStore(addr, port, self.size, False, timeout=timeout)
            # The first heartbeat goes out before the group forms, so every key exists once it has.
            self._store.set(self._hb_prefix + str(self.rank), self._activity.encode(pid))
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            if self.single_host:
                opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
            else:
                opts._devices = [dist.ProcessGroupGloo.create_default_device()]
            self.pg = dist.ProcessGroupGloo(dist.PrefixStore(f"deep_ep/{token}", self._store),
                                            self.rank, self.size, opts)
            self._start_heartbeat()
        except Exception as exc:
            raise self._setup_error(exc, t0, addr, port) from exc

    # ----------------------------------------------------------------------------- heartbeats
    def _start_heartbeat(self) -> None:
        hb_store = self._store.clone()
        self._diag_store = self._store.clone()
        short = datetime.timedelta(seconds=min(self.timeout_s, 5.0))
        for s in (hb_store, self._diag_store):
            s.set_timeout(short)
        self._hb_thread = threading.Thread(
            target=_heartbeat_loop, name=f"deep_ep-heartbeat-rank{self.rank}", daemon=True,
            args=(hb_store, self._hb_prefix + str(self.rank), self._period, self._activity, os.getpid(), self._stop,
                  self._local_peers.get(0), self._board))
        self._hb_thread.start()
        # Stop the thread when the Communicator is collected (the thread holds no reference to it).
        weakref.finalize(self, self._stop.set)

    def _read_peers(self, peers: Sequence[int]) -> None:
        """Refresh `_peer_states`: peers on this host from their status page (`_StatusBoard`), the others
        from the store (one round trip; sets `_store_lost` on failure)."""
        remote = []
        for p in peers:
            if self._board.has(p):
                self._read_board(p)
            else:
                remote.append(p)
        if self._diag_store is None or self._store_lost or not remote:
            return
        if 0 in self._local_peers and _proc_gone(*self._local_peers[0]):
            self._store_lost = True  # rank 0 hosted the store; do not even try
            return
        try:
            values = self._diag_store.multi_get([self._hb_prefix + str(p) for p in remote])
        except Exception:
            self._store_lost = True
            return
        now = time.monotonic()
        for p, raw in zip(remote, values):
            self._update_state(p, bytes(raw).decode("utf-8", "replace"), now)

    def _update_state(self, p: int, text: str, now: float) -> None:
        try:
            state = _PeerState(text, now)
        except (ValueError, IndexError):
            return
        old = self._peer_states.get(p)
        if old is not None and old.beat == state.beat:
            state.changed_at = old.changed_at
        self._peer_states[p] = state

    def _read_board(self, p: int) -> None:
        text = self._board.read(p)
        if text:
            self._update_state(p, text, time.monotonic())

    def _gone(self, peers: Sequence[int]) -> Dict[int, str]:
        """Peers known to be gone, with the reason; reads the store only for peers on other hosts."""
        gone: Dict[int, str] = {}
        remote = []
        for p in peers:
            if p in self._local_peers:
                pid, start = self._local_peers[p]
                if _proc_gone(pid, start):
                    gone[p] = f"its process is gone (pid {pid} on this host)"
                    self._read_board(p)  # its last words (a failure it published just before exiting)
                    if p == 0:
                        self._store_lost = True  # it hosted the store
            else:
                remote.append(p)
        if remote:
            self._read_peers(remote)
            now = time.monotonic()
            for p in remote:
                state = self._peer_states.get(p)
                if p == 0 and self._store_lost:
                    gone[p] = "it is unreachable (it hosts deep_ep's rendezvous store, which stopped answering)"
                elif state is not None and now - state.changed_at > self._stall_s:
                    gone[p] = (f"no heartbeat for {now - state.changed_at:.1f} s (process gone, frozen, or its "
                               f"host unreachable; pid {self.pids[p]} on {self.hostnames[p]})")
        return gone

    def _raised(self, peers: Sequence[int]) -> Dict[int, str]:
        """Peers (from their last heartbeat) that raised an exception in their own deep_ep call and will not
        join the operation this rank waits in: one whose exception left it out of an exchange (its Buffer is
        broken), or one that raised in this very call or a later one."""
        out: Dict[int, str] = {}
        for p in peers:
            state = self._peer_states.get(p)
            if state is not None and state.raised and (state.broken or state.call >= self._activity.call):
                out[p] = state.doing()
        return out

    def publish_error(self, method: str, exc: BaseException, broken: bool) -> None:
        """Tell the peers, through this rank's heartbeat key, that this rank raised `exc` in its own call to
        `method` (``"dispatch"``); ``broken``: it left them in an exchange (this communicator is unusable).
        Peers waiting for this rank then fail within one heartbeat period instead of at the timeout."""
        act = self._activity
        act.op = method
        act.error = f"{type(exc).__name__}: {exc}"
        act.broken = broken
        self._push_heartbeat()

    def clear_error(self) -> None:
        """A new call began: an earlier published (non-breaking) error no longer concerns the peers."""
        if self._activity.error and not self._activity.broken:
            self._activity.error = ""
            self._push_heartbeat()

    def _mirror_heartbeat(self, text: str) -> None:
        self._board.write(text)

    def _push_heartbeat(self) -> None:
        self._mirror_heartbeat(self._activity.encode(os.getpid()))
        if self._diag_store is None or self._store_lost:
            return
        try:
            self._diag_store.set(self._hb_prefix + str(self.rank), self._activity.encode(os.getpid()))
        except Exception:
            self._store_lost = True

    # ------------------------------------------------------------------------------- errors
    def error(self, op: str, exc: Optional[BaseException], peers: Optional[Sequence[int]] = None,
              started: Optional[float] = None, gone: Optional[Dict[int, str]] = None,
              raised: Optional[Dict[int, str]] = None) -> CommError:
        """A `CommError` for `op` that names the peers that did not answer and why.

        Args:
            op: the operation (``"dispatch (data)"``); its first word names the Buffer method.
            exc: the underlying exception (gloo's), or None.
            peers: the ranks the operation waited on (default: all others).
            started: ``time.monotonic()`` when the operation started (default: when this rank's latest
                operation started).
            gone: peers already known to be gone, with the reason.
            raised: peers that raised an exception in their own call, with what they published.
        """
        peers = [p for p in (range(self.size) if peers is None else peers) if p != self.rank]
        if not raised and not (gone and any(p in gone for p in peers)):
            # A peer that raised in its own call (and then went on, closing connections) explains it all.
            self._read_peers(peers)
            raised = self._raised(peers)
        if raised:
            return self._raised_error(op, peers, started, raised)
        if started is None:
            started = self._op_started
        elapsed = time.monotonic() - started
        cause = _fmt_exc(exc)
        gone = dict(gone or {})
        gone.update(self._gone([p for p in peers if p not in gone]))
        # A closed connection means some peer went away; on another host that shows as a heartbeat
        # that stops, so watch for a little while before blaming nobody.
        closed = any(k in cause for k in ("closed by peer", "Connection reset", "Broken pipe"))
        if closed and not gone:
            # A process killed on this host closes its sockets a moment before /proc shows it gone;
            # on another host it takes a stalled heartbeat. Watch until one peer shows up as gone, or
            # reports that it closed its Buffer or failed itself.
            remote = [p for p in peers if p not in self._local_peers]
            deadline = time.monotonic() + (self._stall_s + self._period if remote else 1.5)
            while time.monotonic() < deadline:
                gone.update(self._gone(peers))
                if gone or self._store_lost:
                    break
                self._read_peers(peers)
                if any(self._peer_states[p].closed or self._peer_states[p].failed
                       for p in peers if p in self._peer_states):
                    break
                time.sleep(self._period / 2 if remote else 0.05)
        # What the live peers are doing: a heartbeat read now may predate this operation, so wait
        # until every heartbeat has been renewed since it started.
        alive = [p for p in peers if p not in gone]
        if alive and not self._store_lost:
            self._await_fresh_heartbeats(alive)
        # Peers that went away during this diagnosis: when the failure already has a cause, they
        # followed it (a survivor that raised and exited), they did not cause it.
        late = self._gone(alive)
        late_echo: Dict[int, str] = {}
        if gone:
            late_echo = {p: f"Rank {p} went away since this failure began ({why})" for p, why in late.items()}
        else:
            gone.update(late)
        alive = [p for p in peers if p not in gone and p not in late_echo]

        # Root causes are the peers that are gone or elsewhere by this rank's own observation; peers
        # that failed in the same operation and blamed someone are reported as such.
        roots: Dict[int, str] = {}
        echoes: Dict[int, str] = {}
        same: List[int] = []
        blamed: set = set()
        for p in peers:
            state = self._peer_states.get(p)
            if p in late_echo and not (state is not None and state.failed):
                echoes[p] = late_echo[p]
                continue
            if state is not None and state.failed and state.seq:
                blamed.update(b for b in state.blamed if b != p)
                if p in gone or p in late_echo:
                    echoes[p] = (f"Rank {p} failed in `{state.op}` too, blaming rank(s) {state.blamed}, and has "
                                 f"exited since")
                else:
                    echoes[p] = f"Rank {p} failed in `{state.op}` too, blaming rank(s) {state.blamed}"
                continue
            if p in gone:
                roots[p] = gone[p]
                if state is not None and state.seq:
                    roots[p] += f"; last seen {'in' if state.busy else 'after'} `{state.op}` (its call #{state.seq})"
            elif state is not None:
                stalled = time.monotonic() - state.changed_at
                if stalled > self._stall_s:
                    roots[p] = (f"alive, but frozen: no heartbeat for {stalled:.1f} s (process stopped, or stuck "
                                f"without releasing Python's GIL); its last heartbeat: {state.doing()}")
                elif state.busy and state.op == op:
                    same.append(p)
                else:
                    roots[p] = f"alive, but {state.doing()}"
        if self._store_lost and self.rank != 0 and 0 not in roots and 0 not in echoes:
            roots[0] = "unreachable: deep_ep's rendezvous store, which it hosts, stopped answering"
            gone[0] = roots[0]
        if not roots:
            for b in sorted(blamed):
                if b != self.rank and b in peers and b not in echoes:
                    roots[b] = "named by the peers that failed first"
        missing = sorted(roots)
        timed_out = "imed out" in cause or elapsed >= self.timeout_s * 0.99

        where = _where(op)
        head = f"{where}: `{op}` failed on rank {self.rank} of {self.size} after {elapsed:.1f} s"
        parts = []
        if missing:
            within = f" within {self.timeout_s:g} s" if timed_out and not any(p in gone for p in missing) else ""
            parts.append(f"peer rank(s) {missing} did not answer{within}")
            parts += [f"Rank {p}: {roots[p]}" for p in missing]
        elif alive and len(same) == len(alive) and not echoes:
            parts.append("every peer is alive and in this operation (ranks passing different shapes or "
                         "arguments, or a network problem?)")
        else:
            parts.append("no peer could be identified as missing")
        parts += [echoes[p] for p in sorted(echoes)]
        if same and (missing or echoes):
            parts.append(f"Peer rank(s) {sorted(same)} are alive and in this operation")
        parts.append(f"This rank's operation #{self._activity.seq}; timeout {self.timeout_s:g} s (DEEP_EP_TIMEOUT_S)")
        message = head + ": " + ". ".join(parts) + "."
        if cause:
            message += f" Cause: {cause}"
        message += (" The Buffer cannot be used after this error: create a new one (in shrink mode, low-latency "
                    "calls mask the ranks that are gone instead).")
        self._publish_failure(op, missing)
        self.failed = self.failed or message.split(" The Buffer cannot be used after this error")[0]
        return CommError(message, op=op, rank=self.rank, missing_ranks=missing,
                         gone_ranks=[p for p in missing if p in gone])

    def _await_fresh_heartbeats(self, peers: Sequence[int]) -> None:
        """Read `peers`' heartbeats until each one has beaten again since this call began (so what it
        says is no older than the failure being diagnosed), or has published a failure, a raised error or
        a closed Buffer, or has gone quiet for long enough to be called frozen. A fixed wait is not
        enough: on a loaded host a heartbeat thread can be late by more than a period, and its previous
        beat may predate this rank's whole run of operations."""
        self._read_peers(peers)
        seen = {p: self._peer_states[p].beat for p in peers if p in self._peer_states}
        deadline = time.monotonic() + self._stall_s + 2 * self._period
        while True:
            now = time.monotonic()
            waiting = []
            for p in peers:
                state = self._peer_states.get(p)
                if state is not None and (state.beat != seen.get(p, -1) or state.failed or state.raised
                                          or state.closed or now - state.changed_at > self._stall_s):
                    continue
                waiting.append(p)
            if not waiting or now >= deadline or self._store_lost:
                return
            time.sleep(min(0.05, self._period / 4))
            self._read_peers(waiting)
            if self._gone(waiting):
                return

    def _raised_error(self, op: str, peers: Sequence[int], started: Optional[float],
                      raised: Dict[int, str]) -> CommError:
        """The `CommError` for an operation that peers left because they raised in their own call."""
        elapsed = time.monotonic() - (self._op_started if started is None else started)
        missing = sorted(raised)
        head = (f"{_where(op)}: failed on rank {self.rank} of {self.size} after {elapsed:.1f} s: peer rank(s) "
                f"{missing} raised an error in their own call and will not join this one")
        parts = [f"Rank {p}: {raised[p]}" for p in missing]
        message = head + ". " + ". ".join(p.rstrip(".") for p in parts) + "."
        self._publish_failure(op, missing)
        self.failed = self.failed or message
        after = " No Buffer was created." if _where(op) == "deep_ep.Buffer.__init__" else \
            " The Buffer cannot be used after this error: create a new one."
        return CommError(message + after, op=op, rank=self.rank, missing_ranks=missing)

    def _publish_failure(self, op: str, blamed: Sequence[int]) -> None:
        """Tell the peers (through this rank's heartbeat key) that `op` failed here and whom it blamed."""
        act = self._activity
        act.op = op
        act.failed = ",".join(str(b) for b in blamed) or "-"
        self._mirror_heartbeat(act.encode(os.getpid()))
        if self._diag_store is None or self._store_lost:
            return
        try:
            self._diag_store.set(self._hb_prefix + str(self.rank), act.encode(os.getpid()))
        except Exception:
            self._store_lost = True

    def _setup_error(self, exc: BaseException, started: float, addr: str, port: int) -> CommError:
        op = "__init__ (set-up of deep_ep's gloo group)"
        missing: List[int] = []
        detail = ""
        if self._store is None:
            if self.rank != 0:
                missing = [0]
                detail = f"could not reach deep_ep's rendezvous store on rank 0 at {addr}:{port}"
        else:
            try:
                keys = [self._hb_prefix + str(p) for p in range(self.size)]
                missing = [p for p, key in enumerate(keys) if not self._store.check([key])]
            except Exception:
                missing = [0] if self.rank != 0 else []
        if not detail:
            detail = (f"rank(s) {missing} never joined deep_ep's rendezvous" if missing else
                      "the ranks reached the rendezvous but could not connect to each other (firewall, or "
                      "DEEP_EP_STORE_ADDR / MASTER_ADDR naming an address the peers cannot reach?)")
        return CommError(f"deep_ep.Buffer.__init__: set-up of deep_ep's gloo group failed on rank {self.rank} of "
                         f"{self.size} after {time.monotonic() - started:.1f} s: {detail}. Timeout "
                         f"{self.timeout_s:g} s (DEEP_EP_TIMEOUT_S). Cause: {_fmt_exc(exc)}",
                         op=op, rank=self.rank, missing_ranks=missing)

    # ------------------------------------------------------------------------------- waiting
    def _begin(self, op: str) -> float:
        act = self._activity
        act.seq += 1
        act.op = op
        act.inflight += 1
        act.failed = ""
        self._op_started = time.monotonic()
        return self._op_started

    def _end(self) -> None:
        self._activity.inflight = max(0, self._activity.inflight - 1)

    def _wait(self, work: Any, op: str, started: float, peers: Optional[Sequence[int]] = None) -> None:
        """Wait for a gloo collective: one plain wait on the happy path; past one heartbeat period,
        watch the peers and fail as soon as one is gone, or at the timeout."""
        try:
            work.wait(self._slice)
            return
        except Exception as exc:
            if not _c10d_slice_timeout(exc):
                raise self.error(op, exc, peers, started) from exc
        self._activity.op = op  # what this rank is blocked on, for the peers' diagnostics
        watch = [p for p in (range(self.size) if peers is None else peers) if p != self.rank]
        deadline = started + self.timeout_s
        while True:
            gone = self._gone(watch)
            if gone:
                raise self.error(op, None, peers, started, gone)
            self._read_peers(watch)  # heartbeats of this host's peers too: a stalled one means frozen
            raised = self._raised(watch)
            if raised:
                raise self.error(op, None, peers, started, raised=raised)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.error(op, TimeoutError(f"no answer within {self.timeout_s:g} s"), peers, started)
            try:
                work.wait(datetime.timedelta(seconds=min(self._period, max(remaining, 0.001))))
                return
            except Exception as exc:
                if not _c10d_slice_timeout(exc):
                    raise self.error(op, exc, peers, started) from exc

    # ------------------------------------------------------------------------------- bootstrap
    def bootstrap_all_gather(self, obj: Any) -> List[Any]:
        """All-gather a picklable object over the bootstrap channel (user group or MPI)."""
        if self.user_group is not None:
            out: List[Any] = [None] * self.size
            dist.all_gather_object(out, obj, group=self.user_group)
            return out
        return list(self.mpi_comm.allgather(obj))

    def all_gather_object(self, obj: Any, op: str = "all_gather_object") -> List[Any]:
        """All-gather a picklable object over the private group (with timeout)."""
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = self.all_gather(torch.tensor([data.numel()], dtype=torch.int64), op=op).view(-1).tolist()
        padded = torch.zeros(max(sizes), dtype=torch.uint8)
        padded[: data.numel()] = data
        gathered = self.all_gather(padded, op=op)
        return [pickle.loads(gathered[i, : sizes[i]].numpy().tobytes()) for i in range(self.size)]

    # ------------------------------------------------------------------- shared-memory transport
    def enable_shm(self, data_bytes: int, engine_bytes: int = 0) -> str:
        """Collectively set up the same-host shared-memory transport for CPU tensors (`deep_ep._shm`) with
        `data_bytes` of data area and `engine_bytes` of engine area (the low-latency receive slots) per
        rank, unless ``DEEP_EP_TRANSPORT=gloo``. Returns why the CPU transport is what it is (for
        ``Buffer.engine_reason``); every rank gets the same outcome."""
        from . import _shm
        self.shm, reason = _shm.setup(self, data_bytes, _env.transport_override(), engine_bytes)
        return reason

    def enable_row_streams(self) -> str:
        """With the gloo transport: collectively connect deep_ep's own TCP streams for the all-to-alls
        (`deep_ep._rowsock`), unless ``DEEP_EP_GLOO_ROWS=gloo``. Returns why the rows travel as they do
        (for ``Buffer.engine_reason``); every rank gets the same outcome."""
        from . import _rowsock
        self.rows, reason = _rowsock.setup(self)
        return reason

    @property
    def transport(self) -> str:
        """``"shm"`` or ``"gloo"``: what moves CPU tensors."""
        return "shm" if self.shm is not None else "gloo"

    def send_buffer(self, num_bytes: int, op: str = "send buffer") -> Optional[torch.Tensor]:
        """A uint8 tensor of `num_bytes` in this rank's shared-memory area for a sender to gather rows
        into (the next `all_to_all_single` from it then moves them without another copy), or None
        (no shared-memory transport, or too large). Valid until the next collective."""
        if self.shm is None:
            return None
        self._check_open(op)
        return self.shm.send_buffer(num_bytes, op)

    def engine_areas(self, op: str) -> Optional[List[torch.Tensor]]:
        """Shared-memory transport with an engine area only (else None): every rank's engine area (uint8),
        mapped in this process, indexed by rank (`deep_ep._shm.ShmTransport.engine_area`)."""
        if self.shm is None or self.shm.engine_bytes == 0:
            return None
        self._check_open(op)
        return [self.shm.engine_area(r) for r in range(self.size)]

    def fence_round(self, op: str) -> None:
        """Shared-memory transport: a barrier; when it returns, every store any rank made before entering
        it is visible here (`deep_ep._shm.ShmTransport.fence_round`)."""
        self._check_open(op)
        self.shm.fence_round(op)

    def all_to_all_views(self, inp: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int],
                         op: str = "all_to_all") -> Optional[Tuple[List[torch.Tensor], Any]]:
        """Shared-memory transport only (else None): the all-to-all of `all_to_all_single` without the
        copy out: returns ``(per-source tensors [out_splits[s], *inp.shape[1:]], release)``, views into
        the senders' shared areas where possible. Call ``release()`` once done with them and before the
        next collective (the senders cannot reuse their areas until then)."""
        if self.shm is None or inp.is_cuda:
            return None
        self._check_open(op)
        row = _row_bytes(inp)
        raw: List[torch.Tensor] = []
        out_splits = [int(v) for v in out_splits]
        self.shm.all_to_all(None, _flat_bytes(inp), [n * row for n in out_splits],
                            [int(n) * row for n in in_splits], op, views=raw)
        shape = tuple(inp.shape[1:])
        segs = [(t if t.numel() else torch.empty(0, dtype=torch.uint8)).view(inp.dtype).view((n,) + shape)
                for t, n in zip(raw, out_splits)]
        return segs, self.shm.release_views

    # ----------------------------------------------------------------------------- collectives
    def _cuda_native(self, t: torch.Tensor) -> bool:
        return t.is_cuda and self.user_group is not None and "nccl" in self._user_backend

    def _check_open(self, op: str) -> None:
        if self.failed:
            raise CommError(f"{_where(op)}: this Buffer failed earlier: {self.failed.rstrip('.')}; create a new Buffer",
                            op=op, rank=self.rank)
        if self.pg is None:
            raise CommError(f"{_where(op)}: `{op}` on rank {self.rank}: deep_ep's communicator was closed "
                            f"(the Buffer was destroyed)", op=op, rank=self.rank)

    def all_gather(self, t: torch.Tensor, op: str = "all_gather") -> torch.Tensor:
        """Returns ``[size, *t.shape]`` with every rank's ``t`` (same shape on all ranks)."""
        t = t.contiguous()
        if self._cuda_native(t):
            out = torch.empty((self.size,) + tuple(t.shape), dtype=t.dtype, device=t.device)
            try:
                dist.all_gather_into_tensor(out, t, group=self.user_group)
            except Exception as exc:
                raise self.error(op, exc) from exc
            return out
        self._check_open(op)
        src = t.cpu() if t.is_cuda else t
        out = torch.empty((self.size,) + tuple(src.shape), dtype=src.dtype)
        raw_in, raw_out = _as_gloo(src), _as_gloo(out)
        started = self._begin(op)
        try:
            work = self.pg._allgather_base(raw_out.view(-1), raw_in.view(-1))
        except Exception as exc:
            err = self.error(op, exc, None, started)
            self._end()
            raise err from exc
        try:
            self._wait(work, op, started)
        finally:
            self._end()
        return out.to(t.device) if t.is_cuda else out

    def all_to_all_single(self, out: torch.Tensor, inp: torch.Tensor, out_splits: Sequence[int],
                          in_splits: Sequence[int], op: str = "all_to_all", async_op: bool = False,
                          match: Optional[str] = None):
        """Uneven all-to-all along dim 0. Returns a work handle with ``wait()`` when ``async_op``.
        ``match``: the name the shared-memory transport pairs the ranks' exchanges by (default `op`;
        its divergence check); gloo pairs by order only."""
        out_splits, in_splits = [int(v) for v in out_splits], [int(v) for v in in_splits]
        if self._cuda_native(out):
            try:
                work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.user_group,
                                              async_op=async_op)
            except Exception as exc:
                raise self.error(op, exc) from exc
            return _Work(self, op, work, native=True) if async_op else _Done()
        self._check_open(op)
        if self.shm is not None and not out.is_cuda and not inp.is_cuda:
            out_row, in_row = _row_bytes(out), _row_bytes(inp)
            self.shm.all_to_all(_flat_bytes(out), _flat_bytes(inp), [n * out_row for n in out_splits],
                                [n * in_row for n in in_splits], op, match=match)
            return _Done()
        if self.rows is not None and not out.is_cuda and not inp.is_cuda:
            # gloo transport with row streams (deep_ep._rowsock): the same exchange over them, in this thread
            # (no hand-over to gloo's threads; ordered per pair, like gloo's)
            out_row, in_row = _row_bytes(out), _row_bytes(inp)
            self.rows.all_to_all(_flat_bytes(out), _flat_bytes(inp), [n * out_row for n in out_splits],
                                 [n * in_row for n in in_splits], op)
            return _Done()
        staged = out.is_cuda
        h_out = torch.empty(out.shape, dtype=out.dtype) if staged else out
        h_in = inp.cpu() if inp.is_cuda else inp
        raw_out, raw_in = _as_gloo(h_out), _as_gloo(h_in)
        started = self._begin(op)
        try:
            work = self.pg.alltoall_base(raw_out, raw_in, out_splits, in_splits, dist.AllToAllOptions())
        except Exception as exc:
            err = self.error(op, exc, None, started)
            self._end()
            raise err from exc
        finish = (lambda: out.copy_(h_out)) if staged else None
        handle = _Work(self, op, work, finish, started=started)
        if not async_op:
            handle.wait()
            return _Done()
        return handle

    def barrier(self, op: str = "barrier") -> None:
        self._check_open(op)
        started = self._begin(op)
        try:
            work = self.pg.allreduce([torch.zeros(1)])
            self._wait(work, op, started)
        except CommError:
            raise
        except Exception as exc:
            raise self.error(op, exc, None, started) from exc
        finally:
            self._end()

    # ------------------------------------------------------------------------ point-to-point
    def p2p(self, sends: Mapping[int, torch.Tensor], recvs: Mapping[int, torch.Tensor], tag: int,
            op: str) -> "P2PWork":
        """Send ``sends[p]`` to each ``p`` and receive ``recvs[p]`` from each ``p``, all in flight at once,
        on the private gloo group (host tensors; this rank's own entries are copied locally).

        Every peer must post the mirror image with the same `tag` (a non-negative int below 2**31).
        Returns a `P2PWork`; its ``wait(tolerate_gone=...)`` finishes the messages.
        """
        self._check_open(op)
        started = self._begin(op)
        works: List[Tuple[int, Any]] = []
        keep: List[torch.Tensor] = []
        for p in (set(recvs) | set(sends)):
            if p in recvs and not recvs[p].is_contiguous():
                self._end()
                raise ValueError(f"deep_ep: p2p receive buffer for rank {p} must be contiguous")
        if self.rank in recvs and self.rank in sends:
            recvs[self.rank].copy_(sends[self.rank])
        for p in sorted(set(sends) | set(recvs)):
            if p == self.rank:
                continue
            # Posting to a peer whose connection is already closed raises at once; that is the same
            # failure as one seen while waiting, so it is recorded for `wait` to judge.
            try:
                if p in sends and sends[p].numel() > 0:
                    t = _as_gloo(sends[p].contiguous())
                    keep.append(t)
                    works.append((p, self.pg.send([t], p, tag)))
                if p in recvs and recvs[p].numel() > 0:
                    t = _as_gloo(recvs[p])
                    keep.append(t)
                    works.append((p, self.pg.recv([t], p, tag)))
            except Exception as exc:
                works.append((p, _Failed(exc)))
        return P2PWork(self, op, works, keep, started)

    def confirm_gone(self, peer: int) -> Optional[str]:
        """Why `peer` is gone (its process exited, its heartbeat stalled, or, for rank 0, the store it
        hosts stopped answering), or None when it seems alive. For a peer on another host this may
        watch its heartbeat for a few seconds."""
        local = peer in self._local_peers
        # A process killed on this host closes its sockets a moment before /proc shows it gone.
        deadline = time.monotonic() + (1.5 if local else self._stall_s + self._period)
        reason = self._gone([peer]).get(peer)
        while reason is None and time.monotonic() < deadline and (local or not self._store_lost):
            time.sleep(0.05 if local else self._period / 2)
            reason = self._gone([peer]).get(peer)
        return reason

    # ------------------------------------------------------------------------------ life cycle
    def close(self) -> None:
        """Release the private group; the peers' diagnostics will say this rank closed its Buffer."""
        if 0 in self._local_peers and _proc_gone(*self._local_peers[0]):
            self._store_lost = True  # rank 0 and the store it hosted are gone: nobody to tell
        self._activity.closed = True
        self._mirror_heartbeat(self._activity.encode(os.getpid()))
        if self.pg is not None and self._diag_store is not None and not self._store_lost:
            try:
                self._diag_store.set(self._hb_prefix + str(self.rank), self._activity.encode(os.getpid()))
            except Exception:
                pass
        self._stop.set()
        self._board.close()  # the peers keep their own mappings of this rank's page
        if self.rank == 0 and self._store is not None and (self.failed or self._activity.error):
            # The peers may still be diagnosing this failure through the store this rank hosts: keep it
            # serving a little longer (a daemon timer holds it; nothing blocks the process from exiting).
            held = [self._store, self._listen_sock]
            timer = threading.Timer(max(2.0, 3.0 * self._period), held.clear)
            timer.daemon = True
            timer.start()
            self._listen_sock = None
        if self.shm is not None:
            self.shm.close()
            self.shm = None
        if self.rows is not None:
            self.rows.close()
            self.rows = None
        self.pg = None
        self._store = None
        self._diag_store = None
        if self._listen_sock is not None:
            try:
                self._listen_sock.close()
            except OSError:
                pass
            self._listen_sock = None


class _Done:
    """A completed work handle (for synchronous paths that still return a handle)."""

    def wait(self) -> None:
        return None


class _Failed:
    """A message that could not even be posted: waiting for it re-raises the error."""

    def __init__(self, exc: BaseException) -> None:
        self._exc = exc

    def wait(self) -> None:
        raise self._exc


class _Work:
    """An in-flight collective; ``wait()`` finishes it (and copies staged CUDA results back)."""

    def __init__(self, comm: Communicator, op: str, work: Any, finish=None, native: bool = False,
                 started: Optional[float] = None) -> None:
        self._comm, self._op, self._work, self._finish = comm, op, work, finish
        self._native = native
        self._started = started if started is not None else time.monotonic()
        self._done = False

    def wait(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            if self._work is not None:
                if self._native:
                    try:
                        self._work.wait()
                    except Exception as exc:
                        raise self._comm.error(self._op, exc, None, self._started) from exc
                else:
                    self._comm._wait(self._work, self._op, self._started)
        finally:
            if not self._native:
                self._comm._end()
        if self._finish is not None:
            self._finish()


class P2PWork:
    """Messages posted by `Communicator.p2p`."""

    def __init__(self, comm: Communicator, op: str, works: List[Tuple[int, Any]], keep: List[torch.Tensor],
                 started: float) -> None:
        self._comm, self._op, self._works, self._keep, self._started = comm, op, works, keep, started
        self._result: Optional[List[int]] = None

    def wait(self, tolerate_gone: bool = False) -> List[int]:
        """Finish every message. A message to or from a peer whose process is gone raises a `CommError`
        naming it, or with ``tolerate_gone`` marks the peer failed: its receive buffer is left as it was
        and the peer is returned. A peer that is alive but does not answer always raises (gloo's timeout
        breaks the whole private group, so it cannot be tolerated). Returns the failed peers, sorted."""
        if self._result is not None:
            return list(self._result)
        comm = self._comm
        failed: Dict[int, str] = {}
        try:
            for peer, work in self._works:
                if peer in failed:
                    continue
                try:
                    work.wait()
                except Exception as exc:
                    reason = comm.confirm_gone(peer)
                    if reason is None or not tolerate_gone:
                        peers = sorted({p for p, _ in self._works})
                        gone = dict(failed)
                        if reason is not None:
                            gone[peer] = reason
                        raise comm.error(self._op, exc, peers, self._started, gone) from exc
                    failed[peer] = reason
        finally:
            comm._end()
            self._keep = []
        self._result = sorted(failed)
        return list(self._result)


def _as_gloo(t: torch.Tensor) -> torch.Tensor:
    """gloo has no float8 types: move such tensors as raw bytes (same shape with a byte last dim)."""
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) or t.dtype == getattr(torch, "float8_e8m0fnu", None):
        return t.view(torch.uint8)
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t


def _row_bytes(t: torch.Tensor) -> int:
    """Bytes of one dim-0 row of `t`."""
    n = t.element_size()
    for d in t.shape[1:]:
        n *= int(d)
    return n


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's data as a flat uint8 tensor (same storage)."""
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    if not t.is_contiguous():
        raise ValueError("deep_ep: all-to-all tensors must be contiguous")
    return t.reshape(-1).view(torch.uint8)
