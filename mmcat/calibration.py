"""Calibrated confidence: temperature scaling per input combination, expected calibration error, and the
coverage a score threshold reaches at a target precision.

Why per input combination: a product with only a photo is a different prediction problem from one with photo and
title, and the fused model is over- or under-confident by different amounts on each. The temperatures are keyed by
the *inputs a product actually has* (:func:`input_mode`: ``fused`` = all of them, ``image_only``, ``text_only``,
``without_<m>`` ...), the same key :class:`mmcat.classifier.Prediction` reports as ``modalities``, so a photo-only
listing gets the photo-only temperature whether it arrived that way or had its text hidden by an ablation.

Fitting needs no logits kept in memory and works across ranks: every evaluated sample adds its negative
log-likelihood at each temperature of a fixed log-spaced grid (0.05 .. 20, 2.5 % apart) and its confidence /
correctness to per-temperature reliability bins; the sums are reduced over ranks, and the temperature with the
lowest summed NLL wins (Guo et al., "On Calibration of Modern Neural Networks", 2017). The grid contains 1.0
exactly, so the "before" ECE is exact too.
"""
from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

FILE = "calibration.json"  # in best/
BINS = 15  # reliability bins of the ECE (equal width over [0, 1], the usual choice)
MIN_SAMPLES = 20  # an input combination with fewer val samples keeps the fused temperature
PRECISIONS = (0.90, 0.95, 0.99)  # coverage reported at these precisions
GRID = torch.cat([torch.logspace(math.log10(0.05), 0.0, 121)[:-1], torch.ones(1),
                  torch.logspace(0.0, math.log10(20.0), 121)[1:]]).double()
ONE = 120  # GRID[ONE] == 1.0


def input_mode(present: Sequence[str], names: Sequence[str]) -> str:
    """The name of the inputs a product has: ``fused`` (all), ``<m>_only`` (one of several), ``without_<m>`` (all
    but one, from three modalities on), else the present names joined with ``+``; ``none`` when nothing."""
    present = [n for n in names if n in present]
    if not present:
        return "none"
    if len(present) == len(names):
        return "fused"
    if len(present) == 1:
        return f"{present[0]}_only"
    if len(present) == len(names) - 1:
        return f"without_{next(n for n in names if n not in present)}"
    return "+".join(present)


def input_modes(names: Sequence[str]) -> List[str]:
    """Every input combination of a model, ``fused`` first."""
    subsets = [c for k in range(len(names), 0, -1) for c in combinations(names, k)]
    return [input_mode(c, names) for c in subsets]


def temperature_for(temperatures: Dict[str, float], mode: str) -> float:
    """The fitted temperature of ``mode``; a combination fit on too few samples falls back to ``fused``'s."""
    return float(temperatures.get(mode, temperatures.get("fused", 1.0)))


class CalibrationStats:
    """Sums over samples, per input combination: NLL at each grid temperature, and (count, confidence, correct)
    per reliability bin at each grid temperature. Add batches, reduce across ranks, then fit."""

    def __init__(self, modes: Sequence[str]) -> None:
        self.modes = list(modes)
        self.nll = torch.zeros(len(self.modes), len(GRID), dtype=torch.float64)
        self.bins = torch.zeros(len(self.modes), len(GRID), BINS, 3, dtype=torch.float64)

    @torch.no_grad()
    def add(self, logits: torch.Tensor, targets: torch.Tensor, modes: Sequence[str], chunk: int = 40) -> None:
        logits, targets = logits.detach().double().cpu(), targets.cpu()
        for mode in set(modes):
            rows = torch.tensor([i for i, m in enumerate(modes) if m == mode])
            if mode not in self.modes:  # "none": nothing to calibrate
                continue
            k = self.modes.index(mode)
            x, y = logits[rows], targets[rows]
            for start in range(0, len(GRID), chunk):  # [G, B, C] in chunks: memory bounded for many classes
                t = GRID[start:start + chunk, None, None]
                logp = torch.log_softmax(x[None] / t, dim=-1)
                self.nll[k, start:start + chunk] -= logp.gather(-1, y[None, :, None].expand(len(t), -1, 1)).sum((1, 2))
                conf, pred = logp.exp().max(dim=-1)
                correct = (pred == y[None]).double()
                idx = torch.clamp((conf * BINS).long(), max=BINS - 1)
                for col, val in enumerate((torch.ones_like(conf), conf, correct)):
                    self.bins[k, start:start + chunk, :, col].scatter_add_(1, idx, val)

    def tensor(self) -> torch.Tensor:
        return torch.cat([self.nll.flatten(), self.bins.flatten()])

    def load_tensor(self, flat: torch.Tensor) -> None:
        n = self.nll.numel()
        flat = flat.double().cpu()
        self.nll = flat[:n].reshape(self.nll.shape).clone()
        self.bins = flat[n:].reshape(self.bins.shape).clone()

    def _ece(self, k: int, g: int) -> float:
        count, conf, correct = self.bins[k, g].unbind(-1)
        total = count.sum()
        return float((conf - correct).abs().sum() / total) if total > 0 else 0.0

    def fit(self) -> Dict[str, Dict[str, float]]:
        """Per input combination with samples: ``temperature`` (lowest NLL on the grid), ``ece_before`` (T = 1),
        ``ece_after`` and ``num_samples``. A temperature that would raise the ECE on the very data it was fit on
        (a small or already calibrated split) is not used: T = 1."""
        out: Dict[str, Dict[str, float]] = {}
        for k, mode in enumerate(self.modes):
            n = int(self.bins[k, ONE, :, 0].sum())
            if n == 0:
                continue
            g = int(torch.argmin(self.nll[k]))
            g = g if self._ece(k, g) <= self._ece(k, ONE) else ONE
            out[mode] = {"temperature": round(float(GRID[g]), 4), "num_samples": n,
                         "ece_before": self._ece(k, ONE), "ece_after": self._ece(k, g)}
        return out


