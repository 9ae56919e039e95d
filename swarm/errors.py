"""The one error tree of Swarm.

    SwarmError
    ├── ConfigError (ValueError)          bad CLI flag, model path, alias, block range
    ├── InvalidRequest (ValueError)       a request that breaks the wire contract (shape, dtype, limits)
    │   ├── SpanNotServed                 (server side) the server does not hold the requested blocks
    │   └── LimitExceeded                 a request over one of the server's announced limits
    ├── InvalidRecord (ValueError)        a DHT value that is malformed or not signed by the peer it names
    ├── RoutingError                      no chain of servers can serve the request
    │   └── MissingBlocksError            some blocks are served by nobody
    ├── RemoteError                       a server answered with an error
    │   ├── PeerTimeout (TimeoutError)    a server did not answer in time
    │   └── WrongResult                   a server's output disagreed with two independent recomputations
    ├── UnverifiableResult                two servers disagree and no third one can decide (spot checks)
    ├── CacheNotPassed                    generate() ran a step without its session's cache (a transformers change)
    └── CacheFull                         the server's attention cache has no room for a session

`InvalidRecord` never leaves a DHT read: readers drop and count such values (swarm/records.py).
Servers raise `InvalidRequest` and `CacheFull` inside handlers; the handler edge turns them into an
error reply for that caller only. Clients see a server's failure (and SpanNotServed, which means the
route is stale) as `RemoteError` carrying its message, and their own mistakes as `InvalidRequest`.
"""

from __future__ import annotations


class SwarmError(Exception):
    """Base of every error that Swarm raises on purpose."""


class ConfigError(SwarmError, ValueError):
    """A user-supplied setting (flag, path, alias, block range) is wrong."""


class InvalidRequest(SwarmError, ValueError):
    """A request breaks the wire contract: wrong span, shape, dtype, size or position."""


class SpanNotServed(InvalidRequest):
    """The server does not hold the requested blocks: the caller's route is stale, not wrong."""


class LimitExceeded(InvalidRequest):
    """A request goes over one of a server's announced limits (the message names it and its value)."""


class InvalidRecord(SwarmError, ValueError):
    """A value read from the DHT that breaks the record schema or is not signed by the peer it names."""


class RoutingError(SwarmError):
    """No chain of servers can serve this request."""


class MissingBlocksError(RoutingError):
    """Some blocks of the model are served by no online server."""

    def __init__(self, missing: list[tuple[int, int]], model: str):
        self.missing = missing
        ranges = ", ".join(f"{start}:{end}" for start, end in missing)
        super().__init__(f"no online server holds blocks {ranges} of {model}")


class RemoteError(SwarmError):
    """A server answered a request with an error, or the connection to it failed."""

    def __init__(self, peer: str, message: str):
        self.peer = peer
        super().__init__(f"server {peer[-8:]}: {message}")


class PeerTimeout(RemoteError, TimeoutError):
    """A server did not answer in time."""


class WrongResult(RemoteError):
    """A server's output disagreed with two independent recomputations: it is banned for good."""


class UnverifiableResult(SwarmError):
    """Two servers disagree and no third one can decide which is right."""


class CacheNotPassed(SwarmError):
    """generate() ran a model step without handing over the inference session's cache."""


class CacheFull(SwarmError):
    """The server's attention cache cannot hold this session."""
