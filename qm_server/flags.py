"""`qm-server`'s flags, made from the settings that config.py declares.

A setting is declared once (name, default, help, flag) on its dataclass; this module walks
the dataclasses to add one flag per setting and to build the configuration back from the
parsed arguments, so nothing here lists a limit by name.

Every flag can also be set by an environment variable (`environment_defaults`): the way
containers and service managers configure a process. The variable only changes the flag's
default, so a flag on the command line wins, and a bad value is refused as the flag's would
be (exit status 2), naming the variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
from collections.abc import Mapping
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


ENV_PREFIX = "QM_"
ENV_RULE = (
    "Every flag can also be set by an environment variable: QM_ and the flag's name "
    "upper-cased, dashes as underscores (--data-dir: QM_DATA_DIR); a flag given on the "
    "command line wins over its variable."
)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def env_name(flag: str) -> str:
    """QM_DATA_DIR for --data-dir."""
    return ENV_PREFIX + flag.removeprefix("--").upper().replace("-", "_")


def environment_defaults(
    parser: argparse.ArgumentParser, environ: Mapping[str, str] = os.environ
) -> None:
    """Name each long flag's variable in its help, and take the variable's value, when set
    and not empty, as the flag's default. Called once all flags are added, so the rule
    covers every flag, those made from config.py and the others alike; --help and
    --version are left alone. An empty variable counts as unset, as a shell's `QM_X=`
    usually means."""
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or action.default == argparse.SUPPRESS:
            continue
        name = env_name(longs[0])
        action.help = f"{action.help or ''} [env: {name}]".lstrip()
        if environ.get(name, "") != "":
            action.default = _from_environment(parser, action, name, environ[name])


def _from_environment(
    parser: argparse.ArgumentParser, action: argparse.Action, name: str, text: str
) -> Any:
    """The value text gives the flag, converted and checked as argparse would check it on
    the command line; a bad one ends the program with a usage error naming the variable."""
    if action.nargs == 0:  # store_true
        if text.strip().lower() in _TRUE:
            return True
        if text.strip().lower() in _FALSE:
            return False
        parser.error(f"{name}: {text!r} is not a boolean (use one of 1, true, 0, false)")
    convert = action.type if callable(action.type) else str
    try:
        value = convert(text)
    except (TypeError, ValueError):
        type_name = getattr(convert, "__name__", "")
        parser.error(f"{name}: invalid {type_name} value: {text!r}")
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(repr, action.choices))
        parser.error(f"{name}: invalid choice: {text!r} (choose from {choices})")
    return value


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
