"""Where the shards of a split are, how many samples they hold, what the labels are, and the pre-flight checks
(``check_data``, ``check_split``) that refuse bad data settings before any work.

``data.root`` is one or more comma-separated entries; each entry is either a packed directory
(``<dir>/<split>/*.tar`` with ``sizes.json``, ``labels.json`` and ``manifest.json`` from ``mmcat pack``) or a shard
pattern with braces or globs (``/d/{split}/shard-{000000..000009}.tar``; ``{split}`` is replaced by the split name),
or a folder that holds ``.tar`` shards itself (img2dataset's output folder), which is how shards written by other tools
(img2dataset, ``webdataset.ShardWriter``) are read. Such a folder, like a pattern without ``{split}``, gives every
split the same shards: ``data.val_root`` / ``data.test_root`` (same forms) name the val / test shards instead, and
training refuses val or test shards that are train shards (:func:`check_data`).
"""
from __future__ import annotations

import glob
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import braceexpand
import webdataset as wds

from mmcat.files import read_json
from mmcat.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class ShardSource:
    """The shards of one ``data.root`` entry for one split."""

    entry: str
    shards: List[str]  # absolute paths, sorted
    sizes: Dict[str, int]  # shard path -> samples (empty when unknown)
    weight: float = 1.0


def root_entries(data_cfg: Any) -> List[str]:
    return _entries(str(data_cfg.root), "data.root")


def _entries(value: str, setting: str) -> List[str]:
    entries = [e.strip() for e in value.split(",") if e.strip()]
    if not entries:
        raise DataError(f"{setting} is empty: give a packed directory, a folder of shards or a shard pattern")
    return entries


def _setting(data_cfg: Any, key: str) -> Any:
    """An optional data key (configs built before the key existed, e.g. by library callers, lack it)."""
    return data_cfg.get(key) if hasattr(data_cfg, "get") else getattr(data_cfg, key, None)


def split_root(data_cfg: Any, split: str) -> Tuple[str, List[str]]:
    """The setting that holds ``split`` and its entries: ``data.val_root`` / ``data.test_root`` for the val / test
    split when set (shards another tool wrote in separate folders), else ``data.root``."""
    for root_key, split_key in (("val_root", "val_split"), ("test_root", "test_split")):
        value = _setting(data_cfg, root_key)
        if value and split == _setting(data_cfg, split_key):
            return f"data.{root_key}", _entries(str(value), f"data.{root_key}")
    return "data.root", root_entries(data_cfg)


def _is_pattern(entry: str) -> bool:
    return any(c in entry for c in "{*?[") or entry.endswith(".tar")


def _fixed_dir(entry: str) -> Path:
    """The directory part of a shard pattern before any brace or glob (``/d/{split}/s-{0..9}.tar`` -> ``/d``)."""
    fixed = re.split(r"[{*?\[]", entry, maxsplit=1)[0]
    return Path(os.path.dirname(fixed) or ".")


def check_root_exists(entry: str, setting: str = "data.root") -> None:
    """A packed directory, or the fixed directory of a pattern, must exist (else every split looks "missing")."""
    where = Path(entry) if not _is_pattern(entry) else _fixed_dir(entry)
    if not where.exists():
        why = f"no {where}" if _is_pattern(entry) else "not a directory or a shard pattern"
        raise DataError(f"{setting} entry '{entry}' does not exist ({why})")
    if not _is_pattern(entry) and not where.is_dir():
        raise DataError(f"{setting} entry '{entry}' is not a directory or a shard pattern")


def _shard_folder(entry: str, split: str) -> bool:
    """A directory entry without a ``split`` folder that holds .tar shards itself: one set of shards, no splits."""
    return (not _is_pattern(entry) and not (Path(entry) / split).is_dir()
            and any(p.is_file() for p in Path(entry).glob("*.tar")))


