"""Tensors between a CUDA device and the host: the wire's bytes, in pinned memory.

A CUDA worker moves its gradient to the host and the parameters back on every step.
Two things make the plain `.cpu()` and `.to(device)` slow there:

- from pageable memory, the driver stages every copy through a pinned buffer of its own,
  a piece at a time: 25 M fp32 parameters (100 MB) took 14 ms host to device on an H100,
  against 1.8 ms from pinned memory;
- a copy between the CPU and a GPU that also changes the type converts on the CPU
  (torch's rule), so an fp16 push crossed the bus as fp32 and was then converted by the
  CPU, and an fp16 pull was widened to fp32 by the CPU before crossing.

So conversions happen on the GPU, and what crosses the bus is the wire's own bytes, in
pinned memory. On the CPU every function here is the identity or plain numpy memory.
"""

from __future__ import annotations

import numpy
import torch

from gradhub import memory


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on the CPU: itself when already there, else a copy in pinned memory.

    The copy is complete when this returns (the caller serializes it next). Pinned blocks
    come from torch's caching host allocator, so a step reuses the last step's.
    """
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor)
    return host


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor` on `device`, converted to `dtype` there: the bus carries `tensor`'s own bytes.

    From pinned memory the copy is asynchronous: `tensor` must stay alive until the
    device's stream has passed it (see `Landing`). From pageable memory the driver has
    staged the bytes before this returns.
    """
    moved = tensor.to(device, non_blocking=True)
    return moved if dtype is None or moved.dtype == dtype else moved.to(dtype)


def receive_buffer(nbytes: int, pinned: bool) -> numpy.ndarray:
    """Uninitialised bytes for a received payload; pinned for a CUDA worker, so that the
    parameters it decodes cross to the device by DMA, without the driver's staging."""
    if pinned:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
    if nbytes >= memory.HUGE_PAGE_BYTES:
        return memory.recycled(nbytes)  # the next step's payload is the same size
    return numpy.empty(nbytes, dtype=numpy.uint8)


class Landing:
    """Keeps the host tensors of asynchronous host-to-device copies alive until the
    device has read them.

    torch keeps its own pinned blocks from being reused while a copy reads them, but only
    for tensors it allocated as such; a payload decoded as views of a received buffer is
    not one of those. Holding the sources here, and waiting for an event recorded after
    the copies before letting them go, makes that explicit.
    """

    def __init__(self) -> None:
        self._event: torch.cuda.Event | None = None
        self._sources: tuple[object, ...] = ()

    def hold(self, device: torch.device, *sources: object) -> None:
        """The copies from `sources` to `device` are queued: keep them until they are done."""
        self.settle()
        if device.type != "cuda":
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        self._event, self._sources = event, sources

    def settle(self) -> None:
        """Wait for the held copies (normally long done: the step synchronised since)."""
        if self._event is not None:
            self._event.synchronize()
        self._event, self._sources = None, ()
