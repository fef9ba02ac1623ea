"""Pipeline schedules as data: validity, bubble fractions against closed forms, memory bound."""

import dataclasses

import pytest

from jaxsys.parallel.pipeline.schedules import (Op, ScheduleError, check, gpipe, interleaved_1f1b,
                                                one_f_one_b, peak_in_flight, zb_h1)

GRID = [(p, m) for p in (2, 4, 8) for m in (p, 2 * p, 4 * p)]


@pytest.mark.parametrize("p,m", GRID)
def test_bubbles_equal_closed_forms(p, m):
    for sched in (gpipe(p, m), one_f_one_b(p, m)):
        check(sched)
        assert sched.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
    inter = interleaved_1f1b(p, m, v=2)
    check(inter)
    assert inter.bubble_fraction == pytest.approx((p - 1) / (2 * m + p - 1), abs=1e-12)
    zb = zb_h1(p, m)
    check(zb)
    assert zb.bubble_fraction < one_f_one_b(p, m).bubble_fraction


@pytest.mark.parametrize("p", [2, 4, 8])
def test_1f1b_activation_memory_is_flat_in_m_while_gpipe_grows(p):
    for m in (p, 2 * p, 8 * p):
        assert peak_in_flight(one_f_one_b(p, m)) == [p - s for s in range(p)]
        assert peak_in_flight(zb_h1(p, m)) == [p - s for s in range(p)]
        assert peak_in_flight(gpipe(p, m)) == [m] * p


def _with_table(sched, table):
    return dataclasses.replace(sched, table=tuple(tuple(row) for row in table))


def test_checker_rejects_backward_before_forward():
    sched = one_f_one_b(2, 2)
    table = [list(row) for row in sched.table]
    first_b = next(t for t, row in enumerate(table) if row[1] == Op("B", 0))
    first_f = next(t for t, row in enumerate(table) if row[1] == Op("F", 0))
    # Move stage 1's first backward (2 ticks) to before its forward.
    table[first_b][1] = table[first_b + 1][1] = None
    table.insert(0, [None, Op("B", 0)])
    table.insert(0, [None, Op("B", 0)])
    assert first_f < first_b
    with pytest.raises(ScheduleError, match=r"Op\(kind='B', mb=0, chunk=0\) starts at tick 0 before"):
        check(_with_table(sched, table))


def test_checker_rejects_missing_duplicate_and_truncated_ops():
    sched = gpipe(2, 2)
    table = [list(row) for row in sched.table]
    missing = [[None if op == Op("F", 1) and s == 0 else op for s, op in enumerate(row)] for row in table]
    with pytest.raises(ScheduleError, match=r"stage 0: Op\(kind='F', mb=1, chunk=0\) is missing"):
        check(_with_table(sched, missing))
    twice = table + [[Op("F", 0), None]]
    with pytest.raises(ScheduleError, match="expected 1 consecutive ticks once"):
        check(_with_table(sched, twice))
    t = next(t for t, row in enumerate(table) if row[0] == Op("B", 0))
    truncated = [list(row) for row in table]
    truncated[t + 1][0] = None  # a backward that runs 1 tick instead of 2
    with pytest.raises(ScheduleError, match="expected 2 consecutive ticks"):
        check(_with_table(sched, truncated))


def test_schedule_preconditions_are_clear_errors():
    with pytest.raises(ScheduleError, match="1F1B needs microbatches ≥ stages, got m=2 < p=4"):
        one_f_one_b(4, 2)
    with pytest.raises(ScheduleError, match="needs v ≥ 2"):
        interleaved_1f1b(4, 8, 1)
    with pytest.raises(ScheduleError, match="divisible by stages, got m=6, p=4"):
        interleaved_1f1b(4, 6, 2)
