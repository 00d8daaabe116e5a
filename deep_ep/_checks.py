"""Argument checks shared by `deep_ep.Buffer` methods.

Every check raises before any collective starts, with a message that names the method, the argument,
what was expected and what arrived: ``TypeError`` for a wrong Python type, ``ValueError`` for a wrong
value, dtype or shape.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch

__all__ = ["ArgChecker"]


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


class ArgChecker:
    """Checks for one public method; ``where`` is e.g. ``"deep_ep.Buffer.dispatch"``."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, name: str, msg: str, exc=ValueError):
        raise exc(f"{self.where}: `{name}` {msg}")

    def tensor(self, name: str, t: Any, dtypes: Optional[Sequence[torch.dtype]] = None, dim: Optional[int] = None,
               contiguous: bool = True, shape: Optional[Sequence[Optional[int]]] = None,
               device: Optional[torch.device] = None, dtype_hint: str = "") -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            self.fail(name, f"must be a torch.Tensor, got {type(t).__name__}", TypeError)
        if dtypes is not None and t.dtype not in dtypes:
            want = " or ".join(str(d) for d in dtypes) + (f" ({dtype_hint})" if dtype_hint else "")
            self.fail(name, f"must be {want}, got {t.dtype}")
        if dim is not None and t.dim() != dim:
            self.fail(name, f"must be {dim}-D, got shape {_shape(t)}")
        if shape is not None:
            if t.dim() != len(shape) or any(s is not None and s != a for s, a in zip(shape, t.shape)):
                want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
                self.fail(name, f"must have shape {want}, got {_shape(t)}")
        if contiguous and not t.is_contiguous():
            self.fail(name, f"must be contiguous (got strides {tuple(t.stride())}); call .contiguous()")
        if device is not None and t.device != device:
            self.fail(name, f"must be on {device} like the other inputs, got {t.device}")
        return t

    def flag(self, name: str, value: Any) -> bool:
        if not isinstance(value, bool):
            self.fail(name, f"must be a bool, got {type(value).__name__}", TypeError)
        return value

    def integer(self, name: str, value: Any, minimum: Optional[int] = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, f"must be an int, got {type(value).__name__}", TypeError)
        if minimum is not None and value < minimum:
            self.fail(name, f"must be >= {minimum}, got {value}")
        return value

    def ids_in_range(self, name: str, idx: torch.Tensor, upper: int, what: str = "expert ids") -> None:
        """``idx`` values must lie in ``[-1, upper)``."""
        if idx.numel() == 0:
            return
        lo, hi = (int(v) for v in torch.aminmax(idx))  # one pass
        if lo < -1 or hi >= upper:
            bad = lo if lo < -1 else hi
            self.fail(name, f"holds {what} outside [-1, {upper}) (found {bad}); -1 marks an unused slot")


def all_same_device(tensors: Iterable[Optional[torch.Tensor]]) -> Optional[torch.device]:
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    return devices.pop() if len(devices) == 1 else None
