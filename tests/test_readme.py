"""The README's examples and tables stay true: its code runs, its tables match the code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ServerHandle
from qm.v1 import queue_manager_pb2 as pb
from qm_server.__main__ import build_parser

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def run_block(code: str, server: ServerHandle) -> str:
    code = code.replace('"127.0.0.1:50051"', repr(server.target))
    code = code.replace('"secret"', repr(server.admin_password))
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "QM_SERVER": server.target, "QM_PASSWORD": server.admin_password},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_readme_has_the_examples() -> None:
    assert len(python_blocks()) == 3


def test_front_page_client_example_runs(server: ServerHandle) -> None:
    run_block(python_blocks()[0], server)


def test_dead_letter_example_runs(server: ServerHandle) -> None:
    printed = run_block(python_blocks()[1], server)
    assert printed == "poison emails 2 max_deliveries after ack error\n"


def test_login_example_with_bare_stubs_runs(server: ServerHandle) -> None:
    assert run_block(python_blocks()[2], server) == "hello True\n"


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
