"""The OpenAI-compatible HTTP API over a distributed model: /v1/models, /v1/completions, /v1/chat/completions.

Requests and replies follow OpenAI's shapes (pydantic models below); streaming uses FastAPI's own
server-sent events (`EventSourceResponse`), ending with `data: [DONE]` as OpenAI's clients expect;
errors come back in OpenAI's format, `{"error": {"message", "type", "param", "code"}}`, with the
matching status. Generation itself is client/api_generation.py's.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel, Field

from swarm.errors import InvalidRequest, SwarmError
from swarm.client.api_generation import Completion, GenerationParams, Generator


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str = Field(max_length=200_000)


class _Sampling(BaseModel):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=8)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None


class CompletionRequest(_Sampling):
    prompt: str = Field(max_length=200_000)
    logprobs: int | None = Field(default=None, ge=0, le=20)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


def create_app(generator: Generator, model_name: str, api_keys: frozenset[str] = frozenset()) -> FastAPI:
    app = FastAPI(title="Swarm OpenAI-compatible API")

    @app.middleware("http")
    async def check_api_key(request: Request, call_next: Any) -> Any:
        if api_keys:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not any(secrets.compare_digest(given, key) for key in api_keys):
                return _error(401, "invalid or missing API key", "invalid_request_error", code="invalid_api_key")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ())[1:])
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}" if where else str(first.get("msg")), param=where or None)

    @app.exception_handler(UnknownModel)
    async def unknown_model(request: Request, error: UnknownModel) -> JSONResponse:
        return _error(404, str(error), param="model", code="model_not_found")

    @app.exception_handler(InvalidRequest)
    async def bad_request(request: Request, error: InvalidRequest) -> JSONResponse:
        return _error(400, str(error))

    @app.exception_handler(SwarmError)
    async def swarm_failed(request: Request, error: SwarmError) -> JSONResponse:
        return _error(503, str(error), "server_error")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "swarm"}]}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> Any:
        _check_model(body.model, model_name)
        params = _params(body, body.max_tokens, body.logprobs)
        input_ids = generator.encode_prompt(body.prompt)
        if body.stream:
            return EventSourceResponse(_stream(generator, input_ids, params, "text_completion", model_name))
        completion = await generator.complete(input_ids, params)
        return _reply(completion, "text_completion", model_name)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest) -> Any:
        _check_model(body.model, model_name)
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = _params(body, body.max_completion_tokens or body.max_tokens, top)
        input_ids = generator.encode_chat([message.model_dump() for message in body.messages])
        if body.stream:
            return EventSourceResponse(_stream(generator, input_ids, params, "chat.completion.chunk", model_name))
        completion = await generator.complete(input_ids, params)
        return _reply(completion, "chat.completion", model_name)

    return app


def _check_model(requested: str, served: str) -> None:
    if requested != served:
        raise UnknownModel(f"the model {requested!r} does not exist (this server serves {served!r})")


class UnknownModel(InvalidRequest):
    """A request names a model this API does not serve (404, as OpenAI answers)."""


def _params(body: _Sampling, max_tokens: int | None, logprobs: int | None) -> GenerationParams:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return GenerationParams(max_tokens=max_tokens or 16, temperature=body.temperature, top_p=body.top_p, n=body.n,
                            stop=stop, seed=body.seed, logprobs=logprobs)


def _reply(completion: Completion, kind: str, model: str) -> dict[str, Any]:
    choices = []
    for index, choice in enumerate(completion.choices):
        entry: dict[str, Any] = {"index": index, "finish_reason": choice.finish_reason}
        if kind == "chat.completion":
            entry["message"] = {"role": "assistant", "content": choice.text}
            entry["logprobs"] = {"content": choice.logprobs} if choice.logprobs is not None else None
        else:
            entry["text"] = choice.text
            entry["logprobs"] = _completion_logprobs(choice.logprobs) if choice.logprobs is not None else None
        choices.append(entry)
    return {
        "id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
                  "total_tokens": completion.prompt_tokens + completion.completion_tokens},
    }


def _completion_logprobs(per_token: list[dict[str, Any]]) -> dict[str, Any]:
    """The legacy completions format of logprobs: parallel lists."""
    return {
        "tokens": [entry["token"] for entry in per_token],
        "token_logprobs": [entry["logprob"] for entry in per_token],
        "top_logprobs": [{alt["token"]: alt["logprob"] for alt in entry["top_logprobs"]} for entry in per_token],
    }


async def _stream(generator: Generator, input_ids: Any, params: GenerationParams, kind: str, model: str) -> AsyncIterator[bytes]:
    """OpenAI's chunks as server-sent events (FastAPI's framing), then [DONE]. A client that
    disconnects closes this generator, which stops the generation and its session on every server."""
    ident = f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    first = True
    async for delta, finish in generator.stream(input_ids, params):
        if kind.startswith("chat"):
            change = ({"role": "assistant", "content": delta} if first else {"content": delta}) if delta or first else {}
            choice: dict[str, Any] = {"index": 0, "delta": change, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta, "finish_reason": finish}
        first = False
        chunk = {"id": ident, "object": kind, "created": created, "model": model, "choices": [choice]}
        yield format_sse_event(data_str=json.dumps(chunk))
    yield format_sse_event(data_str="[DONE]")


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": code}})
