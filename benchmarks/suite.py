"""Shared by the benchmarks and ``run_all.py``: one row of the suite's table, and the median of paired ratios."""
from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple


def row(measure: str, unit: str, mmcat: Optional[float], baseline: Optional[float], ratio: Optional[float],
        target: str, at_least: Optional[float] = None, at_most: Optional[float] = None,
        note: str = "") -> Dict[str, Any]:
    """A table row. ``met`` is None when there is no numeric target (report only) or nothing was measured."""
    met: Optional[bool] = None
    if ratio is not None and at_least is not None:
        met = ratio >= at_least
    if ratio is not None and at_most is not None:
        met = ratio <= at_most if met is None else (met and ratio <= at_most)
    return {"measure": measure, "unit": unit, "mmcat": mmcat, "baseline": baseline, "ratio": ratio,
            "target": target, "met": met, "note": note}


def not_measured(measure: str, target: str, why: str) -> Dict[str, Any]:
    return row(measure, "", None, None, None, target, note=f"not measured: {why}")


def paired(pairs: Sequence[Tuple[float, float]]) -> Tuple[float, float, float]:
    """(median mmcat, median baseline, median of the per-pair ratios mmcat / baseline) of interleaved pairs:
    the median ratio is the figure to trust on a shared machine, each pair having seen the same load."""
    ours: List[float] = [a for a, _ in pairs]
    base: List[float] = [b for _, b in pairs]
    return statistics.median(ours), statistics.median(base), statistics.median(a / b for a, b in pairs)
