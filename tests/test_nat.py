"""Behind NAT: a server that no other host can dial serves a client through a relay, with exact parity.

Two network namespaces joined by a veth pair (nothing of the host's own network is touched):

    public (11.77.0.1): swarm-dht (the relay), a public server for blocks 0:3, the client, swarm-health
    home   (11.77.0.2): a server for blocks 3:6 that can connect out but accepts no connection

"home" drops every TCP SYN without ACK that arrives (and all UDP): a stateless firewall made of
tc filters, as this machine has no iptables/nft. The addresses are public-looking on purpose: go-libp2p's
autorelay announces no relayed address through a relay whose address is private (RFC 1918), so a
10.x test would prove nothing about the internet. The namespaces have no route anywhere else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm.cli.dataclass_args import add_dataclass_arguments, config_from_namespace
from swarm.client.local_processes import SHARED_CORES_ENV, ManagedProcess
from swarm.dht import P2P  # with swarm.dht's patch of its p2pd arguments
from swarm.client.event_loop import run_sync
from swarm.reachability import CHECK_TIMEOUT, DIAL_BACK_TIMEOUT, _ip_of, _valid_maddrs, check_reachability
from swarm.transport import call_unary, listen_maddrs, start_p2p
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.rpc import RPC_REACHABILITY
from swarm.server.config import ServerConfig

pytestmark = pytest.mark.timeout(180)

PUBLIC_IP, HOME_IP = "11.77.0.1", "11.77.0.2"
CLIENT_TIMEOUT = 90.0  # seconds for the client to load, route, compute and print
HEALTH_PORT = 8000  # inside the public namespace, where nothing else listens


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@contextlib.contextmanager
def nat_namespaces() -> Iterator[tuple[str, str]]:
    """(public, home) namespace names; deleted on exit with every process still inside them."""
    suffix = str(os.getpid())
    public, home = f"swnat-pub-{suffix}", f"swnat-home-{suffix}"
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    try:
        _ip("netns", "add", public)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot create a network namespace: {getattr(e, 'stderr', None) or e}")
    try:
        _ip("netns", "add", home)
        _ip("link", "add", "pub0", "netns", public, "type", "veth", "peer", "name", "home0", "netns", home)
        for namespace, device, address in ((public, "pub0", PUBLIC_IP), (home, "home0", HOME_IP)):
            _ip("-n", namespace, "link", "set", "lo", "up")
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", device)
            _ip("-n", namespace, "link", "set", device, "up")
        _drop_inbound_connections(home, "home0")
        yield public, home
    finally:
        for namespace in (public, home):
            _kill_everything_in(namespace)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)


def _drop_inbound_connections(namespace: str, device: str) -> None:
    """Make `namespace` undialable: drop arriving SYNs (not SYN-ACKs), TCP with IP options, and UDP.

    Without the gact module, "drop" is a redirect into a veth pair whose far end discards everything.
    """
    _ip("-n", namespace, "link", "add", "sink0", "type", "veth", "peer", "name", "sink1")
    _ip("-n", namespace, "link", "set", "sink0", "up")
    _ip("-n", namespace, "link", "set", "sink1", "up")
    tc = ["ip", "netns", "exec", namespace, "tc"]
    subprocess.run([*tc, "qdisc", "add", "dev", device, "ingress"], check=True, capture_output=True, timeout=10)
    sink = ["action", "mirred", "egress", "redirect", "dev", "sink0"]
    tcp_ihl5 = ["match", "ip", "protocol", "6", "0xff", "match", "u8", "0x05", "0x0f", "at", "0"]
    rules = [tcp_ihl5 + ["match", "u8", "0x02", "0x12", "at", "33"]]  # flags byte: SYN set, ACK clear
    rules += [["match", "ip", "protocol", "6", "0xff", "match", "u8", str(ihl), "0x0f", "at", "0"] for ihl in range(6, 16)]
    rules += [["match", "ip", "protocol", "17", "0xff"]]
    for rule in rules:
        filter_ = [*tc, "filter", "add", "dev", device, "parent", "ffff:", "protocol", "ip", "prio", "1", "u32", *rule, *sink]
        subprocess.run(filter_, check=True, capture_output=True, timeout=10)


def _kill_everything_in(namespace: str) -> None:
    """SIGKILL the processes left in a namespace this test created (all of them were started by it)."""
    found = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=10)
    for pid in found.stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), 9)


def _in(namespace: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", namespace, sys.executable, "-m", *args]


_FETCH = """
import sys, time, urllib.request
for attempt in range(100):  # uvicorn binds just after the "health page at" line
    try:
        print(urllib.request.urlopen(sys.argv[1], timeout=20).read().decode())
        break
    except OSError:
        time.sleep(0.2)
