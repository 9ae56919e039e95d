"""Which keyword argument a transformers function takes its KV cache by.

transformers renames this argument between minor releases: 5.23 calls it `past_key_values`, 5.24
calls it `cache` (and still accepts the old name with a FutureWarning). Passing the cache under
the wrong name is silent: the callee sees no cache and runs stateless. So nothing in Swarm spells
the name out; it is read off the signature of the function that receives it, by its annotation
(`Cache | None`), once per function.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any

import transformers
from transformers import Cache

from swarm.errors import ConfigError

KNOWN_NAMES = ("cache", "past_key_values")  # newest first: used only if no parameter is annotated


@functools.cache
def cache_argument(function: Callable[..., Any]) -> str:
    """The name of `function`'s parameter that takes a `transformers.Cache`.

    Raises ConfigError if there is none, or several: this transformers release changed the API in
    a way Swarm does not know, and guessing would run generation without its cache.
    """
    parameters = inspect.signature(function).parameters
    annotated = [name for name, parameter in parameters.items() if _names_cache(parameter.annotation)]
    if len(annotated) == 1:
        return annotated[0]
    known = [name for name in KNOWN_NAMES if name in parameters]
    if not annotated and known:
        return known[0]
    raise ConfigError(
        f"cannot tell which argument of {getattr(function, '__qualname__', function)} takes the KV cache "
        f"(candidates: {annotated or list(parameters)}) in transformers {transformers.__version__}; "
        "install the versions Swarm was tested with (scripts/setup-venv.sh uses requirements/lock.txt)"
    )


def _names_cache(annotation: object) -> bool:
    """Whether a parameter annotation is `Cache`, a subclass of it, or an optional/union of one."""
    if isinstance(annotation, str):  # postponed annotations
        return "Cache" in annotation
    if isinstance(annotation, type):
        return issubclass(annotation, Cache)
    return any(_names_cache(member) for member in typing.get_args(annotation))
