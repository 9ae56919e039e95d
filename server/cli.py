"""swarm-server: serve a range of a model's blocks to the swarm."""

from __future__ import annotations

import argparse
import logging
import sys

from swarm.cli.dataclass_args import add_dataclass_arguments, config_from_namespace
from swarm.cli.logs import configure_logging
from swarm.errors import SwarmError

logger = logging.getLogger("swarm.server")  # not __name__: run with -m, that is "__main__"

EXAMPLES = """\
examples:
  start a new swarm serving the first half of the default model:
    swarm-server smollm2 --blocks 0:15 --new-swarm
  join it with the second half (use the multiaddr the first server printed):
    swarm-server smollm2 --blocks 15:30 --initial-peers /ip4/127.0.0.1/tcp/PORT/p2p/PEER_ID
"""


def main(argv: list[str] | None = None) -> None:
    configure_logging()  # before importing the server: bitsandbytes logs while it is imported
    from swarm.server.config import ServerConfig
    from swarm.server.server import Server

    parser = argparse.ArgumentParser(
        prog="swarm-server",
        description="Serve a contiguous range of a language model's transformer blocks to a Swarm.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_arguments(parser, ServerConfig)
    args = parser.parse_args(argv)
    try:
        Server(config_from_namespace(ServerConfig, args)).run()
    except SwarmError as e:
        logger.debug("exiting on error", exc_info=True)
        print(f"swarm-server: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
