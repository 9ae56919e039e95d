"""The server's RPC handlers: info (unary), forward and inference sessions (streams of frames).

Every input is checked before use; a bad request gets an `Error` reply for that caller only and
the server keeps serving everyone else. Nothing from the wire is unpickled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import torch
from transformers import DynamicCache

from swarm.errors import CacheFull, InvalidRequest, LimitExceeded, SpanNotServed
from swarm.limits import CACHE_WAIT_TIMEOUT, DEFAULT_MAX_SESSION_LIFETIME, DEFAULT_REQUEST_TIMEOUT, SESSION_IDLE_TIMEOUT
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.transport import P2P, call_unary
from swarm.wire.rpc import RPC_BACKWARD, RPC_FORWARD, RPC_INFERENCE, RPC_INFO, RPC_PUSH
from swarm.wire.frames import MessageT, read_message, read_until_end, to_frames
from swarm.wire.codecs import check_codec, decode, decode_mask, encode
from swarm.server.adapter_routing import AdapterRouting, RoutedAdapters
from swarm.server.adapter_service import AdapterService
from swarm.server.adapters import MAX_PROMPT_LENGTH, ParsedAdapter, applied, parse_adapter
from swarm.server.backprop import ActivationStore, backward, forward_for_backward
from swarm.server.cache_budget import CacheBudget
from swarm.server.peer_limits import PeerGovernor
from swarm.server.compute_worker import ComputeWorker
from swarm.server.inference_steps import InferenceStep
from swarm.server.kv_cache import SessionCache
from swarm.server.scheduler import TaskKind
from swarm.server.sessions import MAX_PENDING_PUSHES, ServerSession, SessionRegistry, check_push_route, check_pushers
from swarm.server.span_runner import SpanRunner

logger = logging.getLogger(__name__)

T = TypeVar("T")

@dataclasses.dataclass(frozen=True, kw_only=True)
class RequestLimits:
    max_batch_size: int
    max_tokens_per_request: int  # batch * new tokens
    max_session_length: int  # tokens per sequence
    max_lora_rank: int
    max_session_lifetime: float = DEFAULT_MAX_SESSION_LIFETIME  # seconds from open to forced close
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT  # seconds a request's first message may take to arrive


# Bytes a request may carry beyond its tensors' payloads (field tags, names, codec scales).
MESSAGE_OVERHEAD_BYTES = 1 << 16
WIDEST_WIRE_BYTES = 4  # float32: no codec makes a tensor larger on the wire
PUSH_TIMEOUT = 20.0  # seconds for the next server to accept a pushed step (it replies before computing)


class SpanHandlers:
    """Serves one span of one model; `info` describes it to callers."""

    def __init__(
        self,
        *,
        runner: SpanRunner,
        worker: ComputeWorker,
        budget: CacheBudget,
        limits: RequestLimits,
        info: pb.InfoResponse,
        activations: ActivationStore,
        governor: PeerGovernor,
        adapters: AdapterService | None = None,
        idle_timeout: float = SESSION_IDLE_TIMEOUT,
    ):
        self.runner = runner
        self.worker = worker
        self.budget = budget
        self.limits = limits
        self.info = info
        self.activations = activations
        self.governor = governor
        self.adapters = adapters  # adapters held by this server, for requests that name one by hash
        self.routing = AdapterRouting(adapters) if adapters is not None else None  # requests that name several
        self.idle_timeout = idle_timeout
        self.hidden_size = runner.config.hidden_size
        self._hidden_bytes = limits.max_tokens_per_request * self.hidden_size * WIDEST_WIRE_BYTES
        linears = [m for m in runner.layers[0].modules() if isinstance(m, torch.nn.Linear)]  # every block is alike
        self._lora_bytes_per_block = sum(m.in_features + m.out_features for m in linears) * limits.max_lora_rank * WIDEST_WIRE_BYTES
        self.served = pb.RequestCounts()  # completed requests by kind, reported by `info`
        self.sessions = SessionRegistry()
        self.p2p: P2P | None = None  # set by register(): pushes to the next servers go through it

    def cache_tokens_left(self) -> int:
        """Room left in the attention cache, in tokens of one sequence over all of this server's blocks."""
        runner = self.runner
        return max(0, self.budget.bytes_left) // runner.kv_bytes_per_token(runner.start, runner.end)

    async def register(self, p2p: P2P) -> None:
        self.p2p = p2p
        await p2p.add_protobuf_handler(RPC_PUSH, self.rpc_push, pb.PushRequest)
        await p2p.add_protobuf_handler(RPC_INFO, self.rpc_info, pb.InfoRequest)
        await p2p.add_protobuf_handler(RPC_FORWARD, self.rpc_forward, pb.Frame, stream_input=True, stream_output=True)
        await p2p.add_protobuf_handler(RPC_INFERENCE, self.rpc_inference, pb.Frame, stream_input=True, stream_output=True)
        await p2p.add_protobuf_handler(RPC_BACKWARD, self.rpc_backward, pb.Frame, stream_input=True, stream_output=True)

    async def rpc_info(self, request: pb.InfoRequest, context: object) -> pb.InfoResponse:
        info = pb.InfoResponse()
        info.CopyFrom(self.info)
        info.cache_tokens_left = self.cache_tokens_left()
        info.served.CopyFrom(self.served)
        info.served.merged_forwards = self.worker.merged_forwards
        info.served.merged_steps = self.worker.merged_steps
        return info

    async def rpc_forward(self, frames: AsyncIterator[pb.Frame], context: object) -> AsyncIterator[pb.Frame]:
        try:
            with self.governor.request(_caller(context)):
                response = await self._forward(frames, context)
        except Exception as e:
            response = pb.ForwardResponse(error=_error_reply(e, "forward"))
        for frame in to_frames(response):
            yield frame
        await read_until_end(frames)

    async def _forward(self, frames: AsyncIterator[pb.Frame], context: object) -> pb.ForwardResponse:
        request = await self._read_request(frames, pb.ForwardRequest, self._hidden_bytes + self._adapter_bytes(), "empty forward request")
        runner = self.runner
        start, end = self._check_span(request.span, runner)
        response_codec = check_codec(request.response_codec)
        hidden = await self._check_hidden(request.hidden_states)
        mask = decode_mask(request.attention_mask, hidden.shape[0], hidden.shape[1])
        adapter = await self._adapter(request.adapter, runner, start, end, mask, scoring_allowed=not request.forward_id)
        peer, cost = _caller(context), _cost(hidden, start, end)
        if request.forward_id:
            compute = functools.partial(forward_for_backward, runner, hidden, start, end, adapter, request.dropout_seed, mask)
            began = time.perf_counter()
            kept = await self.worker.submit(TaskKind.FORWARD, peer, cost, compute)
            logger.debug("forward (kept) compute for blocks %d:%d took %.3f s", start, end, time.perf_counter() - began)
            self.activations.put((peer, request.forward_id), kept)
            output = kept.output.detach()
        else:
            compute = functools.partial(_run_frozen, runner, hidden, start, end, adapter, padding_mask=mask)
            output = await self.worker.submit(TaskKind.FORWARD, peer, cost, compute)
        self.served.forwards += 1
        response = pb.ForwardResponse(hidden_states=await _off_loop_if_large(output.numel(), encode, output, response_codec))
        if adapter is not None and isinstance(adapter.routing, RoutedAdapters) and adapter.routing.scores is not None:
            response.adapter_scores.extend(adapter.routing.scores.tolist())
        return response

    async def rpc_backward(self, frames: AsyncIterator[pb.Frame], context: object) -> AsyncIterator[pb.Frame]:
        """Gradients of a span's inputs and of the caller's adapter, from its kept forward or a recompute."""
        try:
            with self.governor.request(_caller(context)):
                response = await self._backward(frames, context)
        except Exception as e:
            response = pb.BackwardResponse(error=_error_reply(e, "backward"))
        for frame in to_frames(response):
            yield frame
        await read_until_end(frames)

    async def _backward(self, frames: AsyncIterator[pb.Frame], context: object) -> pb.BackwardResponse:
        request = await self._read_request(
            frames, pb.BackwardRequest, 2 * self._hidden_bytes + self._adapter_bytes(), "empty backward request"
        )
        runner = self.runner
        start, end = self._check_span(request.span, runner)
        response_codec = check_codec(request.response_codec)
        hidden = await self._check_hidden(request.hidden_states)
        grad_outputs = await self._check_hidden(request.grad_outputs, "gradients")
        if grad_outputs.shape != hidden.shape:
            raise InvalidRequest(f"gradients of shape {tuple(grad_outputs.shape)} do not match the inputs' {tuple(hidden.shape)}")
        peer, cost = _caller(context), _cost(hidden, start, end)
        kept = self.activations.pop((peer, request.forward_id)) if request.forward_id else None
        logger.debug("backward for blocks %d:%d: %s", start, end, "kept forward" if kept is not None else "recompute")
        if kept is None or kept.inputs.shape != hidden.shape:
            adapter = await self._adapter(request.adapter, runner, start, end)
            mask = decode_mask(request.attention_mask, hidden.shape[0], hidden.shape[1])
            compute = functools.partial(forward_for_backward, runner, hidden, start, end, adapter, request.dropout_seed, mask)
            kept = await self.worker.submit(TaskKind.FORWARD, peer, cost, compute)
        began = time.perf_counter()
        grad_inputs, lora_grads, prompt_grads = await self.worker.submit(
            TaskKind.BACKWARD, peer, 2 * cost, functools.partial(backward, kept, grad_outputs)
        )
        logger.debug("backward compute for blocks %d:%d took %.3f s", start, end, time.perf_counter() - began)
        response = pb.BackwardResponse(
            grad_inputs=await _off_loop_if_large(grad_inputs.numel(), encode, grad_inputs, response_codec),
            lora_grads=[pb.NamedTensor(name=name, tensor=encode(grad)) for name, grad in lora_grads.items()],
        )
        if prompt_grads is not None:
            response.deep_prompt_grads.CopyFrom(encode(prompt_grads))
        self.served.backwards += 1
        return response

    async def rpc_inference(self, frames: AsyncIterator[pb.Frame], context: object) -> AsyncIterator[pb.Frame]:
        """One inference session: an open, then steps until the client closes the stream."""
        try:
            with self.governor.session(_caller(context)):
                async for frame in self._session(frames, _caller(context)):
                    yield frame
        except Exception as e:
            for frame in to_frames(pb.InferenceResponse(error=_error_reply(e, "inference"))):
                yield frame
            await read_until_end(frames, timeout=1.0)  # the session is over: let the caller finish writing

    async def _session(self, frames: AsyncIterator[pb.Frame], peer: str) -> AsyncIterator[pb.Frame]:
        no_open = "an inference session must start with an `open` message"
        request = await self._read_request(frames, pb.InferenceRequest, self._adapter_bytes(), no_open)
        if request.WhichOneof("request") != "open":
            raise InvalidRequest(no_open)
        opening = request.open
        runner = self.runner  # the session keeps these blocks even if the server moves meanwhile
        start, end = self._check_span(opening.span, runner)
        if not 0 < opening.batch_size <= self.limits.max_batch_size:
            raise InvalidRequest(f"batch size {opening.batch_size} is outside 1..{self.limits.max_batch_size}")
        if not 0 < opening.max_length <= self.limits.max_session_length:
            raise InvalidRequest(f"max_length {opening.max_length} is outside 1..{self.limits.max_session_length}")
        adapter = await self._adapter(opening.adapter, runner, start, end)
        tokens = opening.batch_size * opening.max_length
        own_adapter = adapter is not None and not adapter.frozen  # a held adapter is in the adapter store's budget
        nbytes = tokens * runner.kv_bytes_per_token(start, end) + (adapter.nbytes() if own_adapter else 0)
        what = f"a session of {tokens} tokens" + (" and its adapter" if adapter is not None else "")
        async with self.budget.reserve(nbytes, CACHE_WAIT_TIMEOUT, what):
            with self.sessions.opened(
                owner=peer, runner=runner, start=start, end=end, batch_size=opening.batch_size, max_length=opening.max_length,
                adapter=adapter, response_codec=check_codec(opening.response_codec), pushers=list(opening.pushers),
                last_active=asyncio.get_running_loop().time(),
                # keys/values per block: (batch, kv_heads, max_length, head_dim), the bytes reserved for the session
                cache=SessionCache(runner.config, start, end, opening.batch_size, opening.max_length, runner.compute_dtype,
                                   runner.device),
            ) as session:
                yield single_frame(pb.InferenceResponse(opened=pb.SessionOpened(
                    max_length=opening.max_length, max_tokens_per_request=self.limits.max_tokens_per_request,
                    session_id=session.session_id)))
                self.served.sessions_opened += 1
                async for frame in self._run_session(frames, session):
                    yield frame

    async def _run_session(self, frames: AsyncIterator[pb.Frame], session: ServerSession) -> AsyncIterator[pb.Frame]:
        """Replies to the owner, in order: of its own steps, of steps pushed into the session, and grants."""
        reader = asyncio.create_task(self._serve_owner(frames, session))
        try:
            while (response := await session.outbox.get()) is not None:
                for frame in to_frames(response):
                    yield frame
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if session.error is not None:
            raise session.error

    async def _serve_owner(self, frames: AsyncIterator[pb.Frame], session: ServerSession) -> None:
        """Read the owner's requests until it closes the stream, the session idles out or reaches its lifetime."""
        try:
            loop = asyncio.get_running_loop()
            closes_at = loop.time() + self.limits.max_session_lifetime
            while True:
                wait = min(session.last_active + self.idle_timeout, closes_at) - loop.time()
                try:
                    request = await asyncio.wait_for(
                        read_message(frames, pb.InferenceRequest, self._hidden_bytes + MESSAGE_OVERHEAD_BYTES), max(wait, 0)
                    )
                except TimeoutError:
                    if loop.time() >= closes_at:
                        raise LimitExceeded(
                            f"the session reached this server's maximum session lifetime of {self.limits.max_session_lifetime:.0f} s "
                            "(--max-session-lifetime)"
                        ) from None
                    if loop.time() < session.last_active + self.idle_timeout:
                        continue  # pushed steps kept it busy
                    logger.info("closing an inference session idle for %.0f s", self.idle_timeout)
                    break
                if request is None:
                    break  # the client closed the session
                kind = request.WhichOneof("request")
                if kind == "grant":
                    session.pushers = check_pushers(request.grant.pushers)
                    session.outbox.put_nowait(pb.InferenceResponse(granted=request.grant))
                elif kind == "step":
                    check_push_route(request.step.push_to)
                    hidden = await self._check_hidden(request.step.hidden_states)
                    await self._run_step(session, request.step, hidden)
                else:
                    raise InvalidRequest("expected an inference step")
        except Exception as e:
            session.fail(e)
        else:
            session.outbox.put_nowait(None)

    async def _run_step(self, session: ServerSession, step: pb.InferenceStep, hidden: torch.Tensor) -> None:
        """Run one step of the session (from its owner or pushed), then reply to the owner, pushing on first if asked."""
        async with session.lock:
            session.begin_step(step, hidden)
            step_work = InferenceStep(session.runner, session.start, session.end, hidden, session.position, session.cache,
                                      session.mask, session.adapter)
            output = await self.worker.submit_step(session.owner, _cost(hidden, session.start, session.end), step_work)
            session.position += hidden.shape[1]
            session.last_active = asyncio.get_running_loop().time()
            position = session.position
        self.served.inference_steps += 1
        if step.push_to:
            # Pushed on in the codec the step came in (the owner's choice for server-to-server hops); the
            # owner gets these very bytes, so that its replay records equal what the next server decoded.
            encoded = await _off_loop_if_large(output.numel(), encode, output, step.hidden_states.codec or "none")
            self._push_on(session, step, encoded, position)
            return
        encoded = await _off_loop_if_large(output.numel(), encode, output, session.response_codec)
        session.outbox.put_nowait(pb.InferenceResponse(step=pb.StepResult(hidden_states=encoded, position=position, step_id=step.step_id)))

    def _push_on(self, session: ServerSession, step: pb.InferenceStep, encoded: pb.Tensor, position: int) -> None:
        """Send a step's output to the next server's session, then report it (or why it failed) to the owner.

        Reports go out in step order, each after its push was accepted or refused: the owner needs the
        copy only for replay, off its critical path, and learns from it whether to send the step on itself.
        """
        target = step.push_to[0]
        onward = pb.InferenceStep(hidden_states=encoded, position=step.position, step_id=step.step_id,
                                  attention_mask=step.attention_mask, reorder=target.reorder, push_to=step.push_to[1:])
        previous = session.last_report

        async def push_and_report() -> None:
            error = ""
            try:
                reply = await call_unary(self.p2p, target.peer_id, RPC_PUSH, pb.PushRequest(session_id=target.session_id, step=onward),
                                         pb.PushResponse, PUSH_TIMEOUT)
                if reply.HasField("error"):
                    error = f"refused: {reply.error.message}"
            except Exception as e:  # noqa: BLE001 - any failure of the next hop goes to the owner, who replays
                error = f"{type(e).__name__}: {e}"
            if error:
                logger.info("push to %s failed: %s", target.peer_id[-8:], error)
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            result = pb.StepResult(hidden_states=encoded, position=position, step_id=step.step_id, pushed=True, push_error=error)
            session.outbox.put_nowait(pb.InferenceResponse(step=result))

        session.last_report = asyncio.create_task(push_and_report())
        session.track(session.last_report)

    async def rpc_push(self, request: pb.PushRequest, context: object) -> pb.PushResponse:
        """A step pushed by the previous server of a session's route: accepted (queued) or refused at once."""
        try:
            session = self.sessions.for_push(request.session_id, _caller(context))
            step = request.step
            check_push_route(step.push_to)
            if len(session.tasks) >= MAX_PENDING_PUSHES:
                raise LimitExceeded(f"this session already has {len(session.tasks)} pushed steps waiting")
            hidden = await self._check_hidden(step.hidden_states)
            if hidden.shape[0] != session.batch_size:
                raise InvalidRequest(f"step has batch {hidden.shape[0]}, the session was opened with {session.batch_size}")
        except Exception as e:
            return pb.PushResponse(error=_error_reply(e, "push"))
        session.track(asyncio.create_task(self._run_pushed(session, step, hidden)))
        return pb.PushResponse()

    async def _run_pushed(self, session: ServerSession, step: pb.InferenceStep, hidden: torch.Tensor) -> None:
        try:
            await self._run_step(session, step, hidden)
            self.served.pushed_steps += 1
        except Exception as e:
            session.fail(e)

    async def _read_request(
        self, frames: AsyncIterator[pb.Frame], message_type: type[MessageT], payload_bytes: int, if_empty: str
    ) -> MessageT:
        """The first message of a request stream, within a size cap derived from this server's limits
        and a deadline, so that no caller can make the server buffer or wait without bound."""
        try:
            request = await asyncio.wait_for(
                read_message(frames, message_type, payload_bytes + MESSAGE_OVERHEAD_BYTES), self.limits.request_timeout
            )
        except TimeoutError:
            raise LimitExceeded(
                f"the request did not arrive within this server's {self.limits.request_timeout:g} s (--request-timeout)"
            ) from None
        if request is None:
            raise InvalidRequest(if_empty)
        return request

    async def _adapter(self, message: pb.Adapter, runner: SpanRunner, start: int, end: int,
                       padding_mask: torch.Tensor | None = None, scoring_allowed: bool = False) -> ParsedAdapter | None:
        """The request's adapter: one held here named by hash (fetched from peers if missing), several held
        ones to route among (adapter_routing.py), or the caller's own."""
        if message.arrow_hashes or message.arrow_score:
            if self.routing is None:
                raise InvalidRequest("this server holds no adapters")
            return await self.routing.parse(message, start, end, padding_mask, scoring_allowed)
        if not message.adapter_hash:
            return parse_adapter(message, runner, start, end, self.limits.max_lora_rank)
        if message.lora or message.HasField("deep_prompts"):
            raise InvalidRequest("an adapter named by hash cannot be combined with LoRA tensors or deep prompts")
        if self.adapters is None:
            raise InvalidRequest("this server holds no adapters")
        return await self.adapters.resolve(message.adapter_hash, start, end)

    def _adapter_bytes(self) -> int:
        """The most an adapter for this server's blocks can take on the wire: LoRA of the largest
        rank on every linear layer, and deep prompts of the longest length."""
        blocks = len(self.runner.layers)
        return blocks * (self._lora_bytes_per_block + MAX_PROMPT_LENGTH * self.hidden_size * WIDEST_WIRE_BYTES)

    def _check_span(self, span: pb.Span, runner: SpanRunner) -> tuple[int, int]:
        if span.start >= span.end:  # a malformed request, not a stale route: SpanNotServed would send the caller elsewhere
            raise InvalidRequest(f"span {span.start}:{span.end} is empty")
        if not (runner.start <= span.start < span.end <= runner.end):
            raise SpanNotServed(
                f"blocks {span.start}:{span.end} are not served here (this server holds {runner.start}:{runner.end})"
            )
        return span.start, span.end

    async def _check_hidden(self, message: pb.Tensor, what: str = "hidden states") -> torch.Tensor:
        """Hidden states or their gradients (batch, seq, hidden) within this server's limits, finite.

        The declared shape is checked before anything is decoded, so a tensor over the limits costs
        nothing and its error speaks of batch and tokens; decode then checks the bytes against it.
        """
        shape = tuple(message.shape)
        if len(shape) != 3 or shape[2] != self.hidden_size:
            raise InvalidRequest(f"{what} must have shape (batch, seq, {self.hidden_size}), got {shape}")
        batch, seq_len, _ = shape
        if batch == 0 or seq_len == 0:
            raise InvalidRequest(f"{what} of shape {shape} are empty")
        if batch > self.limits.max_batch_size:
            raise InvalidRequest(f"batch {batch} exceeds the limit {self.limits.max_batch_size}")
        if batch * seq_len > self.limits.max_tokens_per_request:
            raise InvalidRequest(f"{batch * seq_len} tokens in one request exceed the limit {self.limits.max_tokens_per_request}")
        hidden = await _off_loop_if_large(batch * seq_len * self.hidden_size, decode, message)
        if not torch.isfinite(hidden).all():
            raise InvalidRequest(f"{what} contain NaN or Inf")
        return hidden


