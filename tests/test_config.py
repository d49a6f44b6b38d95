"""Config tree: YAML + dotted overrides, one-line errors naming the key, exit code 2 from the CLI."""
import subprocess
import sys
from pathlib import Path

import pytest

from mmcat.config import ConfigError, PackConfig, SynthConfig, TrainRunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_and_overrides_merge():
    cfg = load_config(TrainRunConfig, ROOT / "configs/tiny_cpu.yaml",
                      ["data.root=/d", "output_dir=/o", "train.lr=1e-4", "model.fusion=late"])
    assert cfg.data.root == "/d" and cfg.train.lr == pytest.approx(1e-4) and cfg.model.fusion == "late"
    assert cfg.model.image.name == "resnet18"  # from the YAML


@pytest.mark.parametrize("overrides, key", [
    (["train.lrr=1"], "train.lrr"),
    (["train.lr=abc"], "train.lr"),
    (["model.fusion=sum"], "model.fusion"),
    (["train.precision=fp8"], "train.precision"),
    (["model.image.name=vit"], "model.image.name"),
])
def test_bad_keys_and_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(TrainRunConfig, None, ["data.root=/d", "output_dir=/o", *overrides])
    assert f"'{key}'" in str(err.value) and "\n" not in str(err.value)


def test_precision_no_is_the_word_not_a_yaml_boolean(tmp_path):
    """YAML 1.1 reads `no` as False; `train.precision=no` (the documented value) must still mean no mixed precision,
    from the command line and from a file, after a file that said bf16."""
    assert load_config(TrainRunConfig, ROOT / "configs/resnet50_bert_base.yaml",
                       ["data.root=/d", "output_dir=/o", "train.precision=no"]).train.precision.value == "no"
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  precision: no\n  batch_size: 4\n")
    assert load_config(TrainRunConfig, f, ["data.root=/d", "output_dir=/o"]).train.precision.value == "no"
    with pytest.raises(ConfigError) as err:  # `yes` is no precision: still refused in one line naming the key
        load_config(TrainRunConfig, None, ["data.root=/d", "output_dir=/o", "train.precision=yes"])
    assert "'train.precision'" in str(err.value)


def test_missing_required_key():
    with pytest.raises(ConfigError, match="'output_dir' is required"):
        load_config(TrainRunConfig, None, ["data.root=/d"])


def test_missing_file_and_bad_override_form(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainRunConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(PackConfig, None, ["input=a", "out=b", "seed"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(TrainRunConfig, bad)


def test_cli_config_error_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mmcat", "train", "--config", str(ROOT / "configs/tiny_cpu.yaml"),
                           f"output_dir={tmp_path}", "data.root=/d", "train.epochz=3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mmcat train: error: config key 'train.epochz'"), proc.stderr


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", "config key 'train.batch_size': must be >= 1, got 0"),
    ("train.grad_accum=0", "config key 'train.grad_accum': must be >= 1, got 0"),
    ("train.log_every=0", "config key 'train.log_every': must be >= 1, got 0"),
    ("train.epochs=0", "config key 'train.epochs': must be >= 1, got 0"),
    ("train.max_steps=-1", "config key 'train.max_steps': must be >= 0, got -1"),
    ("train.warmup_steps=-5", "config key 'train.warmup_steps': must be >= 0, got -5"),
    ("train.lr=-0.001", "config key 'train.lr': must be >= 0, got -0.001"),
    ("train.lr_image=nan", "config key 'train.lr_image': must be >= 0, got nan"),
    ("train.label_smoothing=1.0", "config key 'train.label_smoothing': must be in [0, 1), got 1.0"),
    ("train.keep_checkpoints=-1", "config key 'train.keep_checkpoints': must be >= 0, got -1"),
    ("model.dropout=1.0", "config key 'model.dropout': must be in [0, 1), got 1.0"),
    ("model.dropout=-0.1", "config key 'model.dropout': must be in [0, 1), got -0.1"),
    ("model.modality_dropout=1.5", "config key 'model.modality_dropout': must be in [0, 1], got 1.5"),
    ("model.hidden_dim=0", "config key 'model.hidden_dim': must be >= 1, got 0"),
    ("data.image_size=0", "config key 'data.image_size': must be >= 1, got 0"),
    ("data.max_text_length=1", "config key 'data.max_text_length': must be >= 3, got 1"),
    ("data.min_crop_scale=0", "config key 'data.min_crop_scale': must be in (0, 1], got 0.0"),
    ("data.min_crop_scale=1.2", "config key 'data.min_crop_scale': must be in (0, 1], got 1.2"),
    ("data.num_workers=-1", "config key 'data.num_workers': must be >= 0, got -1"),
    ("data.shuffle_buffer=-1", "config key 'data.shuffle_buffer': must be >= 0, got -1"),
    ("data.prefetch_factor=0", "config key 'data.prefetch_factor': must be >= 1, got 0"),
    ("data.samples_per_epoch=0", "config key 'data.samples_per_epoch': must be >= 1, got 0"),
    ("seed=-1", "config key 'seed': must be in [0, 4294967295], got -1"),
    ("data.label_key=txt", "config key 'data.label_key': must be 'cls' or 'json:<field>', got 'txt'"),
    ("data.label_key=jsn:x", "config key 'data.label_key': must be 'cls' or 'json:<field>', got 'jsn:x'"),
])
def test_values_out_of_range_are_refused_with_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(TrainRunConfig, None, ["data.root=/d", "output_dir=/o", override])
    assert str(err.value) == message


