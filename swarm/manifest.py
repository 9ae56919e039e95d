"""A model's manifest: its identity, and what every tensor must be.

The manifest lists the config (minus fields that do not change the computation), the tokenizer
files' hashes, and for every tensor its name, dtype, shape, part ("block:N" for decoder block N,
"client" for embeddings, final norm and head) and the sha256 of its bytes as stored. The model id
(its DHT prefix) is a hash of the config, the tokenizer files' hashes and the tensors, so it is the
same whoever computes it and however the tensors are split into files, and a manifest fetched from
a stranger is believed only if it hashes to the id asked for (swarm/fetch/). Servers and clients verify the tensors they load
against it, and a folder that holds only some tensors (a server's blocks) can still be identified
by the manifest that comes with it (`swarm-manifest.json`, written by `swarm-model manifest`).

Computing a manifest reads every byte once (about 1 s per 500 MB here); it is cached under the
Swarm cache directory, keyed by the files' names, sizes and modification times.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import torch

from swarm.errors import ConfigError

MANIFEST_FILE = "swarm-manifest.json"
FORMAT = "swarm-manifest/1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json")
_IGNORED_CONFIG_FIELDS = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "use_cache"}
_BLOCK_KEY = re.compile(r"^model\.layers\.(\d+)\.")
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
_READ_CHUNK = 8 << 20


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    dtype: str  # safetensors' name, e.g. "F32", "BF16"
    shape: tuple[int, ...]
    part: str  # "block:N" or "client"
    sha256: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    config: dict[str, Any]
    tokenizer: dict[str, str]  # file name -> sha256
    tensors: dict[str, TensorEntry]
    # Read from a manifest file that came with the folder. Only then is verifying the folder's tensors
    # against it worth the hashing: a manifest computed from these very files would always match.
    from_file: bool = dataclasses.field(default=False, compare=False)

    @property
    def model_id(self) -> str:
        """`{model_type}-{layers}x{hidden}-{digest}`: the model's DHT prefix (see swarm.model_id.MODEL_ID)."""
        body = {"config": self.config, "tokenizer": self.tokenizer,
                "tensors": {name: dataclasses.asdict(entry) for name, entry in sorted(self.tensors.items())}}
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
        model_type = re.sub(r"[^A-Za-z0-9_]", "_", str(self.config.get("model_type", "model")))
        return f"{model_type}-{self.config.get('num_hidden_layers', 0)}x{self.config.get('hidden_size', 0)}-{digest}"

    def tensors_of(self, part: str) -> dict[str, TensorEntry]:
        return {name: entry for name, entry in self.tensors.items() if entry.part == part}

    def to_json(self) -> str:
        tensors = {name: dataclasses.asdict(entry) for name, entry in sorted(self.tensors.items())}
        return json.dumps({"format": FORMAT, "config": self.config, "tokenizer": self.tokenizer, "tensors": tensors}, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str, from_file: bool = False) -> Manifest:
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
            tensors = {
                str(name): TensorEntry(str(entry["dtype"]), tuple(int(size) for size in entry["shape"]), str(entry["part"]),
                                       str(entry["sha256"]))
                for name, entry in data["tensors"].items()
            }
            return cls(dict(data["config"]), {str(k): str(v) for k, v in data["tokenizer"].items()}, tensors, from_file)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"the manifest {where} is malformed: {e}") from None


# Bytes per element of safetensors' dtypes; a manifest with any other dtype is refused.
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


def tensor_nbytes(name: str, entry: TensorEntry) -> int:
    """How many bytes the tensor takes as stored: what a peer must send for it, known before asking."""
    if entry.dtype not in _DTYPE_BYTES or any(size < 0 for size in entry.shape):
        raise ConfigError(f"the manifest gives tensor {name} an unknown dtype {entry.dtype!r} or a negative size")
    count = 1
    for size in entry.shape:
        count *= size
    return count * _DTYPE_BYTES[entry.dtype]


def part_of(tensor_name: str) -> str:
    match = _BLOCK_KEY.match(tensor_name)
    return f"block:{int(match.group(1))}" if match else "client"


def load_manifest(checkpoint_dir: Path, cache_dir: Path | None = None) -> Manifest:
    """The folder's manifest: its `swarm-manifest.json` if it has one (checked against its config),
    else one computed from its files (cached in `cache_dir`)."""
    config = canonical_config(checkpoint_dir)
    written = checkpoint_dir / MANIFEST_FILE
    if written.exists():
        manifest = Manifest.from_json(written.read_text(), str(written), from_file=True)
        if manifest.config != config:
            raise ConfigError(f"the manifest {written} does not match the config in {checkpoint_dir}")
        return manifest
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors weights in {checkpoint_dir}")
    cached = _cache_path(checkpoint_dir, files, cache_dir) if cache_dir is not None else None
    if cached is not None and cached.exists():
        return Manifest.from_json(cached.read_text(), str(cached))
    manifest = compute_manifest(checkpoint_dir)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(manifest.to_json())
        partial.replace(cached)  # complete files only, even with several processes at once
    return manifest