def _expand(entry: str, split: str, setting: str = "data.root") -> List[str]:
    check_root_exists(entry, setting)
    if not _is_pattern(entry):
        split_dir = Path(entry) / split
        if _shard_folder(entry, split):  # img2dataset's output folder: the shards themselves
            split_dir = Path(entry)
        elif not split_dir.is_dir():
            raise DataError(f"no '{split}' split in {entry} (expected {split_dir}/*.tar)")
        shards = sorted(str(p.resolve()) for p in split_dir.glob("*.tar"))
    else:
        shards = []
        for pat in braceexpand.braceexpand(entry.replace("{split}", split)):
            matches = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else [pat]
            shards.extend(os.path.abspath(m) for m in matches)
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise DataError(f"shard not found: {missing[0]} (from {setting} entry '{entry}')")
    if not shards:
        raise DataError(f"no shards for split '{split}' in {setting} entry '{entry}'")
    return shards


def _known_sizes(shards: Sequence[str]) -> Dict[str, int]:
    """Sample counts from ``sizes.json`` next to the shards (open_clip format) or img2dataset ``*_stats.json``."""
    sizes: Dict[str, int] = {}
    for folder in sorted({os.path.dirname(s) for s in shards}):
        table = read_json(Path(folder) / "sizes.json", DataError, missing_ok=True) or {}
        for name, n in table.items():
            sizes[os.path.join(folder, name)] = int(n)
    for shard in shards:
        if shard not in sizes:  # img2dataset writes 00000.tar + 00000_stats.json {"successes": n}
            stats = read_json(Path(shard[: -len(".tar")] + "_stats.json"), DataError, missing_ok=True)
            if stats and "successes" in stats:
                sizes[shard] = int(stats["successes"])
    return {s: sizes[s] for s in shards if s in sizes}


def count_tar_samples(shard: str) -> int:
    """Count samples by reading tar headers only, grouped by webdataset's own rules; used without a size table."""
    from mmcat.tarkeys import count_tar_samples as count

    try:
        return count(shard)
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise DataError(f"shard {shard} is not a readable tar file ({exc})") from None


def shard_sources(data_cfg: Any, split: str, count_missing: bool = True) -> List[ShardSource]:
    setting, entries = split_root(data_cfg, split)
    # the weights pick data.root entries when sampling train shards; a val / test root is read in full, unweighted
    weights = list(data_cfg.weights) if data_cfg.weights is not None and setting == "data.root" else None
    if weights is not None and len(weights) != len(entries):
        raise DataError(f"data.weights has {len(weights)} values but data.root has {len(entries)} entries")
    sources = []
    for i, entry in enumerate(entries):
        shards = _expand(entry, split, setting)
        sizes = _known_sizes(shards)
        unknown = [s for s in shards if s not in sizes]
        if unknown and count_missing:
            log.info("no sizes.json for %d shard(s) of %s: counting samples from tar headers", len(unknown), entry)
            for s in unknown:
                sizes[s] = count_tar_samples(s)
        sources.append(ShardSource(entry, shards, sizes, float(weights[i]) if weights else 1.0))
    return sources


def all_shards(sources: Sequence[ShardSource]) -> List[str]:
    return [s for src in sources for s in src.shards]


def total_samples(sources: Sequence[ShardSource]) -> int:
    return sum(sum(src.sizes.get(s, 0) for s in src.shards) for src in sources)


def split_sizes(data_cfg: Any, split: str) -> int:
    """Number of samples in ``split`` over all roots (sizes.json, else tar headers)."""
    return total_samples(shard_sources(data_cfg, split))


# ------------------------------------------------------------------------------------------------------ labels
def _label_dirs(entry: str, split: str) -> List[Path]:
    """Where labels.json / manifest.json of one root entry may live, in order: a packed directory itself; for a
    shard pattern the directory of its shards (``{split}`` filled in with ``split``), then the one above it (the
    dataset directory of ``/d/{split}/*.tar`` or of ``/d/test/*.tar``)."""
    if not _is_pattern(entry):
        return [Path(entry)]
    shard_dir = os.path.dirname(entry.replace("{split}", split))
    base = Path(shard_dir or ".") if not re.search(r"[{*?\[]", shard_dir) else _fixed_dir(shard_dir + "/")
    return [base] if base.parent == base else [base, base.parent]