def test_range_edges_that_are_valid_pass():
    """The lowest valid value of each bounded key loads (0 = off / none for the step counters)."""
    cfg = load_config(TrainRunConfig, None, [
        "data.root=/d", "output_dir=/o", "train.lr=0", "train.max_steps=0", "train.keep_checkpoints=0",
        "model.dropout=0", "model.modality_dropout=1.0", "data.min_crop_scale=1.0", "data.num_workers=0",
        "data.max_text_length=3", "train.label_smoothing=0.99", "data.test_split=null", "data.label_key=json:cat"])
    assert cfg.data.test_split is None and cfg.model.modality_dropout == 1.0 and cfg.data.label_key == "json:cat"


def test_every_range_key_exists_in_a_schema():
    """A typo in the table would silently check nothing."""
    from omegaconf import OmegaConf

    from mmcat.config import RANGES

    schemas = [OmegaConf.structured(s) for s in (TrainRunConfig, PackConfig, SynthConfig)]
    for key in RANGES:
        assert any(OmegaConf.select(s, key, default="<absent>") != "<absent>" for s in schemas), key


def test_loaded_config_is_read_only_and_derived_copies_leave_it_alone():
    """Nothing downstream may write into the run's config; a changed copy is derived with OmegaConf.merge."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ReadonlyConfigError

    cfg = load_config(TrainRunConfig, None, ["data.root=/d", "output_dir=/o"])
    with pytest.raises(ReadonlyConfigError):
        cfg.data.root = "/elsewhere"
    with pytest.raises(ReadonlyConfigError):
        cfg.model.image.channels_last = False
    derived = OmegaConf.merge(cfg.model, {"image": {"channels_last": False}})
    assert derived.image.channels_last is False and derived.image.name == cfg.model.image.name
    assert cfg.model.image.channels_last is True and cfg.data.root == "/d"


def test_a_shipped_config_is_found_by_name(tmp_path, monkeypatch):
    """`--config tiny_cpu` works from any folder: the name finds the shipped file (a file path still wins)."""
    monkeypatch.chdir(tmp_path)
    by_path = load_config(TrainRunConfig, ROOT / "configs/tiny_cpu.yaml", ["data.root=/d", "output_dir=/o"])
    for name in ("tiny_cpu", "tiny_cpu.yaml", "configs/tiny_cpu"):
        assert load_config(TrainRunConfig, name, ["data.root=/d", "output_dir=/o"]) == by_path, name
    (tmp_path / "tiny_cpu").write_text("train:\n  epochs: 3\n")  # a file of that name in the working folder wins
    assert load_config(TrainRunConfig, "tiny_cpu", ["data.root=/d", "output_dir=/o"]).train.epochs == 3
    with pytest.raises(ConfigError, match="config file not found: tiny_gpu .*mmcat configs list"):
        load_config(TrainRunConfig, "tiny_gpu")


def test_pack_flags_are_values_not_yaml():
    """`mmcat pack` flags are taken as typed values: a path with '=', ': ' or the word null stays a string, and
    --splits replaces the default splits rather than merging into them."""
    from mmcat.cli import build_parser
    from mmcat.pack import config_from_args

    args = build_parser().parse_args(["pack", "a=b: c.csv", "--out", "null", "--splits", "train=1",
                                      "--image-size", "32"])
    cfg = config_from_args(args)
    assert (cfg.input, cfg.out, cfg.image_size, dict(cfg.splits)) == ("a=b: c.csv", "null", 32, {"train": 1.0})


def _schema_keys(schema, prefix=""):
    """Dotted leaf keys of a dataclass schema (nested dataclasses are sections)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _schema_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def _readme_config_keys():
    """The keys named in the first column of README's config table (`a.b` / `.c` = `a.c`)."""
    import re

    text = (ROOT / "README.md").read_text()
    section = text.split("\n### Configuration\n", 1)[1].split("\n### ", 1)[0]
    keys = []
    for row in (ln for ln in section.splitlines() if ln.startswith("| `")):
        last = ""
        for name in re.findall(r"`([^`]+)`", row.split("|")[1]):
            last = last.rsplit(".", 1)[0] + name if name.startswith(".") else name
            keys.append(last)
    return keys


