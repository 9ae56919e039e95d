"""Swarm: run and fine-tune language models too big for one machine, across volunteers' computers.

    from swarm import AutoDistributedModelForCausalLM
    model = AutoDistributedModelForCausalLM.from_pretrained("smollm2", initial_peers=[...])

Importing `swarm` has no side effects: the client classes load on first use.
"""

from __future__ import annotations

from typing import Any

from swarm.errors import (
    CacheFull,
    CacheNotPassed,
    ConfigError,
    InvalidRequest,
    MissingBlocksError,
    PeerTimeout,
    RemoteError,
    RoutingError,
    SwarmError,
    UnverifiableResult,
    WrongResult,
)
from swarm.version import __version__

__all__ = [
    "AutoDistributedModelForCausalLM",
    "CacheFull",
    "CacheNotPassed",
    "ConfigError",
    "InvalidRequest",
    "MissingBlocksError",
    "PeerTimeout",
    "RemoteError",
    "RoutingError",
    "SwarmError",
    "UnverifiableResult",
    "WrongResult",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # The public facade re-exports the client lazily: swarm's core never imports swarm.client itself.
    if name == "AutoDistributedModelForCausalLM":
        from swarm.client.model import AutoDistributedModelForCausalLM

        return AutoDistributedModelForCausalLM
    raise AttributeError(f"module 'swarm' has no attribute {name!r}")
