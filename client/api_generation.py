"""One OpenAI-style generation request, run on a distributed model: parameters in, text and counts out.

Knows nothing about HTTP: client/api_app.py turns requests into `GenerationParams` and results into
OpenAI's JSON. Each call runs `generate()` on a worker thread with its own inference session (see
client/model.py), so many requests share one model; streaming hands tokens to the event loop as
generate produces them, and a cancelled stream stops generation at the next token, which closes
the session on every server at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from swarm.errors import InvalidRequest


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # how many top alternatives per token, or None for no logprobs

    def __post_init__(self) -> None:
        if not 1 <= self.max_tokens <= 4096:
            raise InvalidRequest("max_tokens must be between 1 and 4096")
        if not 0 <= self.temperature <= 2:
            raise InvalidRequest("temperature must be between 0 and 2")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest("top_p must be in (0, 1]")
        if not 1 <= self.n <= 8:
            raise InvalidRequest("n must be between 1 and 8")
        if len(self.stop) > 4 or any(not s or len(s) > 64 for s in self.stop):
            raise InvalidRequest("stop takes at most 4 non-empty strings of at most 64 characters")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidRequest("top logprobs must be between 0 and 20")


@dataclasses.dataclass
class Choice:
    text: str
    finish_reason: str  # "stop" | "length"
    tokens: list[int]
    logprobs: list[dict[str, Any]] | None = None  # per token: token, logprob, top_logprobs


@dataclasses.dataclass
class Completion:
    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int


class _Cancelled(StoppingCriteria):
    """Ends generation at the next token once `event` is set (a client that went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


class _QueueStreamer(BaseStreamer):
    """Hands each new token id (batch 1) to an asyncio queue; None marks the end."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[int | None]):
        self.loop, self.queue, self.prompt_seen = loop, queue, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, int(token))

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


class Generator:
    """Runs requests on a distributed model from an asyncio server, each on a worker thread."""

    def __init__(self, model: Any, tokenizer: PreTrainedTokenizerBase, max_concurrency: int = 16):
        self.model, self.tokenizer = model, tokenizer
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="swarm-api")
        self._seeded = threading.Lock()  # torch's sampling RNG is global: seeded requests take turns

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        return self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]

    def encode_chat(self, messages: list[dict[str, str]]) -> torch.Tensor:
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                      return_dict=True)["input_ids"]
        except Exception as e:  # a template error on odd messages is the caller's mistake
            raise InvalidRequest(f"cannot apply the chat template to these messages: {e}") from None

    async def complete(self, input_ids: torch.Tensor, params: GenerationParams) -> Completion:
        """The whole completion(s) for one prompt (1, prompt_tokens)."""
        cancel = threading.Event()
        try:
            return await self._run(self._generate, input_ids, params, None, cancel)
        finally:
            cancel.set()

    async def stream(self, input_ids: torch.Tensor, params: GenerationParams) -> AsyncIterator[tuple[str, str | None]]:
        """(text delta, finish reason or None) as tokens come; stops the generation if the consumer goes away."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[int | None] = asyncio.Queue()
        cancel = threading.Event()
        task = asyncio.ensure_future(self._run(self._generate, input_ids, params, _QueueStreamer(loop, queue), cancel))
        tokens: list[int] = []
        sent = ""
        try:
            while (token := await queue.get()) is not None:
                tokens.append(token)
                text = self._text(tokens, params.stop)
                if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                    continue
                if len(text) > len(sent):
                    yield text[len(sent):], None
                    sent = text
            completion = await task
            yield "", completion.choices[0].finish_reason
        finally:
            cancel.set()  # the client left (or we are done): generation stops, the session closes

    async def _run(self, function: Any, *args: Any) -> Any:
        context = contextvars.copy_context()  # one session per request, on its own thread
        return await asyncio.get_running_loop().run_in_executor(self._pool, context.run, function, *args)

    def _generate(self, input_ids: torch.Tensor, params: GenerationParams, streamer: BaseStreamer | None,
                  cancel: threading.Event) -> Completion:
        if streamer is not None and params.n != 1:
            raise InvalidRequest("streaming supports n=1 only")
        kwargs: dict[str, Any] = dict(
            max_new_tokens=params.max_tokens, num_return_sequences=params.n, streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]), return_dict_in_generate=True,
            output_logits=params.logprobs is not None, pad_token_id=self._pad_token_id(),
        )
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        if params.temperature == 0:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        if params.seed is not None and kwargs["do_sample"]:
            with self._seeded:
                torch.manual_seed(params.seed)
                output = self.model.generate(input_ids, **kwargs)
        else:
            output = self.model.generate(input_ids, **kwargs)
        return self._completion(input_ids, output, params)

    def _pad_token_id(self) -> int | None:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def _completion(self, input_ids: torch.Tensor, output: Any, params: GenerationParams) -> Completion:
        prompt_length = input_ids.shape[1]
        eos = self.tokenizer.eos_token_id
        choices = []
        for row, sequence in enumerate(output.sequences):
            tokens = sequence[prompt_length:].tolist()
            if eos is not None and eos in tokens:
                tokens = tokens[: tokens.index(eos) + 1]
            full = self.tokenizer.decode(tokens, skip_special_tokens=True)
            text = _cut_at_stop(full, params.stop)
            stopped = (eos is not None and tokens[-1:] == [eos]) or text != full
            logprobs = self._logprobs(output.logits, row, tokens, params.logprobs) if params.logprobs is not None else None
            choices.append(Choice(text, "stop" if stopped or len(tokens) < params.max_tokens else "length", tokens, logprobs))
        completion_tokens = sum(len(choice.tokens) for choice in choices)
        return Completion(choices, prompt_length, completion_tokens)

    def _text(self, tokens: list[int], stop: tuple[str, ...]) -> str:
        return _cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), stop)

    def _logprobs(self, logits: tuple[torch.Tensor, ...], row: int, tokens: list[int], top: int) -> list[dict[str, Any]]:
        """Per generated token: its log-probability under the model and the `top` most likely alternatives."""
        found = []
        for step, token in enumerate(tokens[: len(logits)]):
            logprobs = torch.log_softmax(logits[step][row].float(), dim=-1)
            best = torch.topk(logprobs, top) if top else None
            found.append({
                "token": self.tokenizer.decode([token]),
                "logprob": float(logprobs[token]),
                "top_logprobs": [{"token": self.tokenizer.decode([int(i)]), "logprob": float(v)}
                                 for v, i in zip(best.values, best.indices)] if best is not None else [],
            })
        return found

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """The text up to the first stop string (OpenAI leaves the stop string out)."""
    cuts = [text.index(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text
