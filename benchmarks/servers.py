"""Launchers for the two servers under test: the floor and ours (``qm-server``).

Ours runs exactly as a user would start it: the console script, an embedded store in a
fresh data directory, default durability, the admin password from the environment.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from benchmarks.procs import REPO_ROOT, ServerProcess, start_server

ADMIN_USER = "admin"
ADMIN_PASSWORD = "bench-admin-password"
"""Local-only throwaway: the server listens on 127.0.0.1 and its data dir is deleted."""


def qm_server_command() -> list[str]:
    """The venv's console script first, so the harness measures this checkout's server."""
    beside = Path(sys.executable).parent / "qm-server"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("qm-server")
    if found:
        return [found]
    return [sys.executable, "-m", "qm_server"]


def start_ours(
    data_dir: Path,
    work_dir: Path,
    timeout_s: float = 60.0,
    name: str = "ours",
    checkout: Path | None = None,
    store: str | None = None,
    schema: str | None = None,
) -> ServerProcess:
    """This checkout's server, or another checkout's (scripts/bench-ab). That one runs
    with its checkout as working directory: `python -m` puts the working directory first
    on sys.path, so run from here it would import this checkout whatever PYTHONPATH says.
    With ``store`` (a postgresql:// URL) it runs on the PostgreSQL store in ``schema``,
    its connections named after the schema (benchmarks/pgstore.py finds them by it)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port_file = work_dir / f"{name}.port"
    env = {"QM_ADMIN_PASSWORD": ADMIN_PASSWORD}
    where = ["--data-dir", str(data_dir)]
    if store is not None:
        if schema is None:
            raise ValueError("a PostgreSQL store needs the run's schema")
        env["PGAPPNAME"] = schema
        # The data dir too: each server locks its own (the store is the shared part).
        where += ["--store", store, "--store-schema", schema]
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout)
    command = qm_server_command() if checkout is None else [sys.executable, "-m", "qm_server"]
    cmd = [
        *command,
        "--listen",
        "127.0.0.1:0",
        *where,
        "--port-file",
        str(port_file),
    ]
    return start_server(
        name,
        cmd,
        port_file,
        work_dir / f"{name}.log",
        env=env,
        timeout_s=timeout_s,
        cwd=checkout or REPO_ROOT,
    )


def start_floor(work_dir: Path, element_size: int, timeout_s: float = 60.0) -> ServerProcess:
    port_file = work_dir / "floor.port"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.floor",
        "--port-file",
        str(port_file),
        "--element-size",
        str(element_size),
    ]
    return start_server("floor", cmd, port_file, work_dir / "floor.log", timeout_s=timeout_s)
