"""Held adapters of the rows of one merged decode step: one base forward plus a per-row LoRA correction.

Steps of several sessions run as one forward (server/inference_steps.py); each session may use a
different adapter held by this server (frozen), or none. Instead of one sub-batch per adapter, each
targeted linear layer gets one hook that adds, for every row, lora_update(x_row, A_row, B_row,
scaling_row) (server/adapters.py, the same formula as a single adapter's): the rows' A and B are
gathered into (rows, rank, in) and (rows, out, rank) tensors and applied with one batched matmul,
the idea behind Punica and S-LoRA. Ranks differ between adapters, so rows are grouped by rank, one
batched matmul per rank present (usually one): zero-padding every adapter to the largest rank
was measured about three times slower for mixed ranks (4..64) on CPU, where the padded copies cost
more than the extra matmuls. Rows without an adapter, or whose adapter does not target the layer,
are in no group: they get no correction at all. The result is peft's mixed-batch forward
(`adapter_names=[...]`, `LoraLayer._mixed_batch_forward`), which loops over the adapters instead.

Only inference: no dropout, no gradients. Trainable adapters sent by a client and deep prompts
still run alone (their steps never merge), since their gradients and prompt positions are per
request.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from swarm.server.adapters import ParsedAdapter, lora_update
from swarm.server.span_runner import SpanRunner


@dataclasses.dataclass
class RankGroup:
    """The rows of a merged step whose adapters have the same rank at one layer."""

    rows: torch.Tensor | None  # (n,) their rows in the batch; None: every row of the batch, in order
    pairs: list[tuple[torch.Tensor, torch.Tensor]]  # per row: A (rank, in), B (out, rank)
    scales: list[float]  # per row

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A (n, rank, in), B (n, out, rank), scaling (n, 1, 1): the rows' matrices side by side."""
        lora_a = torch.stack([lora_a for lora_a, _ in self.pairs])
        lora_b = torch.stack([lora_b for _, lora_b in self.pairs])
        return lora_a, lora_b, torch.tensor(self.scales, dtype=lora_a.dtype).view(-1, 1, 1)


@dataclasses.dataclass
class RowLora:
    """One linear layer's LoRA for every row of a merged step, in groups of equal rank.

    Rows without an adapter for this layer are in no group: they get no correction at all. Matrices
    are gathered when the layer runs, so a merged forward holds those of one layer at a time."""

    groups: list[RankGroup]
    rows: int  # rows of the batch

    def correction(self, x: torch.Tensor) -> torch.Tensor:
        """The rows' LoRA updates for the layer's input x (rows, ..., in), rows first: (rows, ..., out).

        Layers that flatten the tokens first (rows * tokens, in) are fine too: rows stay leading."""
        if x.numel() % (self.rows * x.shape[-1]):
            raise ValueError(f"a LoRA layer's input of shape {tuple(x.shape)} cannot be split into {self.rows} rows")
        per_row = x.to(self.groups[0].pairs[0][0].dtype).reshape(self.rows, -1, x.shape[-1])  # (rows, tokens, in)
        if len(self.groups) == 1 and self.groups[0].rows is None:  # one rank, every row: no scatter
            update = lora_update(per_row, *self.groups[0].gathered())
        else:
            out = self.groups[0].pairs[0][1].shape[0]
            update = per_row.new_zeros(self.rows, per_row.shape[1], out)
            for group in self.groups:
                update[group.rows] = lora_update(per_row[group.rows], *group.gathered())
        return update.reshape(*x.shape[:-1], update.shape[-1])


def stack_rows(adapters: Sequence[ParsedAdapter | None], rows: Sequence[int]) -> dict[tuple[int, str], RowLora]:
    """Per (block, module path) that any of `adapters` targets: its LoRA for all rows.

    `adapters[i]` covers `rows[i]` consecutive rows of the batch (a session's batch); None: no adapter."""
    per_row = [adapter for adapter, count in zip(adapters, rows) for _ in range(count)]
    keys = sorted({key for adapter in adapters if adapter is not None for key in adapter.lora})
    stacked = {}
    for key in keys:
        by_rank: dict[int, list[tuple[int, ParsedAdapter]]] = {}
        for row, adapter in enumerate(per_row):
            if adapter is not None and key in adapter.lora:
                by_rank.setdefault(adapter.lora[key][0].shape[0], []).append((row, adapter))
        groups = []
        for members in by_rank.values():
            where = None if len(members) == len(per_row) else torch.tensor([row for row, _ in members])
            groups.append(RankGroup(where, [adapter.lora[key] for _, adapter in members], [adapter.scaling for _, adapter in members]))
        stacked[key] = RowLora(groups, len(per_row))
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
