"""Tensor codecs for the wire: raw, half precision, bitsandbytes' blockwise int8 and nf4, and nf4o.

Hidden states and gradients travel as `swarm.rpc.Tensor`. The client picks, per request, the
codec of what it sends and of what it wants back; servers announce the codecs they accept.
Decoding never unpickles: it reads bytes of an allow-listed layout and checks every length
against the declared shape before building the tensor, and rejects NaN/Inf that a codec
cannot produce from finite inputs.

Bytes per value (fp32 input): none 4, fp16/bf16 2, int8 1 + 4/64 (scales), nf4 0.5 + 4/64,
nf4o 0.5 + 2/64 (scales) + 4/64 (outliers). Blocks of 64 values never straddle tokens for hidden
sizes that are multiples of 64, so a token quantizes the same whether it travels alone (decode) or
with others (prefill).

nf4o exists because hidden states have a few huge channels (SmolLM2's channel 507 reaches 24890
where a token's rms is about 6): a block of 4-bit codes scaled by its absolute maximum then
rounds the block's other values to zero. nf4o keeps the largest |values| of each row (the last
dimension, a token's hidden vector), one per block of 64 on average, apart as (uint16 position,
bfloat16 value) and codes the rest as NormalFloat with a bfloat16 scale per block: 38 bytes per
64 values, 0.297x bf16. scripts/bench_codecs.py measures what that buys (README, "Wire codecs").
"""

from __future__ import annotations

import logging
import math

# bitsandbytes warns at import, on CPUs with AVX512-BF16, that an optional kernel package is
# missing (bitsandbytes/backends/cpu/ops.py); it falls back to its own kernels, which is fine here.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import bitsandbytes.functional as bnb_functional  # noqa: E402
import torch  # noqa: E402

from swarm.errors import InvalidRequest
from swarm.limits import WIRE_DTYPES
from swarm.wire import swarm_rpc_pb2 as pb

CODECS = ("none", "fp16", "bf16", "int8", "nf4", "nf4o")
# Chosen by scripts/bench_codecs.py on the default model (see README, "Wire codecs").
DEFAULT_CODEC = "int8"
BLOCK_SIZE = 64

_TORCH_DTYPES = {name: getattr(torch, name) for name in WIRE_DTYPES}
_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
_INT8_CODE = bnb_functional.create_dynamic_map(signed=True)  # the map bitsandbytes uses by default
_NF4_LEVELS = bnb_functional.get_4bit_type("nf4", device="cpu").float()  # 16 values in [-1, 1], code 7 is 0
_NF4_MIDPOINTS = (_NF4_LEVELS[1:] + _NF4_LEVELS[:-1]) / 2
MAX_NF4O_ROW = 2**16  # outlier positions travel as uint16


