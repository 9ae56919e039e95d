"""Measuring how fast this machine runs one block, once per model, dtype, quantization and device.

Both figures are per block, so they hold for any span: `inference_rps`, single-token decode steps
per second (what an inference route waits on), and `forward_tps`, tokens per second of a batched
forward (what placement balances). The measurement runs one decoder layer with random weights
of the model's shape, so it can happen before the server has chosen its blocks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache, PretrainedConfig

from swarm.families import ModelFamily
from swarm.server.quantization import quantize_linear_layers
from swarm.server.span_runner import SpanRunner

logger = logging.getLogger(__name__)

DECODE_CONTEXT = 128  # tokens in the cache while timing decode steps
DECODE_STEPS = 16
FORWARD_TOKENS = 256  # one sequence of this length per timed forward
FORWARD_REPEATS = 3


@dataclasses.dataclass(frozen=True)
class Throughput:
    inference_rps: float  # decode steps/s through one block
    forward_tps: float  # tokens/s of batched forward through one block


def cache_path() -> Path:
    root = Path(os.environ.get("SWARM_CACHE_DIR", Path.home() / ".cache" / "swarm"))
    return root / "throughput.json"


def get_throughput(config: PretrainedConfig, family: ModelFamily, dtype: torch.dtype, quant_type: str,
                   device: torch.device, cache_key: str) -> Throughput:
    """The cached figure for `cache_key` (model, dtype, quantization, device, threads), else measure it."""
    path = cache_path()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached.get(cache_key), dict):
        try:
            found = Throughput(**cached[cache_key])
            logger.info("throughput from cache: %.1f decode steps/s, %.0f forward tokens/s per block", found.inference_rps, found.forward_tps)
            return found
        except TypeError:
            pass
    measured = measure_throughput(config, family, dtype, device, quant_type)
    cached[cache_key] = dataclasses.asdict(measured)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cached, indent=1))
    tmp.replace(path)
    return measured


def measure_throughput(
    config: PretrainedConfig, family: ModelFamily, dtype: torch.dtype, device: torch.device, quant_type: str = "none"
) -> Throughput:
    began = time.perf_counter()
    layer = family.layer_class(config)(config, layer_idx=0).to(device=device, dtype=dtype).eval()
    layer = quantize_linear_layers(layer, quant_type, dtype)
    runner = SpanRunner(config, family, 0, torch.nn.ModuleList([layer])).to(device)
    hidden = config.hidden_size
    cache = DynamicCache()
    runner(torch.randn(1, DECODE_CONTEXT, hidden, device=device), 0, 1, position=0, cache=cache)
    step_times = []
    for step in range(DECODE_STEPS):
        started = time.perf_counter()
        runner(torch.randn(1, 1, hidden, device=device), 0, 1, position=DECODE_CONTEXT + step, cache=cache)
        _synchronize(device)
        step_times.append(time.perf_counter() - started)
    forward_times = []
    for _ in range(FORWARD_REPEATS):
        started = time.perf_counter()
        runner(torch.randn(1, FORWARD_TOKENS, hidden, device=device), 0, 1)
        _synchronize(device)
        forward_times.append(time.perf_counter() - started)
    result = Throughput(1.0 / statistics.median(step_times), FORWARD_TOKENS / statistics.median(forward_times))
    logger.info("measured throughput in %.1f s: %.1f decode steps/s, %.0f forward tokens/s per block",
                time.perf_counter() - began, result.inference_rps, result.forward_tps)
    return result


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
