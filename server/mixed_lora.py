"""Held adapters of the rows of one merged decode step: one base forward plus a per-row LoRA correction.

Steps of several sessions run as one forward (server/inference_steps.py); each session may use a
different adapter held by this server (frozen), or none. Instead of one sub-batch per adapter, each
targeted linear layer gets one hook that adds, for every row, lora_update(x_row, A_row, B_row,
scaling_row) (server/adapters.py, the same formula as a single adapter's): the rows' A and B are
gathered into (rows, max rank, in) and (rows, out, max rank) tensors and applied with one batched
matmul, the idea behind Punica and S-LoRA. Ranks differ between adapters, so each adapter's A and
B are zero-padded to the largest rank among the rows (the padded rank components contribute exact
zeros); rows without an adapter, or whose adapter does not target the layer, get zero matrices,
hence no correction at all. The result is peft's mixed-batch forward (`adapter_names=[...]`,
`LoraLayer._mixed_batch_forward`), which loops over the adapters instead.

Only inference: no dropout, no gradients. Trainable adapters sent by a client and deep prompts
still run alone (their steps never merge), since their gradients and prompt positions are per
request.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from swarm.server.adapters import ParsedAdapter, lora_update
from swarm.server.span_runner import SpanRunner


@dataclasses.dataclass
class RowLora:
    """One linear layer's LoRA for every row of a merged step (zeros for rows it does not apply to)."""

    lora_a: torch.Tensor  # (rows, max rank, in)
    lora_b: torch.Tensor  # (rows, out, max rank)
    scaling: torch.Tensor  # (rows, 1, 1)

    def correction(self, x: torch.Tensor) -> torch.Tensor:
        """The rows' LoRA updates for the layer's input x (rows, ..., in), rows first: (rows, ..., out).

        Layers that flatten the tokens first (rows * tokens, in) are fine too: rows stay leading."""
        rows = self.lora_a.shape[0]
        if x.numel() % (rows * x.shape[-1]):
            raise ValueError(f"a LoRA layer's input of shape {tuple(x.shape)} cannot be split into {rows} rows")
        per_row = x.to(self.lora_a.dtype).reshape(rows, -1, x.shape[-1])  # (rows, tokens, in)
        update = lora_update(per_row, self.lora_a, self.lora_b, self.scaling)
        return update.reshape(*x.shape[:-1], update.shape[-1])


def stack_rows(adapters: Sequence[ParsedAdapter | None], rows: Sequence[int]) -> dict[tuple[int, str], RowLora]:
    """Per (block, module path) that any of `adapters` targets: its LoRA gathered for all rows.

    `adapters[i]` covers `rows[i]` consecutive rows of the batch (a session's batch); None: no adapter."""
    keys = sorted({key for adapter in adapters if adapter is not None for key in adapter.lora})
    # each row's session, when some session has several rows; else the sessions are the rows
    row_index = None if all(count == 1 for count in rows) else torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(rows))
    stacked = {}
    for key in keys:
        pairs = [adapter.lora.get(key) if adapter is not None else None for adapter in adapters]
        present = [pair for pair in pairs if pair is not None]
        rank = max(lora_a.shape[0] for lora_a, _ in present)
        sample_a, sample_b = present[0]
        zero_a, zero_b = sample_a.new_zeros(rank, sample_a.shape[1]), sample_b.new_zeros(sample_b.shape[0], rank)
        lora_a = torch.stack([zero_a if pair is None else F.pad(pair[0], (0, 0, 0, rank - pair[0].shape[0])) for pair in pairs])
        lora_b = torch.stack([zero_b if pair is None else F.pad(pair[1], (0, rank - pair[1].shape[1])) for pair in pairs])
        scales = [adapter.scaling if adapter is not None and key in adapter.lora else 0.0 for adapter in adapters]
        scaling = torch.tensor(scales, dtype=sample_a.dtype).view(-1, 1, 1)
        if row_index is not None:
            lora_a, lora_b, scaling = lora_a[row_index], lora_b[row_index], scaling[row_index]
        stacked[key] = RowLora(lora_a, lora_b, scaling)
    return stacked


@contextlib.contextmanager
def applied_per_row(runner: SpanRunner, adapters: Sequence[ParsedAdapter | None], rows: Sequence[int]) -> Iterator[None]:
    """Hooks that add each row's own held adapter to the linear layers of a merged forward (see the
    module docstring); nothing at all if no row has an adapter."""
    if any(adapter is not None and (not adapter.frozen or adapter.deep_prompts is not None) for adapter in adapters):
        raise ValueError("only held (frozen) LoRA adapters can share a merged forward")
    handles = []
    for (block, path), row_lora in stack_rows(adapters, rows).items():
        module = runner.layers[block - runner.start].get_submodule(path)
        handles.append(module.register_forward_hook(_row_hook(row_lora)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _row_hook(row_lora: RowLora):  # noqa: ANN202
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + row_lora.correction(args[0]).to(output.dtype)

    return hook
