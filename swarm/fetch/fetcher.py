"""Fetching a model's manifest, config, tokenizer and some parts' tensors from peers into the cache.

Order and trust: the manifest first, believed only if it hashes to the model id; then config.json,
which must equal the manifest's config; tokenizer files, which must have its sha256; then tensors,
whose sizes come from the manifest before any byte is asked for. Tensors download several at a time,
each from the least busy peer that shares its part, so a server's blocks come from several peers at
once. A peer that disconnects or stalls mid-tensor is avoided and the tensor continues from the byte
where it stopped on another peer; a peer whose bytes do not hash right is banned for this fetch and
the tensor is fetched again elsewhere (bytes from two peers that fail together are fetched again
from one, so an honest peer is never banned for another's lie). Files land in the cache only whole
and verified (swarm/fetch/store.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from swarm.dht import DHT, start_dht
from swarm.errors import ConfigError, RemoteError
from swarm.fetch import store
from swarm.fetch.providers import Providers, find_providers
from swarm.fetch.transfer import Oversized, download
from swarm.limits import FETCH_PARALLEL_DOWNLOADS, MAX_FETCHED_FILE_BYTES, MAX_MANIFEST_BYTES
from swarm.manifest import MANIFEST_FILE, Manifest, canonical, load_manifest
from swarm.records import CLIENT_PART
from swarm.transport import P2P
from swarm.wire import swarm_rpc_pb2 as pb

logger = logging.getLogger(__name__)

MAX_FAILURES_PER_PEER = 3  # disconnects or timeouts before a peer is no longer asked during this fetch


def part_label(part: str) -> str:
    return "the client part (embeddings, final norm, head)" if part == CLIENT_PART else part.replace(":", " ")


@dataclasses.dataclass
class _Progress:
    """One tensor's download so far: bytes received (in order), their running hash, and who sent them."""

    received: int = 0
    digest: "hashlib._Hash" = dataclasses.field(default_factory=hashlib.sha256)
    senders: set[str] = dataclasses.field(default_factory=set)


