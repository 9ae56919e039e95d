"""transformers' SDPA attention, run on one intra-op thread for decode-sized queries.

A decode step attends with one query per row: PyTorch's CPU flash-attention kernel splits the work
over (batch x heads), nine tiny tasks for the default model, and waking a second OpenMP thread for
them costs more than the attention itself. Measured on this 2-core machine (shared with other jobs):
one query against 150 keys took 48 us on one thread and 129 us on two, and a whole 15-block decode
step spent more time in attention than in its matrix products (py-spy: 29% of the first server's
samples in attention, 35% in linear layers; after this change 2-3%; at a load average of 3 the
server's CPU per token was the same either way: the second thread costs most when it waits for a
core). Outputs equal two threads'
up to float rounding (within 1e-4 on the default model's hidden states); the parity and batched-
decoding tests, which compare tokens with local transformers, pass unchanged.

Layers look their attention function up by `config._attn_implementation` at every call, so a
span's config is switched to `DECODE_SDPA`, registered with transformers' own SDPA function and
SDPA mask builder (masks, cache handling and kernels are transformers' and PyTorch's, unchanged).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

DECODE_SDPA = "swarm_decode_sdpa"
# Query tokens over the batch (rows x new tokens) up to which attention runs on one thread: decode
# steps, merged decode steps of up to 16 sessions and assisted generation's drafts. Above it
# (prefill) the kernel has enough work per thread to gain from the others.
ONE_THREAD_MAX_QUERIES = 16


def use_decode_sdpa(config: PretrainedConfig) -> None:
    """Make layers built with `config` (which attend with transformers' "sdpa") run small queries on one thread."""
    if config._attn_implementation == "sdpa":
        config._attn_implementation = DECODE_SDPA


def decode_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """transformers' sdpa_attention_forward; query (batch, heads, new_tokens, head_dim), key/value (batch, kv_heads, kv_len, head_dim)."""
    one_thread = query.device.type == "cpu" and query.shape[0] * query.shape[2] <= ONE_THREAD_MAX_QUERIES
    with _intra_op_threads(1) if one_thread else contextlib.nullcontext():
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@contextlib.contextmanager
def _intra_op_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads for the calling thread (an OpenMP setting of that thread) within the block."""
    before = torch.get_num_threads()
    if before == count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


AttentionInterface.register(DECODE_SDPA, decode_sdpa_forward)
AttentionMaskInterface.register(DECODE_SDPA, sdpa_mask)
