"""Bad command lines get one clear line on stderr and exit code 2, never a traceback, in bounded time.

Real `python -m ...` processes, a few at a time (each spends seconds importing torch and friends),
show what a user sees: stderr, exit code, time. Every further message comes through the same
`main` (which prints any SwarmError as one line) and is checked in-process; the checks behind the
flags are checked as plain functions.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from swarm.errors import ConfigError
from swarm.families import family_of, load_config
from swarm.model_id import model_dht_prefix
from swarm.server import cli as server_cli
from swarm.server.block_loader import load_span_layers
from swarm.server.config import ServerConfig, parse_block_range

pytestmark = pytest.mark.timeout(240)

# A well-formed address of a random peer on a loopback port where nothing listens.
UNREACHABLE = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWLfeu2jMWADXprq3c7D7HeKPYd6WENS2zbDUJqS5NNZkb"
PROCESS_TIMEOUT = 90.0  # seconds: no case may take longer, even with the others running beside it
PARALLEL = max(2, os.cpu_count() or 1)  # the processes mostly import (CPU-bound)
# Besides the error line, stderr may hold only the entry point's own log lines (swarm.cli.logs format).
OWN_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO) swarm[.\w]*: ")


@dataclasses.dataclass
class Finished:
    returncode: int
    stderr: str
    seconds: float


def run(module: str, *args: str) -> Finished:
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
    return Finished(result.returncode, result.stderr, time.monotonic() - began)


def assert_clear_error(result: Finished, program: str, *needles: str) -> None:
    """Exit code 2 and exactly one error line, `{program}: error: ...`, holding every needle."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    error_lines = [line for line in lines if line.startswith(f"{program}: error: ")]
    assert len(error_lines) == 1, result.stderr
    assert all(line in error_lines or OWN_LOG_LINE.match(line) for line in lines), f"noise on stderr:\n{result.stderr}"
    for needle in needles:
        assert needle in error_lines[0], error_lines[0]


# One real process per phase where start-up can fail (flags, model lookup, model contents, joining
# the swarm) and per entry point. id: (module, arguments ({llama}, {busy_port} filled in), words
# the error line must hold)
CASES: dict[str, tuple[str, list[str], list[str]]] = {
    "malformed-multiaddr": ("swarm.server.cli", ["{llama}", "--blocks", "0:3", "--initial-peers", "not-an-address"],
                            ["--initial-peers: 'not-an-address' is not a multiaddress"]),
    "missing-model-path": ("swarm.server.cli", ["/nonexistent/model", "--new-swarm"],
                           ["model path /nonexistent/model does not exist"]),
    "blocks-past-the-end": ("swarm.server.cli", ["{llama}", "--blocks", "0:99", "--new-swarm"],
                            ["--blocks 0:99 is outside the model's 6 blocks"]),
    "unreachable-peer": ("swarm.server.cli", ["{llama}", "--blocks", "0:3", "--initial-peers", UNREACHABLE, "--num-threads", "1"],
                         ["none of the initial peers answered", UNREACHABLE]),
    "dht-malformed-peer": ("swarm.cli.dht", ["--initial-peers", "/ip4/127.0.0.1/tcp/9"],
                           ["--initial-peers: '/ip4/127.0.0.1/tcp/9' has no /p2p/PEER_ID part"]),
    "dht-busy-port": ("swarm.cli.dht", ["--host-maddrs", "/ip4/127.0.0.1/tcp/{busy_port}"],
                      ["could not start the DHT peer: Daemon failed to start: failed to listen", "address already in use"]),
    "health-unreachable-peer": ("swarm.health.cli", ["--initial-peers", UNREACHABLE, "--port", "0"],
                                ["none of the initial peers answered"]),
}
PROGRAMS = {"swarm.server.cli": "swarm-server", "swarm.cli.dht": "swarm-dht", "swarm.health.cli": "swarm-health"}


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Path:
    """Model directories that exist but cannot be loaded."""
    root = tmp_path_factory.mktemp("bad-models")
    config = (tiny_models["llama"] / "config.json").read_text()
    (root / "bad-config").mkdir()
    (root / "bad-config" / "config.json").write_text("{not json")
    (root / "bad-config" / "model.safetensors").write_bytes(b"")
    for name, weights in (("empty-weights", b""), ("corrupt-weights", (12).to_bytes(8, "little") + b"{not a header")):
        (root / name).mkdir()
        (root / name / "config.json").write_text(config)
        (root / name / "model.safetensors").write_bytes(weights)  # an interrupted download, a damaged file
    return root


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


@pytest.fixture(scope="module")
def finished(tiny_models, busy_port) -> dict[str, Finished]:
    """Every case's finished process, by case id."""
    fill = {"{llama}": str(tiny_models["llama"]), "{busy_port}": str(busy_port)}

    def start(module: str, args: list[str]) -> Finished:
        for placeholder, value in fill.items():
            args = [arg.replace(placeholder, value) for arg in args]
        return run(module, *args)

    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = {case: pool.submit(start, module, args) for case, (module, args, _) in CASES.items()}
        return {case: future.result() for case, future in futures.items()}


