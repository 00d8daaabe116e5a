"""The collectives a `Buffer` runs among its ranks.

`Communicator` bootstraps from a ``torch.distributed`` group (any backend, gloo included) or from an
mpi4py communicator, learns the topology (which ranks share a host), and then builds deep_ep's own
gloo process group with a timeout, so that a dead or diverging peer makes a collective raise instead
of hanging. The private group listens on 127.0.0.1 when all ranks share one host.

CUDA tensors travel over the user's group when its backend handles CUDA (NCCL); otherwise they are
staged through host memory on the private gloo group.
"""

from __future__ import annotations

import datetime
import pickle
import socket
import uuid
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

from . import _env

__all__ = ["Communicator", "CommError"]


class CommError(RuntimeError):
    """A collective failed or timed out (a peer died, diverged, or never arrived)."""


def _fmt_exc(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class _Done:
    """A completed work handle (for synchronous paths that still return a handle)."""

    def wait(self) -> None:
        return None


class _Work:
    """An in-flight collective; ``wait()`` finishes it (and copies staged CUDA results back)."""

    def __init__(self, comm: "Communicator", op: str, work: Any, finish=None) -> None:
        self._comm, self._op, self._work, self._finish = comm, op, work, finish
        self._done = False

    def wait(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            if self._work is not None:
                self._work.wait()
        except Exception as exc:  # gloo raises RuntimeError subclasses on timeout / closed peers
            raise self._comm.error(self._op, exc) from exc
        if self._finish is not None:
            self._finish()


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

        # Topology: ranks sharing a host name form a node.
        self.hostnames: List[str] = self.bootstrap_all_gather(socket.gethostname())
        self.single_host = len(set(self.hostnames)) == 1

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
        timeout = datetime.timedelta(seconds=self.timeout_s)
        try:
            if self.rank == 0:
                self._store = dist.TCPStore(addr, port, self.size, True, timeout=timeout,
                                            wait_for_workers=False, master_listen_fd=self._listen_sock.fileno())
            else:
                self._store = dist.TCPStore(addr, port, self.size, False, timeout=timeout)
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            if self.single_host:
                opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
            else:
                opts._devices = [dist.ProcessGroupGloo.create_default_device()]
            self.pg = dist.ProcessGroupGloo(dist.PrefixStore(f"deep_ep/{token}", self._store),
                                            self.rank, self.size, opts)
        except Exception as exc:
            raise self.error("set-up of deep_ep's gloo group", exc) from exc

    # ----------------------------------------------------------------------------------------
    def error(self, op: str, exc: BaseException) -> CommError:
        return CommError(
            f"deep_ep: {op} failed on rank {self.rank} of {self.size} (timeout {self.timeout_s:g} s, "
            f"DEEP_EP_TIMEOUT_S): a peer died, diverged (called a different operation or shape), or did "
            f"not arrive in time. Cause: {_fmt_exc(exc)}")

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

    # ----------------------------------------------------------------------------------------
    def _cuda_native(self, t: torch.Tensor) -> bool:
        return t.is_cuda and self.user_group is not None and "nccl" in self._user_backend

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
        src = t.cpu() if t.is_cuda else t
        out = torch.empty((self.size,) + tuple(src.shape), dtype=src.dtype)
        raw_in, raw_out = _as_gloo(src), _as_gloo(out)
        try:
            self.pg._allgather_base(raw_out.view(-1), raw_in.view(-1)).wait()
        except Exception as exc:
            raise self.error(op, exc) from exc
        return out.to(t.device) if t.is_cuda else out

    def all_to_all_single(self, out: torch.Tensor, inp: torch.Tensor, out_splits: Sequence[int],
                          in_splits: Sequence[int], op: str = "all_to_all", async_op: bool = False):
        """Uneven all-to-all along dim 0. Returns a work handle with ``wait()`` when ``async_op``."""
        out_splits, in_splits = [int(v) for v in out_splits], [int(v) for v in in_splits]
        if self._cuda_native(out):
            try:
                work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.user_group,
                                              async_op=async_op)
            except Exception as exc:
                raise self.error(op, exc) from exc
            return _Work(self, op, work) if async_op else _Done()
        staged = out.is_cuda
        h_out = torch.empty(out.shape, dtype=out.dtype) if staged else out
        h_in = inp.cpu() if inp.is_cuda else inp
        raw_out, raw_in = _as_gloo(h_out), _as_gloo(h_in)
        try:
            work = self.pg.alltoall_base(raw_out, raw_in, out_splits, in_splits, dist.AllToAllOptions())
        except Exception as exc:
            raise self.error(op, exc) from exc
        finish = (lambda: out.copy_(h_out)) if staged else None
        handle = _Work(self, op, work, finish)
        if not async_op:
            handle.wait()
            return _Done()
        return handle

    def barrier(self, op: str = "barrier") -> None:
        try:
            self.pg.allreduce([torch.zeros(1)]).wait()
        except Exception as exc:
            raise self.error(op, exc) from exc

    def close(self) -> None:
        self.pg = None
        self._store = None
        if self._listen_sock is not None:
            try:
                self._listen_sock.close()
            except OSError:
                pass
            self._listen_sock = None


def _as_gloo(t: torch.Tensor) -> torch.Tensor:
    """gloo has no float8 types: move such tensors as raw bytes (same shape with a byte last dim)."""
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) or t.dtype == getattr(torch, "float8_e8m0fnu", None):
        return t.view(torch.uint8)
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t
