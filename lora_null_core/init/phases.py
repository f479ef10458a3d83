"""Named phases of an init that observers can time or trace (the speed benchmark's profiler is one), so nothing
outside the pipeline reaches into its module globals. No observer, no cost beyond a context manager."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

WRAP = "PEFT wrapping"
DATA = "calibration data (the model's own text drawn here)"
CAPTURE = "capture block-0 inputs"
FORWARD = "block forward passes (with input taps)"
SOLVE = "null bases (decompositions)"
WRITE = "factors and residual"
FINALIZE = "covariances finalized (mirrored, checked)"
REPORT = "leakage figures"
ALL = (WRAP, DATA, CAPTURE, FORWARD, FINALIZE, SOLVE, WRITE, REPORT)  # disjoint: none runs inside another


class PhaseObserver(Protocol):
    def begin(self, name: str) -> None: ...

    def end(self, name: str) -> None: ...


_observers: list[PhaseObserver] = []


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    if not _observers:
        yield
        return
    for observer in _observers:
        observer.begin(name)
    try:
        yield
    finally:
        for observer in reversed(_observers):
            observer.end(name)


def observed() -> bool:
    """Whether anyone is timing the phases now."""
    return bool(_observers)


@contextlib.contextmanager
def observing(observer: PhaseObserver) -> Iterator[PhaseObserver]:
    """Show `observer` every phase that starts and ends while the block runs."""
    _observers.append(observer)
    try:
        yield observer
    finally:
        _observers.remove(observer)
