"""The deployable artifact (``RUN_DIR/best``): everything needed to predict, nothing from training.

Layout::

    best/model.safetensors        weights of the whole fusion model (fp32)
    best/config.yaml              what inference needs: the model section and the preprocessing (``data.image_size``,
                                  ``max_text_length``, ``label_key``, ``uint8_pixels``); nothing of the training
                                  machine (no data.root, output_dir or train section)
    best/labels.json              index -> label
    best/text_encoder/config.json the text encoder's architecture (weights live in model.safetensors)
    best/tokenizer/               the tokenizer files
    best/metrics.json             validation metrics at the step it was exported
    best/attributes.json ...      the files of the plug-in modalities (``mmcat.modalities``), copied unchanged from
                                  the training data, so inference encodes exactly as training did

Loading builds the model from these files alone (no hub, no pretrained downloads, no checkpoint state).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from mmcat.config import ConfigError, DataConfig, ModelConfig, to_yaml
from mmcat.files import fresh_dir, publish_dir

WEIGHTS = "model.safetensors"


@dataclass
class Preprocessing:
    """The ``data`` keys that decide what the model sees (defaults: the training schema's)."""
    image_size: int = DataConfig.image_size
    # the region of the eval view: the whole photo after training without random crops (transforms.eval_box); an
    # artifact written before the key existed was evaluated with the centre crop, and still is
    min_crop_scale: float = DataConfig.min_crop_scale
    max_text_length: int = DataConfig.max_text_length
    label_key: str = DataConfig.label_key
    uint8_pixels: Optional[bool] = DataConfig.uint8_pixels


@dataclass
class ArtifactConfig:
    """Schema of ``best/config.yaml``."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: Preprocessing = field(default_factory=Preprocessing)


def artifact_config(cfg: Any) -> Any:
    """The inference part of a training config (``TrainRunConfig``): a read-only ``ArtifactConfig``."""
    keys = OmegaConf.structured(Preprocessing).keys()
    out = OmegaConf.merge(OmegaConf.structured(ArtifactConfig),
                          {"model": cfg.model, "data": {k: cfg.data[k] for k in keys}})
    OmegaConf.set_readonly(out, True)
    return out


def _hf_text_model(model: torch.nn.Module) -> PreTrainedModel:
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise TypeError("the model has no Hugging Face text encoder")


def export_artifact(out_dir: Path, state_dict: Dict[str, torch.Tensor], model: torch.nn.Module, cfg: Any,
                    labels: List[str], tokenizer: Any, metrics: Optional[Dict] = None,
                    modalities: Sequence[Any] = ()) -> Path:
    """Write the artifact to a temp dir and swap it in whole: ``best/`` is never half-written, and never absent
    where the OS can swap directories atomically (see :func:`mmcat.files.publish_dir`)."""
    out_dir = Path(out_dir)
    tmp = fresh_dir(out_dir.with_name(out_dir.name + ".tmp"))
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    (tmp / "config.yaml").write_text(to_yaml(artifact_config(cfg)))
    (tmp / "labels.json").write_text(json.dumps(list(labels), ensure_ascii=False, indent=1))
    if getattr(model, "text_encoder", None) is not None:  # an image-only model has none
        _hf_text_model(model).config.save_pretrained(tmp / "text_encoder")
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    for m in modalities:
        for name, src in m.paths.items():
            shutil.copyfile(src, tmp / name)
    if metrics is not None:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    publish_dir(tmp, out_dir)
    return out_dir


TRAINING_ONLY = ("aux_heads.", "modality_strength")


@dataclass
class Artifact:
    model: torch.nn.Module
    tokenizer: Any
    labels: List[str]
    cfg: Any  # ArtifactConfig: the model section and the preprocessing, read-only
    path: Path
    modalities: List[Any] = field(default_factory=list)  # the non-built-in ones, with best/'s files

    @property
    def modes(self) -> List[str]:
        """Its evaluation modes (fused, <m>_only, without_<m>)."""
        from mmcat.modalities import modes_for

        return modes_for(list(self.model.names))

    def data_config(self, root: str, **overrides: Any) -> Any:
        """A read-only ``DataConfig`` that reads ``root`` the way the model was trained to see it (for loaders,
        split checks); ``overrides``: other data keys, e.g. ``label_key`` or ``labels_file``."""
        preprocessing = OmegaConf.to_container(self.cfg.data)  # plain values: a Preprocessing is no DataConfig
        cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), preprocessing, {"root": str(root)}, overrides)
        OmegaConf.set_readonly(cfg, True)
        return cfg


def read_artifact_config(path: Path) -> Any:
    """``best/config.yaml`` as a read-only ``ArtifactConfig``. Artifacts from before this schema hold the whole
    training config: their model section and preprocessing keys are taken, the rest (data.root, train, ...) ignored."""
    try:
        raw = OmegaConf.load(path)
        keys = OmegaConf.structured(Preprocessing).keys()
        data = raw.get("data") or {}
        cfg = OmegaConf.merge(OmegaConf.structured(ArtifactConfig),
                              {"model": raw.get("model") or {}, "data": {k: data[k] for k in keys if k in data}})
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {str(exc).splitlines()[0]}") from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


def load_artifact(path: str | Path, device: str | torch.device = "cpu") -> Artifact:
    from mmcat.models import build_model
    from mmcat.models.text import load_tokenizer

    path = Path(path)
    if not (path / WEIGHTS).is_file():
        from mmcat.errors import ConfigError

        raise ConfigError(f"{path} is not an mmcat model artifact (no {WEIGHTS})")
    cfg = read_artifact_config(path / "config.yaml")
    labels = json.loads((path / "labels.json").read_text())
    # architecture from the artifact's own files; every weight comes from model.safetensors
    build_cfg = OmegaConf.merge(cfg.model, {"text": {"name": str(path / "text_encoder"), "pretrained": False},
                                            "image": {"weights": "none"}})
    from mmcat.modalities import artifact_modalities

    modalities = artifact_modalities(cfg.model, path)
    model = build_model(build_cfg, num_labels=len(labels), modalities=modalities)
    missing, unexpected = model.load_state_dict(load_file(str(path / WEIGHTS)), strict=False)
    # training-only parts (auxiliary heads, running modality strengths) take no part in a prediction: an artifact
    # exported before they existed loads, and predicts exactly as it did
    missing = [k for k in missing if not k.startswith(TRAINING_ONLY)]
    if missing or unexpected:
        raise RuntimeError(f"artifact {path} does not match the model: missing={missing[:5]} unexpected={unexpected[:5]}")
    tokenizer = load_tokenizer(OmegaConf.merge(cfg.model.text, {"name": str(path / "tokenizer")}))
    return Artifact(model.to(device).eval(), tokenizer, labels, cfg, path, modalities)
