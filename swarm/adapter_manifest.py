"""An adapter's content address: the manifest of a LoRA for the remote blocks, and its hash.

A manifest states what a LoRA computes: the base model (its DHT prefix), rank, alpha, dropout,
rsLoRA, and for every matrix its wire name ("{block}.{module path}.lora_A" (rank, in) or
".lora_B" (out, rank)), its shape and the sha256 of its float32 bytes. The adapter's hash is the
sha256 of the manifest's canonical msgpack, so anyone holding a slice of the adapter (the matrices
of some blocks) together with the manifest can prove that the slice belongs to that hash, one
tensor at a time, without the rest of the adapter: that is what lets servers keep and pass on
only the blocks they serve.

Manifests come from peers, so `AdapterManifest.from_wire` bounds and type-checks every field.
This module knows nothing about peft's files or the network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping
from typing import Any

import msgpack
import torch

from swarm.errors import InvalidRequest

FORMAT = "swarm-adapter/1"
MAX_MANIFEST_BYTES = 1 << 20  # 30 blocks x 7 linear layers x 2 matrices take about 40 KB
MAX_TENSORS = 8192
MAX_NAME_CHARS = 256
MAX_DIM = 1 << 20
HASH_CHARS = 64  # hex sha256


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    """peft's LoRA scale: alpha / rank, or alpha / sqrt(rank) with rsLoRA (the one place it is decided)."""
    return alpha / (math.sqrt(rank) if rslora else rank)


@dataclasses.dataclass(frozen=True)
class TensorDigest:
    shape: tuple[int, int]
    sha256: str


@dataclasses.dataclass(frozen=True)
class AdapterManifest:
    base: str  # DHT prefix of the base model
    rank: int
    alpha: float
    dropout: float
    rslora: bool
    tensors: Mapping[str, TensorDigest]  # by wire name

    def to_wire(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "base": self.base, "rank": self.rank, "alpha": float(self.alpha), "dropout": float(self.dropout),
            "rslora": self.rslora,
            "tensors": {name: [list(d.shape), d.sha256] for name, d in sorted(self.tensors.items())},
        }

    def encode(self) -> bytes:
        return msgpack.packb(self.to_wire())

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.encode()).hexdigest()

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, self.rslora)

    def blocks(self) -> list[int]:
        return sorted({block_of(name) for name in self.tensors})

    def names_in(self, start: int, end: int) -> list[str]:
        """Wire names of the matrices of blocks [start, end)."""
        return sorted(name for name in self.tensors if start <= block_of(name) < end)

    def nbytes(self, start: int = 0, end: int = 1 << 30) -> int:
        """Bytes (float32) of the matrices of blocks [start, end)."""
        return sum(4 * math.prod(self.tensors[name].shape) for name in self.names_in(start, end))

    def target_paths(self) -> list[str]:
        """Module paths inside a block that the adapter targets, e.g. ["self_attn.q_proj"]."""
        return sorted({split_name(name)[1] for name in self.tensors})

    @classmethod
    def decode(cls, payload: bytes) -> AdapterManifest:
        """A manifest from a peer's bytes; InvalidRequest names the first thing wrong with it."""
        if len(payload) > MAX_MANIFEST_BYTES:
            raise InvalidRequest(f"adapter manifest of {len(payload)} bytes exceeds {MAX_MANIFEST_BYTES}")
        try:
            value = msgpack.unpackb(payload, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
        except Exception as e:  # noqa: BLE001 - msgpack raises several types on hostile bytes
            raise InvalidRequest(f"undecodable adapter manifest ({type(e).__name__})") from None
        return cls.from_wire(value)

    @classmethod
    def from_wire(cls, value: Any) -> AdapterManifest:
        if not isinstance(value, dict) or value.get("format") != FORMAT:
            raise InvalidRequest(f"not an adapter manifest of format {FORMAT}")
        base, rank, alpha, dropout, rslora, tensors = (value.get(k) for k in ("base", "rank", "alpha", "dropout", "rslora", "tensors"))
        if not isinstance(base, str) or not 0 < len(base) <= MAX_NAME_CHARS:
            raise InvalidRequest("adapter manifest: bad base model")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= MAX_DIM:
            raise InvalidRequest("adapter manifest: bad rank")
        if not isinstance(alpha, float) or not math.isfinite(alpha) or alpha <= 0:
            raise InvalidRequest("adapter manifest: alpha must be a positive number")
        if not isinstance(dropout, float) or not 0 <= dropout < 1:
            raise InvalidRequest("adapter manifest: dropout must be in [0, 1)")
        if not isinstance(rslora, bool):
            raise InvalidRequest("adapter manifest: bad rslora flag")
        if not isinstance(tensors, dict) or not 0 < len(tensors) <= MAX_TENSORS:
            raise InvalidRequest(f"adapter manifest: 1..{MAX_TENSORS} tensors expected")
        digests = {}
        for name, entry in tensors.items():
            block, _, kind = split_name(name)
            if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], list) or len(entry[0]) != 2
                    or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= MAX_DIM for d in entry[0])
                    or not _is_hex_hash(entry[1])):
                raise InvalidRequest(f"adapter manifest: bad entry for {name!r}")
            shape = (entry[0][0], entry[0][1])
            if (shape[0] if kind == "lora_A" else shape[1]) != rank:
                raise InvalidRequest(f"adapter manifest: {name!r} of shape {shape} does not have rank {rank}")
            digests[name] = TensorDigest(shape, entry[1])
        return cls(base, rank, alpha, dropout, rslora, digests)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise InvalidRequest(f"msgpack ext type {code}")


