"""TurnBudget: at most N takers go on per event-loop turn; the others in later turns, in order."""

from __future__ import annotations

import asyncio
import gc
import time
from collections import Counter

import pytest

from proxy.cache.inflight import TURN_CHUNK_BYTES, turn_items
from proxy.turns import TurnBudget, TurnMark


class _Turns:
    """Counts the event loop's turns (a callback that queues itself again) until stopped."""

    def __init__(self) -> None:
        self.now = 0
        self._stopped = False
        asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        self.now += 1
        if not self._stopped:
            asyncio.get_running_loop().call_soon(self._tick)

    def stop(self) -> None:
        self._stopped = True


async def _starts_by_turn(per_turn: int, takers: int) -> Counter[int]:
    turns = _Turns()
    budget = TurnBudget(per_turn)
    started: Counter[int] = Counter()

    async def taker() -> None:
        if budget.exhausted():
            await budget.next()
        budget.take()
        started[turns.now] += 1

    await asyncio.gather(*(taker() for _ in range(takers)))
    turns.stop()  # the turn counter stops with the test
    return started


@pytest.mark.parametrize(("per_turn", "takers"), [(2, 7), (3, 3), (1, 4)])
async def test_at_most_per_turn_takers_go_on_in_one_turn(per_turn: int, takers: int) -> None:
    started = await _starts_by_turn(per_turn, takers)
    assert sum(started.values()) == takers  # nobody is left waiting
    assert max(started.values()) <= per_turn
    assert len(started) >= -(-takers // per_turn)  # spread over that many turns at least


async def test_no_limit_lets_everyone_go_on_in_the_same_turn() -> None:
    started = await _starts_by_turn(0, 50)
    assert list(started.values()) == [50]


async def test_a_turn_mark_tells_whether_the_loop_turned_since() -> None:
    mark = TurnMark()
    await asyncio.sleep(0)  # a step that let other callbacks run
    assert mark.passed()
    ran: list[int] = []
    loop = asyncio.get_running_loop()
    loop.call_soon(ran.append, 1)
    mark = TurnMark()
    assert not mark.passed()  # nothing waited: the caller yields itself
    await asyncio.sleep(0)
    assert ran == [1] and not mark.passed()  # the dropped mark never fires later


def _reaches(start: object, target: object, depth: int = 6) -> bool:
    """Whether ``target`` is reachable from ``start`` through references (a cycle if same)."""
    seen: set[int] = set()
    frontier = gc.get_referents(start)
    for _ in range(depth):
        following = []
        for item in frontier:
            if item is target:
                return True
            if id(item) not in seen:
                seen.add(id(item))
                following.extend(gc.get_referents(item))
        frontier = following
    return False


async def test_a_turn_mark_is_in_no_reference_cycle_whether_it_fired_or_was_dropped() -> None:
    # One is made per relayed chunk: in a cycle (mark -> handle -> method -> mark) each would
    # wait, with its task's context, for the garbage collector.
    fired = TurnMark()
    assert _reaches(fired, fired)  # pending: the loop holds it, and it its handle
    await asyncio.sleep(0)
    assert fired.passed() and not _reaches(fired, fired)
    dropped = TurnMark()
    assert not dropped.passed() and not _reaches(dropped, dropped)


async def test_items_taken_together_count_as_many() -> None:
    budget = TurnBudget(16)
    assert not budget.take(8)
    assert budget.take(8)  # 16 of 16: the turn's items are all taken
    assert budget.exhausted()
    await budget.next()  # the next turn starts from zero
    assert not budget.exhausted()
    assert budget.take(40)  # one big taker may go past the budget: it goes on, the rest wait


async def test_waiters_go_on_in_the_order_they_began_to_wait_a_newcomer_behind_them() -> None:
    budget = TurnBudget(2)
    went: list[str] = []

    async def waiter(name: str) -> None:
        await budget.next()
        went.append(name)

    first = [asyncio.ensure_future(waiter(name)) for name in ("a", "b", "c")]
    budget.take(2)  # the turn's items are all taken before they ask
    await asyncio.sleep(0)  # they wait; the turn's end has let the first go (not run yet)
    assert went == [] and budget.waiting
    # A newcomer while they wait: the new turn has items left, but it goes behind them.
    assert not budget.take() and budget.waiting
    await budget.next()
    went.append("late")
    await asyncio.gather(*first)
    assert went == ["a", "b", "c", "late"]
    assert not budget.waiting


async def test_a_turn_lets_a_few_waiters_go_then_one_more_each_turn() -> None:
    budget = TurnBudget(16)  # lets 16 // 8 = 2 go at first
    went: Counter[int] = Counter()
    turns: _Turns | None = None

    async def waiter() -> None:
        await budget.next()
        assert turns is not None
        went[turns.now] += 1

    waiters = [asyncio.ensure_future(waiter()) for _ in range(20)]
    budget.take(16)  # the turn's items are all taken before they ask
    turns = _Turns()
    await asyncio.gather(*waiters)
    turns.stop()
    assert list(went.values()) == [2, 3, 4, 5, 6]  # 20 in five turns, none in a crowd


async def test_after_a_turn_over_its_cpu_time_half_as_many_waiters_go() -> None:
    budget = TurnBudget(64, cpu_s=0.001)  # lets 64 // 8 = 8 go at first
    went: Counter[int] = Counter()
    turns: _Turns | None = None

    async def waiter() -> None:
        await budget.next()
        assert turns is not None
        went[turns.now] += 1
        _spend_cpu(0.0006)
        budget.take()  # the third in a turn finds 1.2 ms of CPU used since the first: over

    waiters = [asyncio.ensure_future(waiter()) for _ in range(20)]
    budget.take(64)
    turns = _Turns()
    await asyncio.gather(*waiters)
    turns.stop()
    assert list(went.values())[:3] == [8, 4, 2]  # each turn went over: halved each time


def _spend_cpu(seconds: float) -> None:
    """Use this thread's CPU for ``seconds`` (of CPU time, however long the clock says)."""
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass


async def test_a_turn_that_used_its_cpu_time_takes_no_more_however_few_were_taken() -> None:
    budget = TurnBudget(100, cpu_s=0.002)
    assert not budget.take()  # the turn's first item: its CPU time counts from here
    _spend_cpu(0.001)
    assert not budget.take()  # 1 ms of 2
    _spend_cpu(0.002)
    assert budget.take()  # past 2 ms: this item is the turn's last, 3 of 100 taken
    assert budget.exhausted()
    await budget.next()
    assert not budget.take() and not budget.exhausted()  # a new turn, its time from zero


async def test_time_the_thread_did_not_run_is_not_counted() -> None:
    # A machine busy with other work (the process waiting for its core) looks like this:
    # the clock moves, the thread's CPU time does not.
    budget = TurnBudget(100, cpu_s=0.002)
    assert not budget.take()
    time.sleep(0.01)  # noqa: ASYNC251 (on purpose: the turn goes on, the thread does not run)
    assert not budget.take() and not budget.exhausted()


async def test_without_cpu_time_only_the_count_limits_a_turn() -> None:
    budget = TurnBudget(3)
    assert not budget.take()
    _spend_cpu(0.005)
    assert not budget.take()
    assert budget.take()  # 3 of 3


def test_a_chunk_counts_once_per_128_kib_it_holds() -> None:
    assert TURN_CHUNK_BYTES == 128 * 1024
    assert turn_items(0) == turn_items(1) == turn_items(16 * 1024) == 1
    assert turn_items(128 * 1024) == 1
    assert turn_items(128 * 1024 + 1) == 2
    assert turn_items(1024 * 1024) == 8  # 16 of them make the default 128 a turn


async def test_must_wait_when_the_turn_is_taken_or_others_wait() -> None:
    budget = TurnBudget(3)  # lets 3 // 8 -> 1 waiter go a turn at first
    waiters = [asyncio.ensure_future(budget.next()) for _ in range(2)]
    assert not budget.must_wait(2)  # items left, nobody waits yet: on
    assert budget.must_wait()  # the turn's last item: wait
    await asyncio.sleep(0)  # both wait; the turn's end lets the first go, the second waits
    assert budget.waiting
    # A new turn with items left, but one waits in line: a newcomer must wait too.
    assert budget.must_wait()
    await asyncio.gather(*waiters)
    assert not budget.waiting
