"""Events: `EventHandle` (a recorded point on a stream) and `EventOverlap` (DeepEP V1's wrapper).

On CUDA they wrap ``torch.cuda.Event``; on CPU (no CUDA) the work is already complete when a call
returns, so an `EventHandle` holds no CUDA event and waiting on it does nothing. Megatron-Core
imports both names from ``deep_ep.utils``.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from ._comm import loopback_store  # rendezvous for single-host runs that listens on 127.0.0.1 only

__all__ = ["EventHandle", "EventOverlap", "cuda_in_use", "loopback_store"]


def cuda_in_use() -> bool:
    """True when CUDA is usable in this process (events then record on CUDA streams)."""
    return torch.cuda.is_available()


class EventHandle:
    """A point on a stream that another stream can wait for.

    Args:
        stream: the CUDA stream to record on; default the current stream. Ignored without CUDA.
    """

    def __init__(self, stream: Optional[Any] = None) -> None:
        self.event: Optional[torch.cuda.Event] = None
        if cuda_in_use():
            self.event = torch.cuda.Event()
            self.event.record(stream if stream is not None else torch.cuda.current_stream())

    def current_stream_wait(self) -> None:
        """Make the current CUDA stream wait for this event (no-op on CPU)."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def stream_wait(self, stream: Any) -> None:
        """Make ``stream`` wait for this event (no-op on CPU)."""
        if self.event is not None:
            stream.wait_event(self.event)

    def synchronize(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class EventOverlap:
    """Wrapper of an `EventHandle` for communication/computation overlap (DeepEP V1 semantics).

    Args:
        event: the event to wait for; None for an empty wrapper.
        extra_tensors: tensors kept alive until this object is dropped (a simple stand-in for
            ``record_stream``, useful with CUDA graphs).
    """

    def __init__(self, event: Optional[EventHandle] = None,
                 extra_tensors: Optional[Tuple[torch.Tensor, ...]] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """The current stream waits for the event. Raises if this wrapper holds no event."""
        if self.event is None:
            raise RuntimeError("deep_ep.EventOverlap.current_stream_wait: this EventOverlap holds no event")
        self.event.current_stream_wait()

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        if self.event is not None:
            self.event.current_stream_wait()
