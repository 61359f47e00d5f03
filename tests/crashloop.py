"""The crash loop: mixed load from client processes while qm-server is SIGKILLed, then proofs.

Shared by tests/test_crash_loop.py (a few rounds) and scripts/crash_loop (as many as asked).
The load client is tests/crashloop_client.py (its process tests/crashloop_proc.py), the
proofs tests/crashloop_checker.py, the servers a deployment (crashloop_deploy.py: one
server on a data directory; crashloop_pg.py with `nodes`: several nodes on a private
PostgreSQL database, with node pauses and database crashes besides the kills); this
module runs the rounds.

Each round starts `qm-server` on the same data directory (sessions expire after
`SESSION_TTL_S`), starts client processes (each with its own channel and session; the
odd ones log in as `worker`, a user with grants only), and SIGKILLs the server at a
random moment. After each restart the checker compares the server's state with every log
so far (no message in flight, queue sizes within what the logs allow, map values), and
after the last round it drains every queue and runs every proof (crashloop_checker).

The queues: `cl-a` and `cl-b` with the seed's settings, and the lifecycle queue `cl-l`
(a one-second ack deadline, two deliveries, then the dead-letter queue `cl-dlq`), whose
load and proofs are apart (crashloop_client.LIFECYCLE_SETTINGS, crashloop_checker's
check_lifecycle). Every third round lasts a lease longer (`long_round_every`), so that
leases run out in it while their sessions live; the kill still lands at a random moment.

Work directory: `data/` (the server's, the same every round), `data-server.log`,
`logs/rRRR-cC.jsonl` (one client process in one round) and `logs/rRRR-cC.err`; with
nodes, `nodeN/` and `nodeN-server.log` instead of the server's (the database's files
are in a temporary directory of their own, removed at the end).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import selectors
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from crashloop_checker import Delivery, History, LifecycleState, ServerState
from crashloop_client import (
    CALL_TIMEOUT_S,
    DEAD_LETTER_QUEUE,
    LATE_ACK_S,
    LEASE_S,
    LIFECYCLE_QUEUE,
    LIFECYCLE_SETTINGS,
    MAPS,
    QUEUES,
    Stub,
    login,
)
from crashloop_deploy import SESSION_TTL_S, Deployment, OneServer
from crashloop_pg import PgCluster

from qm.v1 import queue_manager_pb2 as pb
from qm_server.errors import COMMIT_LOST

READY_TIMEOUT_S = 60.0
# The drain's lease on the lifecycle queue: long enough never to run out while it drains.
DRAIN_LEASE_MS = 3_600_000
CLIENT_EXIT_TIMEOUT_S = 60.0
CLIENT = Path(__file__).resolve().parent / "crashloop_proc.py"


# Reading the server's state -----------------------------------------------------------


def ready_and_in_flight(stub: Stub, token: str, queue: str) -> tuple[int, int]:
    """Size and GetUncheckNum as of one moment. On a shared store the sessions of killed
    nodes live on between rounds, and one expiring between the two calls moves messages
    from in flight to ready: read in flight on both sides of Size until it holds still."""
    for _ in range(50):
        before = stub.GetUncheckNum(
            pb.GetUncheckNumRequest(token=token, queue_name=queue), timeout=CALL_TIMEOUT_S
        )
        size = stub.Size(pb.SizeRequest(token=token, queue_name=queue), timeout=CALL_TIMEOUT_S)
        after = stub.GetUncheckNum(
            pb.GetUncheckNumRequest(token=token, queue_name=queue), timeout=CALL_TIMEOUT_S
        )
        codes = (before.code, size.code, after.code)
        if codes != (pb.CODE_OK,) * 3:
            raise RuntimeError(f"{queue}: GetUncheckNum, Size, GetUncheckNum answered {codes}")
        if before.ack_num == after.ack_num:
            return size.size, after.ack_num
    raise RuntimeError(f"{queue}: in-flight count never held still across a Size")


def read_state(stub: Stub, token: str, drain: bool, max_messages: int) -> ServerState:
    """Sizes, in-flight counts and maps; with drain, every queue emptied by PullElements."""
    state = ServerState({}, {}, {})
    for queue in QUEUES:
        state.ready[queue], state.in_flight[queue] = ready_and_in_flight(stub, token, queue)
    for queue in (LIFECYCLE_QUEUE, DEAD_LETTER_QUEUE):
        unchecked = stub.GetUncheckNum(
            pb.GetUncheckNumRequest(token=token, queue_name=queue), timeout=CALL_TIMEOUT_S
        )
        if unchecked.code != pb.CODE_OK:
            raise RuntimeError(f"{queue}: GetUncheckNum {unchecked.code}")
        state.in_flight[queue] = unchecked.ack_num
    for name in MAPS:
        got = stub.MapGetAll(pb.MapGetAllRequest(token=token, map=name), timeout=CALL_TIMEOUT_S)
        if got.code not in (pb.CODE_OK, pb.CODE_MAP_NOT_FOUND):
            raise RuntimeError(f"map {name}: MapGetAll answered {got.code}")
        state.maps[name] = dict(got.map)
    if drain:
        state.drained = {}
        for queue in QUEUES:
            items: list[Delivery] = []
            for _ in range(max_messages + 1):  # each page takes at least one message
                page = stub.PullElements(
                    pb.PullElementsRequest(token=token, queue_name=queue, number=1000),
                    timeout=CALL_TIMEOUT_S,
                )
                if page.code == pb.CODE_QUEUE_EMPTY:
                    break
                if page.code != pb.CODE_OK:
                    raise RuntimeError(f"{queue}: PullElements answered {page.code}")
                items += [
                    Delivery(
                        e.message_id,
                        e.element,
                        e.delivery_count,
                        queue,
                        math.inf,
                        math.inf,
                        "drain",
                    )
                    for e in page.element_info
                ]
            state.drained[queue] = items
        state.lifecycle = read_lifecycle(stub, token, max_messages)
    return state


def read_lifecycle(stub: Stub, token: str, max_messages: int) -> LifecycleState:
    """The lifecycle queue drained (on leases that cannot run out meanwhile), its dead
    letters listed page by page, and the counts GetQueueInfo gives for both."""
    drained: list[Delivery] = []
    for _ in range(max_messages + 1):
        page = stub.PullElements(
            pb.PullElementsRequest(
                token=token,
                queue_name=LIFECYCLE_QUEUE,
                number=1000,
                ack_deadline_ms=DRAIN_LEASE_MS,
            ),
            timeout=CALL_TIMEOUT_S,
        )
        if page.code == pb.CODE_QUEUE_EMPTY:
            break
        if page.code != pb.CODE_OK:
            raise RuntimeError(f"{LIFECYCLE_QUEUE}: PullElements answered {page.code}")
        drained += [
            Delivery(
                e.message_id,
                e.element,
                e.delivery_count,
                LIFECYCLE_QUEUE,
                math.inf,
                math.inf,
                "drain",
            )
            for e in page.element_info
        ]
    letters: list[dict[str, Any]] = []
    after = 0
    while True:
        listed = stub.ListDeadLetters(
            pb.ListDeadLettersRequest(
                token=token, queue_name=DEAD_LETTER_QUEUE, after_id=after, limit=1000
            ),
            timeout=CALL_TIMEOUT_S,
        )
        if listed.code != pb.CODE_OK:
            raise RuntimeError(f"{DEAD_LETTER_QUEUE}: ListDeadLetters answered {listed.code}")
        letters += [
            {
                "id": d.message_id,
                "original_queue": d.original_queue,
                "delivery_count": d.delivery_count,
                "cause": d.cause,
                "element": d.element,
            }
            for d in listed.dead_letters
        ]
        after = listed.next_after_id
        if not after:
            break
    infos = {}
    for queue in (LIFECYCLE_QUEUE, DEAD_LETTER_QUEUE):
        info = stub.GetQueueInfo(
            pb.GetQueueInfoRequest(token=token, queue_name=queue), timeout=CALL_TIMEOUT_S
        )
        if info.code != pb.CODE_OK:
            raise RuntimeError(f"{queue}: GetQueueInfo answered {info.code}")
        infos[queue] = info
    return LifecycleState(
        drained,
        letters,
        dead_lettered=infos[LIFECYCLE_QUEUE].dead_lettered,
        dead_letter_queue_ready=infos[DEAD_LETTER_QUEUE].ready,
        delayed=infos[LIFECYCLE_QUEUE].delayed + infos[DEAD_LETTER_QUEUE].delayed,
    )


# The loop ------------------------------------------------------------------------------


@dataclass
class Options:
    work_dir: Path
    rounds: int = 5
    clients: int = 3
    seed: int = 0
    max_kill_delay_s: float = 1.5  # the kill lands uniformly in [0, this] after clients start
    # Every this many rounds, one lasts a lease and a bit longer (the kill comes that
    # much later), so that leases run out in it while their sessions live (0: never).
    long_round_every: int = 3
    budget_s: float = 3600.0  # no new round starts after this
    nodes: int = 0  # 0: one server on a data directory; N: N nodes on a PostgreSQL database
    client_max_s: float = 120.0  # a client stops by itself after this (the kill comes first)
    client_max_ops: int = 100_000
    say: Callable[[str], None] = lambda line: None


@dataclass
class Report:
    seed: int
    rounds: int = 0
    kills: int = 0
    client_processes: int = 0
    seconds: float = 0.0
    ops: Counter[str] = field(default_factory=Counter)  # "add ok", "poll unknown", ...
    figures: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        by_status: Counter[str] = Counter()
        for key, n in self.ops.items():
            by_status[key.split()[1]] += n
        lines = [
            f"crash loop (seed {self.seed}): {self.rounds} rounds, {self.kills} SIGKILLs, "
            f"{self.client_processes} client processes, {self.seconds:.1f} s",
            f"operations: {sum(self.ops.values())} "
            f"({', '.join(f'{n} {st}' for st, n in sorted(by_status.items()))})",
            "  " + ", ".join(f"{k} {n}" for k, n in sorted(self.ops.items())),
            "  " + ", ".join(f"{k} {n}" for k, n in self.figures.items()),
            f"violations: {len(self.problems)}",
        ]
        lines += [f"  {p}" for p in self.problems[:50]]
        return "\n".join(lines)


def _start_clients(
    options: Options,
    deployment: Deployment,
    targets: list[str],
    logs: Path,
    round_no: int,
    rng: random.Random,
) -> list[subprocess.Popen[str]]:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "tests"), str(root)])}
    procs = []
    for client in range(options.clients):
        stem = logs / f"r{round_no:03d}-c{client}"
        with stem.with_suffix(".err").open("w") as err:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(CLIENT),
                        *deployment.client_args(targets, client),
                        "--log",
                        str(stem.with_suffix(".jsonl")),
                        "--round",
                        str(round_no),
                        "--client",
                        str(client),
                        "--seed",
                        str(rng.getrandbits(32)),
                        "--max-seconds",
                        str(options.client_max_s),
                        "--max-ops",
                        str(options.client_max_ops),
                        "--session-ttl",
                        str(SESSION_TTL_S),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                    env=env,
                )
            )
    return procs


def _wait_ready(procs: list[subprocess.Popen[str]], timeout_s: float) -> None:
    """Block until every client printed `ready` (logged in) or exited."""
    with selectors.DefaultSelector() as selector:
        for proc in procs:
            assert proc.stdout is not None
            selector.register(proc.stdout, selectors.EVENT_READ)
        waiting = len(procs)
        deadline = time.monotonic() + timeout_s
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("crash loop clients did not log in")
            for key, _ in selector.select(remaining):
                selector.unregister(key.fileobj)
                waiting -= 1  # a line ("ready") or end of file (it died; its log tells)


def _finish_clients(procs: list[subprocess.Popen[str]], logs: Path, round_no: int) -> list[str]:
    problems = []
    for client, proc in enumerate(procs):
        try:
            code = proc.wait(timeout=CLIENT_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(timeout=30)
            problems.append(f"r{round_no}-c{client}: did not stop after the kill")
        assert proc.stdout is not None
        proc.stdout.close()
        err = (logs / f"r{round_no:03d}-c{client}.err").read_text()
        if code != 0 or "Traceback" in err:
            problems.append(f"r{round_no}-c{client}: exited {code}: {err[-2000:]}")
    return problems


def _state(target: str, drain: bool, max_messages: int) -> ServerState:
    with grpc.insecure_channel(target) as channel:
        stub = Stub(channel)
        token = login(stub)
        state = read_state(stub, token, drain, max_messages)
        stub.Logout(pb.LogoutRequest(token=token), timeout=CALL_TIMEOUT_S)
        return state


def _create_queues(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = Stub(channel)
        token = login(stub)
        plain = pb.QueueSettings()
        for queue, settings in [
            *((q, plain) for q in QUEUES),
            (DEAD_LETTER_QUEUE, plain),  # first: cl-l names it
            (LIFECYCLE_QUEUE, LIFECYCLE_SETTINGS),
        ]:
            reply = stub.NewQueue(
                pb.NewQueueRequest(token=token, queue_name=queue, settings=settings),
                timeout=CALL_TIMEOUT_S,
            )
            if reply.code not in (pb.CODE_OK, pb.CODE_QUEUE_ALREADY_EXISTS):
                raise RuntimeError(f"NewQueue {queue}: {reply.code} {reply.message}")
        stub.Logout(pb.LogoutRequest(token=token), timeout=CALL_TIMEOUT_S)


def run(options: Options) -> Report:
    """Run the crash loop in options.work_dir and check everything; see the module doc."""
    started = time.monotonic()
    rng = random.Random(options.seed)
    report = Report(seed=options.seed)
    logs = options.work_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    deployment: Deployment = (
        PgCluster(options.work_dir, options.nodes) if options.nodes else OneServer(options.work_dir)
    )
    try:
        deployment.setup()
        for round_no in range(options.rounds):
            if time.monotonic() - started > options.budget_s:
                options.say(f"time budget spent after {round_no} rounds")
                break
            targets = deployment.start()
            if round_no == 0:
                _create_queues(targets[0])
            else:
                history = deployment.history.load(logs)
                state = deployment.between_rounds(_state(targets[0], drain=False, max_messages=0))
                report.problems += [
                    f"after restart {round_no}: {p}" for p in history.check_state(state)
                ]
            procs = _start_clients(options, deployment, targets, logs, round_no, rng)
            report.client_processes += len(procs)
            try:
                _wait_ready(procs, READY_TIMEOUT_S)
                delay = rng.uniform(0, options.max_kill_delay_s)  # the random moment
                if options.long_round_every and round_no % options.long_round_every == 1:
                    delay += LEASE_S + LATE_ACK_S + 0.2
                deployment.play(rng, round_no, delay)
            finally:
                report.kills += deployment.kill()
            report.problems += _finish_clients(procs, logs, round_no)
            report.rounds += 1
            options.say(
                f"round {round_no + 1}/{options.rounds}: killed; "
                f"{sum(1 for _ in logs.glob('*.jsonl'))} client logs, "
                f"{len(report.problems)} violations so far"
            )
        history = deployment.history.load(logs)
        targets = deployment.start()
        deployment.settle(targets[0])
        state = _state(targets[0], drain=True, max_messages=len(history.element_owner()))
        report.problems += deployment.terminate()
        problems = history.check() + [f"final: {p}" for p in history.check_state(state)]
        report.problems += list(dict.fromkeys(problems))  # a fault may show in two checks
        server_log = deployment.log()
        for marker in ("Traceback", "internal error"):
            if marker in server_log:
                report.problems.append(f"the server log holds {marker!r}")
        _figures(report, history, state)
        report.figures.update(deployment.figures)
    finally:
        deployment.stop()
        report.seconds = time.monotonic() - started
    return report


def _figures(report: Report, history: History, state: ServerState) -> None:
    for r in history.records:
        report.ops[f"{r['op']} {r['st']}"] += 1
    unknown_adds = [r for r in history.adds if r["st"] == "unknown"]
    seen = {d.element for d in history.deliveries}
    assert state.drained is not None
    seen |= {d.element for items in state.drained.values() for d in items}
    last = history.last_counts(d for items in state.drained.values() for d in items)
    lost = [r for r in history.records if r["st"] == "unknown"]
    ops = Counter(r["op"] for r in history.records if r["st"] == "ok")
    report.figures = {
        "messages added (OK)": len(history.ok_ids()),
        "answers lost": len(lost),
        "of which to a short deadline": sum(
            1 for r in lost if r.get("grpc") == "DEADLINE_EXCEEDED"
        ),
        "adds with lost answer": len(unknown_adds),
        "of which applied": sum(1 for r in unknown_adds if r["elements"][0] in seen),
        "deliveries": len(history.deliveries),
        "of which on Subscribe streams": sum(
            1 for d in history.deliveries if "subscribe" in d.where
        ),
        "redeliveries": sum(1 for d in history.deliveries if d.count > 1),
        "max delivery_count": max((d.count for d in history.deliveries), default=0),
        "acked done (OK)": len(history.done_ok),
        "done-acks with lost answer": len(history.done_unknown),
        "of which delivered again": sum(
            1
            for message_id, counts in history.done_unknown.items()
            if last.get(message_id, 0) > max(counts)
        ),
        "nacked (OK)": history.nacked_ok,
        "logouts": ops["logout"],
        "sessions expired": ops["expire"] + sum(1 for r in history.records if r["st"] == "expired"),
        "queues destroyed": ops["destroy"],
        "calls denied to the worker": ops["denied"],
        "calls of the worker": sum(1 for r in history.records if r["client"] % 2),
        "left at the end": sum(len(items) for items in state.drained.values()),
        "map writes": len(history.writes),
        **_cluster_figures(history),
        **_lifecycle_figures(history, state.lifecycle),
    }


def _cluster_figures(history: History) -> dict[str, int]:
    """Answers of live nodes during a database outage: CODE_UNAVAILABLE (nothing applied)
    and the gRPC status UNAVAILABLE of a commit whose answer the connection lost (outcome
    unknown, store/pg_outcome.py); OK answers that the same client process got after its
    first such answer (it carried on), and moves to another node."""
    unavailable = [r for r in history.records if r.get("grpc") == "CODE_UNAVAILABLE"]
    commit_lost = [r for r in history.records if COMMIT_LOST in r.get("detail", "")]
    first: dict[tuple[int, int], float] = {}
    for r in unavailable + commit_lost:
        key = (r["round"], r["client"])
        first[key] = min(first.get(key, math.inf), r["t1"])
    return {
        "answered CODE_UNAVAILABLE": len(unavailable),
        "answered UNAVAILABLE, commit lost": len(commit_lost),
        "database outage answers": len(unavailable) + len(commit_lost),
        "OK answers after an outage answer": sum(
            1
            for r in history.records
            if r["st"] == "ok" and r["t0"] > first.get((r["round"], r["client"]), math.inf)
        ),
        "moves to another node": sum(1 for r in history.records if r["op"] == "failover"),
        "of which in the same session": sum(
            1 for r in history.records if r["op"] == "failover" and r.get("kept")
        ),
    }


def _lifecycle_figures(history: History, end: LifecycleState | None) -> dict[str, int]:
    assert end is not None
    deliveries = history.lifecycle_deliveries()
    results = Counter(
        code for r in history.lifecycle_acks() if r["st"] != "unknown" for code in r["results"]
    )
    causes = Counter(str(d["cause"]) for d in end.dead_letters)
    return {
        "lifecycle adds (OK)": sum(
            len(r["ids"]) for r in history.records if r["op"] == "ladd" and r["st"] == "ok"
        ),
        "lifecycle deliveries": len(deliveries),
        "lifecycle redeliveries": sum(1 for d in deliveries if d.count > 1),
        "lifecycle acks OK": results[pb.CODE_OK],
        "late acks answered LEASE_EXPIRED": results[pb.CODE_LEASE_EXPIRED],
        "late acks answered MESSAGE_NOT_FOUND": results[pb.CODE_MESSAGE_NOT_FOUND],
        "dead-letter moves": len(end.dead_letters),
        "of which after lease expiry": causes["max_deliveries after lease expiry"],
        "of which after ack error": causes["max_deliveries after ack error"],
        "of which after session end": causes["max_deliveries after session end"],
        "of which after extend to 0": causes["max_deliveries after extend to 0"],
        "lease extensions (OK)": sum(
            1
            for r in history.records
            if r["op"] == "lextend" and r.get("results") == [pb.CODE_OK] and r["lease_ms"]
        ),
        "given back by ExtendLease 0 (OK)": sum(
            1
            for r in history.records
            if r["op"] == "lextend" and r.get("results") == [pb.CODE_OK] and not r["lease_ms"]
        ),
        "left in the lifecycle queue": len(end.drained),
    }


# Command line ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="crash_loop", description="SIGKILL qm-server under mixed load, round after round"
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=None, help="default: random")
    parser.add_argument("--max-kill-delay", type=float, default=2.0, metavar="SECONDS")
    parser.add_argument("--budget", type=float, default=3600.0, metavar="SECONDS")
    parser.add_argument(
        "--nodes",
        type=int,
        default=0,
        help="run N nodes on a private PostgreSQL database (crashloop_pg.py); 0: one server",
    )
    parser.add_argument("--work-dir", type=Path, help="default: a new temporary directory")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(31)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="qm-crash-loop-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    print(f"work directory {work_dir}, seed {seed}, started {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    report = run(
        Options(
            work_dir=work_dir,
            rounds=args.rounds,
            clients=args.clients,
            seed=seed,
            max_kill_delay_s=args.max_kill_delay,
            budget_s=args.budget,
            nodes=args.nodes,
            say=lambda line: print(line, flush=True),
        )
    )
    if args.json:
        print(
            json.dumps(
                {
                    "seed": report.seed,
                    "rounds": report.rounds,
                    "kills": report.kills,
                    "client_processes": report.client_processes,
                    "seconds": round(report.seconds, 1),
                    "ops": dict(report.ops),
                    "figures": report.figures,
                    "violations": report.problems,
                },
                indent=2,
            )
        )
    else:
        print(report.summary())
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
