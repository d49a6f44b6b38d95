"""Product attributes (brand, colour, price ...) as a modality: the worked example of a one-file modality.

Reads the json member's ``"attributes"`` object and encodes it with ``attributes.json`` (written by ``mmcat pack
--attribute-columns``, fit on the train split; the contract in the README):

- categorical column -> token id: 0 unknown (never seen in train), 1 other (seen, rarer than min_count),
  2 + i for ``vocab[i]``;
- numeric column -> ``(x' - mean) / std`` clipped to [-5, 5], with ``x' = log1p(x)`` when the column says so;
- a null value (or a key the sample lacks) is masked per column; a sample with no value at all, or no
  ``"attributes"`` object, lacks the modality (``has_attributes`` false).

Encoder: one embedding table per categorical column, a linear map of the scalar per numeric column, and a learned
"missing" embedding per column where a value is masked; the column vectors are concatenated and an MLP maps them
to ``hidden_dim``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from mmcat.errors import DataError
from mmcat.modalities import Modality, register, sample_json

UNKNOWN, OTHER, FIRST = 0, 1, 2  # token ids; vocab[i] is FIRST + i
CLIP = 5.0

Encoded = Tuple[List[int], List[bool], List[float], List[bool]]  # cat ids, cat present, numeric values, present


def _spec(path: Path) -> List[Dict[str, Any]]:
    try:
        spec = json.loads(Path(path).read_text())
        columns = spec["columns"]
        for c in columns:
            if c["kind"] not in ("categorical", "numeric") or not isinstance(c["name"], str):
                raise ValueError(f"column {c!r}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not an attributes.json of version 1 ({exc})") from None
    if spec.get("version") != 1 or not columns:
        raise DataError(f"{path}: attributes.json version {spec.get('version')!r} with {len(columns)} columns: "
                        f"this mmcat reads version 1 with at least one column")
    return columns


@register
class Attributes(Modality):
    name = "attributes"
    members = ("json",)
    files = ("attributes.json",)

    def __init__(self, files: Dict[str, Path]) -> None:
        super().__init__(files)
        columns = _spec(files["attributes.json"])
        self.categorical = [c for c in columns if c["kind"] == "categorical"]
        self.numeric = [c for c in columns if c["kind"] == "numeric"]
        self.vocab = [{v: FIRST + i for i, v in enumerate(c["vocab"])} for c in self.categorical]
        self.rare = [set(c.get("rare") or ()) for c in self.categorical]

    # ---------------------------------------------------------------------------------------------- encoding
    def _token(self, j: int, value: Any) -> int:
        value = str(value).strip()
        return self.vocab[j].get(value, OTHER if value in self.rare[j] else UNKNOWN)

    @staticmethod
    def _number(column: Dict[str, Any], value: Any) -> Optional[float]:
        try:
            x = float(value)
        except (TypeError, ValueError):
            return None
        if not math.isfinite(x) or (column.get("log1p") and x <= -1):
            return None
        x = math.log1p(x) if column.get("log1p") else x
        z = (x - float(column.get("mean", 0.0))) / (float(column.get("std") or 1.0))
        return max(-CLIP, min(CLIP, z))

    def read(self, raw: Dict[str, Any]) -> Optional[Encoded]:
        attrs = (sample_json(raw) or {}).get("attributes")
        if not isinstance(attrs, dict):
            return None
        cat = [attrs.get(c["name"]) for c in self.categorical]
        ids = [self._token(j, v) if v is not None else UNKNOWN for j, v in enumerate(cat)]
        cat_mask = [v is not None and str(v).strip() != "" for v in cat]
        nums = [self._number(c, attrs.get(c["name"])) for c in self.numeric]
        if not any(cat_mask) and all(v is None for v in nums):
            return None
        return ids, cat_mask, [0.0 if v is None else v for v in nums], [v is not None for v in nums]

    def collate(self, values: Sequence[Optional[Encoded]]) -> Dict[str, torch.Tensor]:
        n, nc, nn_ = len(values), len(self.categorical), len(self.numeric)
        empty: Encoded = ([UNKNOWN] * nc, [False] * nc, [0.0] * nn_, [False] * nn_)
        rows = [v if v is not None else empty for v in values]
        return {"ids": torch.tensor([r[0] for r in rows], dtype=torch.long).reshape(n, nc),
                "ids_mask": torch.tensor([r[1] for r in rows], dtype=torch.bool).reshape(n, nc),
                "values": torch.tensor([r[2] for r in rows], dtype=torch.float32).reshape(n, nn_),
                "values_mask": torch.tensor([r[3] for r in rows], dtype=torch.bool).reshape(n, nn_)}

    def build_encoder(self, hidden_dim: int, dropout: float) -> nn.Module:
        return AttributeEncoder([len(c["vocab"]) + FIRST for c in self.categorical], len(self.numeric),
                                hidden_dim, dropout)


class AttributeEncoder(nn.Module):
    """Per-column vectors (embedding / scaled vector / missing embedding), concatenated, then an MLP."""

    def __init__(self, vocab_sizes: Sequence[int], num_numeric: int, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        d = self.out_dim = int(hidden_dim)
        self.embeddings = nn.ModuleList(nn.Embedding(v, d) for v in vocab_sizes)
        columns = len(vocab_sizes) + num_numeric
        if num_numeric:  # no zero-size parameters for a table without numeric columns
            self.numeric_weight = nn.Parameter(torch.randn(num_numeric, d) * 0.02)
            self.numeric_bias = nn.Parameter(torch.zeros(num_numeric, d))
        self.missing = nn.Parameter(torch.randn(columns, d) * 0.02)
        self.mlp = nn.Sequential(nn.Linear(columns * d, d), nn.GELU(), nn.Dropout(dropout), nn.Linear(d, d))

    def forward(self, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = self.missing.dtype  # bf16 under DeepSpeed bf16 (no autocast there)
        parts, masks = [], []
        if len(self.embeddings):
            ids = inputs["ids"]
            parts.append(torch.stack([emb(ids[:, j]) for j, emb in enumerate(self.embeddings)], dim=1))
            masks.append(inputs["ids_mask"])
        if hasattr(self, "numeric_weight"):
            x = inputs["values"].to(dtype)[:, :, None]
            parts.append(x * self.numeric_weight + self.numeric_bias)
            masks.append(inputs["values_mask"])
        cols = torch.cat(parts, dim=1).to(dtype)  # [B, C, d]
        present = torch.cat(masks, dim=1).to(torch.bool)[:, :, None]
        cols = torch.where(present, cols, self.missing.expand_as(cols))
        return self.mlp(cols.flatten(1))
