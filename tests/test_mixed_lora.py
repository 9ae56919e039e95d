"""The per-row LoRA correction of a merged step (server/mixed_lora.py) against peft's mixed-batch
forward (`LoraLayer._mixed_batch_forward`, what `model(..., adapter_names=[...])` runs), on random
tensors: adapters of different ranks (one with rsLoRA), one that skips a layer, rows without one."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from swarm.adapter_manifest import lora_scaling
from swarm.server.adapters import ParsedAdapter
from swarm.server.mixed_lora import stack_rows

IN, OUT = 24, 40
CONFIGS = {  # name: (rank, alpha, rsLoRA, target modules)
    "a": (2, 4.0, False, ["q", "v"]),
    "b": (6, 3.0, True, ["q"]),  # does not touch v
    "c": (16, 8.0, False, ["q", "v"]),
}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(IN, OUT)
        self.v = nn.Linear(IN, OUT, bias=False)


@pytest.fixture(scope="module")
def peft_block() -> nn.Module:
    torch.manual_seed(0)
    block = Block()
    for name, (rank, alpha, rslora, targets) in CONFIGS.items():
        config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=targets, init_lora_weights=False)
        block = inject_adapter_in_model(config, block, adapter_name=name)
    return block.eval()


def parsed(block: nn.Module, name: str) -> ParsedAdapter:
    """Adapter `name` of the peft block as a held adapter of block 0 (what adapter_store.py hands the server)."""
    rank, alpha, rslora, targets = CONFIGS[name]
    lora = {(0, path): (getattr(block, path).lora_A[name].weight.detach(), getattr(block, path).lora_B[name].weight.detach())
            for path in targets}
    scaling = lora_scaling(alpha, rank, rslora)
    assert scaling == getattr(block, targets[0]).scaling[name]  # the one formula agrees with peft's
    return ParsedAdapter(scaling, 0.0, lora, {}, None, frozen=True)


@pytest.mark.parametrize("flatten", [False, True])
def test_per_row_correction_equals_peft_mixed_batch(peft_block, flatten):
    steps = ["a", None, "b", "c", "a"]  # session adapters, in batch order
    rows = [2, 1, 1, 3, 1]  # each session's batch
    names = [name or "__base__" for name, count in zip(steps, rows) for _ in range(count)]
    adapters = {name: parsed(peft_block, name) for name in CONFIGS}
    stacked = stack_rows([adapters[name] if name else None for name in steps], rows)
    assert set(stacked) == {(0, "q"), (0, "v")}
    assert sorted(len(group.pairs) for group in stacked[(0, "q")].groups) == [1, 3, 3]  # rows grouped by rank (2, 6, 16)
    x = torch.randn(sum(rows), 3, IN)
    for path in ("q", "v"):
        layer = getattr(peft_block, path)
        with torch.no_grad():
            expected = layer._mixed_batch_forward(x, adapter_names=names)
            base = layer.base_layer(x)
            flat = x.reshape(-1, IN) if flatten else x  # a layer fed (rows * tokens, in), as a MoE router is
            got = base + stacked[(0, path)].correction(flat).reshape(base.shape)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        plain = [index for index, name in enumerate(names) if name == "__base__" or (path == "v" and name == "b")]
        assert torch.equal(got[plain], base[plain])  # rows without this layer's adapter: exactly the base output
        assert not torch.allclose(got, base)


def test_rows_that_do_not_split_are_refused(peft_block):
    stacked = stack_rows([parsed(peft_block, "a"), None], [2, 1])
    with pytest.raises(ValueError, match="cannot be split into 3 rows"):
        stacked[(0, "q")].correction(torch.randn(4, IN))
