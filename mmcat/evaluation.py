"""The evaluation loop (validation during training, final metrics, ``mmcat eval``): one model in several modes from
the same weights: fused, ``<m>_only`` per modality and, from three modalities on, ``without_<m>`` (leave-one-out;
:func:`mmcat.modalities.modes_for`).

The ablations hide modalities through the model's own masks (``has_<name>``), the same path the
model learned with modality dropout, so they measure what a deployed model does when a photo or text is missing.
Each rank evaluates its own shards; predictions are gathered as objects with ``gather_for_metrics``, so the
counts are exact (no padded duplicates) whatever the number of ranks. Ranks step in lockstep: one that has run out
of batches runs a throw-away forward on a dummy batch, because DeepSpeed ZeRO-3 gathers parameters collectively in
every forward and a rank that stopped early would hang the others.

Besides the metrics, ``results["influence"]`` says whether the fused model *uses* each modality: the share of its
predictions that change when that modality alone is hidden (:func:`decision_influence`). A mode's metrics cannot
show it: a gated fusion that shut the text out entirely scores exactly what its image-only mode scores.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from accelerate.utils import send_to_device

from mmcat.data.device_decode import decode_batch
from mmcat.data.loader import iterate_batches
from mmcat.errors import DataError
from mmcat.metrics import MODES, classification_metrics
from mmcat.calibration import EvalScores
from mmcat.models.fusion import forward_modes, mode_masks


def hidden_mode(name: str, names: Sequence[str], modes: Sequence[str]) -> Optional[str]:
    """The mode that hides ``name`` and nothing else: ``without_<name>``, or with two modalities the other's
    ``<m>_only``; None when the modes have neither."""
    if f"without_{name}" in modes:
        return f"without_{name}"
    others = [n for n in names if n != name]
    return f"{others[0]}_only" if len(others) == 1 and f"{others[0]}_only" in modes else None


def decision_influence(preds: Dict[str, List[int]], present: Dict[str, List[bool]],
                       modes: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Per modality m: ``samples``, those that have m and at least one other modality (where the fused model could
    use m or not), and ``changed``, the share of them whose fused prediction changes when m is hidden. ``preds``:
    per mode, the predicted class of every sample (one order across modes); ``present``: per modality, whether
    each sample has it. Empty for a one-modality model."""
    names = [n for n in present if f"{n}_only" in modes]  # the model's modalities (a batch may carry more masks)
    if "fused" not in modes or len(names) < 2:
        return {}
    out = {}
    for name in names:
        mode = hidden_mode(name, names, modes)
        if mode is None:
            continue
        rows = [i for i, has in enumerate(present[name]) if has and any(present[n][i] for n in names if n != name)]
        changed = sum(preds["fused"][i] != preds[mode][i] for i in rows)
        out[name] = {"samples": len(rows), "changed": round(changed / len(rows), 6) if rows else 0.0}
    return out


def influence_text(influence: Dict[str, Dict[str, float]]) -> str:
    """``image 33.3% of 300, text 45.3% of 300``: the words ``mmcat eval`` prints and the report shows."""
    return ", ".join(f"{name} {v['changed']:.1%} of {v['samples']}" for name, v in influence.items())


def format_influence(influence: Dict[str, Dict[str, float]], split: str) -> str:
    """One line: how many fused predictions change when each modality is hidden."""
    if not influence:
        return f"[{split}] influence: one modality, nothing to hide"
    return f"[{split}] fused predictions that change when one input is hidden: {influence_text(influence)}"


