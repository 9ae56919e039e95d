"""The health page against a real swarm: one model fully served, one with a gap, a hostile name."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from swarm.client.local_processes import LocalSwarm

pytestmark = pytest.mark.timeout(300)
HOSTILE = "<script>alert(1)</script>"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def health_swarm(tiny_models):
    """(URL of the health page, [llama 0:3, llama 3:6, qwen3 0:3] server processes)."""
    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        swarm.start_server(tiny_models["llama"], "0:3", "--num-threads", "1", "--public-name", "alice", wait=False)
        swarm.start_server(tiny_models["llama"], "3:6", "--num-threads", "1", "--public-name", HOSTILE, wait=False)
        swarm.start_server(tiny_models["qwen3"], "0:3", "--num-threads", "1", wait=False)
        for server in swarm.processes[1:]:
            server.wait_for_line("serving blocks")
        servers = swarm.processes[1:]
        yield swarm.start_health(free_port(), "--refresh-period", "1"), servers
    finally:
        swarm.stop()


@pytest.fixture
def health(health_swarm) -> str:
    return health_swarm[0]


def fetch(url: str) -> str:
    return urllib.request.urlopen(url, timeout=30).read().decode()


def test_state_json(health):
    state = json.loads(fetch(health + "api/v1/state?refresh=1"))
    models = {model["model_type"]: model for model in state["models"]}
    assert set(models) == {"llama", "qwen3"}
    assert models["llama"]["healthy"] and models["llama"]["replicas"] == [1] * 6
    assert not models["qwen3"]["healthy"] and models["qwen3"]["missing"] == [[3, 6]]
    names = {server["public_name"] for server in models["llama"]["servers"]}
    assert names == {"alice", HOSTILE}
    assert all(server["state"] == "online" and server["throughput"] > 0 for server in models["llama"]["servers"])
    assert all(server["probe_ms"] is not None for server in models["llama"]["servers"])


def test_metrics(health):
    text = fetch(health + "metrics")
    prefix = next(line for line in text.splitlines() if line.startswith("swarm_blocks{") and "qwen3" in line)
    model = prefix.split('"')[1]
    assert f'swarm_blocks_covered{{model="{model}"}} 3' in text
    assert f'swarm_healthy{{model="{model}"}} 0' in text
    assert 'state="online"} 2' in text  # llama's two servers
    assert "swarm_server_versions{" in text


def test_page_escapes_and_404(health):
    html = fetch(health)
    assert HOSTILE not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    with pytest.raises(urllib.error.HTTPError) as error:
        fetch(health + "nope")
    assert error.value.code == 404


def test_page_in_a_real_browser(health, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,900"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", health], capture_output=True, text=True, timeout=120).stdout
    assert "healthy" in dom and "blocks missing" in dom and "Nobody serves blocks 3:6" in dom
    assert dom.count('class="server-row"') == 3 and "no answer" not in dom
    assert "alice" in dom and "<script>alert(1)</script>" not in dom
    screenshot = tmp_path / "health.png"
    subprocess.run([chromium, *flags, f"--screenshot={screenshot}", health], capture_output=True, timeout=120)
    assert screenshot.stat().st_size > 10_000
    shutil.copy(screenshot, os.environ.get("SWARM_SCREENSHOT", tmp_path / "health-copy.png"))


def test_a_server_that_stops_answering_shows_as_such(health_swarm):
    """Last in this module: it kills the qwen3 server like a lost machine (its record stays online)."""
    health, servers = health_swarm
    victim = servers[2]
    os.killpg(victim.pid, signal.SIGKILL)
    victim.popen.wait(10)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = json.loads(fetch(health + "api/v1/state?refresh=1"))
        qwen3 = next(model for model in state["models"] if model["model_type"] == "qwen3")
        if qwen3["servers"] and qwen3["servers"][0]["probe_ms"] is None:
            break
        time.sleep(1)
    assert qwen3["servers"][0]["probe_ms"] is None
    assert "no answer" in fetch(health)
