"""A swarm-server that lies: every span it computes comes back perturbed (for the spot-check tests).

Run as `python -m tests.lying_server MODEL --blocks A:B ...` (the arguments of swarm-server). Its
replies are well-formed, so only a comparison with honest servers can catch it.
"""

from __future__ import annotations

import torch

from swarm.server import cli
from swarm.server.span_runner import SpanRunner

_honest_forward = SpanRunner.forward


def _lying_forward(self: SpanRunner, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    output = _honest_forward(self, hidden_states, *args, **kwargs)
    return output * 1.5 + 0.5  # plausible magnitude, wrong values


if __name__ == "__main__":
    SpanRunner.forward = _lying_forward  # type: ignore[method-assign]
    cli.main()