def compute_manifest(checkpoint_dir: Path) -> Manifest:
    """Hash every tensor of a full checkpoint folder; ConfigError if a tensor appears twice or a block lacks one."""
    tensors: dict[str, TensorEntry] = {}
    for path in sorted(checkpoint_dir.glob("*.safetensors")):
        for name, entry in _hash_file(path).items():
            if name in tensors:
                raise ConfigError(f"tensor {name} appears in more than one file of {checkpoint_dir}")
            tensors[name] = entry
    config = canonical_config(checkpoint_dir)
    blocks = {entry.part for entry in tensors.values() if entry.part != "client"}
    expected = {f"block:{index}" for index in range(int(config.get("num_hidden_layers", 0)))}
    if blocks != expected:
        missing = sorted(expected - blocks, key=lambda part: int(part.split(":")[1]))
        raise ConfigError(f"{checkpoint_dir} lacks the tensors of {', '.join(missing[:5])}: a manifest needs the whole model "
                          f"(or copy {MANIFEST_FILE} from a full copy)")
    tokenizer = {name: _sha256_file(checkpoint_dir / name) for name in TOKENIZER_FILES if (checkpoint_dir / name).exists()}
    return Manifest(config, tokenizer, tensors)


def canonical_config(checkpoint_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((checkpoint_dir / "config.json").read_text())
        return canonical(config)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the model config in {checkpoint_dir}: {e}") from None


def canonical(config: Any) -> dict[str, Any]:
    """A parsed config.json without the fields that do not change the computation; ValueError if not an object."""
    if not isinstance(config, dict):
        raise ValueError("config.json is not a JSON object")
    return {key: value for key, value in config.items() if key not in _IGNORED_CONFIG_FIELDS}


def tensor_sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (tensor name -> dtype, shape, data_offsets) and where its data starts."""
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise ConfigError(f"{path} is not a safetensors file ({len(prefix)} bytes): an interrupted download?")
        (size,) = struct.unpack("<Q", prefix)
        if size > _MAX_HEADER_BYTES:
            raise ConfigError(f"{path} is not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(file.read(size))
            if not isinstance(header, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            raise ConfigError(f"{path} has a corrupt safetensors header") from None
    header.pop("__metadata__", None)
    return header, 8 + size


def _hash_file(path: Path) -> dict[str, TensorEntry]:
    header, data_start = safetensors_header(path)
    found = {}
    with path.open("rb") as file:
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            file.seek(data_start + begin)
            digest = hashlib.sha256()
            remaining = end - begin
            while remaining > 0:
                chunk = file.read(min(_READ_CHUNK, remaining))
                if not chunk:
                    raise ConfigError(f"{path} is truncated (tensor {name})")
                digest.update(chunk)
                remaining -= len(chunk)
            found[name] = TensorEntry(str(info["dtype"]), tuple(info["shape"]), part_of(name), digest.hexdigest())
    return found


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_path(checkpoint_dir: Path, files: list[Path], cache_dir: Path) -> Path:
    """Where a computed manifest is kept: keyed by the folder and its files' names, sizes and mtimes."""
    key = hashlib.sha256()
    key.update(str(checkpoint_dir.resolve()).encode())
    for path in [checkpoint_dir / "config.json", *files]:
        stat = path.stat()
        key.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_dir / "manifests" / f"{key.hexdigest()[:32]}.json"


def verify_tensor(manifest: Manifest, name: str, tensor: torch.Tensor, where: Path) -> None:
    """ConfigError naming the tensor unless it is what the manifest says (dtype, shape, sha256 of its bytes).

    `tensor` is a torch tensor exactly as read from the file (before any dtype conversion). A no-op for
    a manifest computed from the same files (see `Manifest.from_file`).
    """
    if not manifest.from_file:
        return
    entry = manifest.tensors.get(name)
    if entry is None:
        raise ConfigError(f"{where} holds tensor {name}, which the model's manifest does not list")
    if tuple(tensor.shape) != entry.shape:
        raise ConfigError(f"tensor {name} in {where} has shape {tuple(tensor.shape)}, the manifest says {entry.shape}")
    raw = tensor.contiguous().reshape(-1).view(dtype=torch.uint8).numpy()
    if tensor_sha256(raw.tobytes()) != entry.sha256:
        raise ConfigError(f"tensor {name} in {where} does not match the model's manifest (sha256 differs): a corrupt or different file")
