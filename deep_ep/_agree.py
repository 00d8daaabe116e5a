"""Rank agreement and failure state of a `deep_ep.Buffer` (see ``docs/reliability.md``).

Three promises rest on this module:

* **Agreement before data moves.** The first exchange of every collective call of the portable engines
  (normal dispatch's count exchange, low-latency's header exchange, and a small exchange that cached
  dispatch, combine, ``clean_low_latency_buffer`` and ``destroy`` start with) carries a fixed-width
  int64 *descriptor* of the call: which call it is (a per-Buffer number every rank counts alike) and
  method, the status (ok, or "this rank raised"), device, hidden, dtypes, scale width, top-k, number of
  experts, channels, ``num_worst_tokens``, low-latency shape and flags, and which dispatch a handle came
  from. All of these exchanges have the same size and use the same gloo primitive, so ranks that diverge
  (different shapes, dtypes, flags, or methods) never hand gloo mismatched sizes (gloo would abort the
  process): every rank reads the same table and raises the same error, before any payload moves, and
  the Buffer stays usable. Cached dispatch and combine also exchange the row counts each rank sends and
  expects (``2 R`` words), so handles that do not match across ranks are caught the same way.
* **A rank that raises tells its peers.** A call that fails on one rank before its first exchange (bad
  arguments: the usual case) still takes part in that exchange, flagged as failed, with its message in
  the rendezvous store: every rank raises at once, naming that rank and its message, and the Buffer
  stays usable. A rank that raises *after* its first exchange (its peers are already waiting for its
  data) publishes the error in its heartbeat (`deep_ep._comm`); the peers fail within one heartbeat
  period with a `CommError` that names the rank and its message.
* **Failed state.** After an unrecoverable failure every later call raises at once ``this Buffer failed
  earlier: <cause>; create a new Buffer`` (`Communicator.failed`).

The happy path costs the descriptor's bytes in exchanges that run anyway; cached dispatch, combine and
``clean_low_latency_buffer`` gain one small exchange (see the measurement in ``docs/reliability.md``).
The CUDA engines' per-call kernels do not go through here (they exchange nothing on the host per call);
their set-up (probes, handle exchanges) reports a rank's exception through the heartbeat like the rest.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ._comm import CommError, Communicator

_MATCH = "deep_ep agreement exchange"  # the transport pairs agreement exchanges by this name

__all__ = ["exchange", "describe", "coordinated", "guard", "collective", "note_handle", "handle_id"]

# Descriptor words (int64).
_MAGIC = 0x0DEE9A93
(W_MAGIC, W_CALL, W_METHOD, W_STATUS, W_DEVICE, W_HIDDEN, W_X_DTYPE, W_SCALE_DTYPE, W_SCALE_COLS, W_TOPK,
 W_EXPERTS, W_CHANNELS, W_WORST, W_TMAX, W_FP8, W_ROUND, W_UE8M0, W_LOGFMT, W_HANDLE, W_WEIGHTS, W_NVL_BYTES,
 W_RDMA_BYTES, W_LL_MODE, W_SHRINK, W_PAYLOAD) = range(25)
D = 32
_CAP_MAX = 4096  # payload words that may ride inline in the descriptor exchange

_METHODS = ["(unknown)", "dispatch", "cached dispatch", "combine", "low_latency_dispatch", "low_latency_combine",
            "clean_low_latency_buffer", "destroy", "__init__"]
_PUBLIC = {"cached dispatch": "dispatch"}

_DTYPES = [None, torch.bfloat16, torch.float16, torch.float32, torch.int32, torch.int64, torch.int16, torch.int8,
           torch.uint8, getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)]
_DEVICES = {"cpu": 1, "cuda": 2}

# Which words each method's ranks must agree on: (word, what, how to show a value).
_fmt_int = str  # noqa: E731


def _fmt_dtype(v: int) -> str:
    return "none" if v == 0 else str(_DTYPES[v]) if 0 < v < len(_DTYPES) else f"dtype #{v}"


def _fmt_device(v: int) -> str:
    return {1: "cpu", 2: "cuda"}.get(v, "other")


def _fmt_flag(v: int) -> str:
    return "True" if v else "False"


def _fmt_opt(v: int) -> str:
    return "not given" if v == 0 else str(v)


def _fmt_handle(v: int) -> str:
    return f"from call #{v}" if v else "unknown"


_X = [(W_DEVICE, "the device of `x`", _fmt_device), (W_HIDDEN, "the hidden size of `x` (columns)", _fmt_int),
      (W_X_DTYPE, "the dtype of `x`", _fmt_dtype)]
_SCALES = [(W_SCALE_DTYPE, "the dtype of the FP8 scales in `x` (none: `x` is not an FP8 pair)", _fmt_dtype),
           (W_SCALE_COLS, "the number of FP8 scale columns in `x`", _fmt_int)]
_FIELDS: Dict[str, list] = {
    "dispatch": _X + _SCALES + [
        (W_TOPK, "the number of columns of `topk_idx` (num_topk)", _fmt_opt),
        (W_EXPERTS, "the number of experts (`num_tokens_per_expert` entries)", _fmt_int),
        (W_CHANNELS, "the number of channels (`config`: num_sms / 2)", _fmt_int),
        (W_WORST, "`num_worst_tokens`", _fmt_int)],
    "cached dispatch": _X + _SCALES + [
        (W_HANDLE, "the dispatch `handle` comes from", _fmt_handle)],
    "combine": _X + [
        (W_WEIGHTS, "the number of columns of `topk_weights`", _fmt_opt),
        (W_HANDLE, "the dispatch `handle` comes from", _fmt_handle)],
    "low_latency_dispatch": _X + [
        (W_TMAX, "`num_max_dispatch_tokens_per_rank`", _fmt_int),
        (W_EXPERTS, "`num_experts`", _fmt_int),
        (W_TOPK, "the number of columns of `topk_idx` (num_topk)", _fmt_int),
        (W_FP8, "`use_fp8`", _fmt_flag), (W_ROUND, "`round_scale`", _fmt_flag),
        (W_UE8M0, "`use_ue8m0`", _fmt_flag)],
    "low_latency_combine": _X + [
        (W_TMAX, "`num_max_dispatch_tokens_per_rank` of `handle`", _fmt_int),
        (W_EXPERTS, "`num_experts` of `handle`", _fmt_int),
        (W_LOGFMT, "`use_logfmt`", _fmt_flag),
        (W_HANDLE, "the low-latency dispatch `handle` comes from", _fmt_handle)],
    "clean_low_latency_buffer": [
        (W_TMAX, "`num_max_dispatch_tokens_per_rank`", _fmt_int), (W_HIDDEN, "`hidden`", _fmt_int),
        (W_EXPERTS, "`num_experts`", _fmt_int)],
    "destroy": [],
    "__init__": [
        (W_NVL_BYTES, "`num_nvl_bytes`", _fmt_int), (W_RDMA_BYTES, "`num_rdma_bytes`", _fmt_int),
        (W_LL_MODE, "`low_latency_mode`", _fmt_flag), (W_SHRINK, "`enable_shrink`", _fmt_flag)],
    "(unknown)": [],
}
# Words that are compared without being part of a method's documented fields (a safety net).
_INTERNAL = [(W_PAYLOAD, "the size of the exchanged counts (a consequence of the arguments above)", _fmt_int)]


def coordinated(exc: BaseException) -> BaseException:
    """Mark `exc` as raised alike on every rank from data all ranks share (no rank is left waiting):
    the Buffer stays usable. Engines wrap such raises: ``raise coordinated(RuntimeError(...))``."""
    exc.deep_ep_coordinated = True  # type: ignore[attr-defined]
    return exc


class _Call:
    """One Buffer call on this rank."""

    __slots__ = ("method", "index", "words", "status", "exchanged", "portable", "pairs")

    def __init__(self, method: str, index: int) -> None:
        self.method = method
        self.index = index
        self.words: Dict[int, int] = {}
        self.status = 0          # 1: this rank raised (its message is in the store)
        self.exchanged = False   # its first exchange was posted
        self.portable: Optional[bool] = None  # None: not known yet (the arguments failed their checks)
        self.pairs = False       # the payload is [rows sent to each rank, rows expected from each rank]


class _State:
    """Per-Communicator agreement state: call numbering, inline capacity, handle origins."""

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        self.index = 0
        self.cap = max(64, 2 * comm.size + 16)  # payload words riding inline; grows alike on every rank
        self.current: Optional[_Call] = None
        # id(tensor) -> (weak reference, call number) of a tensor of each handle a dispatch returned
        # (tensors compare elementwise, so they cannot be dictionary keys themselves).
        self.handles: Dict[int, Any] = {}

    def begin(self, method: str) -> _Call:
        self.index += 1
        call = _Call(method, self.index)
        self.current = call
        self.comm._activity.call = self.index
        return call


def _state(comm: Communicator) -> _State:
    st = getattr(comm, "_agreement", None)
    if st is None:
        st = _State(comm)
        comm._agreement = st  # type: ignore[attr-defined]
    return st


def describe(comm: Communicator, method: Optional[str] = None, portable: Optional[bool] = None,
             **fields: Any) -> None:
    """Record what the current call's ranks must agree on (after this rank's argument checks passed).

    ``fields``: ``device`` (a torch.device), ``x_dtype``/``scale_dtype`` (torch dtypes or None), and ints
    ``hidden, scale_cols, topk, experts, channels, worst, tmax, fp8, round, ue8m0, logfmt, handle, weights,
    nvl_bytes, rdma_bytes, ll_mode, shrink``. ``portable``: the
    call runs on a portable engine (False: the CUDA kernels, which do no host exchange).
    """
    call = _state(comm).current
    if call is None:
        return
    if method is not None:
        call.method = method
    if portable is not None:
        call.portable = portable
        if not portable:
            return  # the CUDA kernels exchange nothing on the host: nothing to compare, nothing to encode
    words = call.words
    for name, value in fields.items():
        index = _NAMES[name]
        if name == "device":
            value = _DEVICES.get(value.type, 3) if value is not None else 0
        elif name in ("x_dtype", "scale_dtype"):
            value = _DTYPES.index(value) if value in _DTYPES else (0 if value is None else 99)
        words[index] = int(value)


_NAMES = {"device": W_DEVICE, "hidden": W_HIDDEN, "x_dtype": W_X_DTYPE, "scale_dtype": W_SCALE_DTYPE,
          "scale_cols": W_SCALE_COLS, "topk": W_TOPK, "experts": W_EXPERTS, "channels": W_CHANNELS,
          "worst": W_WORST, "tmax": W_TMAX, "fp8": W_FP8, "round": W_ROUND, "ue8m0": W_UE8M0, "logfmt": W_LOGFMT,
          "handle": W_HANDLE, "weights": W_WEIGHTS,
          "nvl_bytes": W_NVL_BYTES, "rdma_bytes": W_RDMA_BYTES, "ll_mode": W_LL_MODE, "shrink": W_SHRINK}


def note_handle(comm: Communicator, key: torch.Tensor) -> None:
    """Remember that the handle holding tensor `key` came from the current (dispatch) call."""
    st = _state(comm)
    if st.current is None:
        return
    if len(st.handles) >= 64:
        st.handles = {k: v for k, v in st.handles.items() if v[0]() is not None}
    st.handles[id(key)] = (weakref.ref(key), st.current.index)


def handle_id(comm: Communicator, key: Any) -> int:
    """The call number of the dispatch whose handle holds `key` (0: not made by this Buffer's dispatch)."""
    entry = _state(comm).handles.get(id(key))
    return entry[1] if entry is not None and entry[0]() is key else 0


# ------------------------------------------------------------------------------------------------
# The exchange

def _err_key(comm: Communicator, rank: int, index: int) -> str:
    return comm._hb_prefix.replace("/hb/", "/err/") + f"{rank}/{index}"


class _Pending:
    """A posted descriptor exchange; `wait()` checks the agreement and returns the payload table."""

    def __init__(self, st: _State, call: _Call, work: Any, out: torch.Tensor, payload: Optional[torch.Tensor],
                 inline: bool, op: str, cap: int) -> None:
        self.st, self.call, self.work, self.out, self.payload, self.inline, self.op, self.cap = \
            st, call, work, out, payload, inline, op, cap

    def wait(self) -> Optional[torch.Tensor]:
        st, call, comm = self.st, self.call, self.st.comm
        self.work.wait()
        R = comm.size
        table = self.out.view(R, D + self.cap)
        if call.status:
            return None  # this rank raised: it raises its own exception
        _check(comm, call, table)
        width = 0 if self.payload is None else self.payload.numel()
        if width and width <= _CAP_MAX:
            st.cap = max(st.cap, width)  # every rank agreed on `width`: the same on all
        if self.payload is None:
            return None
        if self.inline:
            data = table[:, D:D + width]
        else:  # too wide to ride inline (first call with a larger shape): a second round, same size everywhere
            data = torch.empty(R * width, dtype=torch.int64)
            comm.all_to_all_single(data, self.payload.view(-1).to(torch.int64).repeat(R), [width] * R, [width] * R,
                                   op=self.op)
            data = data.view(R, width)
        if call.pairs:
            _check_pairs(comm, call, data)
        return data.to(self.payload.dtype)


def exchange(comm: Communicator, payload: Optional[torch.Tensor], op: str, async_op: bool = False,
             pairs: bool = False):
    """The first exchange of a call: every rank's descriptor (and `payload`, a 1-D integer tensor whose
    width every rank derives from agreed arguments) to every rank, checked before anything else moves.

    ``pairs``: the payload is ``[rows sent to each rank, rows expected from each rank]``; they must match.
    Returns the ``[R, width]`` payload table (None without payload), or with ``async_op`` a handle whose
    ``wait()`` returns it. Raises the same `ValueError` (disagreeing arguments) or `RuntimeError`
    (diverged calls) on every rank, or the error a peer raised in this call, on every other rank.
    """
    st = _state(comm)
    call = st.current
    if call is None or call.exchanged:  # an engine used without a Buffer call around it, or a second exchange
        call = st.begin("(unknown)")
    call.exchanged = True
    call.pairs = pairs
    R = comm.size
    cap = st.cap
    width = 0 if payload is None else payload.numel()
    inline = width <= cap
    words = [0] * D  # built as a list: one tensor construction, not one tensor write per word
    words[W_MAGIC] = _MAGIC
    words[W_CALL] = call.index
    words[W_METHOD] = _METHODS.index(call.method) if call.method in _METHODS else 0
    words[W_STATUS] = call.status
    for index, value in call.words.items():
        words[index] = value
    words[W_PAYLOAD] = width
    # The same vector to every rank: built R times over in place (no separate repeat).
    send = torch.zeros(R, D + cap, dtype=torch.int64)
    send[:, :D] = torch.tensor(words, dtype=torch.int64)
    if payload is not None and inline:
        send[:, D:D + width] = payload.view(1, -1)
    send = send.view(-1)
    out = torch.empty(R * (D + cap), dtype=torch.int64)
    # match: every agreement exchange pairs with any other (a failing rank joins its peers' exchange
    # under its own name; the descriptor, not the transport, tells the calls apart)
    work = comm.all_to_all_single(out, send, [D + cap] * R, [D + cap] * R, op=op, async_op=True,
                                  match=_MATCH)
    pending = _Pending(st, call, work, out, payload, inline, op, cap)
    return pending if async_op else pending.wait()


def _where(call: _Call) -> str:
    return f"deep_ep.Buffer.{_PUBLIC.get(call.method, call.method)}"


def _listing(values: Dict[int, str]) -> str:
    """``{0: "256", 1: "384", 2: "256"}`` -> ``"rank 1: 384; ranks 0, 2: 256"`` (odd ones first)."""
    groups: Dict[str, List[int]] = {}
    for r, v in values.items():
        groups.setdefault(v, []).append(r)
    parts = sorted(groups.items(), key=lambda kv: (len(kv[1]), kv[1][0]))
    return "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {v}" for v, rs in parts)


