"""swarm-health: a web page (and JSON and Prometheus metrics) showing a swarm's state."""

from __future__ import annotations

import argparse
import functools
import logging
import sys

import uvicorn

from swarm.cli.logs import configure_logging
from swarm.dht import start_dht
from swarm.errors import SwarmError
from swarm.health.app import create_app
from swarm.health.state import collect_state

logger = logging.getLogger("swarm.health")  # not __name__: run with -m, that is "__main__"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="swarm-health",
        description="Join a swarm's DHT as a client and serve its health: / (a page), /api/v1/state (JSON), /metrics (Prometheus).",
        epilog="example: swarm-health --initial-peers /ip4/127.0.0.1/tcp/31337/p2p/Qm... --port 8000",
    )
    parser.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of any peers of the swarm")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve the page on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to serve the page on (default: %(default)s)")
    parser.add_argument("--refresh-period", type=float, default=10.0, help="seconds between DHT reads (default: %(default)s)")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        dht = start_dht(args.initial_peers, client_mode=True)
    except SwarmError as e:
        print(f"swarm-health: error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        app = create_app(functools.partial(collect_state, dht), args.refresh_period, dht.replicate_p2p)
        logger.info("health page at http://%s:%d/", args.host, args.port)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        dht.shutdown()


if __name__ == "__main__":
    main()
