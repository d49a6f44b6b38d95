"""Reading packed shards with Hugging Face ``datasets`` (its ``webdataset`` loader).

``datasets`` infers the column types from the first 5 samples of the first shard. On mmcat shards that fails or
loses data: a sample without ``jpg`` or ``txt`` (a degraded row) among them stops the load ("files in the archive
don't share the same prefix"), and a json field that is null in all of them (``image_error``, an empty
``description``, an attribute) is typed ``null``, so a later value fails the load ("Couldn't cast array of type
string to null"). :func:`hf_features` gives the types instead, from what mmcat writes::

    from datasets import load_dataset
    from mmcat.data.hf import hf_features

    ds = load_dataset("webdataset", data_dir=PACKED, features=hf_features(PACKED),
                      data_files={"train": "train/*.tar", "val": "val/*.tar", "test": "test/*.tar"})

``data_files`` (not ``data_dir`` alone): ``data_dir`` alone hands every file under it to the tar reader,
``sizes.json`` (open_clip's size table, which must stay next to the shards) and ``labels.json`` included.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

from mmcat.errors import DataError
from mmcat.files import read_json

# the json keys every mmcat sample has, with their types (mmcat.pack.worker writes them, null when not applicable)
_KNOWN = {"id": "string", "label": "string", "label_index": "int64", "row": "int64", "has_image": "bool",
          "has_text": "bool", "width": "int64", "height": "int64", "orig_width": "int64", "orig_height": "int64",
          "image_error": "string"}


def hf_features(packed: str | Path) -> Any:
    """The ``datasets.Features`` of a packed directory's samples: ``jpg`` (Image), ``txt``, ``cls`` (the class
    index), ``json`` (every key mmcat writes: the fixed ones, the text fields, ``attributes`` typed by
    ``attributes.json``) and ``__key__`` / ``__url__``. Keys this module does not know are typed from the first
    non-null value in the first shard of the first split (string when all are null)."""
    from datasets import Features, Image, List, Value

    packed = Path(packed)
    first = _first_shard(packed)
    metas = _json_members(first)
    if not metas:
        raise DataError(f"{first} has no sample with a json member")
    json_types: Dict[str, Any] = {k: Value(t) for k, t in _KNOWN.items()}
    json_types["image_notes"] = List(Value("string"))
    for key in sorted({k for m in metas for k in m} - set(json_types)):
        if key == "attributes":
            json_types[key] = _attribute_types(packed, metas)
        else:
            json_types[key] = _value_type(next((m[key] for m in metas if m.get(key) is not None), None))
    return Features({"cls": Value("int64"), "jpg": Image(), "json": json_types, "txt": Value("string"),
                     "__key__": Value("string"), "__url__": Value("string")})


def _first_shard(packed: Path) -> Path:
    manifest = read_json(packed / "manifest.json", DataError, missing_ok=True) or {}
    for split, info in (manifest.get("splits") or {}).items():
        for shard in info.get("shards") or []:
            return packed / split / shard["name"]
    shards = sorted(packed.glob("*/*.tar"))
    if not shards:
        raise DataError(f"no shards in {packed} (expected {packed}/<split>/*.tar, as `mmcat pack` writes)")
    return shards[0]


def _json_members(shard: Path) -> list:
    import webdataset as wds

    samples = wds.tarfile_samples(iter([{"url": str(shard)}]), select_files=lambda name: name.endswith(".json"))
    return [json.loads(s["json"]) for s in samples if "json" in s]


def _attribute_types(packed: Path, metas: list) -> Dict[str, Any]:
    """``attributes.json`` says each column's kind: categorical values are strings, numeric ones floats."""
    from datasets import Value

    spec = read_json(packed / "attributes.json", DataError, missing_ok=True)
    if spec:
        return {c["name"]: Value("float64" if c["kind"] == "numeric" else "string") for c in spec["columns"]}
    names = sorted({k for m in metas for k in (m.get("attributes") or {})})
    return {n: _value_type(next((m["attributes"][n] for m in metas
                                 if (m.get("attributes") or {}).get(n) is not None), None)) for n in names}


def _value_type(value: Optional[Any]) -> Any:
    from datasets import List, Value

    if isinstance(value, bool):
        return Value("bool")
    if isinstance(value, int):
        return Value("int64")
    if isinstance(value, float):
        return Value("float64")
    if isinstance(value, list):
        return List(Value("string"))
    return Value("string")
