"""The deployable artifact (``RUN_DIR/best``): everything needed to predict, nothing from training.

Layout::

    best/model.safetensors        weights of the whole fusion model (fp32)
    best/config.yaml              the model + data settings it was trained with
    best/labels.json              index -> label
    best/text_encoder/config.json the text encoder's architecture (weights live in model.safetensors)
    best/tokenizer/               the tokenizer files
    best/metrics.json             validation metrics at the step it was exported

Loading builds the model from these files alone (no hub, no pretrained downloads, no checkpoint state).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from mmcat.config import TrainRunConfig, to_yaml

WEIGHTS = "model.safetensors"


def _hf_text_model(model: torch.nn.Module) -> PreTrainedModel:
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise TypeError("the model has no Hugging Face text encoder")


def export_artifact(out_dir: Path, state_dict: Dict[str, torch.Tensor], model: torch.nn.Module, cfg: Any,
                    labels: List[str], tokenizer: Any, metrics: Optional[Dict] = None) -> Path:
    """Write the artifact to a temp dir and swap it in, so ``best/`` is never half-written."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    (tmp / "config.yaml").write_text(to_yaml(cfg))
    (tmp / "labels.json").write_text(json.dumps(list(labels), ensure_ascii=False, indent=1))
    _hf_text_model(model).config.save_pretrained(tmp / "text_encoder")
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    if metrics is not None:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


@dataclass
class Artifact:
    model: torch.nn.Module
    tokenizer: Any
    labels: List[str]
    cfg: Any  # TrainRunConfig (model + data sections matter)
    path: Path


def load_artifact(path: str | Path, device: str | torch.device = "cpu") -> Artifact:
    from mmcat.models import build_model
    from mmcat.models.text import load_tokenizer

    path = Path(path)
    if not (path / WEIGHTS).is_file():
        from mmcat.errors import ConfigError

        raise ConfigError(f"{path} is not an mmcat model artifact (no {WEIGHTS})")
    cfg = OmegaConf.merge(OmegaConf.structured(TrainRunConfig), OmegaConf.load(path / "config.yaml"))
    labels = json.loads((path / "labels.json").read_text())
    # architecture from the artifact's own files; every weight comes from model.safetensors
    cfg.model.text.name = str(path / "text_encoder")
    cfg.model.text.pretrained = False
    cfg.model.image.weights = "none"
    model = build_model(cfg.model, num_labels=len(labels))
    missing, unexpected = model.load_state_dict(load_file(str(path / WEIGHTS)), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"artifact {path} does not match the model: missing={missing[:5]} unexpected={unexpected[:5]}")
    tok_cfg = OmegaConf.merge(cfg.model.text, {"name": str(path / "tokenizer")})
    tokenizer = load_tokenizer(tok_cfg)
    return Artifact(model.to(device).eval(), tokenizer, labels, cfg, path)
