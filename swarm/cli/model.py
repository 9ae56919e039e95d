"""swarm-model: a model's manifest (its identity, and what every tensor must be)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from swarm.errors import SwarmError
from swarm.manifest import MANIFEST_FILE, compute_manifest
from swarm.model_source import resolve_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="swarm-model",
        description="Write a model's manifest: its config, tokenizer hashes, and every tensor's name, dtype, shape, "
        "block and sha256. The model id (its DHT prefix) derives from it, whatever files the tensors are in; a "
        "folder holding only some blocks' tensors plus the manifest can then serve them, verified.",
        epilog="example: swarm-model manifest ./my-checkpoint   (writes ./my-checkpoint/" + MANIFEST_FILE + ")",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    manifest = commands.add_parser("manifest", help="compute the manifest of a whole checkpoint and write it")
    manifest.add_argument("model", help="a checkpoint directory (all its safetensors files), or 'smollm2'")
    manifest.add_argument("--output", type=Path, help=f"where to write it (default: MODEL/{MANIFEST_FILE})")
    args = parser.parse_args(argv)
    try:
        checkpoint = resolve_model(args.model)
        computed = compute_manifest(checkpoint)
        output = args.output or checkpoint / MANIFEST_FILE
        partial = output.with_name(output.name + ".partial")
        partial.write_text(computed.to_json())
        partial.replace(output)
    except (SwarmError, OSError) as e:
        print(f"swarm-model: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"model id {computed.model_id}: {len(computed.tensors)} tensors, written to {output}")


if __name__ == "__main__":
    main()
