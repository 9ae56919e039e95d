"""Stateless calls through the swarm: forward (optionally kept for backward) and backward.

Both reroute around failed servers through retry.py (`with_rerouting`, `Attempts`). A forward returns, besides its
output, a trace of the hops it took (server, blocks, inputs, id of the kept activations), which
is what backward walks in reverse. If a server from the trace is gone by then, backward recomputes
that hop's blocks elsewhere from the inputs in the trace: the gradients are the same.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator, Iterable
from typing import Protocol, TypeVar

import torch
from google.protobuf.message import Message

from swarm.errors import InvalidRequest, PeerTimeout, RemoteError
from swarm.limits import STEP_TIMEOUT
from swarm.transport import open_stream, raise_for_error, translate_errors
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.codecs import encode, encode_mask
from swarm.wire.frames import read_message, to_frames
from swarm.wire.rpc import RPC_BACKWARD, RPC_FORWARD
from swarm.client.reply_checks import decode_named_replies, decode_reply
from swarm.client.retry import BLAMABLE, Attempts, ServerFailure, TransportFailure, with_rerouting, with_transport_retry
from swarm.client.routing import RouteHop
from swarm.client.swarm_client import SwarmClient

ResponseT = TypeVar("ResponseT", bound=Message)


class AdapterPayload(Protocol):
    """What a request carries of the client's adapter, for blocks [start, end)."""

    def message(self, start: int, end: int) -> pb.Adapter: ...

    @property
    def held_hash(self) -> str: ...  # an adapter held by servers, named by hash ("" if none): routing prefers its holders


@dataclasses.dataclass
class TracedHop:
    hop: RouteHop
    inputs: torch.Tensor  # (batch, seq, hidden) sent to this hop
    forward_id: int  # 0: nothing kept on the server
    padding_mask: torch.Tensor | None = None  # (batch, seq), True for real tokens; None: no padding


@dataclasses.dataclass
class Gradients:
    inputs: torch.Tensor
    lora: dict[str, torch.Tensor]  # by wire name
    deep_prompts: dict[int, torch.Tensor]  # by the first block of each hop: (hop blocks, length, hidden)