def _find(data_cfg: Any, entry: str, name: str) -> Optional[Path]:
    return next((d / name for d in _label_dirs(entry, str(data_cfg.train_split)) if (d / name).is_file()), None)


def load_label_list(path: Path) -> List[str]:
    """A label list in either format ``pack --labels`` takes (JSON list, or one label per line)."""
    from mmcat.pack.plan import read_label_whitelist  # the pack-side reader: one definition of the formats

    try:
        return read_label_whitelist(str(path))
    except ConfigError as exc:
        raise DataError(str(exc).replace("--labels ", "labels file ", 1)) from None


def find_labels(data_cfg: Any) -> Optional[List[str]]:
    """The ordered label list (index = class id) from ``data.labels_file`` or a labels.json next to the shards
    (see :func:`_label_dirs`), None when there is none; with several root entries their labels.json must agree."""
    if data_cfg.labels_file:
        path = Path(data_cfg.labels_file)
        if not path.is_file():
            raise DataError(f"data.labels_file '{path}' does not exist")
        return load_label_list(path)
    found = [p for p in (_find(data_cfg, e, "labels.json") for e in root_entries(data_cfg)) if p is not None]
    if not found:
        return None
    labels = load_label_list(found[0])
    for other in found[1:]:
        if load_label_list(other) != labels:  # the same class index would mean different classes per root
            raise DataError(f"{other} differs from {found[0]}: the data.root entries disagree on the labels; "
                            f"repack them with one `pack --labels` list, or set data.labels_file")
    return labels


def read_labels(data_cfg: Any) -> List[str]:
    """Like :func:`find_labels`, but a missing labels file is an error."""
    labels = find_labels(data_cfg)
    if labels is None:
        where = ", ".join(str(d / "labels.json") for e in root_entries(data_cfg)
                          for d in _label_dirs(e, str(data_cfg.train_split)))
        raise DataError(f"no labels file found (looked for {where}); set data.labels_file=/path/to/labels.json")
    return labels


def read_manifest(data_cfg: Any) -> Optional[Dict[str, Any]]:
    path = _find(data_cfg, root_entries(data_cfg)[0], "manifest.json")
    return read_json(path, DataError, missing_ok=True) if path is not None else None


def label_counts(data_cfg: Any, split: str) -> List[int]:
    """Samples per class in ``split`` (for class weights): manifest.json, else a scan of the shards' labels."""
    labels = read_labels(data_cfg)
    manifest = read_manifest(data_cfg) if len(root_entries(data_cfg)) == 1 else None
    info = ((manifest or {}).get("splits") or manifest or {}).get(split) if manifest else None
    counts = info.get("label_counts") if isinstance(info, dict) else None
    if isinstance(counts, list) and len(counts) == len(labels):
        return [int(c) for c in counts]
    if isinstance(counts, dict):
        index = {name: i for i, name in enumerate(labels)}
        out = [0] * len(labels)
        for k, v in counts.items():  # keyed by label name, never by index ("10" is a name, as in labels.json)
            i = index.get(k)
            if i is None:
                raise DataError(f"manifest.json label_counts names unknown label '{k}'")
            out[i] = int(v)
        return out
    log.info("no label counts in manifest.json for split '%s': scanning shard labels", split)
    return _scan_label_counts(data_cfg, split, labels)


