"""A stopping criterion that timestamps each pass of generate(), shared by the benchmark scripts."""

from __future__ import annotations

import time

import torch
from transformers import StoppingCriteria


class TokenClock(StoppingCriteria):
    """Records when each new token is ready (generate calls this once per step); never stops."""

    def __init__(self) -> None:
        self.stamps: list[float] = []  # one per pass through the model (assisted decoding: several tokens each)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)
