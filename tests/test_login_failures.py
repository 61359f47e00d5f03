"""Failed-login counts keep the same rules wherever they live: in one server's memory or in
PostgreSQL, where every node sharing the store counts into the same rows
(qm_server/login_failures.py, qm_server/store/pg_login_failures.py).

Each rule is run against both, on a fake clock (Unix seconds; the PostgreSQL store takes
it as its `now`), so backoffs are exact and nothing waits.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import pytest
from pg_fixtures import pg_store

from conftest import FAST_AUTH
from qm_server import errors
from qm_server.config import AuthSettings
from qm_server.login_failures import LoginFailures, MemoryLoginFailures, Refusal
from qm_server.login_guard import LoginGuard

START = 1_700_000_000.0
SETTINGS = dataclasses.replace(
    FAST_AUTH,
    failures_before_backoff=3,
    host_failures_before_backoff=6,
    user_failures_ceiling=10,
    max_backoff_s=8.0,
    forget_failures_after_s=100.0,
)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


Scenario = Callable[[LoginFailures, Clock], Awaitable[None]]


class Runner(Protocol):
    def __call__(self, scenario: Scenario, settings: AuthSettings = ...) -> None: ...


@pytest.fixture(params=["memory", "postgresql"])
def on_each(request: pytest.FixtureRequest, tmp_path: Path) -> Runner:
    """Runs a scenario against the in-memory counts or the PostgreSQL ones."""

    def run(scenario: Scenario, settings: AuthSettings = SETTINGS) -> None:
        async def main() -> None:
            clock = Clock()
            if request.param == "memory":
                await scenario(MemoryLoginFailures(settings, clock), clock)
                return
            store = pg_store(tmp_path, clock=clock, timed=False, notify=False)
            await store.open()
            try:
                await scenario(store.login_failures(settings), clock)
            finally:
                await store.close()

        asyncio.run(main())

    return run


async def fail(failures: LoginFailures, user: str, host: str, times: int = 1) -> int:
    count = 0
    for _ in range(times):
        count = await failures.failed(user, host)
    return count


def test_a_pair_backs_off_after_its_allowance_doubling_to_the_cap(on_each: Runner) -> None:
    async def scenario(failures: LoginFailures, clock: Clock) -> None:
        await fail(failures, "admin", "h", times=2)
        assert await failures.refusal("admin", "h") is None
        waits = []
        for _ in range(6):  # the 3rd failure and on: 1, 2, 4, 8, 8, 8 s
            await failures.failed("admin", "h")
            refusal = await failures.refusal("admin", "h")
            assert refusal is not None and not refusal.by_host
            waits.append(refusal.retry_after_s)
            clock.now += refusal.retry_after_s  # waits it out exactly
            assert await failures.refusal("admin", "h") is None
        assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
        assert await failures.refusal("admin", "other-host") is None
        assert await failures.refusal("bob", "h") is None

    on_each(scenario)


def test_a_success_clears_the_pair_but_not_the_host(on_each: Runner) -> None:
    async def scenario(failures: LoginFailures, clock: Clock) -> None:
        await fail(failures, "admin", "h", times=3)
        await failures.succeeded("admin", "h")
        assert await failures.refusal("admin", "h") is None
        await fail(failures, "u", "h", times=3)  # the host's 4th to 6th
        refusal = await failures.refusal("nobody-yet", "h")
        assert refusal == Refusal(1.0, 6, by_host=True, first=True)

    on_each(scenario)


def test_the_pair_s_backoff_is_reported_before_the_host_s(on_each: Runner) -> None:
    async def scenario(failures: LoginFailures, clock: Clock) -> None:
        await fail(failures, "u", "h", times=3)
        await fail(failures, "admin", "h", times=3)  # pair 3 (1 s), host 6 (1 s)
        clock.now += 0.5
        refusal = await failures.refusal("admin", "h")
        assert refusal == Refusal(0.5, 3, by_host=False, first=True)

    on_each(scenario)


def test_each_backoff_is_reported_as_first_once(on_each: Runner) -> None:
    async def scenario(failures: LoginFailures, clock: Clock) -> None:
        await fail(failures, "admin", "h", times=3)
        seen = [await failures.refusal("admin", "h") for _ in range(3)]
        assert [r.first if r else None for r in seen] == [True, False, False]
        clock.now += 1
        await failures.failed("admin", "h")  # a new backoff: its first refusal again
        refusal = await failures.refusal("admin", "h")
        assert refusal == Refusal(2.0, 4, by_host=False, first=True)

    on_each(scenario)


def test_a_quiet_count_is_forgotten(on_each: Runner) -> None:
    async def scenario(failures: LoginFailures, clock: Clock) -> None:
        await fail(failures, "admin", "h", times=2)
        clock.now += SETTINGS.forget_failures_after_s + 1
        assert await fail(failures, "admin", "h") == 1  # the user's count starts again
        assert await failures.refusal("admin", "h") is None  # and the pair's: 1 of 3
        await fail(failures, "admin", "h", times=2)
        assert await failures.refusal("admin", "h") == Refusal(1.0, 3, False, True)

    on_each(scenario)


def test_past_the_user_ceiling_each_host_gets_one_failure(on_each: Runner) -> None:
    async def scenario(failures: LoginFailures, clock: Clock) -> None:
        counts = [await fail(failures, "admin", f"h{i}", times=2) for i in range(5)]
        assert counts == [2, 4, 6, 8, 10]  # the user's count over all hosts
        assert not [i for i in range(5) if await failures.refusal("admin", f"h{i}")]
        assert await fail(failures, "admin", "h5") == 11  # past the ceiling of 10
        assert await failures.refusal("admin", "h5") == Refusal(1.0, 1, False, True)
        await failures.failed("admin", "h0")  # its 3rd, with an allowance of one: 2 ** 2 s
        assert await failures.refusal("admin", "h0") == Refusal(4.0, 3, False, True)
        assert await failures.refusal("admin", "h6") is None  # a host with none
        assert await failures.refusal("bob", "h1") is None

    on_each(scenario)


def test_the_backoff_s_exponent_is_capped(on_each: Runner) -> None:
    """2 ** n overflowed past about 1030 failures (auth.LoginThrottle; and PostgreSQL's
    power() raises there)."""

    async def scenario(failures: LoginFailures, clock: Clock) -> None:
        await fail(failures, "admin", "h", times=1100)
        assert await failures.refusal("admin", "h") == Refusal(8.0, 1100, False, True)

    on_each(scenario, dataclasses.replace(SETTINGS, host_failures_before_backoff=10_000))


def test_the_guard_logs_a_refusal_once_and_refuses_with_the_wait(on_each: Runner) -> None:
    async def scenario(failures: LoginFailures, clock: Clock) -> None:
        guard = LoginGuard(SETTINGS, clock, failures)
        for _ in range(3):
            await guard.failed("admin", "h", "wrong password")
        for _ in range(2):
            with pytest.raises(errors.ResourceExhausted, match=r"retry in 1\.0 s"):
                await guard.check("admin", "h")
        assert (guard.failures, guard.refusals) == (3, 2)
        await guard.check("admin", "elsewhere")

    on_each(scenario)


def test_a_guess_spread_over_many_hosts_is_slowed_but_a_fresh_host_gets_in(
    on_each: Runner,
) -> None:
    settings = dataclasses.replace(FAST_AUTH, user_failures_ceiling=12)

    async def scenario(failures: LoginFailures, clock: Clock) -> None:
        guard = LoginGuard(settings, clock, failures)
        for host in range(3):  # 4 failures each: below the pair's 5, the ceiling not reached
            for _ in range(4):
                await guard.failed("admin", f"h{host}", "wrong password")
        assert not [h for h in range(3) if await refused(guard, "admin", f"h{h}")]
        await guard.failed("admin", "h3", "wrong password")  # the 13th: past the ceiling
        assert await refused(guard, "admin", "h3")  # one failure is all a host gets now
        assert not await refused(guard, "admin", "h0")
        await guard.failed("admin", "h0", "wrong password")  # it backs off at once
        assert await refused(guard, "admin", "h0")
        assert not await refused(guard, "admin", "h4")  # a host that never failed
        assert not await refused(guard, "bob", "h1")  # nor another user on those hosts

    on_each(scenario, settings)


def test_a_host_s_count_survives_its_successes_and_fades_when_quiet(on_each: Runner) -> None:
    """A valid account must not reset its host's count between guesses at others."""
    settings = dataclasses.replace(FAST_AUTH, host_failures_before_backoff=3)

    async def scenario(failures: LoginFailures, clock: Clock) -> None:
        guard = LoginGuard(settings, clock, failures)
        for user in ("u1", "u2"):
            await guard.failed(user, "h", "no such user")
            await guard.succeeded("mine", "h")
        await guard.failed("u3", "h", "no such user")
        assert await refused(guard, "u4", "h")
        clock.now += settings.forget_failures_after_s + 1
        await guard.failed("u4", "h", "no such user")  # counted from one again: no backoff
        assert not await refused(guard, "u5", "h")

    on_each(scenario, settings)


