"""Modalities beyond the photo and the text, as plug-ins: a ``Modality`` subclass registered by name.

The image and the text are built into the loader and the model (ResNet / Hugging Face encoders, augmentation,
tokenizer, cross-attention); every *other* modality goes through this interface, and the loader, the model's fusion
heads, modality dropout, the ablations, ``best/`` and ``mmcat eval`` pick it up with no other change.
``mmcat.modalities.attributes`` (product attributes) is the worked example; the README's "Adding a modality" walks
through it.

A modality class says:

- ``name``: the key in ``model.modalities``; the batch carries ``batch[name]`` (its tensors) and ``has_<name>``;
- ``members``: the tar members it reads (e.g. ``("json",)``), so the loader does not skip them;
- ``files``: dataset-level files it needs (found next to the shards like ``labels.json``, copied into ``best/``
  unchanged so inference encodes exactly as training did); the constructor gets their paths;
- ``read(raw)``: one raw tar sample (member bytes) -> a small picklable value, or None when the sample lacks this
  modality (a ``BadSample`` for a malformed one); runs in the loader workers before any image decode;
- ``collate(values)``: the values of one batch (None where missing) -> a dict of tensors with batch dim first;
- ``build_encoder(hidden_dim, dropout)``: an ``nn.Module`` with ``out_dim`` whose ``forward(inputs)`` (the collated
  dict) returns pooled features ``[B, out_dim]``; the model projects them, swaps in a learned "missing" embedding
  where ``has_<name>`` is false, and fuses them with the others. It runs on every batch, so every parameter takes
  part in every step (DDP / DeepSpeed).
- ``present(find_file)`` (class method): whether packed data has it, for the default ``model.modalities=null``
  (default: all its ``files`` exist).

A user registers one without editing mmcat: write a module with ``@register`` on the class and name it in
``model.plugins=[my_module]`` (imported by name, so it must be importable: on ``PYTHONPATH`` or installed).
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from mmcat.errors import ConfigError, DataError

BUILTIN = ("image", "text")  # built into the loader and the model
REGISTRY: Dict[str, Type["Modality"]] = {}
FileFinder = Callable[[str], Optional[Path]]


class Modality:
    name: str = ""
    members: Tuple[str, ...] = ()
    files: Tuple[str, ...] = ()

    def __init__(self, files: Dict[str, Path]) -> None:
        self.paths = dict(files)

    @classmethod
    def present(cls, find_file: FileFinder) -> bool:
        return bool(cls.files) and all(find_file(f) is not None for f in cls.files)

    def read(self, raw: Dict[str, Any]) -> Optional[Any]:
        raise NotImplementedError

    def collate(self, values: Sequence[Optional[Any]]) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def build_encoder(self, hidden_dim: int, dropout: float) -> nn.Module:
        raise NotImplementedError


def register(cls: Type[Modality]) -> Type[Modality]:
    """Class decorator: make ``cls`` available as ``model.modalities=[..., cls.name]``."""
    if not cls.name or cls.name in BUILTIN:
        raise ValueError(f"a modality needs a name other than {', '.join(BUILTIN)}: {cls!r}")
    REGISTRY[cls.name] = cls
    return cls


def sample_json(raw: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The sample's json member as a dict (parsed once per sample, shared by the modalities reading it)."""
    if "__json__" not in raw:
        try:
            meta = json.loads(raw["json"]) if raw.get("json") else None
        except ValueError:
            meta = None
        raw["__json__"] = meta if isinstance(meta, dict) else None
    return raw["__json__"]


def import_plugins(names: Sequence[str]) -> None:
    for module in names or ():
        try:
            importlib.import_module(str(module))
        except ImportError as exc:
            raise ConfigError(f"model.plugins: cannot import '{module}' ({exc}); it must be importable "
                              f"(installed, or its folder on PYTHONPATH)") from None


def _builtin_modules() -> None:
    from mmcat.modalities import attributes  # noqa: F401  -- registers itself


