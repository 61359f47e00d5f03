"""Every `qm-server` flag can be set by its environment variable; the flag wins."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from server_process import ServerProcess, qm_server

from qm_server.__main__ import build_parser, config_from_args
from qm_server.flags import env_name


@pytest.fixture(autouse=True)
def no_qm_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' own environment sets no server flag."""
    for action in build_parser()._actions:
        for option in action.option_strings:
            monkeypatch.delenv(env_name(option), raising=False)


def long_flags() -> list[str]:
    """The first long option of every flag but --help and --version."""
    return [
        next(o for o in action.option_strings if o.startswith("--"))
        for action in build_parser()._actions
        if action.option_strings and action.default != argparse.SUPPRESS
    ]


def error_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The usage error that parsing argv ends with (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


def test_the_variable_is_qm_and_the_flag_upper_cased() -> None:
    assert env_name("--data-dir") == "QM_DATA_DIR"
    assert env_name("--listen") == "QM_LISTEN"
    assert env_name("--max-waiting-polls-per-user") == "QM_MAX_WAITING_POLLS_PER_USER"


def test_help_names_every_flags_variable_and_the_rule() -> None:
    flags = long_flags()
    assert len(flags) >= 40 and "--log-level" in flags and "--port-file" in flags
    text = re.sub(r"\s+", " ", build_parser().format_help())
    assert "Every flag can also be set by an environment variable" in text
    for flag in flags:
        assert f"[env: {env_name(flag)}]" in text, flag


def test_variables_set_flags_of_every_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QM_LISTEN", "0.0.0.0:7000")  # str
    monkeypatch.setenv("QM_DATA_DIR", "/srv/qm")  # Path
    monkeypatch.setenv("QM_SESSION_TTL", "12.5")  # float, its own flag name
    monkeypatch.setenv("QM_MAX_BATCH", "17")  # int, in Limits
    monkeypatch.setenv("QM_LOGIN_FAILURES", "9")  # int, a flag named apart from its field
    monkeypatch.setenv("QM_DURABILITY", "process-crash")  # a choice
    monkeypatch.setenv("QM_NEW_KEY", "true")  # store_true
    monkeypatch.setenv("QM_MAX_CONCURRENT_RPCS", "64")  # int | None
    monkeypatch.setenv("QM_LOG_LEVEL", "debug")  # a flag __main__ adds itself
    args = build_parser().parse_args([])
    config = config_from_args(args)
    assert config.listen == "0.0.0.0:7000"
    assert config.data_dir == Path("/srv/qm")
    assert config.session_ttl_s == 12.5
    assert config.limits.max_batch == 17
    assert config.auth.failures_before_backoff == 9
    assert config.durability == "process-crash"
    assert config.new_key is True
    assert config.max_concurrent_rpcs == 64
    assert args.log_level == "debug"


def test_the_flag_wins_over_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QM_SESSION_TTL", "12.5")
    monkeypatch.setenv("QM_MAX_BATCH", "17")
    config = config_from_args(build_parser().parse_args(["--session-ttl", "3", "--max-batch=4"]))
    assert (config.session_ttl_s, config.limits.max_batch) == (3.0, 4)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", True), ("yes", True), ("ON", True), ("0", False), ("false", False), ("off", False)],
)
def test_boolean_variables(monkeypatch: pytest.MonkeyPatch, text: str, expected: bool) -> None:
    monkeypatch.setenv("QM_ALLOW_PLAINTEXT", text)
    assert config_from_args(build_parser().parse_args([])).allow_plaintext is expected


def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("QM_MAX_BATCH", "QM_TLS_CERT", "QM_NEW_KEY", "QM_LISTEN"):
        monkeypatch.setenv(name, "")
    config = config_from_args(build_parser().parse_args([]))
    assert config.limits.max_batch == 1000
    assert config.tls.cert is None
    assert config.new_key is False
    assert config.listen == "127.0.0.1:50051"


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--session-ttl", "abc"), ("--max-batch", "1.5"), ("--durability", "fast")],
)
def test_a_bad_value_is_refused_as_the_flags_would_be_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    by_flag = error_of([flag, value], capsys)
    monkeypatch.setenv(env_name(flag), value)
    by_variable = error_of([], capsys)
    assert by_flag.startswith(f"qm-server: error: argument {flag}: ")
    assert by_variable == by_flag.replace(f"argument {flag}", env_name(flag))


def test_a_bad_boolean_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QM_NEW_KEY", "maybe")
    assert error_of([], capsys) == (
        "qm-server: error: QM_NEW_KEY: 'maybe' is not a boolean (use one of 1, true, 0, false)"
    )


def test_a_bad_variable_is_refused_even_when_the_flag_is_given(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A variable that cannot be read is a mistake to fix, not something a flag hides."""
    monkeypatch.setenv("QM_MAX_BATCH", "many")
    assert "QM_MAX_BATCH: invalid int value: 'many'" in error_of(["--max-batch", "5"], capsys)


@pytest.fixture
def processes() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for proc in started:
        proc.stop()


def test_a_real_server_reads_its_variables(tmp_path: Path, processes: list[ServerProcess]) -> None:
    """QM_RSA_BITS sizes the key it creates; QM_DATA_DIR loses to the --data-dir given."""
    ignored = tmp_path / "from-variable"
    env = {"QM_RSA_BITS": "2048", "QM_DATA_DIR": str(ignored)}
    server = ServerProcess(tmp_path / "data", env=env).start()
    processes.append(server)
    assert server.health() == 1  # SERVING
    key = serialization.load_pem_private_key(
        (tmp_path / "data" / "server-key.pem").read_bytes(), password=None
    )
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 2048
    assert not ignored.exists()


def test_a_subcommand_reads_qm_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QM_DATA_DIR", str(tmp_path / "nowhere"))
    result = qm_server("check")
    assert result.returncode == 2
    assert str(tmp_path / "nowhere") in result.stderr
