"""A few device numbers to the host without stalling the GPU.

    readback = Readback()
    ticket = readback.start(torch.stack([loss, grad_norm]))   # queued after the kernels that compute them
    ...                                                        # launch the next step's work meanwhile
    loss, grad_norm = ticket.read()                           # waits for that copy only, not for the queue

`tensor.tolist()` on a CUDA tensor waits until the GPU has run everything queued so far: the GPU then idles
while the host launches the next step (a "bubble" in every step). Here the values go to page-locked host
memory by a non-blocking copy, and `read()` waits on an event recorded right after that copy, so reading a
step's numbers one step later costs nothing: the GPU is long past them. On the CPU it is plain `tolist()`.
"""

from __future__ import annotations

import torch


class Ticket:
    """The host copy of one `start`: `read()` returns the values as Python floats."""

    def __init__(self, host: torch.Tensor, done: torch.cuda.Event | None):
        self.host, self.done = host, done

    def read(self) -> list[float]:
        if self.done is not None:
            self.done.synchronize()  # note: waits for this copy only; issued a step ago, it is long complete
        return self.host.tolist()


class Readback:
    """Non-blocking device-to-host copies of small tensors, into page-locked buffers reused in turn."""

    def __init__(self, slots: int = 2):
        self.slots, self.buffers, self.turn = slots, {}, 0

    def start(self, values: torch.Tensor) -> Ticket:
        """Queue the copy of `values` (read it with the ticket; at most `slots` tickets may be unread)."""
        values = values.detach()
        if values.device.type != "cuda":
            return Ticket(values, None)
        self.turn = (self.turn + 1) % self.slots
        key = (self.turn, values.shape, values.dtype, values.device)
        if key not in self.buffers:  # page-locked, so that the copy is truly asynchronous
            self.buffers[key] = (torch.empty(values.shape, dtype=values.dtype, pin_memory=True), torch.cuda.Event())
        host, done = self.buffers[key]
        host.copy_(values, non_blocking=True)
        done.record(torch.cuda.current_stream(values.device))  # the stream that computed them and copies them
        return Ticket(host, done)
