"""Progress reporting and cooperative cancellation.

`cnc_core` never knows who listens: every long function takes an optional
``progress(stage, fraction)`` callback. ``fraction`` is the fraction of the *whole*
call done so far (0..1, non-decreasing); ``stage`` names the current stage. A listener
cancels the work by raising :class:`Cancelled` from inside the callback; the library
lets it propagate, so the work stops within one step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

ProgressFn = Callable[[str, float], None]


class Cancelled(Exception):  # noqa: N818 - the name reads as what happened
    """Raised by a progress listener to stop the work cooperatively."""


def null_progress(stage: str, fraction: float) -> None:
    """A listener that ignores everything."""


@dataclass
class StagePlan:
    """Maps per-stage progress onto one overall fraction, by stage weights.

    >>> plan = StagePlan([("decompose", 1.0), ("finetune", 3.0)], listener)
    >>> with plan.stage("decompose") as report:
    ...     report(0.5)   # listener("decompose", 0.125)

    Stage wall times are recorded in :attr:`timings` (seconds).
    """

    stages: Sequence[tuple[str, float]]
    listener: ProgressFn | None = None
    timings: dict[str, float] = field(default_factory=dict)
    _offsets: dict[str, tuple[float, float]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        total = sum(w for _, w in self.stages) or 1.0
        start = 0.0
        for name, weight in self.stages:
            self._offsets[name] = (start / total, weight / total)
            start += weight

    def report(self, stage: str, fraction: float) -> None:
        """Report ``fraction`` (0..1) of ``stage`` done."""
        start, width = self._offsets.get(stage, (0.0, 0.0))
        overall = start + width * min(max(fraction, 0.0), 1.0)
        if self.listener is not None:
            self.listener(stage, overall)

    def stage(self, name: str) -> _StageContext:
        return _StageContext(self, name)

    def nested(self, name: str) -> ProgressFn:
        """A listener for a nested call whose own fractions fill stage ``name``.

        The nested call's stage names are reported as ``"name/sub"``.
        """

        def listener(sub: str, fraction: float) -> None:
            start, width = self._offsets.get(name, (0.0, 0.0))
            if self.listener is not None:
                overall = start + width * min(max(fraction, 0.0), 1.0)
                self.listener(f"{name}/{sub}", overall)

        return listener


class _StageContext:
    def __init__(self, plan: StagePlan, name: str) -> None:
        self.plan, self.name = plan, name
        self._t0 = 0.0

    def __enter__(self) -> Callable[[float], None]:
        self._t0 = time.perf_counter()
        self.plan.report(self.name, 0.0)
        return lambda fraction: self.plan.report(self.name, fraction)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.plan.timings[self.name] = self.plan.timings.get(self.name, 0.0) + (
            time.perf_counter() - self._t0
        )
        if exc_type is None:
            self.plan.report(self.name, 1.0)
