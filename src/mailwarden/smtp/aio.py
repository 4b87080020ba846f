"""Run a coroutine eagerly: synchronously while it does not suspend, as a task once it does.

Most policy checks finish without ever waiting; creating a task for each would cost more
than the check. ``run_eager(coro)`` steps the coroutine once in the caller; if it finished,
its result is returned at once, else a ``Pending`` that a task awaits to finish it (the
coroutine is resumed exactly where it stopped, with the future it was waiting on).

Public names: ``run_eager``, ``Pending``.
Security: none (control flow only).
"""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Pending(Generic[T]):
    """A coroutine that suspended on its first step; ``await`` it (once) to finish it."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, T], first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self) -> Generator[Any, Any, T]:
        coro, value = self._coro, self._first
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # thrown in by the task (cancellation, timeout)
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]


def run_eager(coro: Coroutine[Any, Any, T]) -> T | Pending[T]:
    """Step ``coro``: its result if it completed, else a ``Pending``. Exceptions propagate."""
    try:
        first = coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    return Pending(coro, first)