def _check(comm: Communicator, call: _Call, table: torch.Tensor) -> None:
    R = comm.size
    rows = table[:, :D].tolist()
    where = _where(call)
    kept = "no data moved on any rank, and the Buffer is still usable"
    # 1. Ranks that raised in this call (their argument checks failed): every other rank names them.
    failed = [r for r in range(R) if rows[r][W_STATUS]]
    if failed:
        texts, kinds = [], []
        for r in failed:
            kind, text = read_error(comm, r, int(rows[r][W_CALL]))
            kinds.append(kind)
            texts.append(f"rank {r} raised {kind}: {text}")
        cls = {"ValueError": ValueError, "TypeError": TypeError}.get(kinds[0], RuntimeError)
        raise coordinated(cls(f"{where}: {'; '.join(texts)} ({kept})"))
    # 2. Diverged call sequences.
    methods = {r: _METHODS[int(rows[r][W_METHOD])] if 0 <= rows[r][W_METHOD] < len(_METHODS) else "?"
               for r in range(R)}
    calls = {r: int(rows[r][W_CALL]) for r in range(R)}
    if len(set(methods.values())) > 1 or len(set(calls.values())) > 1 or \
            any(row[W_MAGIC] != _MAGIC for row in rows):
        listing = _listing({r: f"{_PUBLIC.get(methods[r], methods[r])}"
                               f"{' (cached)' if methods[r] == 'cached dispatch' else ''} (its Buffer call "
                               f"#{calls[r]})" for r in range(R)})
        raise coordinated(RuntimeError(
            f"{where}: the ranks diverged, they are in different calls: {listing}. Every rank must issue the same "
            f"sequence of collective Buffer calls ({kept})"))
    # 3. Arguments every rank must pass alike.
    problems = []
    fields = _FIELDS.get(call.method, []) + _INTERNAL
    for index, what, fmt in fields:
        if index == W_HANDLE:
            known = {r: rows[r][index] for r in range(R) if rows[r][index]}
            if len(known) == R and len(set(known.values())) > 1:
                problems.append(f"{what}: {_listing({r: fmt(v) for r, v in known.items()})}")
            continue
        values = {r: int(rows[r][index]) for r in range(R)}
        if len(set(values.values())) > 1:
            problems.append(f"{what}: {_listing({r: fmt(v) for r, v in values.items()})}")
    if problems:
        raise coordinated(ValueError(
            f"{where}: the ranks passed different arguments, which must be the same on every rank: "
            f"{'. '.join(problems)} ({kept})"))


