"""packaging/systemd/qm-server.service: systemd accepts it, and it configures a real server.

`systemd-analyze verify` checks every key and value (a warning fails the test too). Where
systemd-analyze is missing, that check cannot run: the other tests here still check what
the unit says to qm-server, every QM_* variable and value against the real flag parser,
and the server started the way the unit starts it.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qm_server.__main__ import build_parser, config_from_args
from qm_server.flags import env_name, environment_defaults

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "packaging" / "systemd" / "qm-server.service"
INSTALLED_SERVER = "/opt/queue-manager/venv/bin/qm-server"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def unit_values(key: str) -> list[str]:
    """Every value of `key` in the unit (systemd allows repeating a key)."""
    return re.findall(rf"^{key}=(.*)$", UNIT.read_text(), flags=re.MULTILINE)


def unit_environment() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in unit_values("Environment")]
    return {name: value for name, value in pairs}


def real_variables() -> set[str]:
    """QM_* names qm-server reads: one per long flag, and QM_ADMIN_PASSWORD."""
    names = {
        env_name(option)
        for action in build_parser()._actions
        for option in action.option_strings
        if option.startswith("--") and option not in ("--help", "--version")
    }
    return names | {"QM_ADMIN_PASSWORD"}


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    """The installed path does not exist here; the unit is checked with this venv's."""
    if SYSTEMD_ANALYZE is None:  # not in CI, where systemd is installed: see the docstring
        test_every_variable_is_a_real_setting_with_a_valid_value()
        return
    here = shutil.which("qm-server", path=str(Path(sys.executable).parent))
    assert here is not None, "qm-server is not installed in this venv"
    unit = tmp_path / "qm-server.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_SERVER, here))
    verified = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert (verified.returncode, verified.stderr) == (0, "")


def test_every_variable_is_a_real_setting_with_a_valid_value() -> None:
    environment = unit_environment()
    assert set(environment) <= real_variables(), set(environment) - real_variables()
    assert {"QM_DATA_DIR", "QM_LISTEN", "QM_GRACE"} <= set(environment)
    parser = build_parser()
    environment_defaults(parser, environment)  # a bad value exits, naming the variable
    config = config_from_args(parser.parse_args([]))
    assert str(config.data_dir) == f"/var/lib/{unit_values('StateDirectory')[0]}"
    assert config.listen == environment["QM_LISTEN"]


def test_the_unit_matches_the_server() -> None:
    """Type=notify would hang the start of a server that never notifies; stopping must
    outlast the drain; the path is the one docs/operations.md installs to."""
    sources = "".join(p.read_text() for p in (ROOT / "qm_server").rglob("*.py"))
    notifies = "NOTIFY_SOCKET" in sources or "sd_notify" in sources
    assert unit_values("Type") == (["notify"] if notifies else ["exec"])
    assert unit_values("ExecStart") == [INSTALLED_SERVER]
    assert unit_values("KillSignal") == ["SIGTERM"]
    grace = float(unit_environment()["QM_GRACE"])
    assert float(unit_values("TimeoutStopSec")[0]) >= grace + 10
    operations = (ROOT / "docs" / "operations.md").read_text()
    assert INSTALLED_SERVER.removesuffix("/bin/qm-server") in operations
    assert "packaging/systemd/qm-server.service" in operations


def test_hardening_is_there() -> None:
    parsed = configparser.ConfigParser(strict=False, interpolation=None)
    parsed.optionxform = str  # type: ignore[assignment,method-assign]
    parsed.read_string(UNIT.read_text())
    service = parsed["Service"]
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter": "@system-service",
        "CapabilityBoundingSet": "",
        "StateDirectory": "qm",
        "StateDirectoryMode": "0700",
    }
    assert {key: service.get(key) for key in expected} == expected
    assert int(service["LimitNOFILE"]) >= 65536


def test_the_server_runs_as_the_unit_configures_it(tmp_path: Path) -> None:
    """The unit's environment and no flag at all (the data directory and address moved
    into tmp_path); SIGTERM, as systemd stops it, drains to exit status 0 in time."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QM_")}
    env |= unit_environment()
    port_file = tmp_path / "port"
    env |= {
        "QM_DATA_DIR": str(tmp_path / "qm"),
        "QM_LISTEN": "127.0.0.1:0",
        "QM_PORT_FILE": str(port_file),
        "QM_RSA_BITS": "2048",
        "QM_DISK_RESERVE_BYTES": "0",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "qm_server"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert server.poll() is None, server.communicate()[1]
            assert time.monotonic() < deadline, "qm-server did not start"
            time.sleep(0.02)  # the port file appears once the server serves
        target = f"127.0.0.1:{int(port_file.read_text())}"
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        server.send_signal(getattr(signal, unit_values("KillSignal")[0]))
        assert server.wait(timeout=float(unit_values("TimeoutStopSec")[0])) == 0
        assert (tmp_path / "qm" / "qm.db").exists()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
        if server.stderr is not None:
            server.stderr.close()
