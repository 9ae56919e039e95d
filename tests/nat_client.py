"""A client that runs where the test cannot (inside a network namespace) and prints what it computed.

Run as `python -m tests.nat_client MODEL INPUT_IDS_JSON MAX_NEW_TOKENS INITIAL_PEER...`. It prints one
JSON line: the logits of a forward over the inputs, the greedy generation, each server's announced
reachability, and the multiaddrs of this client's connections to it (a relayed one contains /p2p-circuit).
"""

from __future__ import annotations

import json
import sys

import torch

from swarm import AutoDistributedModelForCausalLM
from swarm.client.event_loop import run_sync
from swarm.transport import connection_maddrs


def main() -> None:
    model, inputs, max_new_tokens, *initial_peers = sys.argv[1:]
    input_ids = torch.tensor(json.loads(inputs))  # (batch, seq)
    remote = AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers=initial_peers, wire_codec="none")
    try:
        with torch.no_grad():
            logits = remote(input_ids).logits  # (batch, seq, vocab)
        tokens = remote.generate(input_ids, max_new_tokens=int(max_new_tokens), do_sample=False, eos_token_id=None)
        client = remote.swarm_client
        reachability = {peer: record.reachability for records in run_sync(client.fetch_blocks()) for peer, record in records.items()}
        connections = {peer: run_sync(connection_maddrs(client.p2p, peer)) for peer in reachability}
        result = {"logits": logits.tolist(), "tokens": tokens.tolist(), "reachability": reachability, "connections": connections}
        print(json.dumps(result), flush=True)
    finally:
        remote.swarm_client.shutdown()


if __name__ == "__main__":
    main()
