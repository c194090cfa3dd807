"""Host -> device copies of small index lists that never wait for work queued on the device.

A pageable host->device copy (`torch.tensor(xs, device="cuda")`) first waits for everything queued
on the stream, so a scheduler that prepares step N+1 while step N runs would stall until N ends.
`to_device_int64` stages the values in pinned memory and copies without blocking; PyTorch's pinned
host allocator keeps the buffer alive until the copy has run. On CPU it is a plain tensor.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch


def to_device_int64(values: Sequence, device: Union[str, torch.device]) -> torch.Tensor:
    host = torch.tensor(values, dtype=torch.int64)
    if torch.device(device).type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