class ModelFetcher:
    """Fetches what a participant needs of one model into `store.model_dir(model_id)`.

    `dht` reads records; `p2p` calls peers (both from a started DHT peer, in the running loop).
    """

    def __init__(self, dht: DHT, p2p: P2P, model_id: str, *, parallel: int = FETCH_PARALLEL_DOWNLOADS, progress: bool = True):
        self.dht = dht
        self.p2p = p2p
        self.model_id = model_id
        self.directory = store.model_dir(model_id)
        self.parallel = parallel
        self.progress = progress
        self.liars: dict[str, str] = {}  # peer -> what it sent wrong: never asked again by this fetcher
        self.failures: Counter[str] = Counter()
        self.in_flight: Counter[str] = Counter()
        self.asked: set[str] = set()  # peers asked for tensors
        self._found: Providers | None = None
        self._found_all_blocks = False  # read with the manifest's number of blocks, not the index's claim

    async def fetch(self, parts: set[str], tokenizer: bool = False) -> Path:
        """Make the cache folder hold the manifest, config (and tokenizer) and `parts` ("client", "block:N").

        What the folder already holds is used as is, without asking the swarm.
        """
        manifest = self._cached_manifest()
        if manifest is None:
            manifest = await self._fetch_manifest(await self._providers(None))
        await self._fetch_config(manifest)
        for part in sorted(parts):
            if not manifest.tensors_of(part):
                raise ConfigError(f"model {self.model_id} has no {part_label(part)}: its manifest lists no tensor of it")
        missing = parts - store.parts_present(self.directory, manifest)
        if missing:  # before anything else is downloaded: is every missing part shared by someone?
            self._check_shared(manifest, await self._providers(manifest), missing)
        if tokenizer:
            await self._fetch_tokenizer(manifest)
        if missing:
            with store.locked(self.directory):  # staged part files have fixed names: one fetch of them at a time
                missing = parts - store.parts_present(self.directory, manifest)
                if missing:
                    await self._fetch_parts(manifest, await self._providers(manifest), missing)
        return self.directory

    async def _providers(self, manifest: Manifest | None) -> Providers:
        """The model's online servers (read once the manifest gives the number of blocks, and reused)."""
        if self._found is None or (manifest is not None and not self._found_all_blocks):
            num_blocks = int(manifest.config.get("num_hidden_layers", 0)) if manifest is not None else None
            loop = asyncio.get_running_loop()
            self._found = await loop.run_in_executor(None, find_providers, self.dht, self.model_id, num_blocks)
            self._found_all_blocks = manifest is not None
        return self._found

    # --- manifest, config, tokenizer --------------------------------------------------------------

    def _cached_manifest(self) -> Manifest | None:
        """The manifest already in the cache folder, if it is this model's (and matches the cached config)."""
        if not (self.directory / MANIFEST_FILE).is_file() or not (self.directory / "config.json").is_file():
            return None
        try:
            manifest = load_manifest(self.directory)
        except ConfigError as e:
            logger.warning("refetching the manifest: the cached one is unusable (%s)", e)
            return None
        return manifest if manifest.model_id == self.model_id else None

    async def _fetch_manifest(self, providers: Providers) -> Manifest:
        def check(data: bytes) -> str | None:
            try:
                manifest = Manifest.from_json(data.decode("utf-8", errors="strict"), "sent by the peer")
            except (ConfigError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: absurdly nested JSON
                return str(e) or type(e).__name__
            return None if manifest.model_id == self.model_id else f"its manifest hashes to {manifest.model_id}"

        data = await self._whole_file("the manifest", pb.FetchRequest(model_id=self.model_id, manifest=True), MAX_MANIFEST_BYTES,
                                      check, sorted(providers.parts))
        manifest = Manifest.from_json(data.decode(), "fetched", from_file=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        store.write_atomically(self.directory / MANIFEST_FILE, manifest.to_json().encode())
        return manifest

    async def _fetch_config(self, manifest: Manifest) -> None:
        path = self.directory / "config.json"
        if path.is_file() and _config_matches(path.read_bytes(), manifest) is None:
            return

        def check(data: bytes) -> str | None:
            return _config_matches(data, manifest)

        request = pb.FetchRequest(model_id=self.model_id, file="config.json")
        peers = sorted((await self._providers(manifest)).parts)
        store.write_atomically(path, await self._whole_file("config.json", request, MAX_FETCHED_FILE_BYTES, check, peers))

    async def _fetch_tokenizer(self, manifest: Manifest) -> None:
        for name, sha256 in sorted(manifest.tokenizer.items()):
            path = self.directory / name
            if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
                continue

            def check(data: bytes, sha256: str = sha256) -> str | None:
                return None if hashlib.sha256(data).hexdigest() == sha256 else "its sha256 differs from the manifest's"

            request = pb.FetchRequest(model_id=self.model_id, file=name)
            providers = await self._providers(manifest)  # a folder with the client part most likely has the tokenizer
            peers = providers.of(CLIENT_PART) or sorted(providers.parts)
            store.write_atomically(path, await self._whole_file(name, request, MAX_FETCHED_FILE_BYTES, check, peers))

    async def _whole_file(
        self, what: str, request: pb.FetchRequest, limit: int, check: Callable[[bytes], str | None], peers: list[str]
    ) -> bytes:
        """A small file from the first peer whose bytes pass `check` (None: fine, else why not)."""
        reasons = []
        random.shuffle(peers)
        for peer in peers:
            if peer in self.liars:
                continue
            parts: list[bytes] = []
            try:
                await download(self.p2p, peer, request, limit, parts.append)
            except Oversized as e:
                self._ban(peer, f"{what}: {e}")
                reasons.append(str(e))
                continue
            except RemoteError as e:
                self.failures[peer] += 1
                reasons.append(str(e))
                continue
            data = b"".join(parts)
            problem = check(data)
            if problem is None:
                return data
            self._ban(peer, f"{what} it sent is wrong: {problem}")
            reasons.append(f"server {peer[-8:]}: {problem}")
        raise ConfigError(f"no server of model {self.model_id} sent a valid {what} (asked {len(peers)}; "
                          f"{'; '.join(reasons[-3:]) or 'none could be asked'})")

    # --- tensors ----------------------------------------------------------------------------------

    def _check_shared(self, manifest: Manifest, providers: Providers, parts: set[str]) -> None:
        for part in sorted(parts, key=lambda part: (part != CLIENT_PART, int(part.split(":")[-1]) if ":" in part else 0)):
            if not providers.of(part):
                names = sorted(manifest.tensors_of(part))
                raise ConfigError(f"no online server of model {self.model_id} shares {part_label(part)} "
                                  f"(tensors {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")

    async def _fetch_parts(self, manifest: Manifest, providers: Providers, parts: set[str]) -> None:
        self._check_shared(manifest, providers, parts)
        staged = {part: store.StagedPart(self.directory, part, manifest.tensors_of(part)) for part in sorted(parts)}
        needed = sum(stage.total for stage in staged.values())
        free = shutil.disk_usage(self.directory).free
        if needed > free:
            raise ConfigError(f"fetching {len(parts)} part(s) of {self.model_id} needs {needed / 2**30:.2f} GiB in "
                              f"{self.directory}, but only {free / 2**30:.2f} GiB are free")
        jobs: list[tuple[str, str]] = []
        left: Counter[str] = Counter()
        for part, stage in staged.items():
            have = stage.open()
            for name in sorted(stage.entries):
                if name not in have:
                    jobs.append((part, name))
                    left[part] += 1
            if not left[part]:
                stage.finish()
        total = sum(staged[part].sizes[name] for part, name in jobs)
        began = time.perf_counter()
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(job)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"fetching {self.model_id}", disable=None if self.progress else True) as bar:

            async def worker() -> None:
                while not queue.empty():
                    part, name = queue.get_nowait()
                    await self._fetch_tensor(staged[part], part, name, providers.of(part), bar)
                    left[part] -= 1
                    if not left[part]:
                        staged[part].finish()

            tasks = [asyncio.create_task(worker()) for _ in range(min(self.parallel, len(jobs)))]
            try:
                await asyncio.gather(*tasks)
            except BaseException as e:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if isinstance(e, ConfigError):  # no peer can send some tensor: leave nothing of unfinished parts behind
                    for stage in staged.values():
                        stage.staging.unlink(missing_ok=True)
                raise
        senders = len(self.asked - set(self.liars))
        logger.info("fetched %d tensors (%.1f MB) of %s from %d peer(s) in %.2f s", len(jobs), total / 1e6, self.model_id,
                    senders, time.perf_counter() - began)

    async def _fetch_tensor(self, stage: store.StagedPart, part: str, name: str, peers: list[str], bar: tqdm) -> None:
        """One tensor into its place in the staged file, verified; from several peers in turn if they fail."""
        size, expected = stage.sizes[name], stage.entries[name].sha256
        progress = _Progress()
        failed_here: set[str] = set()
        attempts = 2 * len(peers) + 2
        for attempt in range(attempts + 1):
            if progress.received == size:
                if progress.digest.hexdigest() == expected:
                    return
                if len(progress.senders) == 1:
                    self._ban(progress.senders.pop(), f"sent bytes of tensor {name} that do not match the manifest")
                else:
                    logger.warning("tensor %s from %d peers does not match the manifest; fetching it again from one",
                                   name, len(progress.senders))
                bar.update(-progress.received)
                progress = _Progress()
            if attempt == attempts:
                break
            peer = self._choose(peers, failed_here)
            if peer is None:
                raise ConfigError(
                    f"could not fetch tensor {name} of {part_label(part)} of {self.model_id}: every server sharing it failed "
                    f"or sent wrong bytes" + (f" (banned: {', '.join(p[-8:] for p in self.liars)})" if self.liars else "")
                )
            offset = progress.received

            def sink(data: bytes, progress: _Progress = progress, peer: str = peer) -> None:
                stage.write(name, progress.received, data)
                progress.digest.update(data)
                progress.received += len(data)
                progress.senders.add(peer)
                bar.update(len(data))

            request = pb.FetchRequest(model_id=self.model_id, tensor=pb.TensorRange(name=name, offset=offset, length=size - offset))
            self.in_flight[peer] += 1
            self.asked.add(peer)
            why = "its stream ended early"
            try:
                await download(self.p2p, peer, request, size - offset, sink)
            except Oversized as e:
                self._ban(peer, str(e))
                bar.update(-progress.received)
                progress = _Progress()
                continue
            except RemoteError as e:
                why = str(e)
            finally:
                self.in_flight[peer] -= 1
            if progress.received < size:
                logger.info("server %s stopped sending tensor %s at byte %d of %d (%s); continuing elsewhere", peer[-8:], name,
                            progress.received, size, why)
                failed_here.add(peer)
                self.failures[peer] += 1
        raise ConfigError(f"could not fetch tensor {name} of {part_label(part)} of {self.model_id}: too many failed attempts")

    def _choose(self, peers: list[str], failed_here: set[str]) -> str | None:
        """The least busy peer sharing the tensor that has not lied, nor failed too often; one that has not
        failed on this tensor first."""
        usable = [peer for peer in peers if peer not in self.liars and self.failures[peer] < MAX_FAILURES_PER_PEER]
        if not usable:
            return None
        return min(usable, key=lambda peer: (peer in failed_here, self.in_flight[peer], self.failures[peer], random.random()))

    def _ban(self, peer: str, reason: str) -> None:
        self.liars[peer] = reason
        logger.warning("banned server %s for this fetch: %s", peer, reason)


def fetch_model(model_id: str, initial_peers: list[str], parts: set[str], *, tokenizer: bool = False) -> Path:
    """`ModelFetcher.fetch` for a process that is not in the swarm (yet): it joins as a DHT client for
    the fetch only (blocking; runs its own event loop, so call it outside one)."""
    return asyncio.run(_fetch_as_client(model_id, initial_peers, parts, tokenizer))


async def _fetch_as_client(model_id: str, initial_peers: list[str], parts: set[str], tokenizer: bool) -> Path:
    dht = start_dht(initial_peers, client_mode=True)
    try:
        p2p = await dht.replicate_p2p()
        try:
            return await ModelFetcher(dht, p2p, model_id).fetch(parts, tokenizer=tokenizer)
        finally:
            await p2p.shutdown()
    finally:
        dht.shutdown()


def _config_matches(data: bytes, manifest: Manifest) -> str | None:
    """None if `data` is a config.json equal to the manifest's config, else why not."""
    try:
        config = canonical(json.loads(data))
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        return f"config.json is not valid JSON: {type(e).__name__}: {e}"
    return None if config == manifest.config else "config.json does not match the model's manifest"
