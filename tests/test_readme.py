"""The README's examples and tables stay true: its code runs, its tables match the code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_process import ServerProcess

from conftest import ServerHandle
from qm.v1 import queue_manager_pb2 as pb
from qm_client import QueueManagerClient
from qm_server.__main__ import build_parser, config_from_args
from qm_server.datadir import INITIAL_PASSWORD_FILE

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def run_block(code: str, target: str, password: str, cwd: Path | None = None) -> str:
    """Run a README block as a script; only the port in its address is changed."""
    result = subprocess.run(
        [sys.executable, "-c", code.replace('"127.0.0.1:50051"', repr(target))],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, "QM_SERVER": target, "QM_PASSWORD": password},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServerProcess]:
    """qm-server as scripts/serve starts it, in tmp_path: no QM_ADMIN_PASSWORD, so admin
    gets a random password in qm-data/initial-admin-password; the address and data
    directory are the defaults (test_scripts_serve_uses_the_defaults), but for the port."""
    process = ServerProcess(tmp_path / "qm-data", env={"QM_ADMIN_PASSWORD": ""})
    try:
        yield process.start()
    finally:
        process.stop()


def test_scripts_serve_uses_the_defaults() -> None:
    """What the examples take for granted about the server that scripts/serve starts."""
    serve = (ROOT / "scripts" / "serve").read_text()
    assert serve.rstrip().endswith('exec .venv/bin/qm-server "$@"')
    assert "QM_ADMIN_PASSWORD" not in serve
    config = config_from_args(build_parser().parse_args([]))
    assert (config.listen, config.data_dir) == ("127.0.0.1:50051", Path("qm-data"))


def test_readme_has_the_examples() -> None:
    assert len(python_blocks()) == 3


def test_front_page_client_example_runs(served: ServerProcess, tmp_path: Path) -> None:
    password = (tmp_path / "qm-data" / INITIAL_PASSWORD_FILE).read_text().strip()
    printed = run_block(python_blocks()[0], served.target, "unused", cwd=tmp_path)
    assert printed == "resize photo 42\n"
    with QueueManagerClient(served.target, "admin", password) as qm:
        assert (qm.size("jobs"), qm.unacked("jobs")) == (0, 0)


def test_dead_letter_example_runs(served: ServerProcess, tmp_path: Path) -> None:
    printed = run_block(python_blocks()[1], served.target, "unused", cwd=tmp_path)
    assert printed == "poison emails 2 max_deliveries after ack error\n"


def test_login_example_with_bare_stubs_runs(server: ServerHandle) -> None:
    printed = run_block(python_blocks()[2], server.target, server.admin_password)
    assert printed == "hello True\n"


def test_code_table_matches_the_proto() -> None:
    rows = re.findall(r"^\| (\d+) \| `(CODE_[A-Z_]+)` \|", README, flags=re.MULTILINE)
    documented = {name: int(number) for number, name in rows}
    assert documented == {v.name: v.number for v in pb.Code.DESCRIPTOR.values}


def test_every_rpc_is_in_the_seed_table() -> None:
    service = pb.DESCRIPTOR.services_by_name["QueueManagerService"]
    rows = set(re.findall(r"^\| [^|]+ \| `([A-Z][a-z][A-Za-z]+)` \|", README, flags=re.MULTILINE))
    assert rows == {m.name for m in service.methods}


def test_every_documented_flag_exists() -> None:
    documented = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", README)) - {"--strict"}  # mypy
    known = {o for action in build_parser()._actions for o in action.option_strings}
    known |= {"--password-stdin", "--data-dir", "--admin"}  # user subcommands
    assert documented <= known, documented - known
    assert known - {"-h", "--help"} <= documented, known - documented