async def refused(guard: LoginGuard, user: str, host: str) -> bool:
    try:
        await guard.check(user, host)
    except errors.ResourceExhausted:
        return True
    return False


def test_nodes_count_into_the_same_rows_and_lose_no_concurrent_failure(tmp_path: Path) -> None:
    """Two stores on one schema are two nodes: failures spread over both, many at once,
    are all counted, and each node sees the other's backoff."""

    async def main() -> None:
        clock = Clock()
        nodes = [pg_store(tmp_path, clock=clock, timed=False, notify=False) for _ in range(2)]
        for node in nodes:
            await node.open()
        try:
            a, b = (node.login_failures(SETTINGS) for node in nodes)
            counts = await asyncio.gather(
                *(counts.failed("admin", f"h{i % 3}") for i, counts in enumerate([a, b] * 10))
            )
            assert sorted(counts) == list(range(1, 21))  # each saw a count of its own
            assert await b.refusal("admin", "h0") is not None  # 7 failures, on both nodes
            await a.succeeded("admin", "h0")
            refusal = await b.refusal("admin", "h0")  # the pair is clear; the host is not
            assert refusal is not None and refusal.by_host
        finally:
            for node in nodes:
                await node.close()

    asyncio.run(main())


def test_forgotten_rows_are_deleted(tmp_path: Path) -> None:
    async def main() -> None:
        clock = Clock()
        store = pg_store(tmp_path, clock=clock, timed=False, notify=False)
        await store.open()
        try:
            old, fresh = store.login_failures(SETTINGS), store.login_failures(SETTINGS)
            await old.failed("gone", "h-old")
            clock.now += SETTINGS.forget_failures_after_s + 1
            await fresh.failed("kept", "h-new")  # a node's first failure prunes
            async with store._conn() as conn:
                cursor = await conn.execute("SELECT kind, key FROM login_failures ORDER BY 1")
                rows = await cursor.fetchall()
            assert rows == [(0, "h-new kept"), (1, "h-new"), (2, "kept")]
        finally:
            await store.close()

    asyncio.run(main())
