"""swarm-dht: a bootstrap peer that others join; it stores records, relays for servers behind NAT, serves no blocks."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from swarm.cli.logs import configure_logging
from swarm.dht import start_dht, visible_maddrs
from swarm.errors import SwarmError

logger = logging.getLogger("swarm.dht")  # not __name__: run with -m, that is "__main__"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="swarm-dht",
        description="Run a DHT bootstrap peer for a Swarm. It prints the multiaddrs that servers and clients "
        "pass as --initial-peers / initial_peers=[...]. It also checks whether starting servers can be dialed, and "
        "relays (libp2p circuit relay) for those that cannot; for that, give it a public IP address.",
        epilog="example: swarm-dht --host-maddrs /ip4/0.0.0.0/tcp/31337 --identity-path bootstrap.id",
    )
    parser.add_argument("--host-maddrs", nargs="*", default=["/ip4/127.0.0.1/tcp/0"],
                        help="multiaddrs to listen on (default: /ip4/127.0.0.1/tcp/0, loopback only)")
    parser.add_argument("--announce-maddrs", nargs="*", default=[], help="multiaddrs to tell others, if they differ")
    parser.add_argument("--identity-path", help="private key file for a stable peer id (created if missing)")
    parser.add_argument("--initial-peers", nargs="*", default=[], help="join an existing swarm through these peers")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        dht = start_dht(args.initial_peers, host_maddrs=args.host_maddrs, announce_maddrs=args.announce_maddrs,
                        identity_path=args.identity_path)
    except SwarmError as e:
        print(f"swarm-dht: error: {e}", file=sys.stderr)
        sys.exit(2)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    maddrs = visible_maddrs(dht)
    print("DHT is running. Servers and clients join it with:", flush=True)
    print(f"--initial-peers {' '.join(maddrs)}", flush=True)
    stop.wait()
    logger.info("shutting down")
    dht.shutdown()


if __name__ == "__main__":
    main()
