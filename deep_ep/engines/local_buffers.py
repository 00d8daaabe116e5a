"""The NVLink and RDMA byte buffers a Buffer owns (lazily allocated on first use)."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

__all__ = ["LocalBuffers", "DoubleBufferSlots"]


class LocalBuffers:
    """Holds ``num_nvl_bytes`` and ``num_rdma_bytes`` of raw memory.

    The portable engine does not move data through them, but they are real memory: users read and
    clear them through `Buffer.get_local_buffer_tensor`, and the low-latency zero-copy combine writes
    its input into the RDMA buffer. They are allocated with ``torch.empty`` on first use, on the
    device of that first use, then zeroed.
    """

    def __init__(self, num_nvl_bytes: int, num_rdma_bytes: int) -> None:
        self.num_bytes = {"nvl": num_nvl_bytes, "rdma": num_rdma_bytes}
        self._tensors: Dict[str, torch.Tensor] = {}

    def get(self, kind: str, device: Optional[torch.device] = None) -> torch.Tensor:
        """The whole buffer as a 1-D ``uint8`` tensor; ``kind`` is ``"nvl"`` or ``"rdma"``."""
        t = self._tensors.get(kind)
        if t is None:
            if device is None:
                device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
                    else torch.device("cpu")
            t = torch.zeros(self.num_bytes[kind], dtype=torch.uint8, device=device)
            self._tensors[kind] = t
        return t

    def is_allocated(self, kind: str) -> bool:
        return kind in self._tensors

    def release(self) -> None:
        self._tensors.clear()


class DoubleBufferSlots:
    """The low-latency double buffer's bookkeeping, shared by the low-latency engines.

    Every low-latency call takes the current slot and flips it; a receive hook remembers its slot's use
    count and refuses to run once a later call reused the slot (at most two results alive).
    """

    def _init_slots(self) -> None:
        self._slot = 0
        self._slot_uses = [0, 0]

    def _begin_call(self) -> Tuple[int, int]:
        """Take the current slot and flip it; returns ``(slot, its use count)``."""
        slot = self._slot
        self._slot_uses[slot] += 1
        self._slot ^= 1
        return slot, self._slot_uses[slot]

    def _check_slot(self, slot: int, use: int, what: str) -> None:
        if self._slot_uses[slot] != use:
            raise RuntimeError(
                f"deep_ep.Buffer.{what}: this receive hook's buffer slot was reused by a later low-latency "
                f"call. The low-latency mode is double-buffered: at most two results (dispatch or combine) "
                f"can be alive at a time, so call the hook before issuing two more low-latency calls.")