def _check_pairs(comm: Communicator, call: _Call, data: torch.Tensor) -> None:
    """``data[r] = [rows r sends to each rank (R), rows r expects from each rank (R)]``: they must match."""
    R = comm.size
    sent, expected = data[:, :R], data[:, R:2 * R]
    bad = (sent != expected.t()).nonzero().tolist()
    if bad:
        s, d = bad[0]
        raise coordinated(ValueError(
            f"{_where(call)}: `handle` does not match across ranks: rank {s} sends {int(sent[s, d])} rows to rank "
            f"{d}, which expects {int(expected[d, s])} from it ({len(bad)} such pair(s)). Pass every rank the handle "
            f"of the same dispatch (and, for combine, `x` with the rows that dispatch returned) (no data moved on "
            f"any rank, and the Buffer is still usable)"))


def read_error(comm: Communicator, rank: int, index: Optional[int] = None):
    """``(exception type name, message)`` rank `rank` stored for its call `index` (default: this rank's)."""
    if index is None:
        index = comm._activity.call
    store = comm._diag_store
    if store is None:
        return "an error", "(its message could not be read: deep_ep's rendezvous store is gone)"
    try:
        raw = bytes(store.get(_err_key(comm, rank, index))).decode("utf-8", "replace")
    except Exception as exc:  # noqa: BLE001
        return "an error", f"(its message could not be read: {exc})"
    kind, _, text = raw.partition("\n")
    return kind, text


