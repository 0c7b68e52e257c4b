"""bench/queue_load.py's check of an event log, on worked timelines: it must find each kind of broken
promise (capacity, quota, order, a second admission) and pass a correct drain."""

from __future__ import annotations

import datetime as dt
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "queue_load.py"
spec = importlib.util.spec_from_file_location("queue_load", BENCH)
assert spec is not None and spec.loader is not None
queue_load = importlib.util.module_from_spec(spec)
sys.modules["queue_load"] = queue_load
spec.loader.exec_module(queue_load)
Job, Event, check = queue_load.Job, queue_load.Event, queue_load.check

T0 = dt.datetime(2026, 12, 7, 12, 0, 0)


def t(s: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=s)


# submitted at 1, 2, 3, 4 s: alice, bob, alice, carol; carol's at priority 5
A, B, C = Job("a", "alice", 0, t(1)), Job("b", "bob", 0, t(2)), Job("c", "alice", 0, t(3))
D = Job("d", "carol", 5, t(4))


def log(*rows: tuple[str, str, float]) -> list[Event]:
    return [Event(job, state, t(s)) for job, state, s in rows]


QUEUED = [("a", "QUEUED", 1), ("b", "QUEUED", 2), ("c", "QUEUED", 3)]


def test_a_correct_drain_passes():
    # fits 2, one job per owner: a and b start; c (alice) waits for a to end although there is room
    events = log(*QUEUED, ("a", "PENDING", 5), ("b", "PENDING", 5.1), ("a", "RUNNING", 6), ("b", "RUNNING", 6),
                 ("a", "SUCCEEDED", 9), ("c", "PENDING", 10), ("b", "SUCCEEDED", 11), ("c", "RUNNING", 12),
                 ("c", "SUCCEEDED", 15))  # fmt: skip
    assert check([A, B, C], events, fit=2, quota=1) == []


def test_more_than_fits_and_above_a_quota_are_found():
    events = log(*QUEUED, ("a", "PENDING", 5), ("b", "PENDING", 6), ("c", "PENDING", 7))
    got = check([A, B, C], events, fit=2, quota=1)
    assert got == [
        "2026-12-07T12:00:07: 3 jobs admitted at once (fits 2)",
        "2026-12-07T12:00:07: above the quota of 1: {'alice': 2}",
    ]


def test_a_job_started_past_one_that_waited_with_room_is_found_and_a_quota_hold_is_not():
    # c (alice) starts while b (bob, ahead of it, with room in his quota) waits: out of order
    got = check([A, B, C], log(*QUEUED, ("c", "PENDING", 5)), fit=2, quota=1)
    assert got == [
        "2026-12-07T12:00:05: c (alice) started while a (alice), ahead of it, waited with room in its quota",
        "a: never admitted",
        "b: never admitted",
    ]
    # a runs; c (alice, submitted before b) waits on her quota: b may start past it
    c = Job("c", "alice", 0, t(1.5))
    events = log(("a", "QUEUED", 1), ("c", "QUEUED", 1.5), ("b", "QUEUED", 2), ("a", "PENDING", 5),
                 ("b", "PENDING", 6), ("a", "SUCCEEDED", 9), ("c", "PENDING", 10))  # fmt: skip
    assert check([A, B, c], events, fit=2, quota=1) == []
    # priority first: b starting while d (priority 5, submitted later) waits with room is out of order
    events = log(*QUEUED, ("d", "QUEUED", 4), ("b", "PENDING", 5), ("d", "PENDING", 6))
    got = check([B, D], [e for e in events if e.job in "bd"], fit=2, quota=1)
    assert got == ["2026-12-07T12:00:05: b (bob) started while d (carol), ahead of it, waited with room in its quota"]


def test_a_second_admission_is_found():
    events = log(("a", "QUEUED", 1), ("a", "PENDING", 2), ("a", "QUEUED", 3), ("a", "PENDING", 4))
    assert check([A], events, fit=1, quota=1) == ["a: admitted 2 times"]
