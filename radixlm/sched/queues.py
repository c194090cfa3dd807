"""Where each live request is: waiting (queued, holding no KV), running (decoding), or the one
chunked request whose prompt is mid-prefill. A request is in at most one of them; the scheduler,
prefill admission, decode and overlap all work on one `ReqQueues` object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from radixlm.core import Req


@dataclass
class ReqQueues:
    waiting: List[Req] = field(default_factory=list)
    running: List[Req] = field(default_factory=list)
    chunked_req: Optional[Req] = None
    transfer: List[Req] = field(default_factory=list)  # PD: holding KV for a transfer (radixlm/disaggregation)

    def live(self) -> List[Req]:
        """The requests that hold KV: running ones, the chunked one and those in a PD transfer."""
        return self.running + ([self.chunked_req] if self.chunked_req is not None else []) + self.transfer

    def has_compute(self) -> bool:
        """Whether a step has anything to compute (PD transfers only wait for a peer)."""
        return bool(self.waiting or self.running or self.chunked_req is not None)

    def remove(self, req: Req) -> None:
        """Takes `req` out of whichever queue holds it (no-op when none does)."""
        if req is self.chunked_req:
            self.chunked_req = None
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.transfer:
            self.transfer.remove(req)

    def __bool__(self) -> bool:
        return bool(self.waiting or self.running or self.chunked_req is not None or self.transfer)
