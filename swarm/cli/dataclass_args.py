"""Argparse options generated from a config dataclass, so that each default exists once.

A field's `metadata` may hold `help`, `positional` (bool), `choices` and `metavar`; list fields
take several values (`nargs="*"`), bool fields become flags (`--x`; `--x/--no-x` if true by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")


def add_dataclass_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        meta = field.metadata
        if meta.get("cli") is False:
            continue
        hint = hints[field.name]
        base = _base_type(hint)
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None
        )
        help_text = meta.get("help", "")
        if default not in (None, False, "", []):
            help_text += f" (default: {' '.join(map(str, default)) if isinstance(default, (list, tuple)) else default})"
        kwargs: dict[str, Any] = dict(help=help_text)
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        if meta.get("positional"):
            parser.add_argument(field.name, type=base, **kwargs)
            continue
        flag = "--" + field.name.replace("_", "-")
        if base is bool and default:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, **kwargs)
        elif base is bool:
            parser.add_argument(flag, action="store_true", default=default, **kwargs)
        elif typing.get_origin(_strip_optional(hint)) in (list, tuple):
            parser.add_argument(flag, nargs="*", type=str, default=default, **kwargs)
        else:
            parser.add_argument(flag, type=base, default=default, **kwargs)


def config_from_namespace(config_class: type[ConfigT], namespace: argparse.Namespace) -> ConfigT:
    names = {field.name for field in dataclasses.fields(config_class)}  # type: ignore[arg-type]
    return config_class(**{name: value for name, value in vars(namespace).items() if name in names})


def _strip_optional(hint: Any) -> Any:
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType")) and len(args) == 1:
        return args[0]
    return hint


def _base_type(hint: Any) -> type:
    hint = _strip_optional(hint)
    if typing.get_origin(hint) in (list, tuple):
        return str
    return hint if isinstance(hint, type) else str
