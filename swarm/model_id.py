"""The DHT prefix of a model: the same for the same model everywhere, different for different models.

It is derived from what the model computes, not from where it lies: the config (minus fields
that do not change the computation) and a fingerprint of the weights (each safetensors file's
header, with tensor names, dtypes and shapes, plus samples of its data). Sampling keeps it fast
for checkpoints of hundreds of GB; any fine-tune changes the sampled bytes of its tensors.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

from swarm.errors import ConfigError

SAMPLE_BYTES = 1 << 20  # per sample window
_IGNORED_CONFIG_FIELDS = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "use_cache"}
_VALID_PREFIX = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def model_dht_prefix(checkpoint_dir: Path) -> str:
    """`{model_type}-{layers}x{hidden}-{digest}`, e.g. 'llama-30x576-3f2a...'."""
    config = json.loads((checkpoint_dir / "config.json").read_text())
    digest = hashlib.sha256()
    canonical = {key: value for key, value in config.items() if key not in _IGNORED_CONFIG_FIELDS}
    digest.update(json.dumps(canonical, sort_keys=True).encode())
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors weights in {checkpoint_dir}")
    for path in files:
        digest.update(_fingerprint(path))
    model_type = re.sub(r"[^A-Za-z0-9_]", "_", str(config.get("model_type", "model")))
    return f"{model_type}-{config.get('num_hidden_layers', 0)}x{config.get('hidden_size', 0)}-{digest.hexdigest()[:16]}"


def _fingerprint(path: Path) -> bytes:
    """A safetensors file's header and up to three windows of its data (start, middle, end)."""
    with path.open("rb") as file:
        header_size = struct.unpack("<Q", file.read(8))[0]
        header = file.read(header_size)
        data_start = 8 + header_size
        data_size = path.stat().st_size - data_start
        parts = [header]
        for offset in sorted({0, max(0, data_size // 2 - SAMPLE_BYTES // 2), max(0, data_size - SAMPLE_BYTES)}):
            file.seek(data_start + offset)
            parts.append(file.read(SAMPLE_BYTES))
    return hashlib.sha256(b"".join(parts)).digest()


def validate_dht_prefix(prefix: str) -> str:
    """A user-given --dht-prefix: letters, digits, '_' and '-' only (block keys are 'prefix.index')."""
    if not _VALID_PREFIX.match(prefix):
        raise ConfigError(f"--dht-prefix {prefix!r} must be 1-128 letters, digits, '_' or '-'")
    return prefix
