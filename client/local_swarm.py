"""swarm-local: a whole swarm on this machine, in one command.

Starts a DHT and servers that split the model's blocks between them, generates a reply to a
prompt through them, prints the text and the route it took, and stops everything. With
--keep-running it leaves the swarm up and prints how to connect to it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

from swarm.client.local_processes import SHARED_CORES_ENV, LocalSwarm

# This client shares the machine's cores with its servers: set before torch loads OpenMP.
for _name, _value in SHARED_CORES_ENV.items():
    os.environ.setdefault(_name, _value)

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from swarm.cli.logs import configure_logging  # noqa: E402
from swarm.client.model import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.errors import SwarmError  # noqa: E402
from swarm.families import load_config  # noqa: E402
from swarm.model_source import DEFAULT_MODEL, resolve_model  # noqa: E402

logger = logging.getLogger(__name__)


def split_blocks(num_blocks: int, num_servers: int) -> list[str]:
    """Contiguous, nearly equal block ranges, one per server."""
    if not 1 <= num_servers <= num_blocks:
        raise SwarmError(f"--servers must be between 1 and the model's {num_blocks} blocks")
    bounds = [round(i * num_blocks / num_servers) for i in range(num_servers + 1)]
    return [f"{a}:{b}" for a, b in zip(bounds, bounds[1:])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="swarm-local",
        description="Start a local swarm (a DHT and servers splitting the model), generate a reply through it, "
        "print the text and the route, and stop everything.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint directory or alias (default: {DEFAULT_MODEL})")
    parser.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.", help="the user message")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="longest reply, in tokens (default: 48)")
    parser.add_argument("--servers", type=int, default=2, help="how many servers split the blocks (default: 2)")
    parser.add_argument("--num-threads", type=int, default=1, help="torch threads per server (default: 1)")
    parser.add_argument("--keep-running", action="store_true", help="leave the swarm up after the reply, with its health page, until Ctrl+C")
    parser.add_argument("--health-port", type=int, default=8000, help="port of the health page with --keep-running (default: 8000)")
    parser.add_argument("--api-port", type=int, default=8080, help="port of the OpenAI-compatible API with --keep-running (default: 8080)")
    args = parser.parse_args(argv)
    configure_logging()
    swarm = LocalSwarm()
    try:
        _run(args, swarm)
    except SwarmError as e:
        print(f"swarm-local: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        pass
    finally:
        swarm.stop()


def _run(args: argparse.Namespace, swarm: LocalSwarm) -> None:
    checkpoint = resolve_model(args.model)  # prepare once here, not in every server
    ranges = split_blocks(load_config(checkpoint).num_hidden_layers, args.servers)
    began = time.perf_counter()
    swarm.start_dht()
    servers = swarm.start_servers(checkpoint, ranges, "--num-threads", str(args.num_threads))
    print(f"Swarm up in {time.perf_counter() - began:.1f} s: a DHT and {len(servers)} servers ({', '.join(ranges)})", flush=True)

    model = AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    messages = [{"role": "user", "content": args.prompt}]
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with model.inference_session(max_length=input_ids.shape[1] + args.max_new_tokens) as session:
        began = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        elapsed = time.perf_counter() - began
        route = session.route
    new_tokens = output.shape[1] - input_ids.shape[1]
    print(f"\nPrompt: {args.prompt}")
    print(f"Reply:  {tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True).strip()}")
    print(f"\n{new_tokens} tokens in {elapsed:.2f} s ({new_tokens / elapsed:.1f} tokens/s)")
    print("Route:  " + "  ->  ".join(f"{hop.peer_id} blocks {hop.start}:{hop.end}" for hop in route), flush=True)
    model.swarm_client.shutdown()

    if args.keep_running:
        url = swarm.start_health(args.health_port)
        print(f"\nHealth page: {url}  (JSON: {url}api/v1/state, Prometheus: {url}metrics)")
        api = swarm.start_api(checkpoint, args.model, args.api_port)
        print(f"OpenAI-compatible API: {api}  (model name {args.model!r}; e.g. openai.OpenAI(base_url={api!r}, api_key='-'))")
        print("The swarm keeps running; press Ctrl+C to stop it. Connect from Python with:")
        print("    from swarm import AutoDistributedModelForCausalLM")
        print(f"    model = AutoDistributedModelForCausalLM.from_pretrained({args.model!r}, initial_peers={swarm.initial_peers!r})")
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass


if __name__ == "__main__":
    main()
