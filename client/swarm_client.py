"""The client's connection to one model in the swarm: DHT membership, routes and forward calls."""

from __future__ import annotations

import asyncio
import logging
import time

import torch
from hivemind.p2p import P2P

from swarm import dht as swarm_dht
from swarm.errors import MissingBlocksError, RoutingError
from swarm.limits import ROUTE_WAIT, STEP_TIMEOUT
from swarm.transport import open_stream, raise_for_error, translate_errors
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.frames import read_message, to_frames
from swarm.wire.rpc import RPC_FORWARD
from swarm.wire.tensors import deserialize_tensor, serialize_tensor
from swarm.client.event_loop import run_sync
from swarm.client.routing import RouteHop, make_route

logger = logging.getLogger(__name__)

ROUTE_RETRY_PERIOD = 1.0  # seconds between DHT reads while waiting for missing blocks


class SwarmClient:
    """Joins the DHT as a client and talks to the servers of one model (`dht_prefix`)."""

    def __init__(self, initial_peers: list[str], dht_prefix: str, num_blocks: int, route_wait: float = ROUTE_WAIT):
        self.initial_peers = initial_peers
        self.dht_prefix = dht_prefix
        self.num_blocks = num_blocks
        self.route_wait = route_wait
        self.dht = None
        self.p2p: P2P | None = None

    def start(self) -> None:
        self.dht = swarm_dht.start_dht(self.initial_peers, client_mode=True)
        self.p2p = run_sync(self.dht.replicate_p2p())

    def shutdown(self) -> None:
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None

    def make_route(self, start: int = 0, end: int | None = None) -> list[RouteHop]:
        """A chain of servers covering [start, end), waiting up to `route_wait` s for missing blocks."""
        end = self.num_blocks if end is None else end
        deadline = time.monotonic() + self.route_wait
        while True:
            blocks = swarm_dht.fetch_block_records(self.dht, self.dht_prefix, self.num_blocks)
            try:
                route = make_route(blocks, start, end, self.dht_prefix)
            except MissingBlocksError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(ROUTE_RETRY_PERIOD)
                continue
            logger.info("route: %s", " -> ".join(f"{hop.peer_id[-6:]}[{hop.start}:{hop.end}]" for hop in route))
            return route

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Hidden states (batch, seq, hidden) through all blocks, without a cache."""
        route = self.make_route()
        return run_sync(self._forward_route(route, hidden_states))

    async def _forward_route(self, route: list[RouteHop], hidden_states: torch.Tensor) -> torch.Tensor:
        for hop in route:
            hidden_states = await self._forward_hop(hop, hidden_states)
        return hidden_states

    async def _forward_hop(self, hop: RouteHop, hidden_states: torch.Tensor) -> torch.Tensor:
        request = pb.ForwardRequest(span=pb.Span(start=hop.start, end=hop.end), hidden_states=serialize_tensor(hidden_states))
        replies = await open_stream(self.p2p, hop.peer_id, RPC_FORWARD, _aiter(to_frames(request)), STEP_TIMEOUT)
        with translate_errors(hop.peer_id, "forward"):
            reply = await asyncio.wait_for(read_message(replies, pb.ForwardResponse), STEP_TIMEOUT)
        if reply is None:
            raise RoutingError(f"server {hop.peer_id[-8:]} closed the forward stream without a reply")
        if reply.HasField("error"):
            raise_for_error(hop.peer_id, reply.error)
        return deserialize_tensor(reply.hidden_states)


async def _aiter(items):  # noqa: ANN001, ANN202 (an async iterator over a sync one)
    for item in items:
        yield item
