"""The DHT prefix of a model: the same for the same model everywhere, different for different models.

It is the model id of the model's manifest (swarm/manifest.py): a hash of the config (minus fields
that do not change the computation), the tokenizer files and every tensor's name, dtype, shape and
bytes, so it does not depend on the directory, nor on how the tensors are split into files. Given
instead of a path, a model id makes clients and servers fetch what they need from peers (swarm/fetch/).
"""

from __future__ import annotations

import re
from pathlib import Path

from swarm.errors import ConfigError
from swarm.manifest import load_manifest
from swarm.model_source import cache_root

_VALID_PREFIX = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
MODEL_ID = re.compile(r"^[A-Za-z0-9_]{1,64}-[0-9]{1,4}x[0-9]{1,6}-[0-9a-f]{16}$")  # what Manifest.model_id makes


def is_model_id(model: object) -> bool:
    """Whether a MODEL argument is a model id (fetch from peers) rather than a path or an alias."""
    return isinstance(model, str) and MODEL_ID.match(model) is not None and not Path(model).exists()


def model_dht_prefix(checkpoint_dir: Path) -> str:
    """`{model_type}-{layers}x{hidden}-{digest}`, e.g. 'llama-30x576-3f2a...'."""
    return load_manifest(checkpoint_dir, cache_root()).model_id


def validate_dht_prefix(prefix: str) -> str:
    """A user-given --dht-prefix: letters, digits, '_' and '-' only (block keys are 'prefix.index')."""
    if not _VALID_PREFIX.match(prefix):
        raise ConfigError(f"--dht-prefix {prefix!r} must be 1-128 letters, digits, '_' or '-'")
    return prefix
