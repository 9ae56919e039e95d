"""Everything a server is told, in one keyword-only config; swarm-server's CLI is generated from it."""

from __future__ import annotations

import dataclasses

from swarm.dht import check_maddrs
from swarm.errors import ConfigError
from swarm.server.compute_worker import DEFAULT_MAX_MERGED_STEPS
from swarm.server.quantization import QUANT_TYPES
from swarm.limits import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_REQUESTS_PER_PEER,
    DEFAULT_MAX_SESSION_LENGTH,
    DEFAULT_MAX_SESSION_LIFETIME,
    DEFAULT_MAX_SESSIONS_PER_PEER,
    DEFAULT_MAX_TOKENS_PER_REQUEST,
    DEFAULT_REQUEST_TIMEOUT,
)

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _field(default, help: str, **meta):  # noqa: ANN001, ANN202 (a dataclass field)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=dict(help=help, **meta))
    return dataclasses.field(default=default, metadata=dict(help=help, **meta))


@dataclasses.dataclass(kw_only=True)
class ServerConfig:
    model: str = _field(
        "smollm2", "a local transformers checkpoint directory, 'smollm2' (the embedded default model), or a model id "
        "(e.g. llama-30x576-0123456789abcdef: the manifest, config and the blocks' tensors are fetched from peers)", positional=True
    )
    blocks: str | None = _field(None, "the blocks to serve as START:END, a half-open range like a Python slice", metavar="A:B")
    num_blocks: int | None = _field(
        None, "serve this many blocks, where the swarm is weakest, and move when the swarm needs it (instead of --blocks)"
    )
    throughput: float | None = _field(None, "forward tokens/s per block to announce, instead of measuring it")
    balance_quality: float = _field(
        0.75, "with --num-blocks, move only if the swarm's bottleneck now is below this fraction of the one after the move"
    )
    balance_period: float = _field(120.0, "with --num-blocks, seconds between checks whether moving would help the swarm")
    initial_peers: list[str] = _field([], "multiaddrs of peers already in the swarm (printed by swarm-dht or another server)")
    new_swarm: bool = _field(False, "start a new swarm instead of joining one, and print how others can join it")
    host_maddrs: list[str] = _field(
        ["/ip4/127.0.0.1/tcp/0"], "multiaddrs to listen on; use /ip4/0.0.0.0/tcp/PORT to be reachable from other machines"
    )
    announce_maddrs: list[str] = _field([], "multiaddrs to tell others, if they differ from --host-maddrs (e.g. behind NAT)")
    relay: bool = _field(
        True,
        "use libp2p circuit relays: reach servers that others cannot dial through them, and if a dial-back "
        "check by the initial peers finds this server undialable (NAT, firewall), serve through one of them",
    )
    identity_path: str | None = _field(None, "file with this server's private key, for a stable peer id (created if missing)")
    dht_prefix: str | None = _field(None, "name of the model in the DHT; derived from the model's config and weights if not set")
    torch_dtype: str = _field("auto", "dtype of the blocks' weights; auto = float32 on CPU, the checkpoint's dtype on GPU", choices=DTYPES)
    quant_type: str = _field("none", "quantize the blocks' linear weights with bitsandbytes", choices=QUANT_TYPES)
    device: str = _field("auto", "torch device for the blocks: cpu, cuda, cuda:1, ...; auto = cuda if available")
    num_threads: int | None = _field(None, "torch threads for compute (default: torch's choice)")
    attn_cache_tokens: int = _field(16384, "attention-cache budget, in tokens (batch x length) of sessions over all served blocks; enforced in bytes, adapters included")
    max_batch_size: int = _field(DEFAULT_MAX_BATCH_SIZE, "largest batch accepted in one request")
    max_tokens_per_request: int = _field(DEFAULT_MAX_TOKENS_PER_REQUEST, "most tokens (batch x new tokens) in one request")
    max_session_length: int = _field(DEFAULT_MAX_SESSION_LENGTH, "longest sequence an inference session may reach")
    max_lora_rank: int = _field(64, "largest LoRA rank a client may send")
    max_sessions_per_peer: int = _field(DEFAULT_MAX_SESSIONS_PER_PEER, "inference sessions one peer may hold open at once")
    max_requests_per_peer: int = _field(DEFAULT_MAX_REQUESTS_PER_PEER, "forward/backward requests one peer may have in progress at once")
    max_session_lifetime: float = _field(DEFAULT_MAX_SESSION_LIFETIME, "seconds an inference session may stay open before the server closes it")
    request_timeout: float = _field(DEFAULT_REQUEST_TIMEOUT, "seconds a request may take to arrive whole (a slow sender is cut off)")
    max_merged_steps: int = _field(
        DEFAULT_MAX_MERGED_STEPS,
        "most decode steps of different sessions run as one batched forward (within --max-tokens-per-request tokens); 1 = never merge",
    )
    activation_store_mb: int = _field(1024, "memory for forwards kept for their backward (training); beyond it, backward recomputes")
    public_name: str = _field("", "a name to show as this server's contributor (e.g. on the health page)")
    adapters: list[str] = _field([], "local peft LoRA folders (safetensors) to hold for this server's blocks and serve by hash", metavar="DIR")
    adapter_store_mb: int = _field(512, "memory for adapters held for requests that name them (least recently used out first)")
    max_adapter_mb: int = _field(64, "largest slice of one adapter this server holds or accepts, in MiB")

    def __post_init__(self) -> None:
        if self.new_swarm and self.initial_peers:
            raise ConfigError("--new-swarm starts a new swarm: do not pass --initial-peers with it")
        if not self.new_swarm and not self.initial_peers:
            raise ConfigError("pass --initial-peers MADDR... to join a swarm, or --new-swarm to start one")
        for name in ("attn_cache_tokens", "max_batch_size", "max_tokens_per_request", "max_session_length", "max_lora_rank",
                     "max_sessions_per_peer", "max_requests_per_peer", "max_session_lifetime", "request_timeout",
                     "max_merged_steps", "adapter_store_mb", "max_adapter_mb"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        if self.blocks is not None and self.num_blocks is not None:
            raise ConfigError("pass either --blocks or --num-blocks, not both")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ConfigError("--num-blocks must be positive")
        if self.throughput is not None and not self.throughput > 0:
            raise ConfigError("--throughput must be a positive number of tokens/s")
        if not 0 < self.balance_quality <= 1:
            raise ConfigError("--balance-quality must be in (0, 1]")
        if self.balance_period <= 0:
            raise ConfigError("--balance-period must be positive")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ConfigError("--num-threads must be positive")
        if len(self.public_name) > 64:
            raise ConfigError("--public-name must be at most 64 characters")
        check_maddrs(self.initial_peers, self.host_maddrs, self.announce_maddrs)  # before loading and benchmarking


def parse_block_range(text: str, num_blocks: int) -> tuple[int, int]:
    """'A:B' as a half-open range within a model of `num_blocks` blocks."""
    parts = text.split(":")
    try:
        start, end = (int(part) for part in parts)
    except ValueError:
        raise ConfigError(f"--blocks must look like START:END (e.g. 0:{num_blocks}), got {text!r}") from None
    if not 0 <= start < end <= num_blocks:
        raise ConfigError(f"--blocks {text} is outside the model's {num_blocks} blocks (valid: 0 <= START < END <= {num_blocks})")
    return start, end