"""


def _fetch(namespace: str, url: str) -> str:
    """GET `url` from inside `namespace` (the test process is outside it)."""
    command = ["ip", "netns", "exec", namespace, sys.executable, "-c", _FETCH, url]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout


def test_server_behind_nat_serves_through_relay_with_parity(tiny_models):
    path = tiny_models["llama"]
    input_ids = torch.randint(3, 211, (2, 7), generator=torch.Generator().manual_seed(5))  # (batch, seq)
    with nat_namespaces() as (public, home):
        processes: list[ManagedProcess] = []
        try:
            dht = ManagedProcess(_in(public, "swarm.cli.dht", "--host-maddrs", f"/ip4/{PUBLIC_IP}/tcp/0"))
            processes.append(dht)
            peers = dht.wait_for_line("--initial-peers ").split("--initial-peers ", 1)[1].split()
            server_args = ["--num-threads", "1", "--initial-peers", *peers]
            behind_nat = ManagedProcess(
                _in(home, "swarm.server.cli", str(path), "--blocks", "3:6", "--host-maddrs", f"/ip4/{HOME_IP}/tcp/0", *server_args),
                env=SHARED_CORES_ENV,
            )
            public_server = ManagedProcess(
                _in(public, "swarm.server.cli", str(path), "--blocks", "0:3", "--host-maddrs", f"/ip4/{PUBLIC_IP}/tcp/0", *server_args),
                env=SHARED_CORES_ENV,
            )
            processes += [behind_nat, public_server]
            behind_nat.wait_for_line("reachability: relay")
            public_server.wait_for_line("reachability: direct")
            nat_id = behind_nat.wait_for_line("serving blocks").rsplit(" as ", 1)[1].strip()
            public_server.wait_for_line("serving blocks")

            client = ManagedProcess(_in(public, "tests.nat_client", str(path), json.dumps(input_ids.tolist()), "12", *peers))
            health = ManagedProcess(_in(public, "swarm.health.cli", "--initial-peers", *peers, "--port", str(HEALTH_PORT)))
            processes += [client, health]
            client.popen.wait(CLIENT_TIMEOUT)
            lines = [line for line in client.lines if line.startswith("{")]
            assert client.popen.returncode == 0 and lines, client.output()[-3000:]
            result = json.loads(lines[-1])
            health.wait_for_line("health page at")
            state = json.loads(_fetch(public, f"http://127.0.0.1:{HEALTH_PORT}/api/v1/state?refresh=1"))
            page = _fetch(public, f"http://127.0.0.1:{HEALTH_PORT}/")
        finally:  # before the namespaces go: each process gets SIGTERM and time to leave cleanly
            for process in reversed(processes):
                process.stop()

    assert result["reachability"][nat_id] == "relay"
    assert set(result["reachability"].values()) == {"relay", "direct"}
    assert result["connections"][nat_id] and all("/p2p-circuit" in maddr for maddr in result["connections"][nat_id])
    servers = {server["peer_id"]: server for model in state["models"] for server in model["servers"]}
    assert servers[nat_id]["reachability"] == "relay" and servers[nat_id]["probe_ms"] is not None  # probed through the relay
    assert "<td>relay</td>" in page and "<td>direct</td>" in page

    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(result["logits"]), local(input_ids).logits, atol=1e-4, rtol=0)
    expected = local.generate(input_ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert torch.equal(torch.tensor(result["tokens"]), expected)


def test_relay_flags_and_static_relays():
    """--relay is on by default and --no-relay turns it off; trusted relays switch p2pd's relay discovery off."""
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, ServerConfig)
    assert config_from_namespace(ServerConfig, parser.parse_args(["smollm2", "--new-swarm"])).relay is True
    assert config_from_namespace(ServerConfig, parser.parse_args(["smollm2", "--new-swarm", "--no-relay"])).relay is False
    assert "-relayDiscovery=0" in P2P._make_process_args("p2pd", autoRelay=True, trustedRelays="/ip4/1.2.3.4/tcp/1/p2p/Qm")
    assert not any("relayDiscovery" in arg for arg in P2P._make_process_args("p2pd", autoRelay=False))


def test_dial_back_targets_only_valid_direct_addresses():
    assert _ip_of("/ip4/11.77.0.2/tcp/4001") == "11.77.0.2" and _ip_of("/ip6/::1/tcp/1") == "::1"
    assert _ip_of("/dns/example.com/tcp/1") is None and _ip_of("/ip4/999.1.1.1/tcp/1") is None
    given = ["/ip4/1.2.3.4/tcp/1", "/ip4/1.2.3.4/udp/1/quic", "/ip4/1.2.3.4/tcp/1/p2p/Qm/p2p-circuit", "garbage"]
    assert _valid_maddrs(given + ["/ip4/1.2.3.4/tcp/2"] * 20) == ["/ip4/1.2.3.4/tcp/1"] + ["/ip4/1.2.3.4/tcp/2"] * 4


def test_dial_back_reaches_caller_only_at_its_own_ip(local_swarm):
    """swarm-dht dials a caller back at the IP it connects from, and never at an address elsewhere."""
    peers = local_swarm.start_dht()
    assert run_sync(check_reachability(peers, ["/ip4/127.0.0.1/tcp/0"], [])) is True

    async def ask(maddrs_of: Callable[[list[str]], list[str]]) -> tuple[pb.ReachabilityResponse, float]:
        """The checker's answer to a request for `maddrs_of(our addresses)`, and how long it took (s)."""
        p2p = await start_p2p(peers, ["/ip4/127.0.0.1/tcp/0"])
        try:
            request = pb.ReachabilityRequest(maddrs=maddrs_of(await listen_maddrs(p2p)))
            began = time.monotonic()
            response = await call_unary(p2p, peers[0].rsplit("/p2p/", 1)[1], RPC_REACHABILITY, request,
                                        pb.ReachabilityResponse, CHECK_TIMEOUT)
            return response, time.monotonic() - began
        finally:
            await p2p.shutdown()

    assert run_sync(ask(lambda own: own))[0].reachable
    elsewhere, seconds = run_sync(ask(lambda own: ["/ip4/192.0.2.1/tcp/4001"]))  # TEST-NET-1: never routed
    assert not elsewhere.reachable and not elsewhere.error
    assert seconds < DIAL_BACK_TIMEOUT / 2  # answered without trying to dial there
