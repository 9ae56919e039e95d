"""The adapter methods that transformers users know from its PEFT integration, for remote blocks.

add_adapter / load_adapter / set_adapter / active_adapters / disable_adapters / enable_adapters /
save_pretrained behave as on a transformers model with peft, except that the LoRA weights of the
remote blocks live here, on the client (see adapters.py), and travel with each request. Prompt
tuning (`tuning_mode="ptune"` or `"deep_ptune"` at from_pretrained) adds trainable prompts.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from peft import LoraConfig
from torch import nn

from swarm.errors import ConfigError, InvalidRequest
from swarm.families import family_of
from swarm.adapter_manifest import build_manifest
from swarm.adapter_records import AdapterVersion
from swarm.client.adapter_registry import SPEC_PREFIX, AdapterRegistry, default_identity_path, load_signer
from swarm.client.adapter_router import AdapterRouter
from swarm.client.adapters import HeldLora, RemoteLora, RequestAdapter

logger = logging.getLogger(__name__)

TUNING_MODES = ("ptune", "deep_ptune")


class SwarmTuningMixin:
    """Mixed into the distributed model classes before the transformers class."""

    swarm_adapters: nn.ModuleDict
    _active_adapter: str | None = None
    _adapters_enabled: bool = True
    adapter_router: AdapterRouter | None = None  # set_adapter_router(): overrides the active adapter until cleared

    def setup_tuning(self, tuning_mode: str | None, pre_seq_len: int) -> None:
        """Called by from_pretrained: adapter storage, and prompts for prompt tuning."""
        self.swarm_adapters = nn.ModuleDict()
        self.prompt_embeddings: nn.Embedding | None = None  # (pre_seq_len, hidden): ptune and deep_ptune
        self.deep_prompts: nn.Parameter | None = None  # (blocks, pre_seq_len, hidden): deep_ptune
        if tuning_mode is None:
            return
        if tuning_mode not in TUNING_MODES:
            raise ConfigError(f"tuning_mode must be one of {', '.join(TUNING_MODES)} or None, got {tuning_mode!r}")
        if pre_seq_len <= 0:
            raise ConfigError("prompt tuning needs pre_seq_len > 0")
        self.requires_grad_(False)
        hidden = self.config.hidden_size
        self.prompt_embeddings = nn.Embedding(pre_seq_len, hidden)
        nn.init.normal_(self.prompt_embeddings.weight, std=self.config.initializer_range)
        if tuning_mode == "deep_ptune":
            self.deep_prompts = nn.Parameter(torch.zeros(self.config.num_hidden_layers, pre_seq_len, hidden))

    @property
    def pre_seq_len(self) -> int:
        return self.prompt_embeddings.num_embeddings if self.prompt_embeddings is not None else 0

    def add_adapter(self, adapter_config: LoraConfig, adapter_name: str = "default") -> None:
        """A new LoRA for the remote blocks, initialised as peft does; it becomes the active adapter."""
        if adapter_name in self.swarm_adapters:
            raise ConfigError(f"an adapter named {adapter_name!r} exists already")
        lora = RemoteLora(adapter_config, self.config, family_of(self.config))
        self._register_adapter(adapter_name, lora, trainable=True)

    def load_adapter(self, peft_model_id: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False) -> None:
        """A peft adapter from a local directory (adapter_config.json, adapter_model.safetensors), or one
        published in the swarm, "swarm:NAME[@VERSION]": served by the servers that hold it (no weights
        here), or with `is_trainable` pulled here to train on (its hash becomes the new adapter's parent)."""
        if str(peft_model_id).startswith(SPEC_PREFIX):
            self._load_from_swarm(str(peft_model_id), adapter_name, is_trainable)
            return
        directory = Path(peft_model_id)
        if not directory.is_dir():
            raise ConfigError(f"adapter directory {directory} does not exist")
        if adapter_name in self.swarm_adapters:
            raise ConfigError(f"an adapter named {adapter_name!r} exists already")
        lora = RemoteLora.load(directory, self.config, family_of(self.config))
        self._register_adapter(adapter_name, lora, trainable=is_trainable)

    def _load_from_swarm(self, spec: str, adapter_name: str, is_trainable: bool) -> None:
        if adapter_name in self.swarm_adapters:
            raise ConfigError(f"an adapter named {adapter_name!r} exists already")
        registry = AdapterRegistry(self.swarm_client)
        record, version = registry.resolve(spec)
        # the manifest says which model it is for, and fetching it checks that some server holds it
        manifest, tensors = registry.pull(version.hash) if is_trainable else (registry.manifest(version.hash), {})
        if manifest.base != self.swarm_client.dht_prefix:
            raise ConfigError(f"{spec} is an adapter for base model {manifest.base}, not {self.swarm_client.dht_prefix}")
        if not is_trainable:
            self._register_adapter(adapter_name, HeldLora(spec, version.hash), trainable=False)
            logger.info("using %s version %d (%s), held by the servers", record.name, version.version, version.hash[:12])
            return
        config = LoraConfig(r=manifest.rank, lora_alpha=manifest.alpha, lora_dropout=manifest.dropout,
                            use_rslora=manifest.rslora, target_modules=manifest.target_paths())
        lora = RemoteLora(config, self.config, family_of(self.config))
        lora.load_wire_tensors(tensors, spec)
        lora.parents = (version.hash,)
        self._register_adapter(adapter_name, lora, trainable=True)

    def publish_adapter(self, name: str, adapter_name: str | None = None, *, provenance: str = "", method: str = "trained",
                        identity_path: str | os.PathLike | None = None) -> AdapterVersion:
        """Publish an adapter trained here (default: the active one) as the next version of `name`:
        its block slices go to the servers of those blocks, and the name record is signed with the
        publisher key at `identity_path` (default: in the Swarm cache; created if missing)."""
        adapter_name = adapter_name or self._active_adapter
        if adapter_name is None or adapter_name not in self.swarm_adapters:
            raise ConfigError(f"no adapter named {adapter_name!r} to publish (known: {', '.join(self.swarm_adapters) or 'none'})")
        lora = self.swarm_adapters[adapter_name]
        if not isinstance(lora, RemoteLora):
            raise ConfigError(f"adapter {adapter_name!r} is already published ({lora.spec}); load it with is_trainable=True to fork it")
        config, tensors = lora.peft_config, lora.wire_tensors()
        manifest = build_manifest(self.swarm_client.dht_prefix, lora.rank, config.lora_alpha, config.lora_dropout,
                                  bool(config.use_rslora), tensors)
        signer = load_signer(identity_path or default_identity_path())
        publication = AdapterRegistry(self.swarm_client).publish(
            manifest, tensors, name, signer, parents=lora.parents, method=method, provenance=provenance)
        return publication.version

    def _register_adapter(self, adapter_name: str, lora: RemoteLora | HeldLora, trainable: bool) -> None:
        if not self.swarm_adapters:
            self.requires_grad_(False)  # as with peft: the base stays frozen, only adapters train
        lora.requires_grad_(trainable)
        self.swarm_adapters[adapter_name] = lora
        self._active_adapter = adapter_name
        self._adapters_enabled = True

    def set_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.swarm_adapters:
            raise ConfigError(f"no adapter named {adapter_name!r} (known: {', '.join(self.swarm_adapters) or 'none'})")
        self._active_adapter = adapter_name
        self._adapters_enabled = True

    def active_adapters(self) -> list[str]:
        return [self._active_adapter] if self._active_adapter is not None and self._adapters_enabled else []

    def disable_adapters(self) -> None:
        self._adapters_enabled = False

    def enable_adapters(self) -> None:
        self._adapters_enabled = True

    def set_adapter_router(self, names: list[str], method: str = "arrow", top_k: int = 1, *,
                           prompt_blocks: int | None = None) -> None:
        """Route every input among published adapters ("swarm:NAME[@VERSION]", 2..16 of one base model, rank
        and set of target modules) until clear_adapter_router(): `method="arrow"`: the servers run peft's
        Arrow for their blocks (per token and layer, the `top_k` best-aligned adapters mixed); `"prompt"`:
        one adapter per forward()/generate() call, the one whose principal directions the prompt's inputs
        to the first `prompt_blocks` blocks (default: half of them) align with best, then served alone.
        See client/adapter_router.py."""
        if self.deep_prompts is not None or self.pre_seq_len:
            raise ConfigError("adapter routers cannot be combined with prompt tuning")
        self.adapter_router = AdapterRouter.create(self.swarm_client, names, method, top_k, prompt_blocks)
        logger.info("routing among %s (%s, top_k=%d)", ", ".join(names), method, top_k)

    def clear_adapter_router(self) -> None:
        """Back to the active adapter (or the base model)."""
        self.adapter_router = None

    def route_adapter(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                      inputs_embeds: torch.Tensor | None = None) -> str:
        """The adapter the prompt router picks for these prompts (batch, seq), as named in set_adapter_router."""
        router = self.adapter_router
        if router is None or router.method != "prompt":
            raise ConfigError('route_adapter() needs set_adapter_router(..., method="prompt") first')
        return router.specs[self._prompt_choice(router, input_ids, attention_mask, inputs_embeds)]

    def prompt_routed(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                      inputs_embeds: torch.Tensor | None = None) -> contextlib.AbstractContextManager:
        """Inside: this thread's calls use the adapter the prompt router picks for these prompts (no-op
        without a prompt router). forward() and generate() enter it before opening anything remote."""
        router = self.adapter_router
        if router is None or router.method != "prompt":
            return contextlib.nullcontext()
        return router.chosen(id(self), self._prompt_choice(router, input_ids, attention_mask, inputs_embeds))

    def _prompt_choice(self, router: AdapterRouter, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                       inputs_embeds: torch.Tensor | None) -> int:
        if inputs_embeds is None:
            if input_ids is None:
                raise InvalidRequest("the prompt router needs input_ids or inputs_embeds")
            with torch.no_grad():
                inputs_embeds = self.get_input_embeddings()(input_ids)
        mask = attention_mask.bool() if attention_mask is not None else None
        return router.choose(self.swarm_client, inputs_embeds, mask)

    def request_adapter(self) -> RequestAdapter | None:
        """What requests carry now: the router's adapters (if set), else the active LoRA (if enabled); and
        deep prompts (if any)."""
        if self.adapter_router is not None:
            return RequestAdapter(self.adapter_router.request_lora(id(self)), None)
        lora = self.swarm_adapters[self._active_adapter] if self.active_adapters() else None
        if lora is None and self.deep_prompts is None:
            return None
        return RequestAdapter(lora, self.deep_prompts)

    def save_pretrained(self, save_directory: str | os.PathLike, **_: object) -> None:
        """Save the adapters in peft's format: the active one (or "default") at the top, others in subfolders."""
        if not self.swarm_adapters:
            raise ConfigError("nothing to save: the base model lives on the servers; add or load an adapter first")
        directory = Path(save_directory)
        main = self._active_adapter if self._active_adapter is not None else next(iter(self.swarm_adapters))
        for name, lora in self.swarm_adapters.items():
            lora.save(directory if name == main else directory / name)
