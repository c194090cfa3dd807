"""What both PD sides share: the socket options, the peer-failure abort, the first-token result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from radixlm.core import FinishReason

PEER_FAILURE_STATUS = 503  # a dead or silent peer: the router may retry the pair elsewhere
MAX_MESSAGES_PER_POLL = 4096  # bounded work per scheduler step
IDLE_WAIT_S = 0.005  # with only PD work pending, the scheduler waits this long for a peer's message


def peer_abort(message: str) -> FinishReason:
    return FinishReason("abort", message=message, status_code=PEER_FAILURE_STATUS)


def tcp_address(host: str, port: int) -> str:
    host = host.strip("[]")
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def set_socket_options(sock) -> None:
    import zmq

    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 1000)
    sock.setsockopt(zmq.RCVHWM, 1000)


@dataclass
class FirstToken:
    """The prefill worker's first sampled token, shaped like the sampler's result for one request
    (so the OutputProcessor appends it like any sampled token)."""

    token: int
    logprob: Optional[float] = None
    top: Optional[list] = None

    @property
    def next_token_ids(self) -> List[int]:
        return [self.token]

    @property
    def logprobs(self) -> List[Optional[float]]:
        return [self.logprob]

    @property
    def top_logprobs(self) -> List[Optional[list]]:
        return [self.top]