def test_readme_config_table_names_every_schema_key_and_nothing_else():
    readme, schema = _readme_config_keys(), list(_schema_keys(TrainRunConfig))
    assert sorted(set(schema) - set(readme)) == [], "schema keys missing from README's config table"
    assert sorted(set(readme) - set(schema)) == [], "README's config table names keys the schema does not have"
    assert len(readme) == len(set(readme)), "a key is listed twice"


@pytest.mark.parametrize("schema, override, message", [
    (TrainRunConfig, "model.fusion=sum",
     "config key 'model.fusion': 'sum' is not one of concat, late, gated, attention"),
    (TrainRunConfig, "train.precision=fp8", "config key 'train.precision': 'fp8' is not one of no, bf16, fp16, auto"),
    (TrainRunConfig, "model.text.pooling=max", "config key 'model.text.pooling': 'max' is not one of mean, cls"),
    (PackConfig, "resize_mode=fit", "config key 'resize_mode': 'fit' is not one of shorter, center_crop, keep, border"),
    (PackConfig, "format=xls", "config key 'format': 'xls' is not one of auto, csv, jsonl, parquet, "
     "rakuten, rakuten-ens, abo, fashion"),
    (SynthConfig, "format=auto", "config key 'format': 'auto' is not one of csv, jsonl, parquet"),
])
def test_closed_sets_refuse_other_values_in_one_line(schema, override, message):
    required = {TrainRunConfig: ["data.root=/d", "output_dir=/o"], PackConfig: ["input=a", "out=b"],
                SynthConfig: ["out=b"]}[schema]
    with pytest.raises(ConfigError) as err:
        load_config(schema, None, [*required, override])
    assert str(err.value) == message


def test_closed_set_values_read_print_and_save_as_plain_strings(tmp_path):
    """Code compares them with strings, fingerprints and logs print them, best/config.yaml must load again."""
    from mmcat.config import to_container, to_yaml

    cfg = load_config(TrainRunConfig, None, ["data.root=/d", "output_dir=/o", "model.fusion=late",
                                             "train.precision=bf16", "model.text.pooling=cls"])
    assert cfg.model.fusion == "late" and cfg.model.fusion != "gated" and {"late": 1}[cfg.model.fusion] == 1
    assert (str(cfg.model.fusion), f"{cfg.train.precision}", "%s" % cfg.model.text.pooling) == ("late", "bf16", "cls")
    assert to_container(cfg)["model"]["fusion"] == "late" and type(to_container(cfg)["model"]["fusion"]) is str
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg))
    assert "fusion: late" in saved.read_text() and "precision: bf16" in saved.read_text()
    again = load_config(TrainRunConfig, saved)
    assert (again.model.fusion, again.train.precision, again.model.text.pooling) == ("late", "bf16", "cls")
