"""`qm-server`'s flags, made from the settings that config.py declares.

A setting is declared once (name, default, help, flag) on its dataclass; this module walks
the dataclasses to add one flag per setting and to build the configuration back from the
parsed arguments, so nothing here lists a limit by name.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
from pathlib import Path
from typing import Any, TypeVar, cast, get_type_hints

from qm_server.config import ServerConfig

T = TypeVar("T")


def add_setting_flags(parser: argparse.ArgumentParser, cls: type[Any] = ServerConfig) -> None:
    """One flag per `setting(...)` field of cls and of the settings dataclasses it holds."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            add_setting_flags(parser, kind)  # type: ignore[arg-type]
            continue
        if "help" not in f.metadata:
            continue  # not exposed on the command line
        default = f.default
        options: dict[str, Any] = {"dest": _dest(cls, f), "default": default}
        help_text = f.metadata["help"]
        if kind is bool:
            options["action"] = "store_true"
        else:
            options["type"] = _value_type(kind)
            if default is not None:
                help_text += " (default: %(default)s)"
            if f.metadata["choices"]:
                options["choices"] = f.metadata["choices"]
            else:
                options["metavar"] = f.metadata["metavar"] or _METAVARS[options["type"]]
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        parser.add_argument(flag, help=help_text, **options)


def settings_from_args(args: argparse.Namespace, cls: type[T]) -> T:
    """The settings the parsed flags describe; fields without a flag keep their defaults."""
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            values[f.name] = settings_from_args(args, cast(type[Any], kind))
        elif "help" in f.metadata:
            values[f.name] = getattr(args, _dest(cls, f))
    return cls(**values)


_METAVARS = {int: "N", float: "SECONDS", str: "TEXT", Path: "PATH"}


def _dest(cls: type[Any], f: dataclasses.Field[Any]) -> str:
    """The field's own name: settings are named apart across the dataclasses (a test
    checks), so `args.data_dir` reads as it always did."""
    return f.name


def _value_type(kind: Any) -> type[Any]:
    """int for `int` and `int | None`; likewise float, str and Path."""
    if isinstance(kind, types.UnionType):
        kind = next(k for k in kind.__args__ if k is not type(None))
    if kind not in (int, float, str, Path):
        raise TypeError(f"no flag type for {kind!r}")
    return kind  # type: ignore[no-any-return]