def _scan_label_counts(data_cfg: Any, split: str, labels: List[str]) -> List[int]:
    from mmcat.data.samples import LabelReader  # local: keeps this module free of decode dependencies

    reader = LabelReader(data_cfg.label_key, labels)
    member = "cls" if data_cfg.label_key == "cls" else "json"
    counts = [0] * len(labels)
    for shard in all_shards(shard_sources(data_cfg, split, count_missing=False)):
        try:  # grouped by webdataset's own rules, reading only the label member's bytes
            samples = list(wds.tarfile_samples(iter([{"url": shard}]),
                                               select_files=lambda name: name.endswith("." + member)))
        except Exception as exc:  # webdataset re-raises tarfile/OS errors as they come
            raise DataError(f"shard {shard} is not a readable tar file ({exc})") from None
        for sample in samples:
            try:
                counts[reader(sample)] += 1
            except (ValueError, KeyError):
                pass  # bad labels are counted as bad samples by the loader, not here
    return counts


def train_shard_sizes(data_cfg: Any) -> Dict[str, Optional[int]]:
    """Every train shard with its sample count (None when unknown): what the train stream is made of."""
    return {shard: src.sizes.get(shard) for src in shard_sources(data_cfg, data_cfg.train_split) for shard in src.shards}


# ------------------------------------------------------------------------------------------------- pre-flight
def check_data(cfg: Any) -> Dict[str, int]:
    """Refuse bad data settings before any work, with one line naming the key or path (``DataError``, or
    ``ConfigError`` for a setting the data cannot satisfy). Cheap: resolves the shard lists, reads the size tables
    (or tar headers), reads the labels file and the first usable sample of each split.

    Checks: every ``data.root`` entry exists; the train, val and test split (unless ``data.test_split`` is null)
    have shards, readable tars and samples; val and test shards are not train shards (a pattern without
    ``{split}`` gives every split the same shards) nor each other's; the labels file is readable; each split has a
    sample with a usable label (e.g. no ``cls`` member at all with ``data.label_key=cls``); the text model has
    positions for ``data.max_text_length`` tokens. Returns the samples per split.
    """
    data = cfg.data
    roles = [("data.train_split", data.train_split), ("data.val_split", data.val_split)]
    if data.test_split is not None:
        roles.append(("data.test_split", data.test_split))
    elif _setting(data, "test_root"):
        raise ConfigError("data.test_root is set but data.test_split is null: set data.test_split (e.g. test) to "
                          "evaluate on it, or drop data.test_root")
    for _, split in roles:
        setting, entries = split_root(data, split)
        for entry in entries:
            check_root_exists(entry, setting)
    shards: Dict[str, List[str]] = {}
    samples: Dict[str, int] = {}
    for key, split in roles:
        sources = _split_sources(data, key, split)
        shards[key], samples[split] = all_shards(sources), total_samples(sources)
        if samples[split] == 0:
            raise DataError(f"{key} '{split}' has no samples ({len(shards[key])} shard(s), e.g. {shards[key][0]})")
    _check_disjoint(shards, dict(roles), {key: split_root(data, split)[0] for key, split in roles})
    labels = read_labels(data)
    for key, split in roles:
        _check_usable_sample(data, labels, key, split, shards[key])
    _check_text_model(cfg)
    return samples


def _split_sources(data: Any, key: str, split: str) -> List[ShardSource]:
    try:
        return shard_sources(data, split)
    except DataError as exc:
        hint = "; set data.test_split=null to train without a test split" if key == "data.test_split" else ""
        raise DataError(f"{key} '{split}': {exc}{hint}") from None


def _check_disjoint(shards: Dict[str, List[str]], splits: Dict[str, str], roots: Dict[str, str]) -> None:
    """Evaluation shards that are train (or val) shards would report metrics on data the model was fit (or
    selected) on, silently; compared by resolved path so symlinks and relative paths cannot hide it. Shards from
    another tool (one folder, no splits) end here unless data.val_root / data.test_root name the held-out ones."""
    resolved = {key: {os.path.realpath(s) for s in paths} for key, paths in shards.items()}
    keys = list(shards)
    for i, key in enumerate(keys[1:], start=1):
        for earlier in keys[:i]:
            shared = sorted(resolved[key] & resolved[earlier])
            if shared:
                raise DataError(f"{key} '{splits[key]}' reads {len(shared)} shard(s) of {earlier} "
                                f"'{splits[earlier]}' (e.g. {shared[0]}): its metrics would not be held out; "
                                f"{_own_shards_hint(key, roots)}")


