"""The admission planner (service/admission.py) on worked examples: gang admission against free
capacity, priority then FIFO, strict order behind a job that waits for room, quotas that hold back
only their owner, and jobs that can never fit."""

import datetime as dt

from service.admission import (
    Capacity,
    Preemption,
    Queued,
    Quota,
    RayNode,
    Running,
    never_fits,
    order,
    plan,
    plan_preempting,
)

T0 = dt.datetime(2026, 12, 7, tzinfo=dt.timezone.utc)
TINY = {"CPU": 3.0}  # examples/tiny.yaml: one engine and two learners of 1 CPU each
SHAPES = ({"CPU": 1.0},)


def q(job_id: str, owner: str = "alice", priority: int = 0, minute: int = 0, demand=TINY, actors=SHAPES) -> Queued:
    return Queued(job_id, owner, priority, T0 + dt.timedelta(minutes=minute), demand, actors)


def decided(decisions) -> dict[str, tuple[bool, int]]:
    return {d.job_id: (d.admit, d.position) for d in decisions}


def test_the_state_api_rows_become_alive_nodes_without_node_or_memory_entries():
    rows = [
        {"state": "ALIVE", "resources_total": {"CPU": 4.0, "memory": 1e10, "node:10.0.0.1": 1.0, "GPU": 1.0}},
        {"state": "DEAD", "resources_total": {"CPU": 64.0}},
        {"state": "ALIVE", "resources_total": {"CPU": 2.0, "forkrl_learner": 1.0, "object_store_memory": 1e9}},
    ]
    cap = Capacity.from_state_api([RayNode.model_validate(r) for r in rows])
    assert cap.nodes == ({"CPU": 4.0, "GPU": 1.0}, {"CPU": 2.0, "forkrl_learner": 1.0})
    assert cap.total == {"CPU": 6.0, "GPU": 1.0, "forkrl_learner": 1.0}


def test_three_tiny_jobs_on_four_cpus_start_one_at_a_time_in_submission_order():
    """The deadlock of the issue: 4 CPUs, three jobs of 3. One is admitted; the others wait, in order."""
    cap = Capacity(({"CPU": 4.0},))
    jobs = [q("c", minute=2), q("a", minute=0), q("b", minute=1)]
    first = plan(jobs, [], cap, {})
    assert decided(first) == {"a": (True, 0), "b": (False, 1), "c": (False, 2)}
    assert first[1].reason == "waiting for capacity: needs 3 CPU at once, 1 CPU free (short of 2 CPU)"
    assert first[2].reason == "behind b in the queue"
    # a runs: 4 - 3 = 1 CPU free, so the next pass admits nobody; when a ends, b starts
    assert decided(plan(jobs[::2], [Running("a", "alice", TINY)], cap, {}))["b"] == (False, 1)
    assert decided(plan(jobs[::2], [], cap, {}))["b"] == (True, 0)


def test_priority_first_then_fifo_and_a_big_job_is_not_overtaken():
    cap = Capacity(({"CPU": 8.0},))
    running = [Running("r", "carol", {"CPU": 4.0})]  # 4 free
    jobs = [
        q("small-early", minute=0, demand={"CPU": 2.0}),
        q("big-urgent", priority=5, minute=3, demand={"CPU": 6.0}),
        q("small-late", minute=4, demand={"CPU": 1.0}),
    ]
    assert [j.job_id for j in order(jobs)] == ["big-urgent", "small-early", "small-late"]
    # the urgent job needs 6 of the 4 free: it waits, and the small ones (which would fit) wait behind it
    assert decided(plan(jobs, running, cap, {})) == {
        "big-urgent": (False, 1), "small-early": (False, 2), "small-late": (False, 3),
    }  # fmt: skip
    # once r ends, 8 free: the urgent job (6) starts, then small-early (2); small-late finds 0 free
    assert decided(plan(jobs, [], cap, {})) == {
        "big-urgent": (True, 0), "small-early": (True, 0), "small-late": (False, 1),
    }  # fmt: skip


def test_gang_admission_counts_every_resource_at_once():
    cap = Capacity(({"CPU": 16.0, "GPU": 2.0},))
    job = q("gpu", demand={"CPU": 2.0, "GPU": 2.0}, actors=({"CPU": 1.0, "GPU": 1.0},))
    held = [Running("other", "bob", {"CPU": 1.0, "GPU": 1.0})]
    (d,) = plan([job], held, cap, {})
    assert not d.admit and d.reason.endswith("(short of 1 GPU)"), d.reason  # 15 CPUs free are not enough


def test_a_quota_holds_back_its_owner_only():
    cap = Capacity(({"CPU": 32.0},))
    quotas = {"alice": Quota(max_running_jobs=1), "bob": Quota(max_cpus=4.0)}
    running = [Running("a0", "alice", TINY)]
    jobs = [q("a1", "alice", minute=0), q("b1", "bob", minute=1), q("b2", "bob", minute=2), q("c1", "carol", minute=3)]
    out = plan(jobs, running, cap, quotas)
    assert decided(out) == {"a1": (False, 1), "b1": (True, 0), "b2": (False, 2), "c1": (True, 0)}
    reasons = {d.job_id: d.reason for d in out}
    assert reasons["a1"] == "over quota: owner 'alice' has 1 job(s) admitted; quota max_running_jobs = 1"
    bob = "over quota: owner 'bob' would hold 6 CPU with this job (3 CPU admitted); quota max_cpus = 4"
    assert reasons["b2"] == bob


