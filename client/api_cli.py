"""swarm-api: an OpenAI-compatible HTTP server over a swarm, for many users at once."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn
from transformers import AutoTokenizer

from swarm.cli.logs import configure_logging
from swarm.errors import SwarmError
from swarm.model_id import is_model_id
from swarm.model_source import DEFAULT_MODEL, resolve_model

logger = logging.getLogger("swarm.api")  # not __name__: run with -m, that is "__main__"

EXAMPLE = """example:
  swarm-api smollm2 --initial-peers /ip4/127.0.0.1/tcp/31337/p2p/Qm... --port 8080
  then, with the openai package:
    client = openai.OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused")
    client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi!"}])
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="swarm-api",
        description="Serve a swarm's model through OpenAI's HTTP API: /v1/models, /v1/completions, "
        "/v1/chat/completions (streaming too). Each request runs in its own inference session.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="checkpoint directory or alias (default: %(default)s)")
    parser.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of any peers of the swarm")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default: %(default)s)")
    parser.add_argument("--model-name", help="the model's name in the API (default: the MODEL argument)")
    parser.add_argument("--api-key", action="append", default=[], help="accept only requests with this bearer key (repeatable)")
    parser.add_argument("--max-concurrency", type=int, default=16, help="requests generating at once (default: %(default)s)")
    parser.add_argument("--wire-codec", default=None, help="how hidden states travel (default: the client's default)")
    args = parser.parse_args(argv)
    configure_logging()
    from swarm import AutoDistributedModelForCausalLM
    from swarm.client.api_app import create_app
    from swarm.client.api_generation import Generator

    try:
        if not is_model_id(args.model):
            resolve_model(args.model)  # a bad path fails here, before joining the swarm
        codec = {"wire_codec": args.wire_codec} if args.wire_codec else {}
        model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=args.initial_peers, **codec)
    except SwarmError as e:
        print(f"swarm-api: error: {e}", file=sys.stderr)
        sys.exit(2)
    tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)  # the checkpoint, or the folder a model id was fetched to
    generator = Generator(model, tokenizer, args.max_concurrency)
    app = create_app(generator, args.model_name or args.model, frozenset(args.api_key))
    try:
        logger.info("OpenAI-compatible API at http://%s:%d/v1", args.host, args.port)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        generator.shutdown()
        model.swarm_client.shutdown()


if __name__ == "__main__":
    main()
