"""Product attributes (brand, colour, price ...): per-sample values and the train-split fit in ``attributes.json``.

The format is the contract with the training/inference side (README, "Attributes"): every sample's ``json`` holds
``"attributes": {column: value}`` with every configured column as a key -- a stripped string for a categorical
column, a finite float for a numeric one, null when empty/unparseable. ``attributes.json`` describes how to encode
them, fit on the train split only: a vocabulary (count >= min_count, by descending count then value) and the rarer
values for categorical columns; mean/std (after log1p for non-negative right-skewed columns) for numeric ones.

Column kinds are decided from the plan's train rows (every train row of the table, before any photo is opened),
because each sample's value type depends on it and every job-array slice must agree. The fit itself uses the rows
actually packed into train (a row rejected later, e.g. no usable photo and no text, does not count): the train
writer keeps per-shard value counts and the numeric values themselves in its state records, so ``--resume`` and
``pack-merge`` see exactly the rows a single run sees, and the statistics are computed from the sorted values
(``math.fsum``) -- identical bits however the rows were sliced.
"""
from __future__ import annotations

import math
import statistics
from collections import Counter
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from mmcat.errors import ConfigError

FIT_SPLIT = "train"
ATTRIBUTE_STATS = "attribute_stats.json"  # a job-array slice's train counts/values, fit by pack-merge
NUMERIC_SHARE = 0.95  # a column is numeric when at least this share of its non-empty train cells are finite floats
SKEW_RATIO = 10.0  # log1p when every value is >= 0 and max > SKEW_RATIO x median
Kinds = Dict[str, str]  # column -> "categorical" | "numeric", in --attribute-columns order


def check_attribute_settings(cfg, splits: Mapping[str, float]) -> None:
    """One-line errors for attribute options that cannot work (before the table is read)."""
    columns = list(cfg.attribute_columns)
    if not columns:
        for key in ("numeric_attributes", "categorical_attributes"):
            if getattr(cfg, key):
                raise ConfigError(f"config key '{key}': needs --attribute-columns (it names which of them are {key.split('_')[0]})")
        return
    if len(set(columns)) != len(columns):
        raise ConfigError(f"config key 'attribute_columns': a column is listed twice ({', '.join(columns)})")
    used = {cfg.id_column: "the id column", cfg.label_column: "the label column", cfg.image_column: "the image column"}
    for col in columns:
        if col in used:
            raise ConfigError(f"config key 'attribute_columns': '{col}' is {used[col]}")
    for key in ("numeric_attributes", "categorical_attributes"):
        for col in getattr(cfg, key):
            if col not in columns:
                raise ConfigError(f"config key '{key}': '{col}' is not one of --attribute-columns ({', '.join(columns)})")
    both = set(cfg.numeric_attributes) & set(cfg.categorical_attributes)
    if both:
        raise ConfigError(f"attribute '{sorted(both)[0]}' is forced both numeric and categorical")
    if FIT_SPLIT not in splits:
        raise ConfigError(f"--attribute-columns: attributes are fit on the '{FIT_SPLIT}' split, and --splits has none")


def raw_cell(value: str) -> Optional[str]:
    value = value.strip()
    return value or None


def parse_number(value: Optional[str]) -> Optional[float]:
    """A finite float, or None (empty, unparseable, NaN, inf)."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def infer_kinds(cfg, column_cells: Callable[[str], Iterable[Optional[str]]]) -> Kinds:
    """Each column's kind: forced by --numeric/--categorical-attributes, else numeric when at least 95 % of its
    non-empty train cells parse as finite floats (a column with no non-empty train cell is categorical).
    ``column_cells(col)``: the stripped train cells of one column (None when empty), read column by column so a
    catalog's plan never holds a dict per row."""
    kinds: Kinds = {}
    for col in cfg.attribute_columns:
        if col in cfg.numeric_attributes:
            kinds[col] = "numeric"
        elif col in cfg.categorical_attributes:
            kinds[col] = "categorical"
        else:
            present = numeric = 0
            for cell in column_cells(col):
                if cell is not None:
                    present += 1
                    numeric += parse_number(cell) is not None
            kinds[col] = "numeric" if present and numeric >= NUMERIC_SHARE * present else "categorical"
    return kinds


def typed_values(cells: Mapping[str, Optional[str]], kinds: Kinds) -> Dict[str, Any]:
    """A sample's ``attributes`` object: every column, typed by its kind."""
    return {col: parse_number(cells[col]) if kind == "numeric" else cells[col] for col, kind in kinds.items()}


class AttributeStats:
    """What the fit needs from a set of packed train samples: value counts (categorical) and the values (numeric).
    JSON-serialisable (``to_json``/``add_json``) so shard records and slices can carry it."""

    def __init__(self, kinds: Kinds):
        self.kinds = dict(kinds)
        self.counts: Dict[str, Counter] = {c: Counter() for c, k in kinds.items() if k == "categorical"}
        self.values: Dict[str, List[float]] = {c: [] for c, k in kinds.items() if k == "numeric"}

    def add(self, values: Mapping[str, Any]) -> None:
        for col, value in values.items():
            if value is None:
                continue
            if col in self.counts:
                self.counts[col][value] += 1
            else:
                self.values[col].append(value)

    def to_json(self) -> dict:
        return {"counts": {c: dict(sorted(v.items())) for c, v in self.counts.items()},
                "values": {c: sorted(v) for c, v in self.values.items()}}

    def add_json(self, part: Mapping[str, Any]) -> "AttributeStats":
        for col, counts in part.get("counts", {}).items():
            self.counts[col].update(counts)
        for col, values in part.get("values", {}).items():
            self.values[col].extend(values)
        return self

    def fit(self, min_count: int) -> dict:
        """The ``attributes.json`` object."""
        columns = [_fit_categorical(col, self.counts[col], min_count) if kind == "categorical"
                   else _fit_numeric(col, self.values[col]) for col, kind in self.kinds.items()]
        return {"version": 1, "columns": columns}


def merged_stats(kinds: Kinds, parts: Iterable[Optional[Mapping[str, Any]]]) -> AttributeStats:
    stats = AttributeStats(kinds)
    for part in parts:
        if part:
            stats.add_json(part)
    return stats


def _fit_categorical(name: str, counts: Counter, min_count: int) -> dict:
    vocab = sorted((v for v, n in counts.items() if n >= min_count), key=lambda v: (-counts[v], v))
    rare = sorted(v for v, n in counts.items() if n < min_count)
    return {"name": name, "kind": "categorical", "vocab": vocab, "rare": rare, "min_count": min_count}


def _fit_numeric(name: str, values: Sequence[float]) -> dict:
    xs = sorted(values)  # a canonical order: the sums below do not depend on how the rows were sliced
    log1p = bool(xs) and xs[0] >= 0 and xs[-1] > SKEW_RATIO * statistics.median(xs)
    if log1p:
        xs = [math.log1p(x) for x in xs]
    mean = math.fsum(xs) / len(xs) if xs else 0.0
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / len(xs)) if xs else 0.0  # population std
    return {"name": name, "kind": "numeric", "mean": mean, "std": std if std > 0 else 1.0, "log1p": log1p}
