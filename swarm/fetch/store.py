"""The cache folder of a fetched model: only complete, verified files under their final names.

`~/.cache/swarm/models/{model_id}/` holds `swarm-manifest.json`, `config.json`, the tokenizer files
and one safetensors file per part (`client.safetensors`, `block-00007.safetensors`). Each part is
written to a staging file (`.block-00007.safetensors.partial`) whose header is made from the
manifest before any byte arrives, filled tensor by tensor at the header's offsets, and renamed to
its final name once every tensor in it has been verified. A staging file left by an interrupted
fetch is resumed: its tensors whose bytes already hash right are kept. Loaders only ever see files
under their final names, so no half-written file is ever used.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from swarm.manifest import Manifest, TensorEntry, tensor_nbytes
from swarm.model_source import cache_root

_READ_CHUNK = 8 << 20


def model_dir(model_id: str) -> Path:
    return cache_root() / "models" / model_id


def part_file_name(part: str) -> str:
    """'client' -> 'client.safetensors', 'block:7' -> 'block-00007.safetensors'."""
    if part.startswith("block:"):
        return f"block-{int(part.split(':', 1)[1]):05d}.safetensors"
    return f"{part}.safetensors"


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename: the file is whole or absent."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    partial.replace(path)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """One fetch per model folder at a time (several processes may share a cache)."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".fetch.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class StagedPart:
    """One part's safetensors file being filled: tensors written at their offsets, renamed when all verified.

    The header lists the part's tensors in name order; `offsets[name]` is where a tensor's bytes start
    in the file and `sizes[name]` how many there are (from the manifest's dtype and shape).
    """

    def __init__(self, directory: Path, part: str, entries: dict[str, TensorEntry]):
        self.final = directory / part_file_name(part)
        self.staging = directory / f".{self.final.name}.partial"
        self.entries = entries
        self.sizes = {name: tensor_nbytes(name, entry) for name, entry in entries.items()}
        header: dict[str, object] = {}
        position = 0
        for name in sorted(entries):
            header[name] = {"dtype": entries[name].dtype, "shape": list(entries[name].shape),
                            "data_offsets": [position, position + self.sizes[name]]}
            position += self.sizes[name]
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
        self.prefix = len(text).to_bytes(8, "little") + text
        self.offsets = {name: len(self.prefix) + spec["data_offsets"][0] for name, spec in header.items()}  # type: ignore[index]
        self.total = len(self.prefix) + position

    def open(self) -> set[str]:
        """Create the staging file (or reuse a matching one); return the tensors already in it and verified."""
        if self.staging.exists() and self.staging.stat().st_size == self.total:
            with self.staging.open("rb") as file:
                if file.read(len(self.prefix)) == self.prefix:
                    return {name for name in self.entries if self._stored_hash(file, name) == self.entries[name].sha256}
        with self.staging.open("wb") as file:
            file.write(self.prefix)
            file.truncate(self.total)
        return set()

    def write(self, name: str, offset: int, data: bytes) -> None:
        """Bytes `offset:offset+len(data)` of tensor `name` (within its size, checked by the caller)."""
        with self.staging.open("r+b") as file:
            file.seek(self.offsets[name] + offset)
            file.write(data)

    def finish(self) -> Path:
        """Every tensor is in and verified: put the file under its final name."""
        with self.staging.open("r+b") as file:
            os.fsync(file.fileno())
        self.staging.replace(self.final)
        return self.final

    def _stored_hash(self, file, name: str) -> str:  # noqa: ANN001 (an open binary file)
        file.seek(self.offsets[name])
        digest = hashlib.sha256()
        remaining = self.sizes[name]
        while remaining > 0:
            chunk = file.read(min(_READ_CHUNK, remaining))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
        return digest.hexdigest()


def parts_present(directory: Path, manifest: Manifest) -> set[str]:
    """The parts whose file is in the folder under its final name (complete and verified when written)."""
    parts = {entry.part for entry in manifest.tensors.values()}
    return {part for part in parts if (directory / part_file_name(part)).is_file()}
