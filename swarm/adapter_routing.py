"""Routing among adapters held by servers: what client and servers agree on.

A request may name a set of held adapters (by hash) instead of one; the servers route among them
with peft's Arrow (server/adapter_routing.py), or answer per-adapter alignment scores from which
the client picks one adapter for a whole prompt (client/adapter_router.py). Both need the
adapters' principal directions to be comparable module by module, hence `check_routable`:
the same base model, rank and target modules (peft's Arrow requires the same).

This module knows nothing about peft, torch modules or the network.
"""

from __future__ import annotations

from collections.abc import Sequence

from swarm.adapter_manifest import AdapterManifest, split_name
from swarm.errors import InvalidRequest

MIN_ROUTED_ADAPTERS = 2
MAX_ROUTED_ADAPTERS = 16  # adapters one request may route among: bounds the prototypes and matrices a step touches
ARROW_SEED = 0  # peft's ArrowConfig.rng_seed for the power iteration: prototypes are the same on every server
ARROW_TEMPERATURE = 1.0  # peft's default ArrowConfig.router_temperature
METHODS = ("arrow", "prompt")


def check_routable(manifests: Sequence[AdapterManifest], labels: Sequence[str]) -> None:
    """InvalidRequest naming the problem unless Arrow can route among these adapters.

    `labels` name the adapters in messages (a user's "swarm:NAME" or a hash), in the same order.
    """
    count = len(manifests)
    if not MIN_ROUTED_ADAPTERS <= count <= MAX_ROUTED_ADAPTERS:
        raise InvalidRequest(f"routing needs {MIN_ROUTED_ADAPTERS}..{MAX_ROUTED_ADAPTERS} adapters, got {count}")
    hashes = [manifest.hash for manifest in manifests]
    for index, digest in enumerate(hashes):
        if digest in hashes[:index]:
            raise InvalidRequest(f"{labels[index]} is the same adapter as {labels[hashes.index(digest)]} ({digest[:12]})")
    first, first_targets = manifests[0], targets(manifests[0])
    for manifest, label in zip(manifests[1:], labels[1:]):
        if manifest.base != first.base:
            raise InvalidRequest(f"{label} is for base model {manifest.base}, {labels[0]} for {first.base}: "
                                 "routing needs adapters of one base model")
        if manifest.rank != first.rank:
            raise InvalidRequest(f"Arrow cannot combine adapters of different ranks: {label} has rank {manifest.rank}, "
                                 f"{labels[0]} has rank {first.rank}")
        mine = targets(manifest)
        if mine != first_targets:
            extra, missing = sorted(mine - first_targets), sorted(first_targets - mine)
            raise InvalidRequest(f"Arrow cannot combine adapters with different target modules: {label} "
                                 f"adds {_describe(extra)} and lacks {_describe(missing)} compared with {labels[0]}")


def check_top_k(top_k: int, count: int) -> None:
    if not 1 <= top_k <= count:
        raise InvalidRequest(f"top_k must be between 1 and the number of adapters ({count}), got {top_k}")


def targets(manifest: AdapterManifest) -> set[tuple[int, str]]:
    """(block, module path) of every LoRA pair of the adapter."""
    return {split_name(name)[:2] for name in manifest.tensors}


def _describe(found: list[tuple[int, str]]) -> str:
    if not found:
        return "nothing"
    shown = ", ".join(f"block {block} {path}" for block, path in found[:3])
    return shown + (f" and {len(found) - 3} more" if len(found) > 3 else "")
