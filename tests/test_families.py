"""The family table: every entry fits its transformers classes; other model types are refused, naming what is missing."""

from __future__ import annotations

import pytest
from peft import LoraConfig
from transformers import AutoConfig

from swarm.client.adapters import RemoteLora
from swarm.errors import ConfigError
from swarm.families import FAMILIES, family_of

from tests.conftest import TINY_CONFIGS


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_family_finds_its_classes(model_type):
    """A transformers release that renames a layer or rotary class fails here, not in a server."""
    config = AutoConfig.for_model(model_type)
    family = family_of(config)
    assert family.problems(config) == []
    assert family.layer_class(config).__name__.endswith("DecoderLayer")


def test_every_tested_family_is_in_the_table():
    assert set(TINY_CONFIGS) <= set(FAMILIES)


@pytest.mark.parametrize(("model_type", "missing"), [
    ("gpt2", "missing argument 'position_embeddings' of GPT2Block.forward; "
             "missing rotary-embedding class GPT2BlockRotaryEmbedding"),
    ("vit", "transformers has no causal-LM class for it"),
    ("gemma3", "missing a num_hidden_layers in its config (a composite model: serve its text model)"),
    ("llama4_text", "missing a causal mask for layer types ['chunked_attention']"),
    ("olmo2", "missing its line in swarm.families.FAMILIES"),
])
def test_unsupported_model_types_are_refused_naming_what_is_missing(model_type, missing):
    with pytest.raises(ConfigError, match=f"model type '{model_type}' is not supported: ") as error:
        family_of(AutoConfig.for_model(model_type))
    assert missing in str(error.value)
    assert "(supported: llama, " in str(error.value)


@pytest.mark.parametrize(("model_type", "flag"), [
    ("gemma3_text", "use_bidirectional_attention"), ("mixtral", "output_router_logits"),
])
def test_flags_that_spans_cannot_follow_are_refused(model_type, flag):
    with pytest.raises(ConfigError, match=f"config flag {flag}=True is not supported"):
        family_of(AutoConfig.for_model(model_type, **{flag: True}))


def test_all_linear_lora_targets_each_familys_own_linear_layers():
    config = TINY_CONFIGS["phi3"]()
    lora = RemoteLora(LoraConfig(r=2, target_modules="all-linear"), config, family_of(config))
    assert {path for block, path in lora.targets if block == 0} == {
        "self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj",
    }


@pytest.mark.parametrize(("targets", "parameters", "adapted"), [
    ("all-linear", None, "down_proj, gate.weight, gate_up_proj"),
    (["q_proj", "gate"], None, "gate.weight"),
    (["q_proj", "w1", "w3"], None, "gate_up_proj"),  # transformers 4 names of the experts, which peft maps
    (["q_proj"], ["mlp.experts.down_proj"], "mlp.experts.down_proj"),
])
def test_lora_on_experts_is_refused_not_ignored(targets, parameters, adapted):
    """peft adapts a mixture of experts' stacked weights and router; remote blocks cannot, so they say so."""
    config = TINY_CONFIGS["mixtral"]()
    with pytest.raises(ConfigError, match=f"peft would adapt {adapted} here, weights outside linear layers"):
        RemoteLora(LoraConfig(r=2, target_modules=targets, target_parameters=parameters), config, family_of(config))


def test_lora_on_mixtral_attention_is_accepted():
    config = TINY_CONFIGS["mixtral"]()
    lora = RemoteLora(LoraConfig(r=2, target_modules=["q_proj", "o_proj", "down_proj"]), config, family_of(config))
    assert {path for block, path in lora.targets if block == 0} == {"self_attn.q_proj", "self_attn.o_proj"}


def test_half_of_a_fused_expert_projection_is_a_config_error():
    config = TINY_CONFIGS["mixtral"]()
    with pytest.raises(ConfigError, match="without also targeting w3"):
        RemoteLora(LoraConfig(r=2, target_modules=["q_proj", "w1"]), config, family_of(config))
