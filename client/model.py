"""Distributed causal-LM classes: transformers' own model classes with remote decoder layers.

`AutoDistributedModelForCausalLM.from_pretrained(...)` returns an instance of a subclass of the
family's transformers class (e.g. `DistributedLlamaForCausalLM(LlamaForCausalLM)`), made once
per class by `distributed_class`: embeddings, final norm and LM head are local and loaded from
the checkpoint; the decoder layers are one `RemoteSequential`. Everything else, including
`generate()`, is transformers' own code.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import GenerationConfig, PreTrainedModel

from swarm.cache_argument import cache_argument
from swarm.checkpoint_format import convert_tensors
from swarm.errors import CacheNotPassed, ConfigError, InvalidRequest
from swarm.families import ModelFamily, family_of, load_config
from swarm.limits import ROUTE_WAIT
from swarm.wire.codecs import DEFAULT_CODEC
from swarm.fetch.fetcher import ModelFetcher
from swarm.model_id import is_model_id, model_dht_prefix, validate_dht_prefix
from swarm.records import CLIENT_PART
from swarm.client.event_loop import run_sync
from swarm.manifest import load_manifest, verify_tensor
from swarm.model_source import cache_root, resolve_model
from swarm.client.inference_session import InferenceSession
from swarm.client.remote_sequential import (
    RemoteCache,
    RemoteSequential,
    find_remote_cache,
    generating,
    padded,
    require_session_cache,
)
from swarm.client.routing import RouteHop
from swarm.client.spot_checks import SpotChecker
from swarm.client.tuning_api import SwarmTuningMixin
from swarm.client.wire_codecs import WireCodecs
from swarm.client.swarm_client import SwarmClient

logger = logging.getLogger(__name__)

# Each thread's (or asyncio task's) open inference sessions, by id of the model they belong to: a
# context variable, not a model attribute, so that concurrent callers of one model never share one.
_active_sessions: contextvars.ContextVar[dict[int, InferenceSession]] = contextvars.ContextVar("swarm_sessions", default={})


class DistributedCausalLMMixin:
    """What a distributed model adds to its transformers class: sessions and session-aware generate()."""

    swarm_client: SwarmClient
    transformers_class: type[PreTrainedModel]  # the family's own class, which the mixin sits in front of

    @contextlib.contextmanager
    def inference_session(self, max_length: int, batch_size: int = 1) -> Iterator[InferenceSession]:
        """Keep one server-side session (and its KV cache) across several generate() calls.

        The session belongs to the calling thread (or asyncio task): generate() calls made
        elsewhere on the same model meanwhile get sessions of their own.
        """
        if self._active_session is not None:
            raise InvalidRequest("an inference session is already active on this model in this thread")
        session = InferenceSession(self.swarm_client, max_length=max_length + self.pre_seq_len, batch_size=batch_size,
                                   adapter=self.request_adapter()).open()
        token = _active_sessions.set({**_active_sessions.get(), id(self): session})
        try:
            yield session
        finally:
            _active_sessions.reset(token)
            session.close()

    @property
    def _active_session(self) -> InferenceSession | None:
        return _active_sessions.get().get(id(self))

    @property
    def route(self) -> list[RouteHop]:
        """The route of this thread's active inference session (empty without one)."""
        return self._active_session.route if self._active_session is not None else []

    async def agenerate(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        """generate() for asyncio code: runs on a worker thread (with the caller's context, so an
        inference session opened in this task is used), leaving the event loop free."""
        return await asyncio.to_thread(self.generate, *args, **kwargs)

    def generate(self, inputs: torch.Tensor | None = None, *args, session: InferenceSession | None = None, **kwargs):  # noqa: ANN002, ANN003, ANN201
        """transformers' generate(), with the KV cache kept on the servers.

        Inside `inference_session()`, `inputs` may be None (continue after the previous call) or a
        sequence that extends what the session has seen; only the new tokens are sent.
        """
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        session = session or self._active_session
        if session is not None:
            return self._generate_in_session(session, inputs, *args, **kwargs)
        if inputs is None:
            raise InvalidRequest("generate() needs input ids outside an inference session")
        with self.prompt_routed(inputs, kwargs.get("attention_mask")):  # the prompt router's choice, if one is set
            return self._generate_new_session(inputs, *args, **kwargs)

    def _generate_new_session(self, inputs: torch.Tensor, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        batch_size, prompt_length = inputs.shape
        max_length = kwargs.get("max_length") or prompt_length + (
            kwargs.get("max_new_tokens") or self.generation_config.max_new_tokens or self.generation_config.max_length
        )
        max_length += _draft_room(kwargs, self.generation_config)
        with self.inference_session(max_length=max_length, batch_size=batch_size * self._rows_per_input(kwargs)) as new_session:
            return self._generate_in_session(new_session, inputs, *args, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, *, inputs_embeds=None, labels=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
        """transformers' forward, with prompt tuning's trainable prompts put before the tokens.

        The prompts go in once per sequence: always without a session, at the first step with one.
        Their positions are dropped from the logits, so outputs line up with the tokens. The cache
        travels on in `kwargs` under whatever name transformers gave it (see remote_sequential).
        A padded batch (left or right) works as in transformers: the 2D attention mask goes to the
        servers, which mask the pads and number each row's positions from its first real token.
        """
        if kwargs.get("output_router_logits"):
            raise InvalidRequest("output_router_logits is not supported: the experts' routers run on the servers, "
                                 "which return hidden states only")
        cache = find_remote_cache((), kwargs)
        require_session_cache(cache)
        session = cache.session if cache is not None else None
        prefix = self.pre_seq_len
        if prefix and (session is None or session.position == 0):
            if inputs_embeds is None:
                inputs_embeds = self.get_input_embeddings()(input_ids)
            batch = inputs_embeds.shape[0]
            prompts = self.prompt_embeddings.weight[None].expand(batch, -1, -1).to(inputs_embeds.dtype)
            inputs_embeds, input_ids = torch.cat([prompts, inputs_embeds], dim=1), None
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask.new_ones(batch, prefix), attention_mask], dim=1)
            if labels is not None:
                labels = torch.cat([labels.new_full((batch, prefix), -100), labels], dim=1)
            if session is not None:
                session.prompts_sent(prefix)
        else:
            prefix = 0
        routed = self.prompt_routed(input_ids, attention_mask, inputs_embeds) if session is None else contextlib.nullcontext()
        with routed, padded(attention_mask):  # the servers mask pads and number positions per row from it
            output = super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                     labels=labels, **kwargs)
        if prefix:
            output.logits = output.logits[:, prefix:]
        return output

    def _rows_per_input(self, kwargs: dict) -> int:
        """How many rows generate() makes of each input: a beam each, or a sample per returned sequence."""
        config = kwargs.get("generation_config") or self.generation_config
        num_beams = kwargs.get("num_beams", config.num_beams) or 1
        if num_beams > 1:
            return num_beams
        return kwargs.get("num_return_sequences", config.num_return_sequences) or 1

    def _generate_in_session(self, session: InferenceSession, inputs: torch.Tensor | None, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        inputs = session.resume(inputs, reuse_prefix=not _is_assisted(kwargs, self.generation_config))
        cache = {cache_argument(self.transformers_class.forward): RemoteCache(session)}
        with generating(session):
            output = super().generate(inputs, *args, **cache, **kwargs)  # type: ignore[misc]
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        seen = session.tokens_seen
        # A beam that finished early may leave the returned sequences shorter than the session, never longer.
        if sequences.shape[1] > inputs.shape[1] and seen < sequences.shape[1] - 1:
            raise CacheNotPassed(
                f"generate() returned {sequences.shape[1]} tokens per sequence but the servers' session saw {seen}: "
                "its steps did not go through the session"
            )
        session.generated(sequences)
        return output


def _is_assisted(kwargs: dict, default: GenerationConfig) -> bool:
    """Whether generate() will run transformers' assisted decoding (a draft verified in one pass)."""
    config = kwargs.get("generation_config") or default
    return kwargs.get("assistant_model") is not None or \
        kwargs.get("prompt_lookup_num_tokens", config.prompt_lookup_num_tokens) is not None


def _draft_room(kwargs: dict, default: GenerationConfig) -> int:
    """Session length to add for assisted generation's draft, which may run past `max_length` before
    verification cuts it: prompt lookup drafts up to `prompt_lookup_num_tokens` tokens at any point
    (an assistant model's draft stays within `max_length`)."""
    config = kwargs.get("generation_config") or default
    return kwargs.get("prompt_lookup_num_tokens", config.prompt_lookup_num_tokens) or 0


@functools.cache
def distributed_class(model_class: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """`Distributed<Name>`: the transformers class with the mixin in front, made once per class."""
    cache_argument(model_class.forward)  # a transformers release whose cache argument is unknown fails here, at load
    bases = (SwarmTuningMixin, DistributedCausalLMMixin, model_class)
    return type(f"Distributed{model_class.__name__}", bases, {"transformers_class": model_class})


class AutoDistributedModelForCausalLM:
    """Like transformers' AutoModelForCausalLM, for a model served by a swarm."""

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        *,
        initial_peers: list[str],
        dht_prefix: str | None = None,
        torch_dtype: torch.dtype = torch.float32,
        route_wait: float = ROUTE_WAIT,
        allowed_servers: list[str] | None = None,
        blocked_servers: list[str] = (),
        wire_codec: str = DEFAULT_CODEC,
        response_codec: str | None = None,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        verify_fraction: float = 0.0,
        push: bool = True,
    ) -> PreTrainedModel:
        """Load the local parts of `model`: a checkpoint directory, an alias such as 'smollm2', or a model id
        (`swarm-model manifest` prints it; the swarm's health page lists them), whose manifest, config,
        tokenizer and client part (embeddings, final norm, head) are then fetched from the swarm's servers,
        verified, and cached under `~/.cache/swarm/models/MODEL_ID/`.

        `initial_peers`: multiaddrs of any peers of the swarm. `route_wait`: how long a request
        waits for missing blocks to appear before it fails with MissingBlocksError.
        `allowed_servers` / `blocked_servers`: peer ids (base58) to use exclusively / never.
        `wire_codec`: how hidden states travel to servers ("none", "fp16", "bf16", "int8", "nf4", "nf4o");
        `response_codec`: how they come back (default: the same).
        `tuning_mode`: "ptune" (trainable prompts before the input) or "deep_ptune" (also a prompt
        added before every block), with `pre_seq_len` prompt tokens; LoRA comes via add_adapter().
        `verify_fraction`: the fraction of forward hops and inference steps to re-run on independent
        servers and compare (spot checks); a server caught lying is banned for good in this client.
        `push`: inference steps go from server to server, the last one answering the client (False:
        every hop's output comes back to the client before the next hop, as a comparison).
        """
        if not initial_peers:
            raise ConfigError("initial_peers=[...] is required: the multiaddrs printed by swarm-dht or a server")
        if not 0 <= verify_fraction <= 1:
            raise ConfigError(f"verify_fraction must be between 0 and 1, got {verify_fraction}")
        client = SwarmClient(
            list(initial_peers),
            "",
            0,
            route_wait=route_wait,
            allowed_servers=allowed_servers,
            blocked_servers=blocked_servers,
            codecs=WireCodecs(wire_codec, response_codec or wire_codec),
            push=push,
        )
        try:
            if is_model_id(model):  # fetch the manifest, config, tokenizer and client part from peers (cached)
                client.start()
                fetcher = ModelFetcher(client.dht, client.p2p, str(model))
                checkpoint = run_sync(fetcher.fetch({CLIENT_PART}, tokenizer=True))
            else:
                checkpoint = resolve_model(model)
            config = load_config(checkpoint)
            family = family_of(config)
            client.dht_prefix = validate_dht_prefix(dht_prefix) if dht_prefix else model_dht_prefix(checkpoint)
            client.num_blocks = config.num_hidden_layers
            with torch.device("meta"):
                distributed = distributed_class(family.causal_lm_class(config))(config)
            distributed.model.layers = nn.ModuleList([RemoteSequential(client, distributed.request_adapter)])
            _load_local_weights(distributed, checkpoint, family, torch_dtype)
            _initialize_buffers(distributed)
            if (checkpoint / "generation_config.json").exists():
                distributed.generation_config = GenerationConfig.from_pretrained(checkpoint)
            distributed.swarm_client = client
            if verify_fraction > 0:
                client.spot_checker = SpotChecker(client, verify_fraction)
            distributed.setup_tuning(tuning_mode, pre_seq_len)
            distributed.eval()
            client.start()
        except BaseException:
            client.shutdown()
            raise
        prefix = client.dht_prefix
        logger.info("loaded %s (%d remote blocks, DHT prefix %s)", checkpoint.name, config.num_hidden_layers, prefix)
        return distributed


def _load_local_weights(model: PreTrainedModel, checkpoint: Path, family: ModelFamily, dtype: torch.dtype) -> None:
    """Load every tensor except the decoder layers' (embeddings, final norm, LM head), verified against the manifest."""
    manifest = load_manifest(checkpoint, cache_root())
    state = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(path, framework="pt") as reader:
            for key in reader.keys():
                if not key.startswith(family.layer_key_prefix):
                    tensor = reader.get_tensor(key)
                    verify_tensor(manifest, key, tensor, path)
                    state[key] = tensor.to(dtype)
    model.load_state_dict(convert_tensors(model.config, state), strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    still_meta = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if still_meta:
        raise ConfigError(f"the checkpoint in {checkpoint} lacks {', '.join(still_meta[:5])}")


def _initialize_buffers(model: PreTrainedModel) -> None:
    """Compute the buffers that are not in the checkpoint: rotary tables, Gemma's embedding scale.

    The model was built on meta, where they cannot be computed (transformers-spans §6). They get
    real storage and transformers' own initialisation, which skips every tensor marked as loaded,
    so no family needs to say which buffers it has or how they are made.
    """
    for tensor in model.state_dict(keep_vars=True).values():
        tensor._is_hf_initialized = True  # transformers' mark for "loaded: do not initialise"
    for name, buffer in list(model.named_non_persistent_buffers()):
        owner, _, attribute = name.rpartition(".")
        model.get_submodule(owner).register_buffer(attribute, torch.empty_like(buffer, device="cpu"), persistent=False)
    model.initialize_weights()