def resolve_names(model_cfg: Any, find_file: FileFinder) -> List[str]:
    """``model.modalities`` checked, or (null) the modalities the data has: image, text, then every registered
    modality whose files are there. Any non-empty subset is a model (``[image]``: an image-only baseline); the
    result is in the canonical order image, text, then the others as listed."""
    _builtin_modules()
    import_plugins(list(model_cfg.get("plugins") or []))
    names = model_cfg.get("modalities")
    if names is None:
        names = [*BUILTIN, *(n for n, cls in REGISTRY.items() if cls.present(find_file))]
    names = [str(n) for n in names]
    for n in names:
        if n not in BUILTIN and n not in REGISTRY:
            raise ConfigError(f"model.modalities: unknown modality '{n}' (known: {', '.join([*BUILTIN, *REGISTRY])}; "
                              f"a plug-in registers more through model.plugins=[module])")
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"model.modalities must list one or more modalities, each once; got {names}")
    names = [*(b for b in BUILTIN if b in names), *(n for n in names if n not in BUILTIN)]
    check_balance_settings(model_cfg, names)
    return names


def check_balance_settings(model_cfg: Any, names: List[str]) -> None:
    """The per-modality settings name modalities of the model, with sensible values (one line each)."""
    if str(model_cfg.get("fusion")) == "attention" and not all(b in names for b in BUILTIN):
        raise ConfigError(f"model.fusion=attention needs image and text (text attends to the image); the model has "
                          f"{', '.join(names)}: use gated, concat or late")
    for key, low in (("aux_loss_weights", 0.0), ("modality_dropout_weights", None)):
        for n, w in dict(model_cfg.get(key) or {}).items():
            if n not in names:
                raise ConfigError(f"config key 'model.{key}': '{n}' is not a modality of the model "
                                  f"({', '.join(names)})")
            if (low is None and not float(w) > 0) or (low is not None and float(w) < low):
                bound = "> 0" if low is None else ">= 0"
                raise ConfigError(f"config key 'model.{key}.{n}': must be {bound}, got {w}")
    target = str(model_cfg.get("modality_dropout_target"))
    needs_aux = target == "stronger" or float(model_cfg.get("ogm_alpha") or 0) > 0
    weights = dict(model_cfg.get("aux_loss_weights") or {})
    no_head = [n for n in names if float(weights.get(n, model_cfg.get("aux_loss_weight") or 0)) <= 0]
    if needs_aux and len(names) > 1 and no_head:
        raise ConfigError(f"model.modality_dropout_target=stronger and model.ogm_alpha measure each modality by its "
                          f"auxiliary head; {', '.join(no_head)} has none (aux loss weight 0)")


def load_modalities(names: Sequence[str], find_file: FileFinder, where: str) -> List[Modality]:
    """Instances of the non-built-in ``names``, each given its files (``where`` names the place for errors)."""
    out = []
    for n in names:
        if n in BUILTIN:
            continue
        cls = REGISTRY[n]
        paths = {f: find_file(f) for f in cls.files}
        lacking = [f for f, p in paths.items() if p is None]
        if lacking:
            raise DataError(f"modality '{n}' needs {', '.join(lacking)} in {where} (pack the data with it, or "
                            f"leave '{n}' out of model.modalities)")
        out.append(cls(paths))  # type: ignore[arg-type]
    return out


def modes_for(names: Sequence[str]) -> List[str]:
    """Evaluation modes: fused, ``<m>_only`` per modality, and leave-one-out ``without_<m>`` from 3 modalities on; a
    one-modality model has only ``fused``."""
    if len(names) < 2:
        return ["fused"]
    return ["fused", *(f"{n}_only" for n in names), *((f"without_{n}" for n in names) if len(names) >= 3 else ())]


# ------------------------------------------------------------------------------------- the training config's view
def data_file_finder(data_cfg: Any) -> FileFinder:
    """Finds a dataset-level file next to the shards, where labels.json is (first data.root entry that has it)."""
    from mmcat.data.shards import _find, root_entries

    def find(name: str) -> Optional[Path]:
        return next((p for p in (_find(data_cfg, e, name) for e in root_entries(data_cfg)) if p is not None), None)

    return find


def training_modalities(cfg: Any) -> Tuple[List[str], List[Modality]]:
    """(all modality names, the non-built-in instances) of a training config, reading files next to the shards."""
    find = data_file_finder(cfg.data)
    names = resolve_names(cfg.model, find)
    return names, load_modalities(names, find, f"the data ({cfg.data.root})")


def artifact_modalities(model_cfg: Any, directory: Path) -> List[Modality]:
    """The non-built-in modalities of an artifact, with the files it holds (``best/attributes.json`` ...)."""
    def find(name: str) -> Optional[Path]:
        p = Path(directory) / name
        return p if p.is_file() else None

    names = resolve_names(model_cfg, lambda _: None) if model_cfg.get("modalities") is not None else list(BUILTIN)
    return load_modalities(names, find, str(directory))
