"""A Swarm server: loads a span of blocks, serves it over hivemind P2P and announces it in the DHT.

`Server(config)` only stores; `run()` loads, serves until SIGTERM/SIGINT, then announces itself
offline before it exits so that clients route around it at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import torch

from swarm import dht as swarm_dht
from swarm.errors import ConfigError
from swarm.families import family_of, load_config
from swarm.model_id import model_dht_prefix, validate_dht_prefix
from swarm.model_source import resolve_model
from swarm.records import ModelRecord, ServerRecord, ServerState
from swarm.version import __version__
from swarm.wire import swarm_rpc_pb2 as pb
from swarm.wire.tensors import CODECS
from swarm.server.announcer import Announcer
from swarm.server.block_loader import load_span_layers
from swarm.server.cache_budget import CacheBudget
from swarm.server.compute_worker import ComputeWorker
from swarm.server.config import ServerConfig, parse_block_range
from swarm.server.handlers import RequestLimits, SpanHandlers
from swarm.server.span_runner import SpanRunner

logger = logging.getLogger(__name__)

OFFLINE_ANNOUNCE_TIMEOUT = 5.0  # seconds: shutting down must not hang on an unreachable DHT


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config

    def run(self) -> None:
        """Load the blocks, then serve until SIGTERM or SIGINT."""
        cfg = self.config
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        checkpoint = resolve_model(cfg.model)
        model_config = load_config(checkpoint)
        family = family_of(model_config)
        num_blocks = model_config.num_hidden_layers
        if cfg.blocks is None:
            start, end = 0, num_blocks
            logger.info("no --blocks given: serving all %d blocks", num_blocks)
        else:
            start, end = parse_block_range(cfg.blocks, num_blocks)
        dht_prefix = validate_dht_prefix(cfg.dht_prefix) if cfg.dht_prefix else model_dht_prefix(checkpoint)
        device, dtype = self._choose_device_and_dtype(model_config)
        layers = load_span_layers(checkpoint, model_config, family, start, end, dtype).to(device)
        self.runner = SpanRunner(model_config, family, start, layers).to(device)
        self.dht_prefix = dht_prefix
        self.record = ServerRecord(
            state=ServerState.JOINING,
            start=start,
            end=end,
            torch_dtype=str(dtype).removeprefix("torch."),
            codecs=CODECS,
            version=__version__,
            public_name=cfg.public_name,
        )
        self.model_record = ModelRecord(num_blocks=num_blocks, model_type=model_config.model_type)
        self.dht = swarm_dht.start_dht(
            cfg.initial_peers,
            host_maddrs=cfg.host_maddrs,
            announce_maddrs=cfg.announce_maddrs,
            identity_path=cfg.identity_path,
        )
        try:
            asyncio.run(self._serve())
        finally:
            self.dht.shutdown()

    def _choose_device_and_dtype(self, model_config) -> tuple[torch.device, torch.dtype]:  # noqa: ANN001
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
            dtype = model_config.dtype if model_config.dtype in (torch.float16, torch.bfloat16) else torch.float16
            logger.info("torch dtype %s: the checkpoint's half-precision dtype on GPU", dtype)
        return device, dtype

    async def _serve(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        worker = ComputeWorker()
        worker.start()
        budget = CacheBudget(cfg.attn_cache_tokens)
        limits = RequestLimits(
            max_batch_size=cfg.max_batch_size,
            max_tokens_per_request=cfg.max_tokens_per_request,
            max_session_length=cfg.max_session_length,
        )
        info = pb.InfoResponse(
            version=__version__,
            dht_prefix=self.dht_prefix,
            span=pb.Span(start=self.record.start, end=self.record.end),
            hidden_size=self.runner.config.hidden_size,
            torch_dtype=self.record.torch_dtype,
            codecs=list(CODECS),
            max_batch_size=limits.max_batch_size,
            max_tokens_per_request=limits.max_tokens_per_request,
            max_session_length=limits.max_session_length,
        )
        handlers = SpanHandlers(runner=self.runner, worker=worker, budget=budget, limits=limits, info=info)
        p2p = await self.dht.replicate_p2p()
        await handlers.register(p2p)
        announcer = Announcer(self.dht, self.dht_prefix, self.record, self.model_record, lambda: budget.tokens_left)
        await loop.run_in_executor(None, announcer.announce, ServerState.ONLINE)
        peer_id = swarm_dht.peer_id_of(self.dht)
        if cfg.new_swarm:
            maddrs = " ".join(swarm_dht.visible_maddrs(self.dht))
            print(f"Started a new swarm. To join it, pass: --initial-peers {maddrs}", flush=True)
        logger.info("serving blocks %d:%d of %s as %s", self.record.start, self.record.end, self.dht_prefix, peer_id)
        try:
            await announcer.run(stop)
        finally:
            logger.info("shutting down: announcing offline")
            try:
                await asyncio.wait_for(
                    loop.run_in_executor(None, announcer.announce, ServerState.OFFLINE), OFFLINE_ANNOUNCE_TIMEOUT
                )
            except Exception as e:
                logger.warning("could not announce offline: %s", e)
            worker.stop()
