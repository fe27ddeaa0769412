"""TurnBudget: at most N takers go on per event-loop turn; the others in later turns, in order."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from proxy.turns import TurnBudget, TurnMark


async def _starts_by_turn(per_turn: int, takers: int) -> Counter[int]:
    turn = 0
    done = False

    def tick() -> None:
        nonlocal turn
        turn += 1
        if not done:
            loop.call_soon(tick)

    loop = asyncio.get_running_loop()
    loop.call_soon(tick)
    budget = TurnBudget(per_turn)
    started: Counter[int] = Counter()

    async def taker() -> None:
        if budget.exhausted():
            await budget.next()
        budget.take()
        started[turn] += 1

    await asyncio.gather(*(taker() for _ in range(takers)))
    done = True  # the turn counter stops with the test
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
