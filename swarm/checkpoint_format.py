"""Checkpoint tensors in the names and layouts transformers' classes take, read a few at a time.

Checkpoints keep the layout a model was published in, and transformers' `from_pretrained` converts
it on load with the model type's registered transforms: Mixtral's experts, for instance, are
stored one matrix per expert (`block_sparse_moe.experts.{e}.w1.weight`) and become one stacked
parameter (`mlp.experts.gate_up_proj`, (experts, 2 * intermediate, hidden)). Servers load one
block at a time and clients only the embeddings and head, so neither goes through
`from_pretrained`; both run the same transforms here, through transformers' own conversion code.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from concurrent.futures import Future

import torch
from transformers import PretrainedConfig
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key


def convert_tensors(config: PretrainedConfig, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` (full checkpoint keys) renamed and merged as transformers would load them for `config`.

    A converter merges groups of tensors (every expert of one block), so `tensors` must hold whole
    groups: all of one block's tensors at once, as the loaders read them.
    """
    transforms = get_checkpoint_conversion_mapping(config.model_type) or []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    converted: dict[str, torch.Tensor] = {}
    pending: dict[str, WeightConverter] = {}  # target key -> its own converter, collecting its source tensors
    for key in sorted(tensors, key=dot_natural_key):  # natural order: expert 10 after expert 9, as they stack
        target, pattern = rename_source_key(key, renamings, converters)
        if pattern is None:
            converted[target] = tensors[key]
            continue
        converter = pending.setdefault(target, copy.deepcopy(by_pattern[pattern]))
        loaded: Future[torch.Tensor] = Future()  # what transformers' own (threaded) loading hands a converter
        loaded.set_result(tensors[key])
        converter.add_tensor(target, key, pattern, loaded)
    for target, converter in pending.items():
        converted.update(converter.convert(target))
    return converted
