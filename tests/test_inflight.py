"""The in-flight map's journal: a failed transaction leaves it as it was committed."""

from __future__ import annotations

from qm_server.store.inflight import InFlight


def snapshot(in_flight: InFlight) -> tuple[list[tuple[int, int]], list[tuple[int, int]], int]:
    return in_flight.drop_session(1), in_flight.drop_session(2), in_flight.count(10)


def test_rollback_undoes_holds_and_drops_since_the_last_commit() -> None:
    committed = InFlight()
    committed.hold(1, 10, [1, 2])
    committed.hold(2, 10, [3])
    expected = snapshot(committed)

    in_flight = InFlight()
    in_flight.hold(1, 10, [1, 2])
    in_flight.hold(2, 10, [3])
    in_flight.commit()
    assert in_flight.drop(2, [1, 5]) == [None, None]  # held by the session with id 1 / unknown
    assert in_flight.drop(1, [1]) == [10]
    in_flight.hold(2, 20, [4])
    in_flight.drop_queue(10)
    assert in_flight.count(10) == 0
    in_flight.rollback()
    assert in_flight.count(20) == 0
    assert snapshot(in_flight) == expected == ([(1, 10), (2, 10)], [(3, 10)], 0)


def test_leases_expire_in_deadline_order_and_their_holders_are_remembered() -> None:
    in_flight = InFlight()
    in_flight.hold(1, 10, [1, 2], deadline=2000)
    in_flight.hold(2, 10, [3], deadline=1000)
    in_flight.hold(2, 20, [4])  # no deadline: held while the session lives
    in_flight.extend([2], 5000)
    assert in_flight.next_deadline() == 1000
    assert in_flight.expired(999) == []
    assert in_flight.expired(2000) == [(3, 2, 10), (1, 1, 10)]
    assert in_flight.next_deadline() == 5000
    assert (in_flight.expired_holder(1), in_flight.expired_holder(3)) == (1, 2)
    assert (in_flight.holder(1), in_flight.holder(2), in_flight.deadline(2)) == (None, 1, 5000)
    in_flight.forget([1])  # deleted
    in_flight.drop_session(2)  # released: its expired leases are forgotten too
    assert (in_flight.expired_holder(1), in_flight.expired_holder(3)) == (None, None)
    assert in_flight.count(20) == 0
    assert in_flight.expired(10_000) == [(2, 1, 10)]


def test_rollback_undoes_extensions_expiries_and_forgetting() -> None:
    in_flight = InFlight()
    in_flight.hold(1, 10, [1, 2], deadline=1000)
    in_flight.hold(2, 10, [3], deadline=1000)
    assert in_flight.expired(1000) == [(1, 1, 10), (2, 1, 10), (3, 2, 10)]
    in_flight.hold(1, 10, [3], deadline=3000)  # taken again by another session
    in_flight.commit()
    in_flight.extend([3], 9000)
    in_flight.forget([1])
    in_flight.drop_session(2)
    assert in_flight.expired(3000) == []
    in_flight.rollback()
    assert (in_flight.expired_holder(1), in_flight.expired_holder(3)) == (1, 2)
    assert in_flight.deadline(3) == 3000
    assert in_flight.next_deadline() == 3000
    assert in_flight.expired(3000) == [(3, 1, 10)]
    in_flight.rollback()  # the expiry itself is undone: held again, due again
    assert (in_flight.holder(3), in_flight.expired_holder(3)) == (1, 2)
    assert in_flight.expired(3000) == [(3, 1, 10)]
