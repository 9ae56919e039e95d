"""The health page's web app: `/` (HTML, no JavaScript), `/api/v1/state` (JSON), `/metrics` (Prometheus).

The app reads the DHT in a background task every refresh period; `?refresh=1` asks for a fresh
read now, at most once per MIN_REFRESH_INTERVAL. Every string from the swarm is escaped by
Jinja2's autoescaping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from swarm.health.metrics import prometheus_text
from swarm.health.state import SwarmState, probe_servers
from swarm.transport import P2P

logger = logging.getLogger(__name__)

MIN_REFRESH_INTERVAL = 2.0  # seconds between on-demand DHT reads

_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent), autoescape=jinja2.select_autoescape(["html"])
)


class StateCache:
    """The latest snapshot, refreshed periodically and on demand (rate-limited), servers probed."""

    def __init__(self, collect: Callable[[], SwarmState], period: float, p2p_factory: Callable[[], Awaitable[P2P]] | None):
        self.collect = collect
        self.period = period
        self.p2p_factory = p2p_factory
        self.p2p: P2P | None = None
        self.state = SwarmState(0.0, [])
        self._lock = asyncio.Lock()
        self._last_read = 0.0

    async def refresh(self, force: bool = False) -> SwarmState:
        async with self._lock:
            if force or time.monotonic() - self._last_read >= MIN_REFRESH_INTERVAL:
                try:
                    state = await asyncio.get_running_loop().run_in_executor(None, self.collect)
                    if self.p2p_factory is not None:
                        self.p2p = self.p2p or await self.p2p_factory()
                        state = await probe_servers(state, self.p2p)
                    self.state = state
                except Exception as e:  # keep serving the last snapshot; the next read may succeed
                    logger.warning("could not read the DHT: %s", e)
                self._last_read = time.monotonic()
        return self.state

    async def run(self) -> None:
        while True:
            await self.refresh(force=True)
            await asyncio.sleep(self.period)


def create_app(
    collect: Callable[[], SwarmState], refresh_period: float = 10.0, p2p_factory: Callable[[], Awaitable[P2P]] | None = None
) -> FastAPI:
    """`collect` reads the DHT (blocking); `p2p_factory` gives a P2P handle in the app's loop to probe servers."""
    cache = StateCache(collect, refresh_period, p2p_factory)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(cache.run())
        yield
        task.cancel()

    app = FastAPI(title="Swarm health", lifespan=lifespan, docs_url=None, redoc_url=None)

    async def current(request: Request) -> SwarmState:
        if request.query_params.get("refresh"):
            return await cache.refresh()
        return cache.state

    @app.get("/", response_class=HTMLResponse)
    async def page(request: Request) -> HTMLResponse:
        state = await current(request)
        html = _TEMPLATES.get_template("page.html").render(
            models=state.models, age=int(time.time() - state.updated_at) if state.updated_at else "—",
            refresh_seconds=int(refresh_period), invalid_index_records=state.invalid_index_records,
        )
        return HTMLResponse(html)

    @app.get("/api/v1/state")
    async def state_json(request: Request) -> JSONResponse:
        return JSONResponse((await current(request)).to_json())

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(request: Request) -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(await current(request)), media_type="text/plain; version=0.0.4")

    return app