def dummy_batch(tokenizer: Any, image_size: int, modalities: Sequence[Any] = ()) -> Dict[str, Any]:
    """A one-sample batch with no modality, for lockstep forwards whose output is thrown away."""
    enc = tokenizer([""], return_tensors="pt")
    extra = {k: v for m in modalities for k, v in ((m.name, m.collate([None])),
                                                    (f"has_{m.name}", torch.zeros(1, dtype=torch.bool)))}
    return {
        "pixel_values": torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8),
        "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
        "has_image": torch.zeros(1, dtype=torch.bool), "has_text": torch.zeros(1, dtype=torch.bool),
        **extra, "labels": torch.zeros(1, dtype=torch.long),
    }


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[Dict[str, Any]], accelerator, labels: Sequence[str],
             dummy: Dict[str, Any], modes: Sequence[str] = MODES,
             stop_requested: Callable[[], bool] = lambda: False,
             calibration: Optional[EvalScores] = None, mixed_precision: bool = True) -> Optional[Dict[str, Dict]]:
    """Metrics per mode over every sample that ``batches`` yields on every rank. With ``calibration``, also the
    calibrated confidences (and temperature fit sums) of every sample: ``results["calibration"]``.
    ``mixed_precision=False`` runs the forwards in full precision whatever the accelerator trains in: the exported
    artifact as ``mmcat eval``, predict and serve run it.

    Returns None when ``stop_requested()`` turned true on any rank (a preemption during a long validation): the
    ranks agree on it in the same collective that keeps them in lockstep, so the trainer can still checkpoint in
    time and evaluate again after the resume."""
    was_training = model.training
    model.eval()
    preds: Dict[str, List[int]] = {m: [] for m in modes}
    targets: List[int] = []
    skipped = 0
    dummy = send_to_device(dummy, accelerator.device)
    # per modality, per sample: whether the sample has it (the names from the dummy, which has every modality's
    # mask, so that a rank without eval batches gathers the same lists as the others)
    present: Dict[str, List[bool]] = {name: [] for name in mode_masks(dummy, "fused")}
    with iterate_batches(batches) as iterator:
        while True:
            batch = next(iterator, None)
            flags = torch.tensor([0 if batch is None else 1, int(stop_requested())], device=accelerator.device)
            more, stop = accelerator.reduce(flags, "sum").tolist()
            if stop:
                model.train(was_training)
                return None
            if more == 0:
                break
            real = batch is not None
            if real:  # data.decode_on=device: the images are decoded here, on the device (bad ones dropped)
                batch = send_to_device(decode_batch(batch, accelerator.device), accelerator.device, non_blocking=True)
            if real and not batch["keys"]:  # every image of the batch was bad: keep its count, forward the dummy
                skipped += int(batch["skipped"])
                real = False
            batch = batch if real else dummy
            with accelerator.autocast() if mixed_precision else nullcontext():  # every mode from one encoder pass
                for mode, logits in forward_modes(model, batch, modes).items():
                    if real:
                        preds[mode].extend(logits.argmax(dim=-1).tolist())
                        if calibration is not None:
                            calibration.add(mode, logits, batch["labels"], mode_masks(batch, mode))
            if real:
                targets.extend(batch["labels"].tolist())
                skipped += int(batch.get("skipped", 0))
                for name, mask in mode_masks(batch, "fused").items():
                    present[name].extend(mask.bool().tolist())
    model.train(was_training)

    all_targets = accelerator.gather_for_metrics(targets, use_gather_object=True)
    total_skipped = int(sum(accelerator.gather_for_metrics([skipped], use_gather_object=True)))
    if not all_targets:  # every rank sees the same gathered lists, so all of them stop here together
        raise DataError("nothing to evaluate: every sample was skipped as bad (the warnings above say why, "
                        "e.g. a missing label member)")
    results: Dict[str, Dict] = {}
    all_preds = {m: accelerator.gather_for_metrics(preds[m], use_gather_object=True) for m in modes}
    for mode in modes:
        results[mode] = classification_metrics(all_targets, all_preds[mode], labels)
    # every rank's lists in rank order, the same order as the predictions: sample i lines up across them
    all_present = {n: accelerator.gather_for_metrics(v, use_gather_object=True) for n, v in present.items()}
    results["influence"] = decision_influence(all_preds, all_present, modes)
    results["skipped_samples"] = total_skipped
    if calibration is not None:
        results["calibration"] = calibration.finish(accelerator, modes)
    return results
