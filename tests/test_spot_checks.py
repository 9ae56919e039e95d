"""Spot checks catch a server that returns wrong activations, and the generation still ends right.

Three servers hold every block of the tiny Llama; one of them (tests/lying_server.py) perturbs
everything it computes, with well-formed replies. With `verify_fraction=1.0` every step and forward
hop is re-run elsewhere: whichever role the liar has (the session's server, or a verifier), two
honest servers outvote it, it is banned for good, and the tokens and logits equal local ones.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm.client.local_processes import SHARED_CORES_ENV, LocalSwarm, ManagedProcess

pytestmark = pytest.mark.timeout(240)


def peer_id_of(server: ManagedProcess) -> str:
    return server.wait_for_line("serving blocks").rsplit(" as ", 1)[1].strip()


@pytest.fixture(scope="module")
def swarm_with_a_liar(tiny_models) -> Iterator[tuple[LocalSwarm, str, object]]:
    """(swarm, the liar's peer id, model path): two honest servers and one liar, each on blocks 0:6."""
    path = tiny_models["llama"]
    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        swarm.start_servers(path, ["0:6", "0:6"], "--num-threads", "1")
        liar = ManagedProcess(
            [sys.executable, "-m", "tests.lying_server", str(path), "--blocks", "0:6", "--num-threads", "1",
             "--initial-peers", *swarm.initial_peers],
            env=SHARED_CORES_ENV,
        )
        swarm.processes.append(liar)
        yield swarm, peer_id_of(liar), path
    finally:
        swarm.stop()


def test_a_lying_server_is_caught_and_generation_ends_right(swarm_with_a_liar):
    swarm, liar, path = swarm_with_a_liar
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    remote = AutoDistributedModelForCausalLM.from_pretrained(
        path, initial_peers=swarm.initial_peers, wire_codec="none", verify_fraction=1.0
    )
    try:
        prompt = torch.tensor([[4, 8, 15, 16, 23, 42]])
        # The liar serves the session (then the first check catches it) or verifies some of the 12 steps.
        produced = remote.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
        assert torch.equal(produced, local.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None))
        checker = remote.swarm_client.spot_checker
        assert checker.liars == {liar} and checker.checks > 0
        assert liar in remote.swarm_client.bans.banned()

        with torch.no_grad():  # later work never touches the liar again, verified or not
            torch.testing.assert_close(remote(prompt).logits, local(prompt).logits, atol=1e-4, rtol=0)
        assert checker.liars == {liar}
    finally:
        remote.swarm_client.shutdown()


def test_forward_hops_are_verified_too(swarm_with_a_liar):
    swarm, liar, path = swarm_with_a_liar
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    remote = AutoDistributedModelForCausalLM.from_pretrained(
        path, initial_peers=swarm.initial_peers, wire_codec="none", verify_fraction=1.0
    )
    try:
        ids = torch.randint(3, 211, (2, 7), generator=torch.Generator().manual_seed(6))
        # Routes are drawn by throughput: in each forward the liar computes or verifies with chance 2/3,
        # so it goes unnoticed through 10 of them with chance (1/3)^10.
        for _ in range(10):
            with torch.no_grad():
                torch.testing.assert_close(remote(ids).logits, local(ids).logits, atol=1e-4, rtol=0)
        assert remote.swarm_client.spot_checker.liars == {liar}
    finally:
        remote.swarm_client.shutdown()
