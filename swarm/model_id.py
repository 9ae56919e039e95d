"""The DHT prefix of a model: the same for the same model everywhere, different for different models.

It is the model id of the model's manifest (swarm/manifest.py): a hash of the config (minus fields
that do not change the computation) and of every tensor's name, dtype, shape and bytes, so it does
not depend on the directory, nor on how the tensors are split into files.
"""

from __future__ import annotations

import re
from pathlib import Path

from swarm.errors import ConfigError
from swarm.manifest import load_manifest
from swarm.model_source import cache_root

_VALID_PREFIX = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def model_dht_prefix(checkpoint_dir: Path) -> str:
    """`{model_type}-{layers}x{hidden}-{digest}`, e.g. 'llama-30x576-3f2a...'."""
    return load_manifest(checkpoint_dir, cache_root()).model_id


def validate_dht_prefix(prefix: str) -> str:
    """A user-given --dht-prefix: letters, digits, '_' and '-' only (block keys are 'prefix.index')."""
    if not _VALID_PREFIX.match(prefix):
        raise ConfigError(f"--dht-prefix {prefix!r} must be 1-128 letters, digits, '_' or '-'")
    return prefix