async def batch_parts(client: SwarmClient, batch: int, seq_len: int, spread: bool) -> list[slice]:
    """Rows of a batch (batch, seq_len, ...) in parts that each fit every server's per-request token
    limit; with `spread`, also in as many parts as the swarm has replicas of every block.

    A single sequence longer than the limit cannot be split (attention needs it whole): InvalidRequest.
    """
    limit, replicas = await client.batch_capacity()
    if seq_len > limit:
        raise InvalidRequest(
            f"a sequence of {seq_len} tokens exceeds the servers' per-request limit of {limit} tokens "
            "(max_tokens_per_request); shorten it, or use an inference session, which sends it in steps"
        )
    parts = -(-batch // (limit // seq_len))
    if spread:
        parts = max(parts, min(batch, replicas))
    bounds = [int(chunk[0]) for chunk in torch.arange(batch).tensor_split(min(parts, batch))] + [batch]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


async def forward_async(
    client: SwarmClient, hidden_states: torch.Tensor, start: int, end: int,
    adapter: AdapterPayload | None = None, keep: bool = False, seed: int = 0, padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[TracedHop]]:
    """Hidden states (batch, seq, hidden) through blocks [start, end); with `keep`, servers keep
    the activations for backward. `padding_mask` (batch, seq): True for real tokens. Returns the
    output and the hops it took."""
    position, state = start, hidden_states
    trace: list[TracedHop] = []

    async def attempt() -> None:
        # Resumes after the last hop that succeeded: a failure costs only the failed hop.
        nonlocal position, state
        for hop in await client.forward_route(position, end, _tokens(state), adapter=_held(adapter)):
            forward_id = random.getrandbits(63) + 1 if keep else 0
            request = _forward_request(client, hop, state, adapter, forward_id, seed, padding_mask)
            reply = await _call(client, hop, RPC_FORWARD, request, pb.ForwardResponse)
            output = _checked(hop, reply.hidden_states, state.shape, "hidden states")
            checker = client.spot_checker
            random_dropout = keep and request.adapter.lora_dropout > 0  # a recompute could not match it
            if checker is not None and not random_dropout and checker.due():
                try:
                    await checker.verify(hop.peer_id, hop.start, hop.end, state, output, adapter, padding_mask)
                except RemoteError as e:
                    raise ServerFailure(hop.peer_id, e) from e
            trace.append(TracedHop(hop, state, forward_id, padding_mask))
            state = output
            position = hop.end

    await with_rerouting(attempt, client.bans, f"forward through blocks {start}:{end}")
    return state, trace


async def forward_on_route(
    client: SwarmClient, route: list[RouteHop], hidden_states: torch.Tensor, adapter: AdapterPayload | None,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hidden states (batch, seq, hidden) through the given route, once, with no rerouting (spot checks)."""
    state = hidden_states
    for hop in route:
        state, _ = await forward_hop(client, hop, state, adapter, padding_mask)
    return state


async def forward_hop(
    client: SwarmClient, hop: RouteHop, hidden_states: torch.Tensor, adapter: AdapterPayload | None,
    padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, pb.ForwardResponse]:
    """One hop of a plain forward: its output (batch, seq, hidden), checked, and the reply (for its other fields).
    Failures raise ServerFailure, for `with_rerouting`."""
    request = _forward_request(client, hop, hidden_states, adapter, 0, 0, padding_mask)
    reply = await _call(client, hop, RPC_FORWARD, request, pb.ForwardResponse)
    return _checked(hop, reply.hidden_states, hidden_states.shape, "hidden states"), reply


async def backward_async(
    client: SwarmClient, trace: list[TracedHop], grad_outputs: torch.Tensor, adapter: AdapterPayload | None, seed: int
) -> Gradients:
    """Gradients along a forward's trace, in reverse; a hop whose server fails is recomputed elsewhere."""
    gradients = Gradients(grad_outputs, {}, {})
    for traced in reversed(trace):
        try:
            await _backward_hop(client, traced.hop, traced.inputs, traced.forward_id, gradients, adapter, seed, traced.padding_mask)
        except ServerFailure as failure:
            attempts = Attempts(client.bans, f"backward through blocks {traced.hop.start}:{traced.hop.end}")
            attempts.failed(failure.peer_id, failure.error)
            await _backward_elsewhere(client, traced, gradients, adapter, seed, attempts)
    return gradients


async def _backward_elsewhere(client: SwarmClient, traced: TracedHop, gradients: Gradients,
                              adapter: AdapterPayload | None, seed: int, attempts: Attempts) -> None:
    """Backward through `traced`'s blocks on other servers: forward again to get each new hop's inputs."""

    async def attempt() -> None:
        route = await client.forward_route(traced.hop.start, traced.hop.end, _tokens(traced.inputs), adapter=_held(adapter))
        inputs, state = [], traced.inputs
        for hop in route[:-1]:
            inputs.append(state)
            request = _forward_request(client, hop, state, adapter, 0, seed, traced.padding_mask)
            reply = await _call(client, hop, RPC_FORWARD, request, pb.ForwardResponse)
            state = _checked(hop, reply.hidden_states, state.shape, "hidden states")
        inputs.append(state)
        saved = dataclasses.replace(gradients, lora=dict(gradients.lora), deep_prompts=dict(gradients.deep_prompts))
        try:
            for hop, hop_inputs in reversed(list(zip(route, inputs))):
                await _backward_hop(client, hop, hop_inputs, 0, gradients, adapter, seed, traced.padding_mask)
        except ServerFailure:
            gradients.inputs, gradients.lora, gradients.deep_prompts = saved.inputs, saved.lora, saved.deep_prompts
            raise

    await with_rerouting(attempt, client.bans, attempts.what, attempts)


def _forward_request(client: SwarmClient, hop: RouteHop, hidden_states: torch.Tensor, adapter: AdapterPayload | None,
                     forward_id: int, seed: int, padding_mask: torch.Tensor | None = None) -> pb.ForwardRequest:
    request = pb.ForwardRequest(
        span=pb.Span(start=hop.start, end=hop.end),
        hidden_states=encode(hidden_states, client.codecs.send),
        response_codec=client.codecs.receive,
        forward_id=forward_id,
        dropout_seed=seed,
        attention_mask=encode_mask(padding_mask),
    )
    if adapter is not None:
        request.adapter.CopyFrom(adapter.message(hop.start, hop.end))
    return request


async def _backward_hop(client: SwarmClient, hop: RouteHop, inputs: torch.Tensor, forward_id: int,
                        gradients: Gradients, adapter: AdapterPayload | None, seed: int,
                        padding_mask: torch.Tensor | None = None) -> None:
    request = pb.BackwardRequest(
        span=pb.Span(start=hop.start, end=hop.end),
        hidden_states=encode(inputs, client.codecs.send),
        grad_outputs=encode(gradients.inputs, client.codecs.send),
        response_codec=client.codecs.receive,
        forward_id=forward_id,
        dropout_seed=seed,
        attention_mask=encode_mask(padding_mask),
    )
    if adapter is not None:
        request.adapter.CopyFrom(adapter.message(hop.start, hop.end))
    reply = await _call(client, hop, RPC_BACKWARD, request, pb.BackwardResponse)
    grad_inputs = _checked(hop, reply.grad_inputs, inputs.shape, "input gradients")
    try:
        lora = decode_named_replies(hop.peer_id, list(reply.lora_grads), list(request.adapter.lora), "LoRA gradients")
        prompts = None
        if request.adapter.HasField("deep_prompts"):
            shape = tuple(request.adapter.deep_prompts.shape)
            prompts = decode_reply(hop.peer_id, reply.deep_prompt_grads, shape, "deep prompt gradients")
    except RemoteError as e:
        raise ServerFailure(hop.peer_id, e) from e
    gradients.inputs = grad_inputs
    gradients.lora.update(lora)
    if prompts is not None:
        gradients.deep_prompts[hop.start] = prompts


def _held(adapter: AdapterPayload | None) -> str:
    return adapter.held_hash if adapter is not None else ""


def _tokens(hidden_states: torch.Tensor) -> int:
    """Batch x sequence of hidden states (batch, seq, hidden): what servers' per-request limits count."""
    return hidden_states.shape[0] * hidden_states.shape[1]


def _checked(hop: RouteHop, message: pb.Tensor, shape: torch.Size, what: str) -> torch.Tensor:
    """A reply tensor of exactly `shape`; a server that sends anything else fails (and is banned)."""
    try:
        return decode_reply(hop.peer_id, message, tuple(shape), what)
    except RemoteError as e:
        raise ServerFailure(hop.peer_id, e) from e


async def _call(client: SwarmClient, hop: RouteHop, rpc: str, request: Message, response_type: type[ResponseT]) -> ResponseT:
    """One streamed request/response to the hop's server; its failures become ServerFailure."""
    client.in_flight[hop.peer_id] += 1
    try:
        reply = await with_transport_retry(lambda: _call_once(client, hop, rpc, request, response_type), client.bans.policy)
    except BLAMABLE as e:
        raise ServerFailure(hop.peer_id, e) from e
    finally:
        client.in_flight[hop.peer_id] -= 1
    client.bans.succeeded(hop.peer_id)
    return reply


async def _call_once(client: SwarmClient, hop: RouteHop, rpc: str, request: Message, response_type: type[ResponseT]) -> ResponseT:
    try:
        replies = await open_stream(client.p2p, hop.peer_id, rpc, _aiter(to_frames(request)), STEP_TIMEOUT)
        with translate_errors(hop.peer_id, rpc):
            reply = await asyncio.wait_for(read_message(replies, response_type), STEP_TIMEOUT)
    except RemoteError as e:
        if isinstance(e, PeerTimeout):
            raise
        raise TransportFailure(hop.peer_id, str(e)) from e
    if reply is None:
        raise RemoteError(hop.peer_id, f"closed the {rpc} stream without a reply")
    if reply.HasField("error"):
        raise_for_error(hop.peer_id, reply.error)
    return reply


async def _aiter(items: Iterable[pb.Frame]) -> AsyncIterator[pb.Frame]:
    for item in items:
        yield item
