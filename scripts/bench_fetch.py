#!/usr/bin/env python
"""What fetching from peers costs: bytes a client downloads (client part only) vs the whole
checkpoint, and the time for a server to fetch its blocks from two peers on loopback.

A DHT and two servers of the full checkpoint (blocks 0:15 and 15:30, each sharing every part) run
on this machine. Then, each with an empty cache folder: a client given only the model id (its
downloaded bytes, its time to a loaded model, and whether its greedy tokens equal those of a client
with the full checkpoint), and a server given only the model id and `--blocks 0:15` (the time its
fetch of those blocks' tensors takes, from its own log line, and until it serves). Prints a table
and writes JSON.

    python scripts/bench_fetch.py                 # the default model
    python scripts/bench_fetch.py --blocks 0:15 --output bench.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # this process shares the cores with the servers

import torch  # noqa: E402

from swarm import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.cli.logs import configure_logging  # noqa: E402
from swarm.client.local_processes import SHARED_CORES_ENV, LocalSwarm, ManagedProcess  # noqa: E402
from swarm.manifest import load_manifest, tensor_nbytes  # noqa: E402
from swarm.model_source import DEFAULT_MODEL, cache_root, resolve_model  # noqa: E402

logger = logging.getLogger("swarm.bench")
_FETCHED = re.compile(r"fetched (\d+) tensors \(([\d.]+) MB\) of \S+ from (\d+) peer\(s\) in ([\d.]+) s")


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and path.name != ".fetch.lock")


def greedy(model_or_id: str | Path, peers: list[str], prompt: torch.Tensor) -> torch.Tensor:
    remote = AutoDistributedModelForCausalLM.from_pretrained(model_or_id, initial_peers=peers, wire_codec="none")
    try:
        return remote.generate(prompt, max_new_tokens=16, do_sample=False)
    finally:
        remote.swarm_client.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a full checkpoint directory or 'smollm2' (default)")
    parser.add_argument("--blocks", default="0:15", help="the blocks the fetching server asks for (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=Path("bench-results/fetch.json"), help="JSON file (default: %(default)s)")
    args = parser.parse_args()
    configure_logging()
    checkpoint = resolve_model(args.model)
    manifest = load_manifest(checkpoint, cache_root())
    model_id = manifest.model_id
    checkpoint_bytes = sum(path.stat().st_size for path in checkpoint.glob("*.safetensors"))
    client_tensor_bytes = sum(tensor_nbytes(name, entry) for name, entry in manifest.tensors_of("client").items())
    num_blocks = int(manifest.config["num_hidden_layers"])
    half = num_blocks // 2
    prompt = torch.tensor([[1, 504, 3458, 314, 260, 1345, 30]])
    swarm = LocalSwarm()
    scratch = Path(tempfile.mkdtemp(prefix="swarm-bench-fetch-"))
    try:
        swarm.start_dht()
        swarm.start_servers(checkpoint, [f"0:{half}", f"{half}:{num_blocks}"], "--num-threads", "1", "--throughput", "1000")
        expected = greedy(checkpoint, swarm.initial_peers, prompt)

        os.environ["SWARM_CACHE_DIR"] = str(scratch / "client")
        began = time.perf_counter()
        remote = AutoDistributedModelForCausalLM.from_pretrained(model_id, initial_peers=swarm.initial_peers, wire_codec="none")
        client_seconds = time.perf_counter() - began
        try:
            tokens = remote.generate(prompt, max_new_tokens=16, do_sample=False)
        finally:
            remote.swarm_client.shutdown()
        client_bytes = folder_bytes(scratch / "client" / "models")

        server = ManagedProcess([sys.executable, "-m", "swarm.server.cli", model_id, "--blocks", args.blocks, "--num-threads", "1",
                                 "--throughput", "1000", "--initial-peers", *swarm.initial_peers],
                                env={**SHARED_CORES_ENV, "SWARM_CACHE_DIR": str(scratch / "server")})
        began = time.perf_counter()
        swarm.processes.append(server)
        match = _FETCHED.search(server.wait_for_line("fetched "))
        server.wait_for_line("serving blocks")
        server_seconds = time.perf_counter() - began
        assert match is not None
        tensors, megabytes, peers, fetch_seconds = int(match[1]), float(match[2]), int(match[3]), float(match[4])
    finally:
        swarm.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "model_id": model_id,
        "machine": "shared 2-core VM, loopback; other helpers' jobs were running (figures are noisy)",
        "checkpoint_bytes": checkpoint_bytes,
        "client_download_bytes": client_bytes,
        "client_part_tensor_bytes": client_tensor_bytes,
        "client_fraction_of_checkpoint": client_bytes / checkpoint_bytes,
        "client_seconds_to_loaded_model": client_seconds,
        "client_tokens_equal_full_checkpoint_client": bool(torch.equal(tokens, expected)),
        "server_blocks": args.blocks,
        "server_tensors_fetched": tensors,
        "server_megabytes_fetched": megabytes,
        "server_peers_used": peers,
        "server_fetch_seconds": fetch_seconds,
        "server_fetch_mb_per_s": megabytes / fetch_seconds if fetch_seconds else None,
        "server_seconds_to_serving": server_seconds,
    }
    print(f"\nmodel {model_id} (machine shared with other jobs: figures are noisy)\n")
    print(f"{'what':<52} {'value':>14}")
    rows = [
        ("whole checkpoint (MB)", f"{checkpoint_bytes / 1e6:.1f}"),
        ("client downloads, only a model id (MB)", f"{client_bytes / 1e6:.1f}"),
        ("  of which client-part tensors (MB)", f"{client_tensor_bytes / 1e6:.1f}"),
        ("  fraction of the checkpoint", f"{client_bytes / checkpoint_bytes:.3f}"),
        ("client: from_pretrained(model id), empty cache (s)", f"{client_seconds:.2f}"),
        ("client tokens equal the full-checkpoint client's", str(result["client_tokens_equal_full_checkpoint_client"])),
        (f"server --blocks {args.blocks}: tensors fetched", str(tensors)),
        ("  MB fetched", f"{megabytes:.1f}"),
        ("  from peers", str(peers)),
        ("  fetch time (s)", f"{fetch_seconds:.2f}"),
        ("  MB/s", f"{megabytes / fetch_seconds:.0f}" if fetch_seconds else "-"),
        ("  process start to serving (s)", f"{server_seconds:.1f}"),
    ]
    for what, value in rows:
        print(f"{what:<52} {value:>14}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