def temperatures_of(fitted: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """The temperatures worth using: combinations fit on at least ``MIN_SAMPLES`` samples (others fall back to
    ``fused``'s, :func:`temperature_for`)."""
    return {m: v["temperature"] for m, v in fitted.items() if v["num_samples"] >= MIN_SAMPLES}


def write_calibration(directory: Path, fitted: Dict[str, Dict[str, float]], split: str) -> Path:
    from mmcat.files import write_atomic

    body = {"version": 1, "method": "temperature", "split": split, "temperatures": temperatures_of(fitted),
            "fit": fitted}
    path = Path(directory) / FILE
    write_atomic(path, json.dumps(body, indent=2))
    return path


def read_temperatures(directory: Path) -> Dict[str, float]:
    """``best/calibration.json``'s temperatures; {} (every score at T = 1) for an artifact without one."""
    path = Path(directory) / FILE
    if not path.is_file():
        return {}
    from mmcat.errors import ConfigError

    try:
        temps = json.loads(path.read_text())["temperatures"]
        return {str(k): float(v) for k, v in temps.items() if float(v) > 0}
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a calibration file ({exc})") from None


# ---------------------------------------------------------------------------------------- selective prediction
def ece(scores: Sequence[float], correct: Sequence[bool], bins: int = BINS) -> float:
    """Expected calibration error of top-1 confidences (equal-width bins)."""
    s, c = np.asarray(scores, np.float64), np.asarray(correct, np.float64)
    if not len(s):
        return 0.0
    idx = np.minimum((s * bins).astype(int), bins - 1)
    gap = np.bincount(idx, s - c, minlength=bins)
    return float(np.abs(gap).sum() / len(s))


def precision_curve(scores: Sequence[float], correct: Sequence[bool]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds descending, precision, coverage) of "accept when score >= threshold", one point per distinct
    score: ties are accepted or refused together, as a threshold would."""
    s, c = np.asarray(scores, np.float64), np.asarray(correct, np.float64)
    order = np.argsort(-s, kind="stable")
    s, c = s[order], c[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # the last index of each run of equal scores
    hits = np.cumsum(c)[last]
    accepted = last + 1
    return s[last], hits / accepted, accepted / len(s)


def threshold_for_precision(scores: Sequence[float], correct: Sequence[bool],
                            target: float) -> Optional[Dict[str, float]]:
    """The lowest threshold whose accepted predictions reach ``target`` precision (the most coverage), with the
    precision and coverage it gives; None when no threshold reaches it."""
    if not len(scores):
        return None
    thresholds, precision, coverage = precision_curve(scores, correct)
    ok = np.nonzero(precision >= target)[0]
    if not len(ok):
        return None
    i = int(ok[-1])
    return {"threshold": float(thresholds[i]), "precision": float(precision[i]), "coverage": float(coverage[i])}


def coverage_table(scores: Sequence[float], correct: Sequence[bool],
                   targets: Iterable[float] = PRECISIONS) -> Dict[str, Optional[Dict[str, float]]]:
    return {f"{t:.2f}": threshold_for_precision(scores, correct, t) for t in targets}


# ---------------------------------------------------------------------------------------- during an evaluation
class EvalScores:
    """What an evaluation pass collects for calibration: per sample and evaluation mode, the top-1 confidence at
    T = 1 and under ``temperatures`` (by the sample's input combination), whether top-1 is right; with ``fit``,
    also the grid sums to fit temperatures. :meth:`finish` reduces / gathers across ranks."""

    def __init__(self, names: Sequence[str], temperatures: Optional[Dict[str, float]], fit: bool) -> None:
        self.names, self.temperatures = list(names), dict(temperatures or {})
        self.stats = CalibrationStats(input_modes(self.names)) if fit else None
        self.rows: Dict[str, List[Tuple[str, float, float, bool]]] = {}

    def add(self, mode: str, logits: torch.Tensor, targets: torch.Tensor, masks: Dict[str, torch.Tensor]) -> None:
        logits, targets = logits.detach().float().cpu(), targets.cpu()
        present = torch.stack([masks[n].cpu() for n in self.names], dim=1).tolist()
        inputs = [input_mode([n for n, p in zip(self.names, row) if p], self.names) for row in present]
        temps = torch.tensor([temperature_for(self.temperatures, m) for m in inputs])
        raw, pred = torch.softmax(logits, -1).max(-1)
        cal = torch.softmax(logits / temps[:, None], -1).max(-1).values
        correct = (pred == targets).tolist()
        self.rows.setdefault(mode, []).extend(zip(inputs, raw.tolist(), cal.tolist(), correct))
        if self.stats is not None:
            self.stats.add(logits, targets, inputs)

    def finish(self, accelerator: Any, modes: Sequence[str]) -> Dict[str, Any]:
        """{"fit": per-input fit or None, "by_input": ECE before/after per input combination (over every mode's
        samples), "coverage_at_precision": of the fused mode, "temperatures"}; the fused mode's (score, correct)
        pairs stay on ``self.fused`` for thresholds."""
        fitted = None
        if self.stats is not None:
            flat = accelerator.reduce(self.stats.tensor().to(accelerator.device), "sum")
            self.stats.load_tensor(flat)
            fitted = self.stats.fit()
        gathered = {m: accelerator.gather_for_metrics(self.rows.get(m, []), use_gather_object=True) for m in modes}
        by_input: Dict[str, Dict[str, float]] = {}
        for mode in input_modes(self.names):
            rows = [r for m in modes for r in gathered[m] if r[0] == mode]
            if rows:
                by_input[mode] = {"num_samples": len(rows), "ece_before": ece([r[1] for r in rows], [r[3] for r in rows]),
                                  "ece_after": ece([r[2] for r in rows], [r[3] for r in rows]),
                                  "temperature": temperature_for(self.temperatures, mode)}
        fused = gathered.get("fused", [])
        self.fused = ([r[2] for r in fused], [r[3] for r in fused])
        return {"temperatures": self.temperatures, "fit": fitted, "by_input": by_input,
                "coverage_at_precision": coverage_table(*self.fused)}


def ece_rows(by_input: Dict[str, Dict[str, float]]) -> List[str]:
    """A header and one line per input combination: samples, temperature, ECE before / after."""
    lines = [f"{'inputs':<16}{'samples':>9}{'temperature':>13}{'ECE before':>12}{'ECE after':>11}"]
    for mode, v in by_input.items():
        lines.append(f"{mode:<16}{v['num_samples']:>9d}{v['temperature']:>13.3f}{v['ece_before']:>12.4f}"
                     f"{v['ece_after']:>11.4f}")
    return lines


def format_calibration(report: Dict[str, Any], split: str) -> str:
    """The calibration lines of ``mmcat eval``: ECE per input combination, coverage at precision, and the
    threshold for ``--target-precision``."""
    cal = report["calibration"]
    fitted = "fit on val" if cal["temperatures"] else "none fitted: scores at T = 1"
    lines = [f"calibration (temperatures {fitted})", *ece_rows(cal["by_input"])]
    cov = [f"{p}: {_coverage(v)}" for p, v in cal["coverage_at_precision"].items()]
    lines.append(f"fused coverage at precision  {'  '.join(cov)}")
    target = report.get("target_precision")
    if target is not None:
        hit = target["reached"]
        lines.append(f"--target-precision {target['precision']}: " + (
            f"no score threshold reaches it on {split}" if hit is None else
            f"score >= {hit['threshold']:.4f} gives precision {hit['precision']:.4f} at coverage "
            f"{hit['coverage']:.1%} on {split} (mmcat predict --min-score {hit['threshold']:.4f})"))
    return "\n".join(lines)


def _coverage(hit: Optional[Dict[str, float]]) -> str:
    return "unreached" if hit is None else f"{hit['coverage']:.1%} (score >= {hit['threshold']:.3f})"