def _own_shards_hint(key: str, roots: Dict[str, str]) -> str:
    """How to give the split of ``key`` its own shards, by where its shards came from."""
    role = key[len("data."):-len("_split")]  # val | test
    if roots[key] != "data.root":
        return f"{roots[key]} must name other shards than the {'train and val' if role == 'test' else 'train'} ones"
    extra = "; or set data.test_split=null" if role == "test" else ""
    return (f"give each split its own shards (a data.root pattern needs {{split}}; shards another tool wrote in "
            f"one folder: set data.{role}_root to the {role} shards, a folder or a pattern such as "
            f"'/d/{{00008..00009}}.tar'{extra})")


def check_split(data: Any, split: str, labels: List[str], key: str) -> int:
    """One split for evaluation: shards resolve and are readable, it has samples, one of them is usable. Returns
    its number of samples; errors start with ``key`` (the setting that names the split)."""
    sources = _split_sources(data, key, split)
    shards, n = all_shards(sources), total_samples(sources)
    if n == 0:
        raise DataError(f"{key} '{split}' has no samples ({len(shards)} shard(s), e.g. {shards[0]})")
    _check_usable_sample(data, labels, key, split, shards)
    return n


def _check_usable_sample(data: Any, labels: List[str], key: str, split: str, shards: List[str]) -> None:
    """Read the split's samples in order until one is usable (label, image or text, image decodes): one sample in
    the normal case, the whole split only when none is -- which the loader would otherwise skip one by one, and
    training would end in an evaluation of nothing."""
    import webdataset as wds

    from mmcat.data.samples import BadSample, LabelReader, decode_image, parse_sample

    reader = LabelReader(str(data.label_key), labels)
    first_problem, seen = None, 0
    for shard in shards:
        try:
            for raw in wds.tarfile_samples(iter([{"url": shard}])):
                seen += 1
                try:
                    sample = parse_sample(raw, reader)
                    if sample["image"] is not None:
                        decode_image(sample["image"], int(data.image_size))
                    return
                except BadSample as exc:
                    first_problem = first_problem or f"{raw.get('__key__')} in {shard}: {exc}"
        except Exception as exc:  # an unreadable tar is skipped by the loader too; keep looking
            first_problem = first_problem or f"{shard}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    raise DataError(f"{key} '{split}': all {seen} samples would be skipped (label key '{data.label_key}'; "
                    f"first: {first_problem})")


def _check_text_model(cfg: Any) -> None:
    """Tokens beyond the text model's position table fail mid-run (IndexError), and more trainable layers than the
    model has would fail once the run directory exists; both checked when the model is a local folder (the offline
    default included), whose config.json says how many positions and layers it has."""
    from mmcat.models.text import check_trainable_layers, resolve_text_model

    folder = Path(resolve_text_model(str(cfg.model.text.name)))
    if not folder.is_dir():
        return
    conf = read_json(folder / "config.json", DataError, missing_ok=True) or {}
    tok = read_json(folder / "tokenizer_config.json", DataError, missing_ok=True) or {}
    limits = [int(conf["max_position_embeddings"])] if isinstance(conf.get("max_position_embeddings"), int) else []
    if isinstance(tok.get("model_max_length"), int) and tok["model_max_length"] < 10**6:  # else "no limit" sentinel
        limits.append(tok["model_max_length"])  # e.g. RoBERTa: 514 positions, 512 tokens
    if limits and int(cfg.data.max_text_length) > min(limits):
        raise ConfigError(f"config key 'data.max_text_length': {cfg.data.max_text_length} is more than the "
                          f"{min(limits)} tokens the text model {cfg.model.text.name} takes")
    layers = conf.get("num_hidden_layers", conf.get("n_layers"))  # BERT family / DistilBERT
    if isinstance(layers, int):
        check_trainable_layers(int(cfg.model.text.get("trainable_layers", -1)), layers)
