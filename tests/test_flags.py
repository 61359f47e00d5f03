"""qm-server's flags come from the settings declared in config.py, and map back onto them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from qm_server.__main__ import build_parser, config_from_args
from qm_server.config import DURABILITY_MODES, ServerConfig
from qm_server.store.sqlite_file import SYNCHRONOUS


def flagged_fields(cls: type[Any] = ServerConfig) -> list[str]:
    names: list[str] = []
    for f in dataclasses.fields(cls):
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            names += flagged_fields(f.default_factory)
        elif "help" in f.metadata:
            names.append(f.name)
    return names


def test_no_flags_give_the_declared_defaults() -> None:
    assert config_from_args(build_parser().parse_args([])) == ServerConfig()


def test_each_flag_sets_its_setting() -> None:
    flags = [
        ("--max-batch", "7"),
        ("--login-failures", "3"),
        ("--session-ttl", "2.5"),
        ("--tls-cert", "c.pem"),
        ("--durability", "process-crash"),
        ("--max-streams-per-connection", "9"),
    ]
    args = build_parser().parse_args([*(a for pair in flags for a in pair), "--allow-plaintext"])
    config = config_from_args(args)
    assert config.limits.max_batch == 7
    assert config.auth.failures_before_backoff == 3
    assert config.session_ttl_s == 2.5
    assert config.tls.cert == Path("c.pem")
    assert config.allow_plaintext is True
    assert config.durability == "process-crash"
    assert config.max_streams_per_connection == 9


def test_settings_are_named_apart_so_each_has_its_own_flag() -> None:
    names = flagged_fields()
    assert len(names) == len(set(names))
    assert {"max_batch", "rsa_bits", "cert", "min_client_ping_interval_ms"} <= set(names)


def test_the_durability_choices_are_the_modes_the_store_knows() -> None:
    assert set(DURABILITY_MODES) == set(SYNCHRONOUS)