# ------------------------------------------------------------------------------------------------
# The Buffer side: one guard per collective call

def _any_cuda(objs: Sequence[Any]) -> bool:
    stack = list(objs)
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            if o.is_cuda:
                return True
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
    return False


class guard:
    """``with guard(buffer, "dispatch", args):`` around one collective Buffer call.

    On the way in: raises at once when the Buffer failed earlier; numbers the call. On an exception:

    * raised alike on every rank (`coordinated`), or a `CommError`: nothing to add;
    * before this rank's first exchange, on a portable engine: takes part in that exchange flagged as
      failed (its message in the store), so every peer raises it at once and the Buffer stays usable;
    * otherwise (its peers already wait for this rank's data): publishes the error in the heartbeat, so
      that they fail within a heartbeat period, and marks the Buffer failed.
    """

    def __init__(self, buffer: Any, method: str, args: Sequence[Any] = (), ll: bool = False) -> None:
        self.buffer, self.method, self.args, self.ll = buffer, method, args, ll
        self.comm: Communicator = buffer._comm

    def __enter__(self) -> _Call:
        comm = self.comm
        if comm.failed:
            raise CommError(f"deep_ep.Buffer.{self.method}: this Buffer failed earlier: {comm.failed.rstrip('.')}; "
                            f"create a new Buffer", op=self.method, rank=comm.rank)
        comm.clear_error()
        self.call = _state(comm).begin(self.method)
        return self.call

    def __exit__(self, exc_type, exc, tb) -> bool:
        st = _state(self.comm)
        try:
            if exc is not None:
                self._failed(exc)
        finally:
            st.current = None
        return False

    def _portable(self) -> bool:
        """Whether the peers run this call on a portable engine (a host exchange) as this rank would."""
        if self.call.portable is not None:
            return self.call.portable
        cuda_engine = self.buffer._ll_cuda if self.ll else self.buffer._cuda
        return cuda_engine is None or not _any_cuda(self.args)

    def _failed(self, exc: BaseException) -> None:
        comm, call = self.comm, self.call
        if isinstance(exc, CommError) or getattr(exc, "deep_ep_coordinated", False):
            return
        portable = self._portable()
        if not call.exchanged and portable and isinstance(exc, Exception) and comm.pg is not None:
            # Take part in the exchange the peers are in, flagged as failed: they all raise this error.
            call.status = 1
            try:
                if comm._diag_store is not None:
                    comm._diag_store.set(_err_key(comm, comm.rank, call.index), f"{type(exc).__name__}\n{exc}")
                failure_exchange = getattr(self.buffer, "_failure_exchange", None)
                if failure_exchange is not None:
                    failure_exchange(self.method, self.ll)
                else:
                    exchange(comm, None, f"{self.method} (agreement)")
                return
            except CommError:
                return  # the peers are not in this call: the Buffer failed (the CommError says why)
            except Exception:  # noqa: BLE001 - report the original error below
                pass
        # The peers wait for this rank in an exchange it will not join (or it runs no host exchange).
        broken = portable and call.exchanged or not isinstance(exc, Exception)
        comm.publish_error(self.method, exc, broken)
        if broken:
            comm.failed = comm.failed or (f"rank {comm.rank} raised {type(exc).__name__} in the middle of "
                                          f"`deep_ep.Buffer.{self.method}`, after its peers began to exchange "
                                          f"data with it: {exc}")


def collective(method: str, ll: bool = False) -> Callable:
    """Decorator of a collective Buffer method: runs it under `guard`."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(self, *args, **kwargs):
            with guard(self, method, list(args) + list(kwargs.values()), ll=ll):
                return fn(self, *args, **kwargs)
        return call
    return wrap
