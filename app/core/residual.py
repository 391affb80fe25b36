"""The purified model's residual-backdoor check, read from a job's report (no torch).

``cnc_core.purify.verify`` writes ``report["detection"]["verify"]``; the job view and the
callback payload both show this short form of it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["residual_summary"]


def residual_summary(report: Any) -> dict[str, Any] | None:
    """``verdict`` ("residual": removal unconfirmed; "cleared"; "unchecked": Neural Cleanse
    saw no outlier on the original), the class it is about (``suspect_class``) with its
    ``relative_growth`` (its mask's growth over the median class's) and the bar
    (``min_relative_growth``), and the class the purification treated (``acted_on``); None
    where the job ran no check (another method, or a report from before the check)."""
    if not isinstance(report, dict):
        return None
    rec = (report.get("detection") or {}).get("verify")
    if not isinstance(rec, dict) or "verdict" not in rec:
        return None
    return {
        "verdict": rec["verdict"],
        "suspect_class": rec.get("class"),
        "relative_growth": rec.get("relative_growth_of_class"),
        "min_relative_growth": rec.get("min_relative_growth"),
        "acted_on": rec.get("acted_on"),
    }
