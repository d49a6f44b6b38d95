"""The warning users see when one modality learned nothing: modality competition, detected from the ablations.

After each validation the trainer records every ``<m>_only`` macro-F1. A modality whose ablation stays near
chance (below ``NEAR_CHANCE`` x 1/C) for ``WARN_AFTER_EVALS`` evaluations in a row while the fused model, clearly
above chance, held or improved its macro-F1 over them is named in a log warning and a TensorBoard text with the
remedies. A from-scratch encoder can be slow to start rather than starved (the ResNet of the CPU recipe on
`market`: image-only val macro-F1 0.04, 0.03, 0.05 over the first three epochs, 0.39 at the end), so a warned
modality whose ablation is back at the limit or above for ``WARN_AFTER_EVALS`` evaluations in a row is declared
recovered, in the log and the same text tag, and may be warned about again if it falls back. ``metrics.json`` gets
the ablation gap (fused minus ``<m>_only`` macro-F1) per split and ``weak_modalities``: those still warned about
when the run ends.

The other failure is the reverse: a modality that learned (its ``<m>_only`` ablation well above chance) but that
the fused model ignores whenever the others are present. A gated fusion can shut one input out this way (seen on an
H100 run: fused and image-only macro-F1 identical on val and test). The ablations cannot show it; the decision
influence can (:func:`mmcat.evaluation.decision_influence`). At the end of a run, and in ``mmcat eval``, a
modality whose hiding changes under ``UNUSED_BELOW`` of the fused predictions, over at least ``MIN_SAMPLES`` samples,
while it alone scores at least ``NEAR_CHANCE`` x chance, is named in a warning and in ``unused_modalities``.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Sequence, Tuple

NEAR_CHANCE = 1.5  # x chance macro-F1 (1 / number of classes)
WARN_AFTER_EVALS = 3

UNUSED_BELOW = 0.01  # share of fused predictions that change when the modality is hidden
MIN_SAMPLES = 30  # fewer samples that have it and another modality say too little to judge

REMEDIES = ("raise model.aux_loss_weight (or model.aux_loss_weights.{m}), raise model.modality_dropout or set "
            "model.modality_dropout_target=stronger, try model.ogm_alpha=0.5, or train a model on {m} alone "
            "(model.modalities=[{m}]) to see whether the data carries {m} signal at all")


def chance(num_labels: int) -> float:
    """Macro-F1 of guessing (1 / number of classes): the yardstick of both warnings."""
    return 1 / max(num_labels, 1)


def record(history: Dict[str, List[float]], results: Dict[str, Dict], modes: Sequence[str]) -> None:
    """Append this evaluation's fused and ``<m>_only`` macro-F1 to ``history`` (kept in the trainer state, so the
    check survives a resume)."""
    for mode in modes:
        if mode == "fused" or mode.endswith("_only"):
            history.setdefault(mode, []).append(round(float(results[mode]["macro_f1"]), 6))


def starved(history: Dict[str, List[float]], num_labels: int) -> List[str]:
    """Modalities whose ablation stayed near chance over the last ``WARN_AFTER_EVALS`` evaluations while the fused
    model, clearly above chance, kept or raised its macro-F1 over the same evaluations (it learned from the others)."""
    fused = history.get("fused", [])
    limit = NEAR_CHANCE * chance(num_labels)
    if len(fused) < WARN_AFTER_EVALS or fused[-1] < fused[-WARN_AFTER_EVALS] or fused[-1] < 2 * limit:
        return []
    out = []
    for mode, values in history.items():
        if mode.endswith("_only") and len(values) >= WARN_AFTER_EVALS and max(values[-WARN_AFTER_EVALS:]) < limit:
            out.append(mode[:-len("_only")])
    return out


def update(history: Dict[str, List[float]], warned: List[str], num_labels: int) -> Tuple[List[str], List[str]]:
    """After an evaluation was recorded: (modalities to warn about now, modalities that recovered), with ``warned``
    (the trainer state's list of modalities currently warned about) updated in place."""
    limit = NEAR_CHANCE * chance(num_labels)
    # as many evaluations in a row at or above the limit as it took below to warn: one lucky evaluation near the
    # limit is noise (4 classes: 0.175, 0.175, 0.297, then 0.388 once, then 0.347 again)
    recovered = [m for m in warned if len(history.get(f"{m}_only", [])) >= WARN_AFTER_EVALS
                 and min(history[f"{m}_only"][-WARN_AFTER_EVALS:]) >= limit]
    for m in recovered:
        warned.remove(m)
    new = [m for m in starved(history, num_labels) if m not in warned]  # a recovered one is not starved now
    warned.extend(new)
    return new, recovered


def message(name: str, history: Dict[str, List[float]], num_labels: int) -> str:
    recent = ", ".join(f"{v:.3f}" for v in history[f"{name}_only"][-WARN_AFTER_EVALS:])
    fused = ", ".join(f"{v:.3f}" for v in history["fused"][-WARN_AFTER_EVALS:])
    return (f"modality competition: the '{name}' half has learned nothing inside the fused model ({name}-only val "
            f"macro-F1 {recent}; chance {chance(num_labels):.3f}) while the fused model learns from the others "
            f"(fused {fused}). "
            f"Remedies: " + REMEDIES.format(m=name))


def recovery_message(name: str, history: Dict[str, List[float]], num_labels: int) -> str:
    return (f"modality competition over: the '{name}' half now learns inside the fused model ({name}-only val "
            f"macro-F1 {', '.join(f'{v:.3f}' for v in history[f'{name}_only'][-WARN_AFTER_EVALS:])}, at least "
            f"{NEAR_CHANCE:g} x chance {chance(num_labels):.3f}); it was slow to start, not starved, and is no "
            f"longer listed in metrics.json weak_modalities")


def ablation_gaps(results: Dict[str, Dict]) -> Dict[str, float]:
    """Fused macro-F1 minus each ``<m>_only`` macro-F1 (a summary per mode)."""
    fused = float(results["fused"]["macro_f1"])
    return {mode[:-len("_only")]: round(fused - float(r["macro_f1"]), 6)
            for mode, r in results.items() if mode.endswith("_only")}


def unused(influence: Dict[str, Dict[str, float]], results: Dict[str, Dict], num_labels: int) -> List[str]:
    """Modalities the fused model ignores although they carry signal alone (see the module docstring)."""
    limit = NEAR_CHANCE * chance(num_labels)
    return [m for m, inf in influence.items()
            if inf["samples"] >= MIN_SAMPLES and inf["changed"] < UNUSED_BELOW
            and float(results.get(f"{m}_only", {}).get("macro_f1", 0.0)) >= limit]


def unused_message(name: str, influence: Dict[str, Dict[str, float]], results: Dict[str, Dict], num_labels: int,
                   split: str) -> str:
    inf, alone = influence[name], float(results[f"{name}_only"]["macro_f1"])
    return (f"the fused model does not use '{name}': hiding it changes {inf['changed']:.1%} of the {split} predictions "
            f"({inf['samples']} samples that have it and another input), although {name}_only scores macro-F1 "
            f"{alone:.3f} (chance {chance(num_labels):.3f}); its fusion shuts '{name}' out whenever the others "
            f"are present. If '{name}' tells something the others do not, compare a run with model.fusion=late "
            f"(which weighs every present input by construction) or concat")


def warn_unused(results: Dict[str, Dict], num_labels: int, split: str, log: logging.Logger,
                speak: bool = True) -> List[str]:
    """:func:`unused` on an evaluation's results (``results["influence"]``), each one named in a log warning
    (``speak``: on the main process only); the end of a training run and ``mmcat eval`` both call this."""
    names = unused(results["influence"], results, num_labels)
    for name in names if speak else ():
        log.warning(unused_message(name, results["influence"], results, num_labels, split))
    return names
