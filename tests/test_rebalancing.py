"""Servers with --num-blocks pick their own blocks and move when the swarm needs it (real processes)."""

from __future__ import annotations

import re
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm.client.local_processes import LocalSwarm

pytestmark = pytest.mark.timeout(240)

FIXED = ("--num-threads", "1", "--throughput", "10")
AUTO = ("--num-blocks", "3", "--balance-period", "2", *FIXED)


def served_span(server) -> str:  # noqa: ANN001
    return re.search(r"serving blocks (\d+:\d+)", server.wait_for_line("serving blocks")).group(1)


def test_servers_fill_gaps_and_an_unbalanced_swarm_converges(tiny_models):
    path = tiny_models["llama"]
    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        fixed = swarm.start_server(path, "0:3", *FIXED)
        filler = swarm.start_server(path, None, *AUTO)
        assert served_span(filler) == "3:6"  # the least-served window

        # Unbalance the swarm: a fixed server duplicates 3:6, then the one on 0:3 leaves.
        swarm.start_server(path, "3:6", *FIXED)
        fixed.stop()
        filler.wait_for_line("moving from blocks 3:6 to 0:3", timeout=60)
        time.sleep(8)  # several balance periods: a balanced swarm stays put
        assert filler.output().count("moving from blocks") == 1

        # Clients follow the move: the whole model is served again, with the same results.
        prompt = torch.tensor([[3, 14, 15, 92, 65]])
        local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        remote = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, wire_codec="none")
        try:
            expected = local.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)
            assert torch.equal(remote.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None), expected)
        finally:
            remote.swarm_client.shutdown()
    finally:
        swarm.stop()
