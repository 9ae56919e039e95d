"""The client's choice of wire codecs: how it sends hidden states and how it wants them back."""

from __future__ import annotations

import dataclasses

from swarm.wire.codecs import DEFAULT_CODEC, check_codec


@dataclasses.dataclass(frozen=True)
class WireCodecs:
    send: str = DEFAULT_CODEC  # codec of the tensors this client sends
    receive: str = DEFAULT_CODEC  # codec this client asks servers to answer with

    def __post_init__(self) -> None:
        check_codec(self.send)
        check_codec(self.receive)