def test_a_job_larger_than_the_cluster_or_than_every_node_never_fits_and_holds_back_nobody():
    cap = Capacity(({"CPU": 4.0}, {"CPU": 4.0}))
    assert never_fits({"CPU": 3.0}, SHAPES, cap) == ""
    assert never_fits({"CPU": 9.0}, SHAPES, cap) == (
        "needs 9 CPU at once; the Ray cluster has 8 CPU in all (2 node(s)): missing 1 CPU"
    )
    assert never_fits({"CPU": 6.0}, ({"CPU": 6.0},), cap) == (
        "one of its actors needs 6 CPU; no node of the Ray cluster has that much (the largest: 4 CPU)"
    )
    assert "missing 1 GPU" in never_fits({"CPU": 1.0, "GPU": 1.0}, SHAPES, cap)
    jobs = [q("huge", minute=0, demand={"CPU": 9.0}), q("tiny", minute=1)]
    out = plan(jobs, [], cap, {})
    assert decided(out) == {"huge": (False, 1), "tiny": (True, 0)}
    assert out[0].reason.startswith("cannot fit the cluster as it is now (2 node(s), 8 CPU in all): needs 9 CPU")


def test_no_alive_node_admits_nothing_and_says_so():
    (d,) = plan([q("a")], [], Capacity(()), {})
    assert (
        not d.admit
        and d.reason == "cannot fit the cluster as it is now (0 node(s), nothing in all): no Ray node is alive"
    )


def preempt(queued, running, cap, quotas):
    """The pass's preemptions; its decisions are plan()'s (checked below)."""
    decisions, stops = plan_preempting(queued, running, cap, quotas)
    assert decisions == plan(queued, running, cap, quotas)
    return stops


def run(job_id: str, priority: int = 0, minute: int = 0, demand=TINY, stopping=False, owner="bob") -> Running:
    return Running(job_id, owner, demand, priority, T0 + dt.timedelta(minutes=minute), stopping)


def test_preemption_stops_the_lowest_priority_then_the_latest_started_and_only_enough():
    """8 CPUs, three running jobs of 2 CPUs (priority 0 started at 0 and 5, priority 1) and 2 free: a
    priority-5 job of 6 CPUs is 4 short, so two must stop: both priority-0 jobs (the lowest priority
    first), before the priority-1 one; a job of 4 CPUs (2 short) stops only the later of them."""
    cap = Capacity(({"CPU": 8.0},))
    running = [run("p0-early", 0, 0, {"CPU": 2.0}), run("p0-late", 0, 5, {"CPU": 2.0}), run("p1", 1, 9, {"CPU": 2.0})]
    big = q("big", priority=5, demand={"CPU": 6.0})
    assert decided(plan([big], running, cap, {})) == {"big": (False, 1)}
    assert preempt([big], running, cap, {}) == [Preemption("p0-late", "big"), Preemption("p0-early", "big")]
    mid = q("mid", priority=5, demand={"CPU": 4.0})
    assert preempt([mid], running, cap, {}) == [Preemption("p0-late", "mid")]
    # nothing of a priority as high or higher is stopped; a job that fits needs no one stopped
    assert preempt([q("peer", priority=0, demand={"CPU": 4.0})], running, cap, {}) == []
    assert preempt([q("fits", priority=5, demand={"CPU": 2.0})], running, cap, {}) == []


def test_preemption_counts_jobs_already_stopping_and_never_stops_in_vain():
    cap = Capacity(({"CPU": 8.0},))
    # p0-late is already stopping for mid: its 2 CPUs are room to come, so nothing more is stopped
    running = [run("p0-early", 0, 0, {"CPU": 2.0}), run("p0-late", 0, 5, {"CPU": 2.0}, stopping=True),
               run("p1", 1, 9, {"CPU": 2.0})]  # fmt: skip
    assert preempt([q("mid", priority=5, demand={"CPU": 4.0})], running, cap, {}) == []
    # a job of 8 needs all three stopped; p1 is of priority 1 >= 1: not enough room can be made, none stops
    assert preempt([q("all", priority=1, demand={"CPU": 8.0})], running, cap, {}) == []
    # only the first job waiting for capacity preempts; a job held by its owner's quota does not
    held = q("held", owner="alice", priority=9, minute=0, demand={"CPU": 4.0})
    quotas = {"alice": Quota(max_running_jobs=0)}
    assert preempt([held], running, cap, quotas) == []
    second = q("second", priority=3, minute=1, demand={"CPU": 6.0})
    first = q("first", priority=4, minute=2, demand={"CPU": 6.0})  # 2 free + 2 coming: 2 short
    assert preempt([second, first], running, cap, {}) == [Preemption("p0-early", "first")]
