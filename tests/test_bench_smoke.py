"""scripts/bench --quick must keep working: the performance figures depend on it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pg_fixtures

from benchmarks.peers.e2e import DURABILITY, E2ERow
from benchmarks.report import check_targets
from qm_server.store import pg_driver

ROOT = Path(__file__).resolve().parent.parent


def run_script(script: str, *args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """scripts/<script> with this interpreter; it must exit 0. The timeout sits well above
    the seconds it takes and below pytest's own, so a hang fails clearly."""
    proc = subprocess.run(
        [str(ROOT / "scripts" / script), *args],
        cwd=ROOT,
        env={**os.environ, "QM_PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_bench_quick_runs_and_prints_the_table() -> None:
    proc = run_script("bench", "--quick", timeout_s=90)
    header = next((line for line in proc.stdout.splitlines() if line.startswith("scenario")), "")
    for column in ("conc", "ours ops/s", "floor ops/s", "ratio", "p50 ms", "p99 ms", "RSS MB"):
        assert column in header
    for scenario in ("unary Add", "Poll + Ack", "AddAll x100", "PullElements x100 + BatchAck"):
        assert scenario in proc.stdout
    for depth in (100, 400):
        assert f"1 client, {depth} in flight" in proc.stdout
    assert "add_beside_big_reads: a map of 8 MiB, 2 readers" in proc.stdout
    assert "Add beside 2 readers: p50" in proc.stdout
    assert "delayed_backlog: claims of ready messages beside 2,000 delayed" in proc.stdout
    assert "GetQueueInfo showed 2,000 delayed and 0 ready each time" in proc.stdout
    for c in (1, 64):
        assert f"Poll + Ack c{c}: alone " in proc.stdout
    assert proc.stdout.count("ratio beside / alone: ") == 2


def _e2e(system: str, depth: int, rate: float) -> E2ERow:
    return E2ERow(system, DURABILITY[system], "ok", in_flight=depth, rate=rate)


def test_e2e_targets_compare_each_system_at_its_fastest_depth() -> None:
    rows = [
        _e2e("ours", 100, 50_000),
        _e2e("ours", 400, 120_000),
        _e2e("redis-everysec", 100, 65_000),
        _e2e("redis-everysec", 400, 78_000),
        _e2e("nats", 100, 130_000),
        _e2e("nats", 400, 20_000),
        E2ERow("rabbitmq", DURABILITY["rabbitmq"], "skipped", in_flight=0, note="not running"),
        _e2e("redis-none", 400, 500_000),  # context only: never a target
    ]
    verdicts = {t.name: (t.verdict, t.detail) for t in check_targets([], rows, None)}
    assert verdicts == {
        "e2e faster than redis-everysec (weaker durability)": (
            "PASS",
            "120000 (400 in flight) vs 78000 msgs/s (400 in flight)",
        ),
        "e2e faster than nats (weaker durability)": (
            "FAIL",
            "120000 (400 in flight) vs 130000 msgs/s (100 in flight)",
        ),
        "e2e faster than rabbitmq (equal durability)": ("n/a", "not running"),
    } | {
        name: ("n/a", "not measured")
        for name in (
            "unary Add c64 >= 80% of floor",
            "Poll + Ack c64 >= 80% of floor",
            "AddAll x100 c64 >= 70% of floor",
            "PullElements x100 + BatchAck c64 >= 70% of floor",
            "durable Add c1 p50 within 0.3 ms of floor",
        )
    }


def test_the_harness_imports_no_peer_client_until_a_peer_runs() -> None:
    """`scripts/bench --no-peers` must work where the peers' client libraries are absent."""
    code = "import sys, benchmarks.cli; print(sorted({'redis', 'pika', 'nats'} & set(sys.modules)))"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert (proc.returncode, proc.stdout.strip()) == (0, "[]"), proc.stderr


def test_bench_ab_runs_each_checkout_s_own_code(tmp_path: Path) -> None:
    # Regression: started from this repo, `python -m qm_server` imported this repo's
    # server whatever PYTHONPATH named, so an A/B of two versions measured one twice.
    from benchmarks.ab import start_checkout

    checkout = tmp_path / "other"
    (checkout / "qm_server").mkdir(parents=True)
    (checkout / "qm_server" / "__init__.py").write_text("")
    (checkout / "qm_server" / "__main__.py").write_text(
        "import sys, time\n"
        "from pathlib import Path\n"
        "port_file = Path(sys.argv[sys.argv.index('--port-file') + 1])\n"
        "(port_file.parent / 'ran').write_text(str(Path(__file__).resolve()))\n"
        "port_file.write_text('1\\n')\n"
        "time.sleep(60)\n"
    )
    work = tmp_path / "work"
    work.mkdir()
    server = start_checkout("other", checkout, work)
    try:
        ran = (work / "other" / "ran").read_text()
    finally:
        server.stop()
    assert ran == str((checkout / "qm_server" / "__main__.py").resolve())


def test_bench_ab_reports_each_checkout_against_the_floor() -> None:
    proc = run_script(
        "bench-ab",
        "here=" + str(ROOT),
        *("--rounds", "2", "--duration", "1", "--scale", "0.01"),
        *("--concurrency", "2", "--client-procs", "1"),
        timeout_s=120,
    )
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["round 1/2", "round 2/2"]
    table = {line.split()[0]: line.split() for line in lines[3:]}
    assert set(table) == {"floor", "here"}
    assert table["floor"][3] == "1.00"  # the floor against itself, every round
    assert table["here"][4] == "1.00"  # the first checkout against itself


def test_bench_ab_runs_e2e_with_server_cpu_per_message() -> None:
    proc = run_script(
        "bench-ab",
        "here=" + str(ROOT),
        *("--scenario", "e2e", "--rounds", "1", "--e2e-n", "500", "--e2e-in-flight", "100"),
        timeout_s=120,
    )
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("round 1/1: floor ")
    table = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(table) == {"floor", "here"}
    assert float(table["here"][2]) > 0  # server CPU per message, read around the run


def test_bench_ab_runs_the_postgresql_store_as_two_nodes_and_drops_its_schema() -> None:
    pg_fixtures.skip_unless_available()
    proc = run_script(
        "bench-ab",
        *("here=" + str(ROOT), "pg=" + str(ROOT)),
        *("--store", "pg=" + pg_fixtures.URL, "--nodes", "pg=2"),
        *("--scenario", "poll_ack", "--rounds", "1", "--duration", "1", "--scale", "0.01"),
        *("--concurrency", "2", "--client-procs", "2"),
        timeout_s=180,
    )
    lines = proc.stdout.splitlines()
    table = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(table) == {"floor", "here", "pg"}
    assert lines[-1].startswith("pg           database, median per unit: backends' CPU ")
    pids = [line for line in proc.stderr.splitlines() if line.startswith("pg: pids ")]
    assert len(pids) == 1
    words = pids[0].replace(",", "").split()
    assert len(words) == 6  # "pg: pids A B schema S": two servers on the one schema
    with pg_driver.psycopg.connect(pg_fixtures.URL) as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (words[-1],)
        ).fetchone()
    assert left == (0,)
