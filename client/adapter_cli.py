"""swarm-adapter: publish LoRA adapters to the swarm's servers, list them, see their lineage, pull them."""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from swarm.adapter_files import PROVENANCE_FILE, read_peft_folder, read_provenance, write_peft_folder
from swarm.adapter_records import MAX_PROVENANCE_CHARS
from swarm.cli.logs import configure_logging
from swarm.errors import SwarmError
from swarm.families import family_of, load_config
from swarm.model_id import model_dht_prefix
from swarm.model_source import DEFAULT_MODEL, resolve_model
from swarm.client.adapter_merge import METHODS, merge_published
from swarm.client.adapter_registry import AdapterRegistry, default_identity_path, load_signer
from swarm.client.swarm_client import SwarmClient

MAX_FOLDER_BYTES = 1 << 30

EXAMPLE = """examples:
  swarm-adapter publish my-adapter/ --name support-bot --provenance "data: tickets.jsonl sha256 1f2e..." --initial-peers MADDR
  swarm-adapter list --initial-peers MADDR
  swarm-adapter log support-bot --initial-peers MADDR
  swarm-adapter pull support-bot@2 ./support-bot --initial-peers MADDR
  swarm-adapter merge support-bot sql-helper --method ties --weights 1 1 --density 0.5 --name both --initial-peers MADDR
then in Python: model.load_adapter("swarm:support-bot", adapter_name="bot")
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="swarm-adapter", description="Adapters held by the swarm's servers, by name.",
                                     epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=DEFAULT_MODEL, help="the base model: checkpoint directory or alias (default: %(default)s)")
    common.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of any peers of the swarm")
    commands = parser.add_subparsers(dest="command", required=True)
    publish = commands.add_parser("publish", parents=[common], help="place a peft LoRA folder on the servers under a name")
    publish.add_argument("directory", type=Path, help="a peft LoRA folder (adapter_config.json, adapter_model.safetensors)")
    publish.add_argument("--name", required=True, help="the adapter's name; a new version if it exists and is yours")
    publish.add_argument("--provenance", default=None,
                         help=f"free-form: training data and their hashes, who, why (default: the folder's {PROVENANCE_FILE}, if any)")
    publish.add_argument("--method", default="trained", help="how it was made (default: %(default)s)")
    publish.add_argument("--parents", nargs="*", default=[], help="hashes of the adapters it was made from")
    publish.add_argument("--identity-path", type=Path, default=None,
                         help=f"the publisher key that signs the name (created if missing; default {default_identity_path()})")
    commands.add_parser("list", parents=[common], help="the adapters published for this model")
    log = commands.add_parser("log", parents=[common], help="an adapter's versions and lineage")
    log.add_argument("name")
    merge = commands.add_parser("merge", parents=[common], help="merge published adapters with peft and publish the result")
    merge.add_argument("specs", nargs="+", metavar="NAME[@VERSION]")
    merge.add_argument("--method", required=True, choices=METHODS, help="peft's add_weighted_adapter combination_type")
    merge.add_argument("--weights", nargs="+", type=float, required=True, help="one weight per adapter")
    merge.add_argument("--density", type=float, default=None, help="fraction of values kept (ties, dare_ties, dare_linear)")
    merge.add_argument("--name", required=True, help="the merged adapter's name")
    merge.add_argument("--provenance", default="", help="free-form notes kept with the new version")
    merge.add_argument("--identity-path", type=Path, default=None, help="the publisher key (as for publish)")
    pull = commands.add_parser("pull", parents=[common], help="fetch NAME[@VERSION] into a folder that peft loads")
    pull.add_argument("spec", metavar="NAME[@VERSION]")
    pull.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    configure_logging()
    client = None
    try:
        checkpoint = resolve_model(args.model)
        config = load_config(checkpoint)
        prefix = model_dht_prefix(checkpoint)
        layer_prefix = family_of(config).layer_key_prefix
        client = SwarmClient(args.initial_peers, prefix, config.num_hidden_layers)
        client.start()
        registry = AdapterRegistry(client)
        if args.command == "publish":
            signer = load_signer(args.identity_path or default_identity_path())
            manifest, tensors = read_peft_folder(args.directory, prefix, layer_prefix, MAX_FOLDER_BYTES)
            provenance = args.provenance if args.provenance is not None else read_provenance(args.directory, MAX_PROVENANCE_CHARS)
            done = registry.publish(manifest, tensors, args.name, signer, parents=tuple(args.parents), method=args.method,
                                    provenance=provenance)
            holders = ", ".join(f"{peer[-8:]}[{a}:{b}]" for peer, (a, b) in sorted(done.holders.items(), key=lambda i: i[1]))
            print(f"published {args.name}@{done.version.version} {done.version.hash} (publisher {done.record.publisher}); held by {holders}")
        elif args.command == "merge":
            signer = load_signer(args.identity_path or default_identity_path())
            done = merge_published(registry, args.specs, args.weights, args.method, args.density, args.name, signer, config,
                                   layer_prefix, args.provenance)
            print(f"published {args.name}@{done.version.version} {done.version.hash} ({done.version.method}; parents "
                  f"{', '.join(parent[:12] for parent in done.version.parents)})")
        elif args.command == "list":
            for name, record in sorted(registry.records().items()):
                latest = record.latest()
                holders = len(registry.holders(latest.hash))
                print(f"{name}@{latest.version}  {latest.hash[:16]}  {latest.method}  holders {holders}  publisher {record.publisher}")
        elif args.command == "log":
            record = registry.record(args.name)
            if record is None:
                raise SwarmError(f"no adapter named {args.name!r} is held by any server of {prefix}")
            print(f"{record.name} (publisher {record.publisher})")
            for version in reversed(record.versions):
                when = datetime.datetime.fromtimestamp(version.created, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
                print(f"  @{version.version}  {version.hash}  {when}  {version.method}")
                for parent in version.parents:
                    print(f"      parent {parent}")
                if version.provenance:
                    print(f"      provenance: {version.provenance}")
        else:
            record, version = registry.resolve(args.spec)
            manifest, tensors = registry.pull(version.hash)
            write_peft_folder(args.directory, manifest, tensors, layer_prefix)
            print(f"pulled {record.name}@{version.version} {version.hash} into {args.directory}")
    except SwarmError as e:
        print(f"swarm-adapter: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if client is not None:
            client.shutdown()


if __name__ == "__main__":
    main()
