"""Asynchronous mode's bookkeeping with worked numbers: the admission bound, the staleness rule, and the
data order that survives a kill (actors.driver.buffer)."""

import pytest

from actors.driver.buffer import GroupBuffer, StreamOrder, Waiting
from actors.driver.data import Example, PromptSampler


def _sampler(n: int = 10, batch: int = 4, shuffle: bool = True) -> PromptSampler:
    return PromptSampler([Example(f"q{i}", str(i)) for i in range(n)], batch, seed=3, shuffle=shuffle)


def test_admission_runs_k_steps_ahead_and_no_further():
    # P = 8, k = 1: 16 groups may be out before the first step; while a step learns, 8 (its own are taken)
    buf = GroupBuffer(per_step=8, max_staleness=1)
    assert buf.room(in_flight=0, learning=False) == 16
    assert buf.room(in_flight=10, learning=False) == 6
    for s in range(8):
        buf.add(Waiting(s, 0, None))
    assert buf.room(in_flight=8, learning=False) == 0
    taken, stale = buf.take(version=0)
    assert [w.serial for w in taken] == list(range(8)) and stale == []
    assert buf.room(in_flight=8, learning=True) == 0  # step 1 learns: no group of version 0 starts now
    assert buf.room(in_flight=8, learning=False) == 8  # its weights arrived: 8 start with version 1
    # k = 2: three steps' worth before the first step
    assert GroupBuffer(per_step=8, max_staleness=2).room(in_flight=0, learning=False) == 24


def test_a_step_takes_the_first_groups_by_serial_within_the_bound_and_drops_older_ones():
    buf = GroupBuffer(per_step=2, max_staleness=1)
    for serial, version in [(5, 3), (1, 1), (4, 2), (2, 3), (3, 1)]:  # finished out of order
        buf.add(Waiting(serial, version, None))
    assert buf.fresh(version=3) == 3  # versions 2 and 3 are within 1 of version 3
    taken, stale = buf.take(version=3)
    assert [(w.serial, w.version) for w in taken] == [(2, 3), (4, 2)]  # lowest serials first
    assert sorted(w.serial for w in stale) == [1, 3]  # version 1 < 3 - 1: dropped
    assert [w.serial for w in buf.waiting] == [5]


def test_stale_groups_give_their_room_back_before_a_step_waits():
    # k = 1, P = 4: 5 groups of version 0 and 3 of version 1 fill the room; a step at version 2 may train
    # only the 3 - it must not wait with the room held by groups it will drop
    buf = GroupBuffer(per_step=4, max_staleness=1)
    for s in range(8):
        buf.add(Waiting(s, 0 if s < 5 else 1, None))
    assert buf.room(in_flight=0, learning=False) == 0 and buf.fresh(version=2) == 3
    assert [w.serial for w in buf.drop_stale(version=2)] == [0, 1, 2, 3, 4]
    assert buf.room(in_flight=0, learning=False) == 5


def test_the_buffer_is_for_asynchronous_mode_only():
    with pytest.raises(ValueError, match="max_staleness=0"):
        GroupBuffer(per_step=2, max_staleness=0)


def test_the_order_resumes_at_the_lowest_unfinished_prompt_and_skips_finished_ones():
    order = StreamOrder(_sampler())
    drawn = [order.draw() for _ in range(6)]
    assert [s for s, _ in drawn] == list(range(6))
    # trained or left out: 0, 1, 3, 5; in flight or waiting at the kill: 2, 4
    for s in (0, 1, 3, 5):
        order.finish(s)
    state = order.state()
    assert state == {"epoch": 0, "pos": 2, "done": [3, 5]}
    with pytest.raises(ValueError, match="already done"):
        order.finish(1)

    again = StreamOrder(_sampler())
    again.load_state(state)
    redrawn = [again.draw() for _ in range(3)]
    # 2 and 4 are generated again, 3 and 5 are never drawn twice, and the order goes on with 6
    assert [s for s, _ in redrawn] == [2, 4, 6]
    assert [ex for _, ex in redrawn] == [drawn[2][1], drawn[4][1], _sampler_order_item(6)]


def _sampler_order_item(serial: int) -> Example:
    s = _sampler()
    for _ in range(serial):
        s.draw()
    return s.draw()


def test_the_order_crosses_epochs_and_a_synchronous_state_loads():
    order = StreamOrder(_sampler(n=3))
    for _ in range(5):
        serial, _ = order.draw()
        order.finish(serial)
    assert order.state() == {"epoch": 1, "pos": 2, "done": []}
    order.load_state({"epoch": 0, "pos": 1})  # a synchronous checkpoint: no done set
    assert order.low == 1 and order.done == set() and order.draw()[0] == 1


def test_sampler_draws_the_same_order_as_its_batches_and_seeks_to_a_serial():
    a, b = _sampler(), _sampler()
    batches = a.next() + a.next() + a.next()
    assert [b.draw() for _ in range(12)] == batches
    c = _sampler()
    c.seek(7)
    assert c.serial == 7 and c.draw() == batches[7]