def _is_hex_hash(text: Any) -> bool:
    return isinstance(text, str) and len(text) == HASH_CHARS and all(c in "0123456789abcdef" for c in text)


def check_hash(text: Any) -> str:
    """An adapter hash as given by a caller (64 lowercase hex digits), or InvalidRequest."""
    if not _is_hex_hash(text):
        raise InvalidRequest(f"adapter hash {str(text)[:80]!r} is not 64 lowercase hex digits")
    return text


def split_name(name: Any) -> tuple[int, str, str]:
    """(block, module path, "lora_A"/"lora_B") of a wire name; InvalidRequest if it has another form."""
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
        raise InvalidRequest("adapter tensor names must be short strings")
    block, _, rest = name.partition(".")
    path, _, kind = rest.rpartition(".")
    if not block.isdigit() or kind not in ("lora_A", "lora_B") or not path:
        raise InvalidRequest(f"adapter tensor name {name!r} must look like '<block>.<module path>.lora_A' or '.lora_B'")
    return int(block), path, kind


def block_of(name: str) -> int:
    return int(name.partition(".")[0])


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a matrix's float32 bytes (little-endian, row-major)."""
    return hashlib.sha256(tensor.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def build_manifest(base: str, rank: int, alpha: float, dropout: float, rslora: bool,
                   tensors: Mapping[str, torch.Tensor]) -> AdapterManifest:
    """The manifest of float32 matrices by wire name."""
    digests = {name: TensorDigest((int(t.shape[0]), int(t.shape[1])), tensor_digest(t)) for name, t in tensors.items()}
    manifest = AdapterManifest(base, int(rank), float(alpha), float(dropout), bool(rslora), digests)
    return AdapterManifest.from_wire(manifest.to_wire())  # the same checks as a peer's manifest


def verify_slice(manifest: AdapterManifest, tensors: Mapping[str, torch.Tensor], start: int, end: int) -> None:
    """InvalidRequest unless `tensors` are exactly the manifest's matrices of blocks [start, end), byte for byte."""
    expected = set(manifest.names_in(start, end))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise InvalidRequest(f"adapter slice for blocks {start}:{end} does not match its manifest "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for name, tensor in tensors.items():
        digest = manifest.tensors[name]
        if tuple(tensor.shape) != digest.shape or tensor_digest(tensor) != digest.sha256:
            raise InvalidRequest(f"adapter tensor {name!r} does not match its hash in the manifest (corrupted or forged)")