@pytest.mark.parametrize("case", CASES)
def test_bad_command_line(finished, case):
    module, _, needles = CASES[case]
    assert_clear_error(finished[case], PROGRAMS[module], *needles)
    assert finished[case].seconds < PROCESS_TIMEOUT


def test_unreachable_peers_fail_in_bounded_time():
    """Alone on the machine: a closed port, and a port that accepts connections but never answers."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        peer_id = UNREACHABLE.rsplit("/", 1)[1]
        for maddr in (UNREACHABLE, f"/ip4/127.0.0.1/tcp/{silent.getsockname()[1]}/p2p/{peer_id}"):
            result = run("swarm.cli.dht", "--initial-peers", maddr)
            assert_clear_error(result, "swarm-dht", "none of the initial peers answered", maddr)
            assert result.seconds < 30, f"{maddr}: {result.seconds:.1f} s"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["no-such-model", "--new-swarm"], "unknown model 'no-such-model': not a directory and not an alias (known aliases: smollm2)"),
        (["{tmp}/bad-config", "--new-swarm"], "cannot read the model config in"),
        (["{llama}", "--blocks", "3-5", "--new-swarm"], "--blocks must look like START:END (e.g. 0:6), got '3-5'"),
        (["{llama}", "--num-blocks", "99", "--new-swarm"], "--num-blocks 99 is more than the model's 6 blocks"),
        (["{llama}", "--blocks", "0:3", "--new-swarm", "--dht-prefix", "a.b"], "--dht-prefix 'a.b' must be"),
        (["{llama}", "--blocks", "0:3", "--device", "cuda:x", "--new-swarm"], "--device 'cuda:x' is not a torch device"),
    ],
)
def test_more_server_errors_in_process(tiny_models, bad_models, capsys, args, needle):
    """More errors of swarm-server's start-up, through its `main` in this process."""
    fill = {"{llama}": str(tiny_models["llama"]), "{tmp}": str(bad_models)}
    for placeholder, value in fill.items():
        args = [arg.replace(placeholder, value) for arg in args]
    with pytest.raises(SystemExit) as exited:
        server_cli.main(args)
    assert exited.value.code == 2
    assert_clear_error(Finished(2, capsys.readouterr().err, 0.0), "swarm-server", needle)


# ---- the checks behind the flags ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("a:b", "--blocks must look like START:END (e.g. 0:6), got 'a:b'"),
        ("0:3:5", "--blocks must look like START:END"),
        ("", "--blocks must look like START:END"),
        ("4:2", "--blocks 4:2 is outside the model's 6 blocks"),
        ("3:3", "--blocks 3:3 is outside the model's 6 blocks"),
        ("-1:3", "--blocks -1:3 is outside the model's 6 blocks"),
    ],
)
def test_block_range_errors(text, needle):
    with pytest.raises(ConfigError) as raised:
        parse_block_range(text, 6)
    assert needle in str(raised.value)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({}, "pass --initial-peers MADDR... to join a swarm, or --new-swarm to start one"),
        ({"new_swarm": True, "initial_peers": [UNREACHABLE]}, "do not pass --initial-peers with it"),
        ({"new_swarm": True, "blocks": "0:3", "num_blocks": 3}, "pass either --blocks or --num-blocks"),
        ({"new_swarm": True, "max_tokens_per_request": 0}, "--max-tokens-per-request must be positive"),
        ({"initial_peers": ["/ip4/127.0.0.1/tcp/9/p2p/Qm"]}, "--initial-peers: '/ip4/127.0.0.1/tcp/9/p2p/Qm' is not a multiaddress"),
        ({"initial_peers": ["/ip4/127.0.0.1/tcp/9"]}, "--initial-peers: '/ip4/127.0.0.1/tcp/9' has no /p2p/PEER_ID part"),
        ({"new_swarm": True, "host_maddrs": ["/ip4/127.0.0.1/tcp/x"]}, "--host-maddrs: '/ip4/127.0.0.1/tcp/x' is not a multiaddress"),
        ({"new_swarm": True, "announce_maddrs": ["1.2.3.4:5"]}, "--announce-maddrs: '1.2.3.4:5' is not a multiaddress"),
    ],
)
def test_server_config_errors(fields, needle):
    """Flags that are wrong by themselves fail when the config is built, before any model is loaded."""
    with pytest.raises(ConfigError) as raised:
        ServerConfig(model="unused", **fields)
    assert needle in str(raised.value)


def test_empty_weights_file_is_a_config_error(bad_models):
    with pytest.raises(ConfigError, match="model.safetensors"):
        model_dht_prefix(bad_models / "empty-weights")


def test_corrupt_weights_file_is_a_config_error(bad_models):
    path = bad_models / "corrupt-weights"
    config = load_config(path)
    with pytest.raises(ConfigError, match="model.safetensors"):
        load_span_layers(path, config, family_of(config), 0, 1, torch.float32)
