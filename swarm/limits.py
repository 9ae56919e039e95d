"""Limits and timeouts that clients and servers must agree on, in one place.

Numbers with a source say where they came from; the rest are conservative defaults that a
server may lower (never raise past what a client expects) through its config.
"""

from __future__ import annotations

# Streams are cut into frames of about 1 MiB: hivemind's loopback throughput is best there
# (notes/hivemind.md §3), and unary calls cap at 4 MiB.
MAX_FRAME_BYTES = 1 << 20
# A whole message (all its frames) may not exceed this; checked while frames arrive.
MAX_MESSAGE_BYTES = 256 << 20

# Dtypes a hidden-state tensor may have on the wire.
WIRE_DTYPES = ("float32", "bfloat16", "float16")

# Defaults a server announces and enforces per request.
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_TOKENS_PER_REQUEST = 8192  # batch * new tokens in one forward call or inference step
DEFAULT_MAX_SESSION_LENGTH = 8192  # tokens per sequence in one inference session
DEFAULT_MAX_SESSION_LIFETIME = 4 * 3600.0  # seconds an inference session may stay open
DEFAULT_MAX_SESSIONS_PER_PEER = 16  # inference sessions one peer may hold open on a server
DEFAULT_MAX_REQUESTS_PER_PEER = 8  # forward/backward requests one peer may have in progress on a server

# DHT records: servers refresh every REFRESH_PERIOD and records live twice that long, so one
# missed refresh does not drop a server (DESIGN.md, "DHT records").
RECORD_REFRESH_PERIOD = 30.0  # seconds
RECORD_EXPIRATION = 2 * RECORD_REFRESH_PERIOD  # seconds

# Client-side timeouts.
CONNECT_TIMEOUT = 20.0  # seconds: opening a session or a first call to a server
STEP_TIMEOUT = 60.0  # seconds: one inference step or forward call through one server
ROUTE_WAIT = 30.0  # seconds: how long to wait for missing blocks to appear before giving up

# A server closes an inference session that sent nothing for this long and frees its cache.
SESSION_IDLE_TIMEOUT = 300.0  # seconds
# A request stream must deliver its whole first message within this (a slow-drip sender holds nothing longer).
DEFAULT_REQUEST_TIMEOUT = 30.0  # seconds
# How long an open waits for cache room before the server refuses it.
CACHE_WAIT_TIMEOUT = 10.0  # seconds

# Server-to-server push: a step travels server to server as one unary message (hivemind caps those
# at 4 MiB, notes/hivemind.md §3); a larger one (a long prefill) goes through the client instead.
PUSH_MAX_BYTES = 2 << 20  # of hidden states at 4 bytes per value, leaving room for codec scales and fields
# Fetching a model's files from peers (swarm/fetch/). A chunk fills one frame with room for its tags.
FETCH_CHUNK_BYTES = MAX_FRAME_BYTES - 1024
MAX_MANIFEST_BYTES = 64 << 20  # a 1000-block model's manifest is a few MB
MAX_FETCHED_FILE_BYTES = 64 << 20  # config and tokenizer files (the manifest gives their hashes, not sizes)
FETCH_CHUNK_TIMEOUT = 30.0  # seconds a peer may take to send the next chunk
FETCH_PARALLEL_DOWNLOADS = 4  # tensors downloaded at once, spread over the peers that share them
