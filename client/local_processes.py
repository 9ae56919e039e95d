"""Starting swarm-dht and swarm-server processes on this machine, and reaping them.

Used by swarm-local and by the tests; it launches the servers as separate programs and never
imports their code.

Each process runs in its own session (process group), so that killing it by its pid also takes
down hivemind's DHT child process and p2pd daemon, which SIGKILL would otherwise orphan.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

READY_TIMEOUT = 120.0  # seconds: a server loads its blocks and joins the DHT

# Processes that share this machine's cores must not spin-wait: OpenMP threads that busy-wait after
# each kernel steal the cores from the next server in the chain. Measured with
# scripts/bench_inference.py (default model, 2 servers): swarm/local per-token 1.35 spinning, 1.06 passive.
SHARED_CORES_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


class ManagedProcess:
    """A child process whose output lines are collected by a thread, so that its pipe never blocks."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        self.args = args
        self.popen = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env={**os.environ, "SWARM_LOG_LEVEL": "INFO", **(env or {})},
        )
        self.lines: list[str] = []
        self._new_line = threading.Condition()
        threading.Thread(target=self._collect, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _collect(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._new_line:
                self.lines.append(line.rstrip("\n"))
                self._new_line.notify_all()
        with self._new_line:
            self._new_line.notify_all()

    def wait_for_line(self, needle: str, timeout: float = READY_TIMEOUT) -> str:
        """The first output line containing `needle`; fails if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        with self._new_line:
            while True:
                for line in self.lines:
                    if needle in line:
                        return line
                if self.popen.poll() is not None and not any(needle in line for line in self.lines):
                    raise RuntimeError(f"{self.args[2]} exited ({self.popen.returncode}):\n" + "\n".join(self.lines[-30:]))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no line with {needle!r} within {timeout} s:\n" + "\n".join(self.lines[-30:]))
                self._new_line.wait(min(remaining, 0.5))

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal the process (it shuts down its own children), wait, then SIGKILL its whole group.

        Only the main process gets `sig`: signalling the group would kill hivemind's DHT process
        under a server that is still announcing itself offline through it.
        """
        try:
            os.kill(self.pid, sig)
            self.popen.wait(timeout)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            return self.popen.wait(5)
        except subprocess.TimeoutExpired:
            return None


class LocalSwarm:
    """A DHT and servers on loopback; `stop()` reaps every process it started."""

    def __init__(self, server_env: dict[str, str] | None = None) -> None:
        self.processes: list[ManagedProcess] = []
        self.initial_peers: list[str] = []
        self.server_env = {**SHARED_CORES_ENV, **(server_env or {})}

    def start_dht(self) -> list[str]:
        dht = ManagedProcess([sys.executable, "-m", "swarm.cli.dht"])
        self.processes.append(dht)
        line = dht.wait_for_line("--initial-peers ")
        self.initial_peers = line.split("--initial-peers ", 1)[1].split()
        return self.initial_peers

    def start_server(self, model: str | Path, blocks: str | None, *extra: str, wait: bool = True) -> ManagedProcess:
        """A server for `blocks` of `model` (None: pass --num-blocks in `extra`); with `wait`, returns once announced."""
        span = ["--blocks", blocks] if blocks is not None else []
        args = [sys.executable, "-m", "swarm.server.cli", str(model), *span, "--initial-peers", *self.initial_peers, *extra]
        server = ManagedProcess(args, env=self.server_env)
        self.processes.append(server)
        if wait:
            server.wait_for_line("serving blocks")
        return server

    def start_servers(self, model: str | Path, ranges: list[str], *extra: str) -> list[ManagedProcess]:
        """Start one server per block range at once, then wait until all of them are announced."""
        servers = [self.start_server(model, blocks, *extra, wait=False) for blocks in ranges]
        for server in servers:
            server.wait_for_line("serving blocks")
        return servers

    def start_health(self, port: int, *extra: str) -> str:
        """swarm-health on 127.0.0.1:`port`; returns the page's URL once it serves."""
        health = ManagedProcess([sys.executable, "-m", "swarm.health.cli", "--initial-peers", *self.initial_peers,
                                 "--port", str(port), *extra])
        self.processes.append(health)
        health.wait_for_line("health page at")
        url = f"http://127.0.0.1:{port}/"
        _wait_until_serving(health, url + "metrics", "swarm-health")
        return url

    def start_api(self, model: str | Path, model_name: str, port: int) -> str:
        """swarm-api on 127.0.0.1:`port` serving `model` as `model_name`; returns its base URL once it answers."""
        api = ManagedProcess([sys.executable, "-m", "swarm.client.api_cli", str(model), "--model-name", model_name,
                              "--initial-peers", *self.initial_peers, "--port", str(port)])
        self.processes.append(api)
        api.wait_for_line("OpenAI-compatible API at")
        url = f"http://127.0.0.1:{port}/v1"
        _wait_until_serving(api, url + "/models", "swarm-api")
        return url

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()


def _wait_until_serving(process: ManagedProcess, url: str, program: str) -> None:
    """Return once `url` answers: uvicorn binds just after the program logs that it serves."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return
        except OSError:
            if time.monotonic() > deadline or process.popen.poll() is not None:
                raise RuntimeError(f"{program} did not start:\n" + process.output()) from None
            time.sleep(0.2)
