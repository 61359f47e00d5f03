"""scripts/bench --quick must keep working: the performance figures depend on it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_runs_and_prints_the_table() -> None:
    # Timeout well above the few seconds it takes, below pytest's own, so a hang fails clearly.
    proc = subprocess.run(
        [str(ROOT / "scripts" / "bench"), "--quick"],
        cwd=ROOT,
        env={**os.environ, "QM_PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    header = next((line for line in proc.stdout.splitlines() if line.startswith("scenario")), "")
    for column in ("conc", "ours ops/s", "floor ops/s", "ratio", "p50 ms", "p99 ms", "RSS MB"):
        assert column in header
    for scenario in ("unary Add", "Poll + Ack", "AddAll x100", "PullElements x100 + BatchAck"):
        assert scenario in proc.stdout
