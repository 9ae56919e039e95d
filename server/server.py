"""A Swarm server: loads a span of blocks, serves it over hivemind P2P and announces it in the DHT.

`Server(config)` only stores; `run()` loads, serves until SIGTERM/SIGINT, then announces itself
offline before it exits so that clients route around it at once. With `--num-blocks` it picks
its own blocks where the swarm is weakest and re-checks periodically (see placement.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import random
import signal

from pathlib import Path

import psutil
import torch

from swarm import dht as swarm_dht
from swarm.errors import ConfigError, InvalidRequest
from swarm.families import family_of, load_config
from swarm.fetch.fetcher import fetch_model
from swarm.manifest import load_manifest
from swarm.model_id import is_model_id, model_dht_prefix, validate_dht_prefix
from swarm.model_source import cache_root, resolve_model
from swarm.reachability import check_reachability
from swarm.records import ModelRecord, RecordSigner, ServerRecord, ServerState, shares_of
from swarm.version import __version__
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.codecs import CODECS
from swarm.server.adapter_service import AdapterService
from swarm.server.adapter_store import AdapterStore
from swarm.server.announcer import Announcer
from swarm.server.backprop import ActivationStore
from swarm.server.block_loader import load_span_layers
from swarm.server.cache_budget import CacheBudget
from swarm.server.compute_worker import ComputeWorker
from swarm.server.config import ServerConfig, parse_block_range
from swarm.server.peer_limits import PeerGovernor, PeerLimits
from swarm.server.fetch_service import FetchService
from swarm.server.handlers import RequestLimits, SpanHandlers
from swarm.server.placement import block_throughputs, choose_start, should_move
from swarm.server.span_runner import SpanRunner
from swarm.server.throughput import Throughput, get_throughput

logger = logging.getLogger(__name__)

OFFLINE_ANNOUNCE_TIMEOUT = 5.0  # seconds: shutting down must not hang on an unreachable DHT
JOIN_JITTER = 1.0  # seconds: servers started together read the swarm at slightly different times
MEMORY_HEADROOM = 0.9  # fraction of free memory that block weights may take


def _is_loopback(maddr: str) -> bool:
    return maddr.startswith(("/ip4/127.", "/ip6/::1/"))


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config

    def run(self) -> None:
        """Load the blocks, then serve until SIGTERM or SIGINT."""
        cfg = self.config
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.fetching = is_model_id(cfg.model)  # a model id: fetch the manifest, config and blocks from peers
        if self.fetching:
            self.checkpoint = fetch_model(cfg.model, cfg.initial_peers, set())
        else:
            self.checkpoint = resolve_model(cfg.model)
        self.model_config = load_config(self.checkpoint)
        self.family = family_of(self.model_config)
        self.total_blocks = self.model_config.num_hidden_layers
        if cfg.blocks is not None:
            fixed_span = parse_block_range(cfg.blocks, self.total_blocks)
        elif cfg.num_blocks is None:
            fixed_span = (0, self.total_blocks)
            logger.info("neither --blocks nor --num-blocks given: serving all %d blocks", self.total_blocks)
        else:
            fixed_span = None
        self.dht_prefix = validate_dht_prefix(cfg.dht_prefix) if cfg.dht_prefix else model_dht_prefix(self.checkpoint)
        self.device, self.dtype = self._choose_device_and_dtype()
        if cfg.num_blocks is not None:
            self._check_memory(cfg.num_blocks)
        throughput = self._throughput()
        relays = self._relays()
        self.dht, signer = swarm_dht.start_server_dht(
            cfg.initial_peers, host_maddrs=cfg.host_maddrs, announce_maddrs=cfg.announce_maddrs, identity_path=cfg.identity_path,
            use_relay=cfg.relay, relays=relays,
        )
        try:
            self.peer_id = swarm_dht.peer_id_of(self.dht)
            start, end = fixed_span if fixed_span is not None else self._choose_span(throughput)
            self.record = ServerRecord(
                state=ServerState.JOINING,
                start=start,
                end=end,
                throughput=throughput.forward_tps,
                inference_rps=throughput.inference_rps,
                max_tokens_per_request=cfg.max_tokens_per_request,
                torch_dtype=str(self.dtype).removeprefix("torch."),
                quant_type=cfg.quant_type,
                codecs=CODECS,
                version=__version__,
                public_name=cfg.public_name,
                reachability="relay" if relays else "direct",
            )
            self.model_record = ModelRecord(
                dht_prefix=self.dht_prefix, num_blocks=self.total_blocks, model_type=self.model_config.model_type
            )
            self.announcer = Announcer(self.dht, signer, self.dht_prefix, self.record, self.model_record, lambda: 0)
            self.announcer.announce(ServerState.JOINING)
            self.runner = self._load_runner(start, end)
            self.governor = PeerGovernor(PeerLimits(max_sessions_per_peer=cfg.max_sessions_per_peer,
                                                    max_requests_per_peer=cfg.max_requests_per_peer))
            self.adapters = self._adapter_service(signer)
            asyncio.run(self._serve())
        finally:
            self.dht.shutdown()

    def _adapter_service(self, signer: RecordSigner) -> AdapterService:
        """The adapters this server holds: the --adapters folders now, more as they are published or asked for."""
        cfg = self.config
        store = AdapterStore(cfg.adapter_store_mb << 20, cfg.max_adapter_mb << 20)
        service = AdapterService(store=store, runner=lambda: self.runner, base=self.dht_prefix, max_rank=cfg.max_lora_rank,
                                 dht=self.dht, signer=signer, peer_id=self.peer_id, request_timeout=cfg.request_timeout,
                                 governor=self.governor)
        for directory in cfg.adapters:
            try:
                service.load_folder(Path(directory), self.family.layer_key_prefix)
            except InvalidRequest as e:  # e.g. another base model, a rank over --max-lora-rank
                raise ConfigError(f"--adapters {directory}: {e}") from None
        self.announcer.adapters = store.hashes
        return service

    def _relays(self) -> list[str]:
        """The relays to serve through (the initial peers) if peers cannot dial this server directly, else none."""
        cfg = self.config
        if not cfg.relay or not cfg.initial_peers:
            return []
        if all(_is_loopback(maddr) for maddr in [*cfg.initial_peers, *cfg.host_maddrs]):
            return []  # the whole swarm is on this machine: every peer dials this one
        reachable = asyncio.run(check_reachability(cfg.initial_peers, cfg.host_maddrs, cfg.announce_maddrs))
        if reachable is None:
            logger.warning("reachability: no initial peer could check it; assuming others can dial this server")
            return []
        if reachable:
            logger.info("reachability: direct (the initial peers dialed this server)")
            return []
        if cfg.announce_maddrs:
            logger.warning("reachability: peers could not dial --announce-maddrs; announcing relayed addresses instead")
        logger.info("reachability: relay (the initial peers could not dial this server); serving through them as relays")
        return list(cfg.initial_peers)

    def _choose_device_and_dtype(self) -> tuple[torch.device, torch.dtype]:
        cfg = self.config
        device_name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(device_name)
        except RuntimeError:
            raise ConfigError(f"--device {cfg.device!r} is not a torch device") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was given but no CUDA device is available")
        if cfg.torch_dtype != "auto":
            dtype = getattr(torch, cfg.torch_dtype)
        elif device.type == "cpu":
            dtype = torch.float32
            logger.info("torch dtype float32: CPU kernels are fastest and exact in float32")
        else:
            checkpoint_dtype = self.model_config.dtype
            dtype = checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) else torch.float16
            logger.info("torch dtype %s: the checkpoint's half-precision dtype on GPU", dtype)
        return device, dtype

    def _check_memory(self, num_blocks: int) -> None:
        """Refuse a --num-blocks whose weights cannot fit in free memory, before loading anything."""
        if num_blocks > self.total_blocks:
            raise ConfigError(f"--num-blocks {num_blocks} is more than the model's {self.total_blocks} blocks")
        with torch.device("meta"):
            layer = self.family.layer_class(self.model_config)(self.model_config, layer_idx=0)
        block_bytes = sum(p.numel() for p in layer.parameters()) * torch.empty((), dtype=self.dtype).element_size()
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else psutil.virtual_memory().available
        if num_blocks * block_bytes > MEMORY_HEADROOM * free:
            raise ConfigError(
                f"--num-blocks {num_blocks} needs {num_blocks * block_bytes / 2**30:.1f} GiB for weights, "
                f"but only {free / 2**30:.1f} GiB are free on {self.device}"
            )

    def _throughput(self) -> Throughput:
        if self.config.throughput is not None:
            return Throughput(inference_rps=0.0, forward_tps=self.config.throughput)
        quant_type = self.config.quant_type
        key = f"{self.dht_prefix}|{self.dtype}|{quant_type}|{self.device}|threads={torch.get_num_threads()}"
        return get_throughput(self.model_config, self.family, self.dtype, quant_type, self.device, key)

    def _choose_span(self, throughput: Throughput) -> tuple[int, int]:
        asyncio.run(asyncio.sleep(random.uniform(0, JOIN_JITTER)))
        blocks = swarm_dht.fetch_block_records(self.dht, self.dht_prefix, self.total_blocks)
        totals = block_throughputs(blocks, exclude=self.peer_id)
        start = choose_start(totals, self.config.num_blocks, throughput.forward_tps, tie_breaker=self.peer_id)
        logger.info("chose blocks %d:%d: the weakest window (throughput per block there: %s)",
                    start, start + self.config.num_blocks, ", ".join(f"{t:.0f}" for t in totals[start : start + self.config.num_blocks]))
        return start, start + self.config.num_blocks

    def _load_runner(self, start: int, end: int) -> SpanRunner:
        cfg = self.config
        if self.fetching:
            fetch_model(cfg.model, cfg.initial_peers, {f"block:{index}" for index in range(start, end)})
        layers = load_span_layers(self.checkpoint, self.model_config, self.family, start, end, self.dtype, self.device, cfg.quant_type)
        return SpanRunner(self.model_config, self.family, start, layers).to(self.device)

    async def _serve(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        worker = ComputeWorker(max_merged_steps=cfg.max_merged_steps, max_merged_tokens=cfg.max_tokens_per_request)
        worker.start()
        budget = CacheBudget(cfg.attn_cache_tokens * self.runner.kv_bytes_per_token(self.runner.start, self.runner.end))
        limits = RequestLimits(
            max_batch_size=cfg.max_batch_size,
            max_tokens_per_request=cfg.max_tokens_per_request,
            max_session_length=cfg.max_session_length,
            max_lora_rank=cfg.max_lora_rank,
            max_session_lifetime=cfg.max_session_lifetime,
            request_timeout=cfg.request_timeout,
        )
        peer_limits = self.governor.limits
        info = pb.InfoResponse(
            version=__version__,
            dht_prefix=self.dht_prefix,
            span=pb.Span(start=self.record.start, end=self.record.end),
            hidden_size=self.model_config.hidden_size,
            torch_dtype=self.record.torch_dtype,
            codecs=list(CODECS),
            max_batch_size=limits.max_batch_size,
            max_tokens_per_request=limits.max_tokens_per_request,
            max_session_length=limits.max_session_length,
            max_lora_rank=limits.max_lora_rank,
            max_sessions_per_peer=peer_limits.max_sessions_per_peer,
            max_requests_per_peer=peer_limits.max_requests_per_peer,
            max_session_lifetime=limits.max_session_lifetime,
        )
        activations = ActivationStore(cfg.activation_store_mb << 20)
        handlers = SpanHandlers(
            runner=self.runner, worker=worker, budget=budget, limits=limits, info=info, activations=activations,
            governor=self.governor, adapters=self.adapters,
        )
        self.sharing = FetchService(checkpoint=self.checkpoint, manifest=load_manifest(self.checkpoint, cache_root()),
                                    governor=handlers.governor, request_timeout=cfg.request_timeout)
        self.announcer.record = dataclasses.replace(self.announcer.record, shares=shares_of(self.sharing.index()))
        p2p = await self.dht.replicate_p2p()
        await handlers.register(p2p)
        await self.sharing.register(p2p)
        await self.adapters.register(p2p)
        self.announcer.cache_tokens_left = handlers.cache_tokens_left
        await loop.run_in_executor(None, self.announcer.announce, ServerState.ONLINE)
        if cfg.new_swarm:
            maddrs = " ".join(swarm_dht.visible_maddrs(self.dht))
            print(f"Started a new swarm. To join it, pass: --initial-peers {maddrs}", flush=True)
        logger.info("serving blocks %d:%d of %s as %s", self.record.start, self.record.end, self.dht_prefix, self.peer_id)
        tasks = [asyncio.create_task(self.announcer.run(stop, p2p, self.peer_id))]
        announce_now = functools.partial(loop.run_in_executor, None, self.announcer.announce, ServerState.ONLINE)
        await self.adapters.announce()
        tasks.append(asyncio.create_task(self.adapters.run(stop, announce_now)))
        if cfg.num_blocks is not None:
            tasks.append(asyncio.create_task(self._rebalance(stop, handlers)))
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            logger.info("shutting down: announcing offline")
            try:
                await asyncio.wait_for(
                    loop.run_in_executor(None, self.announcer.announce, ServerState.OFFLINE), OFFLINE_ANNOUNCE_TIMEOUT
                )
            except Exception as e:
                logger.warning("could not announce offline: %s", e)
            worker.stop()

    async def _rebalance(self, stop: asyncio.Event, handlers: SpanHandlers) -> None:
        """Every balance period (jittered), move to a better window if the swarm gains clearly from it."""
        loop = asyncio.get_running_loop()
        cfg = self.config
        while not stop.is_set():
            await asyncio.sleep(cfg.balance_period * random.uniform(0.8, 1.2))
            try:
                blocks = await loop.run_in_executor(None, swarm_dht.fetch_block_records, self.dht, self.dht_prefix, self.total_blocks)
                current = self.announcer.record
                totals = block_throughputs(blocks, exclude=self.peer_id)
                target = should_move(totals, current.start, cfg.num_blocks, current.throughput, cfg.balance_quality, self.peer_id)
                if target is None:
                    continue
                start, end = target, target + cfg.num_blocks
                logger.info("moving from blocks %d:%d to %d:%d: the swarm is clearly better that way", current.start, current.end, start, end)
                runner = await loop.run_in_executor(None, self._load_runner, start, end)
                shared = await loop.run_in_executor(None, self.sharing.index)  # blocks just fetched are shared too
                self.announcer.record = dataclasses.replace(self.announcer.record, shares=shares_of(shared))
                await loop.run_in_executor(None, self.announcer.move, start, end)
                handlers.runner = runner  # open sessions keep the runner they started with
                handlers.info.span.CopyFrom(pb.Span(start=start, end=end))
            except Exception as e:  # a failed check is retried next period
                logger.warning("rebalancing check failed: %s", e)
