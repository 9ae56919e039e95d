"""Command-line entry points that belong to neither side (swarm-dht) and CLI helpers."""