def _run_frozen(
    runner: SpanRunner,
    hidden: torch.Tensor,
    start: int,
    end: int,
    adapter: ParsedAdapter | None,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Blocks [start, end) without autograd or cache, with the caller's adapter if any."""
    with torch.inference_mode(), applied(runner, adapter, start):
        return runner(hidden, start, end, padding_mask=padding_mask)


# Tensors of at least this many values are decoded and encoded on a worker thread: an int8 prefill of
# 8192 tokens x 576 takes tens of ms, which would stall every other peer's stream on the event loop,
# while a decode step's few hundred values cost less than the hop to a thread.
OFF_LOOP_ELEMENTS = 1 << 16


async def _off_loop_if_large(elements: int, function: Callable[..., T], *args: Any) -> T:
    if elements < OFF_LOOP_ELEMENTS:
        return function(*args)
    return await asyncio.to_thread(function, *args)


def _cost(hidden: torch.Tensor, start: int, end: int) -> float:
    """What a task costs the compute thread, for fair scheduling: tokens x blocks."""
    return float(hidden.shape[0] * hidden.shape[1] * (end - start))


def _caller(context: object) -> str:
    """The caller's peer id: kept forwards are only ever found again by the same caller."""
    return str(context.remote_id)  # type: ignore[attr-defined]


def single_frame(message: pb.InferenceResponse) -> pb.Frame:
    """A small reply that fits one frame."""
    (frame,) = to_frames(message)
    return frame


def _error_reply(error: Exception, rpc: str) -> pb.Error:
    if isinstance(error, SpanNotServed):
        logger.info("rejected %s request: %s", rpc, error)
        return pb.Error(kind=pb.Error.SPAN_NOT_SERVED, message=str(error))
    if isinstance(error, InvalidRequest):
        logger.info("rejected %s request: %s", rpc, error)
        return pb.Error(kind=pb.Error.INVALID_REQUEST, message=str(error))
    if isinstance(error, CacheFull):
        logger.info("refused an inference session: %s", error)
        return pb.Error(kind=pb.Error.CACHE_FULL, message=str(error))
    logger.exception("%s failed", rpc)
    return pb.Error(kind=pb.Error.INTERNAL, message=f"{type(error).__name__}: {error}")