def check_codec(codec: str) -> str:
    """`codec` if known (the empty string means "none"); InvalidRequest naming the known ones otherwise."""
    codec = codec or "none"
    if codec not in CODECS:
        raise InvalidRequest(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")
    return codec


def encode(tensor: torch.Tensor, codec: str = "none") -> pb.Tensor:
    """Encode a float tensor of a wire dtype with `codec`."""
    codec = check_codec(codec)
    dtype_name = str(tensor.dtype).removeprefix("torch.")
    if dtype_name not in _TORCH_DTYPES:
        raise InvalidRequest(f"dtype {dtype_name} cannot go on the wire (allowed: {', '.join(WIRE_DTYPES)})")
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    message = pb.Tensor(shape=list(tensor.shape), dtype=dtype_name, codec=codec)
    if codec == "none":
        message.data = _raw_bytes(flat)
    elif codec in _HALF:
        message.data = _raw_bytes(flat.to(_HALF[codec]))
    elif codec == "nf4o":
        _encode_nf4o(flat.float(), tensor.shape[-1] if tensor.dim() else 1, message)
    elif flat.numel() > 0:
        if codec == "int8":
            codes, state = bnb_functional.quantize_blockwise(flat.float(), code=_INT8_CODE, blocksize=BLOCK_SIZE)
        else:
            codes, state = bnb_functional.quantize_4bit(flat.float(), blocksize=BLOCK_SIZE, quant_type="nf4")
        message.data = _raw_bytes(codes.reshape(-1))
        message.scales = _raw_bytes(state.absmax.float())
        message.block_size = BLOCK_SIZE
    return message


def encode_mask(mask: torch.Tensor | None) -> bytes:
    """A padding mask (batch, tokens) of 0/1 as one byte per entry; b"" if there is none or it has no pads."""
    if mask is None or bool(mask.all()):
        return b""
    return mask.to(torch.uint8).contiguous().numpy().tobytes()


def decode_mask(data: bytes, batch: int, tokens: int) -> torch.Tensor | None:
    """The (batch, tokens) bool mask that `encode_mask` wrote, checked against the tensor it pads; None if empty."""
    if not data:
        return None
    if len(data) != batch * tokens:
        raise InvalidRequest(f"attention mask has {len(data)} bytes, expected batch x tokens = {batch * tokens}")
    values = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(batch, tokens)
    if bool((values > 1).any()):
        raise InvalidRequest("attention mask bytes must be 0 (pad) or 1 (token)")
    return values.bool()


def extend_padding_mask(
    mask: torch.Tensor | None, position: int, new: torch.Tensor | None, batch: int, new_tokens: int
) -> torch.Tensor | None:
    """A session's padding mask (batch, position + new_tokens) after a step at `position`, from the mask
    so far (cropped to `position`) and the new tokens' (None: all real); None while nothing was padded.
    Client and server keep the same mask this way: the client for replays, the server for attention."""
    if mask is None and new is None:
        return None
    past = mask[:, :position] if mask is not None else torch.ones(batch, position, dtype=torch.bool)
    now = new if new is not None else torch.ones(batch, new_tokens, dtype=torch.bool)
    return torch.cat([past, now], dim=1)


MAX_DIMS = 8
MAX_DIM_SIZE = 2**31 - 1  # torch's strides overflow well before the bytes would run out


def _check_shape(shape: tuple[int, ...]) -> None:
    """InvalidRequest unless torch can hold a tensor of this shape (even an empty one: a zero in one
    dimension does not make 2**40 in another harmless to torch's stride arithmetic)."""
    if len(shape) > MAX_DIMS:
        raise InvalidRequest(f"tensor has {len(shape)} dimensions, more than {MAX_DIMS}")
    if any(size > MAX_DIM_SIZE for size in shape) or math.prod(max(size, 1) for size in shape) > MAX_DIM_SIZE * 4:
        raise InvalidRequest(f"tensor shape {shape} is too large")


def decode(message: pb.Tensor, max_elements: int | None = None) -> torch.Tensor:
    """Decode a tensor, raising InvalidRequest if its header and payload disagree."""
    codec = check_codec(message.codec)
    dtype = _TORCH_DTYPES.get(message.dtype)
    if dtype is None:
        raise InvalidRequest(f"dtype {message.dtype!r} is not allowed (allowed: {', '.join(WIRE_DTYPES)})")
    shape = tuple(message.shape)
    _check_shape(shape)
    numel = math.prod(shape)
    if max_elements is not None and numel > max_elements:
        raise InvalidRequest(f"tensor of shape {shape} has {numel} elements, more than the limit {max_elements}")
    if codec == "none":
        return _from_raw(message.data, dtype, shape, f"{message.dtype}")
    if codec in _HALF:
        return _from_raw(message.data, _HALF[codec], shape, codec).to(dtype)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    if message.block_size != BLOCK_SIZE:
        raise InvalidRequest(f"{codec} block size {message.block_size} is not supported (use {BLOCK_SIZE})")
    num_blocks = -(-numel // BLOCK_SIZE)
    if codec == "nf4o":
        return _decode_nf4o(message, shape, num_blocks).to(dtype)
    absmax = _from_raw(message.scales, torch.float32, (num_blocks,), f"{codec} scales")
    if not torch.isfinite(absmax).all() or (absmax < 0).any():
        raise InvalidRequest(f"{codec} scales must be finite and non-negative")
    if codec == "int8":
        codes = _from_raw(message.data, torch.uint8, (numel,), "int8 codes")
        values = bnb_functional.dequantize_blockwise(codes, absmax=absmax, code=_INT8_CODE, blocksize=BLOCK_SIZE)
    else:
        codes = _from_raw(message.data, torch.uint8, (-(-numel // 2), 1), "nf4 codes")
        state = bnb_functional.QuantState(
            absmax=absmax, shape=torch.Size([numel]), dtype=torch.float32, blocksize=BLOCK_SIZE, quant_type="nf4"
        )
        values = bnb_functional.dequantize_4bit(codes, quant_state=state)
    return values.reshape(shape).to(dtype)


def encoded_size(message: pb.Tensor) -> int:
    """Bytes of payload (data, scales, outliers) a tensor takes on the wire."""
    return len(message.data) + len(message.scales) + len(message.outlier_index) + len(message.outlier_values)


def _outliers_per_row(row: int) -> int:
    return -(-row // BLOCK_SIZE)


def _encode_nf4o(flat: torch.Tensor, row: int, message: pb.Tensor) -> None:
    """Fill `message` with `flat` (numel,) float32, seen as rows of `row` values (see the module docstring)."""
    numel = flat.numel()
    if numel == 0:
        return
    if row > MAX_NF4O_ROW:
        raise InvalidRequest(f"nf4o carries rows of at most {MAX_NF4O_ROW} values, got {row}")
    rows = flat.reshape(-1, row).clone()
    index = rows.abs().topk(_outliers_per_row(row), dim=1).indices  # (rows, outliers per row)
    outliers = rows.gather(1, index).to(torch.bfloat16)
    rows.scatter_(1, index, 0.0)
    blocks = torch.nn.functional.pad(rows.reshape(-1), (0, -numel % BLOCK_SIZE)).reshape(-1, BLOCK_SIZE)
    absmax = blocks.abs().amax(dim=1)
    scales = absmax.to(torch.bfloat16)
    rounded_down = scales.float() < absmax  # round scales up, so that every value fits in [-1, 1]
    scales[rounded_down] = torch.nextafter(scales[rounded_down], torch.tensor(math.inf, dtype=torch.bfloat16))
    divisor = torch.where(scales > 0, scales.float(), 1.0)[:, None]
    # The nearest level's code: how many midpoints lie below (torch.bucketize is ~100x slower on CPU here).
    codes = ((blocks / divisor)[..., None] > _NF4_MIDPOINTS).sum(-1, dtype=torch.uint8).reshape(-1)[:numel]
    codes = torch.nn.functional.pad(codes, (0, numel % 2), value=7)  # an odd count ends with code 7 (zero)
    message.data = _raw_bytes(codes[0::2] << 4 | codes[1::2])
    message.scales = _raw_bytes(scales)
    message.block_size = BLOCK_SIZE
    message.outlier_index = _raw_bytes(index.to(torch.uint16))
    message.outlier_values = _raw_bytes(outliers)


def _decode_nf4o(message: pb.Tensor, shape: tuple[int, ...], num_blocks: int) -> torch.Tensor:
    """The float32 tensor of `shape` an nf4o message holds; every length is checked before use."""
    numel = math.prod(shape)
    row = shape[-1] if shape else 1
    if row > MAX_NF4O_ROW:
        raise InvalidRequest(f"nf4o carries rows of at most {MAX_NF4O_ROW} values, got {row}")
    outliers_shape = (numel // row, _outliers_per_row(row))
    scales = _from_raw(message.scales, torch.bfloat16, (num_blocks,), "nf4o scales").float()
    if not torch.isfinite(scales).all() or (scales < 0).any():
        raise InvalidRequest("nf4o scales must be finite and non-negative")
    packed = _from_raw(message.data, torch.uint8, (-(-numel // 2),), "nf4o codes")
    index = _from_raw(message.outlier_index, torch.uint16, outliers_shape, "nf4o outlier positions").long()
    outliers = _from_raw(message.outlier_values, torch.bfloat16, outliers_shape, "nf4o outlier values").float()
    if bool((index >= row).any()):
        raise InvalidRequest(f"nf4o outlier positions must be below the row length {row}")
    if not torch.isfinite(outliers).all():
        raise InvalidRequest("nf4o outlier values must be finite")
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:numel].long()
    blocks = torch.nn.functional.pad(_NF4_LEVELS[codes], (0, -numel % BLOCK_SIZE)).reshape(-1, BLOCK_SIZE)
    rows = (blocks * scales[:, None]).reshape(-1)[:numel].reshape(outliers_shape[0], row)
    return rows.scatter_(1, index, outliers).reshape(shape)


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.view(torch.uint8).numpy().tobytes()


def _from_raw(data: bytes, dtype: torch.dtype, shape: tuple[int, ...], what: str) -> torch.Tensor:
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if len(data) != expected:
        raise InvalidRequest(f"{what} of shape {shape} needs {expected} bytes, got {len(data)}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)
