"""Bad command lines get one clear line on stderr and exit code 2, never a traceback, in bounded time."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)

UNREACHABLE = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWLfeu2jMWADXprq3c7D7HeKPYd6WENS2zbDUJqS5NNZkb"


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=90)


def assert_clear_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, result.stderr
    for needle in needles:
        assert needle in error_lines[0], error_lines[0]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["/nonexistent/model", "--new-swarm"], ["/nonexistent/model does not exist"]),
        (["no-such-model", "--new-swarm"], ["unknown model 'no-such-model'", "smollm2"]),
        (["{llama}", "--blocks", "3-5", "--new-swarm"], ["--blocks must look like START:END"]),
        (["{llama}", "--blocks", "0:99", "--new-swarm"], ["outside the model's 6 blocks"]),
        (["{llama}", "--blocks", "4:2", "--new-swarm"], ["outside the model's 6 blocks"]),
        (["{llama}", "--num-blocks", "99", "--new-swarm"], ["--num-blocks 99"]),
        (["{llama}", "--blocks", "0:3"], ["--initial-peers", "--new-swarm"]),
        (["{llama}", "--blocks", "0:3", "--initial-peers", "not-an-address"], ["'not-an-address' is not a multiaddress"]),
        (["{llama}", "--blocks", "0:3", "--initial-peers", UNREACHABLE, "--num-threads", "1"], ["none of the initial peers answered"]),
        (["{llama}", "--blocks", "0:3", "--new-swarm", "--dht-prefix", "a.b"], ["--dht-prefix 'a.b'"]),
    ],
)
def test_server_cli_errors(tiny_models, args, needles):
    args = [arg.replace("{llama}", str(tiny_models["llama"])) for arg in args]
    assert_clear_error(run("swarm.server.cli", *args), *needles)


def test_unreadable_model_directory(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert_clear_error(run("swarm.server.cli", str(tmp_path), "--new-swarm"), "cannot read the model config")


def test_dht_cli_errors():
    assert_clear_error(run("swarm.cli.dht", "--initial-peers", UNREACHABLE), "none of the initial peers answered")
    assert_clear_error(run("swarm.cli.dht", "--host-maddrs", "nowhere"), "'nowhere' is not a multiaddress")


def test_health_cli_unreachable_dht():
    assert_clear_error(run("swarm.health.cli", "--initial-peers", UNREACHABLE, "--port", "0"), "none of the initial peers answered")
