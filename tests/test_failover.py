"""Failover: servers die mid-generation (SIGKILL of the whole process group, like a lost machine).

The generation must finish with exactly the tokens of an undisturbed run, whether the failure hits
the first step, a middle step or the last one; when the only server of some blocks dies, the
client must fail fast with an error naming them.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, StoppingCriteria

from swarm import AutoDistributedModelForCausalLM, MissingBlocksError
from swarm.client.local_processes import LocalSwarm, ManagedProcess

pytestmark = pytest.mark.timeout(240)
logger = logging.getLogger(__name__)

NEW_TOKENS = 64
PROMPT = torch.tensor([[5, 17, 42, 99, 7, 123, 64, 8]])


def peer_id_of(server: ManagedProcess) -> str:
    return server.wait_for_line("serving blocks").rsplit(" as ", 1)[1].strip()


def kill_machine(server: ManagedProcess) -> None:
    """SIGKILL the server with its DHT process and p2pd: nothing gets to say goodbye."""
    os.killpg(server.pid, signal.SIGKILL)
    server.popen.wait(10)


class AtStep(StoppingCriteria):
    """Calls `action` once, after `step` new tokens exist (generate calls this after each token)."""

    def __init__(self, step: int, action):  # noqa: ANN001
        self.step, self.action, self.count = step, action, 0
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        self.count += 1
        self.stamps.append(time.perf_counter())
        if self.count == self.step:
            self.action()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.fixture
def replicated_swarm(tiny_models):
    """Blocks 0:3 on one server, 3:6 on two; yields (swarm, {peer_id: process} of the 3:6 servers, path)."""
    path = tiny_models["llama"]
    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        servers = swarm.start_servers(path, ["0:3", "3:6", "3:6"], "--num-threads", "1")
        yield swarm, {peer_id_of(server): server for server in servers[1:]}, path
    finally:
        swarm.stop()


@pytest.fixture(scope="module")
def expected_tokens(tiny_models):
    local = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    return local.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)


@pytest.mark.parametrize("fail_at", ["first", "middle", "last"])
def test_generation_survives_a_dying_server(replicated_swarm, expected_tokens, fail_at):
    swarm, replicas, path = replicated_swarm
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, wire_codec="none")
    try:
        with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS) as session:
            victim_peer = session.route[-1].peer_id
            victim = replicas[victim_peer]
            step = {"first": 0, "middle": NEW_TOKENS // 2, "last": NEW_TOKENS - 1}[fail_at]
            if step == 0:
                kill_machine(victim)  # before the prefill: the very first step fails
            clock = AtStep(step, lambda: kill_machine(victim))
            began = time.perf_counter()
            output = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, stopping_criteria=[clock])
            elapsed = time.perf_counter() - began
            assert victim_peer not in {hop.peer_id for hop in session.route}
        gaps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
        logger.warning("failover at %s step: generation %.2f s, slowest step %.3f s, median step %.3f s",
                       fail_at, elapsed, max(gaps), sorted(gaps)[len(gaps) // 2])
        assert torch.equal(output, expected_tokens)
    finally:
        model.swarm_client.shutdown()


def test_losing_the_only_server_of_some_blocks_fails_clearly(replicated_swarm):
    swarm, replicas, path = replicated_swarm
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, route_wait=3, wire_codec="none")
    try:
        with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS):
            for server in replicas.values():
                kill_machine(server)
            began = time.perf_counter()
            with pytest.raises(MissingBlocksError, match="3:6"):
                model.generate(PROMPT, max_new_tokens=8, do_sample=False, eos_token_id=None)
            assert time.perf_counter() - began < 30
    finally:
        model.swarm_client.shutdown()


def test_clean_leave_and_join_are_seen_at_once(replicated_swarm, tiny_models):
    """A server stopped with SIGTERM announces offline: new sessions avoid it without any failure;
    a server that joins is usable as soon as it has announced itself."""
    swarm, replicas, path = replicated_swarm
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, route_wait=5, wire_codec="none")
    try:
        with model.inference_session(max_length=32) as session:
            leaving_peer = session.route[-1].peer_id
        assert replicas[leaving_peer].stop() == 0  # graceful exit after announcing offline
        with model.inference_session(max_length=32) as session:
            assert leaving_peer not in {hop.peer_id for hop in session.route}
        assert not model.swarm_client.bans.banned()  # routed around by the record, not by a failure

        joined = swarm.start_server(path, "0:6", "--num-threads", "1")
        joined_peer = peer_id_of(joined)
        model.swarm_client.allowed_servers = frozenset({joined_peer})
        with model.inference_session(max_length=32) as session:
            assert [hop.peer_id for hop in session.route] == [joined_peer]
    finally:
        model.swarm_client.shutdown()
