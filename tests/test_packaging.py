"""mmcat as an installed package, not only a checkout: every import declared, the shipped configs and launcher files
found by name and copied out usable, a wheel that trains from any folder, and `make test` selections that install
nothing they do not need."""
from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from train_helpers import ROOT, child_env, metrics

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(*extras: str) -> set:
    reqs = PYPROJECT["project"]["dependencies"] + [r for e in extras for r in PYPROJECT["project"]["optional-dependencies"][e]]
    return {_canonical(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in reqs}


EXTRA_MODULES = {"mmcat/serve.py": ("serve",),  # imported only by users of the extra (`mmcat serve`)
                 "mmcat/data/hf.py": ("hf",)}  # mmcat.data.hf.hf_features, for Hugging Face datasets users


def _third_party_imports(folder: Path) -> dict:
    """Top-level names imported by the .py files under ``folder`` (or the file ``folder``) that are neither stdlib
    nor local modules; a folder's EXTRA_MODULES are checked on their own."""
    paths = [folder] if folder.is_file() else \
        [p for p in folder.rglob("*.py") if p.relative_to(ROOT).as_posix() not in EXTRA_MODULES]
    local = {"mmcat"} | {p.stem for p in paths}
    found: dict = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in (n.split(".")[0] for n in names):
                if name not in sys.stdlib_module_names and name not in local:
                    found.setdefault(name, path.relative_to(ROOT))
    return found


@pytest.mark.parametrize("folder, extras", [("mmcat", ()), ("tests", ("dev",)), ("benchmarks", ("dev",)),
                                            *EXTRA_MODULES.items()])
def test_every_direct_import_is_declared(folder, extras):
    """An import that only works because another package pulled its distribution in breaks on the next upgrade."""
    from importlib.metadata import packages_distributions

    providers = packages_distributions()  # import name -> installed distributions (PIL -> pillow, cv2 -> opencv-…)
    declared = _declared(*extras)
    undeclared = {name: str(where) for name, where in _third_party_imports(ROOT / folder).items()
                  if not {_canonical(d) for d in providers.get(name, [name])} & declared}
    assert undeclared == {}, f"imported in {folder}/ but not declared in pyproject.toml"


def test_make_test_with_a_selection_installs_no_slurm_packages():
    """Selecting tests must not apt-get SLURM (needs root): the SLURM tests' fixture installs it when they run."""
    proc = subprocess.run(["make", "-n", "test", "PYTEST_ARGS=-m 'not slurm'"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    pytest_line = next(line for line in proc.stdout.splitlines() if "-m pytest" in line)
    assert pytest_line.endswith("-m 'not slurm'") and "local_slurm" not in proc.stdout, proc.stdout


# ---------------------------------------------------------------------------------------------- shipped files
def _mmcat(*args: str, cwd: Path, exe=(sys.executable, "-m", "mmcat"), env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*exe, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=env or dict(child_env(), PYTHONPATH=str(ROOT)))


def test_configs_list_names_every_shipped_file(tmp_path):
    proc = _mmcat("configs", "list", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[0] for line in proc.stdout.splitlines()}
    on_disk = {f"{p.relative_to(ROOT).with_suffix('').as_posix()}" for kind in ("configs", "launch")
               for p in (ROOT / kind).rglob("*") if p.suffix in (".yaml", ".json")}
    assert listed == on_disk and "configs/tiny_cpu" in listed and "launch/deepspeed/zero2" in listed
    assert "launch/deepspeed_zero3  When: DeepSpeed ZeRO-3" in re.sub(r" {2,}", "  ", proc.stdout)


def test_copied_deepspeed_launch_file_works_from_any_folder(tmp_path):
    """A copied launch YAML brings its DeepSpeed JSON and points at it by absolute path (accelerate reads the path
    from the working folder); an existing copy is not overwritten without --force."""
    from accelerate.commands.config.config_args import ClusterConfig

    proc = _mmcat("configs", "copy", "launch/deepspeed_zero2", "mine", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    copied = tmp_path / "mine" / "deepspeed_zero2.yaml"
    assert proc.stdout.split() == [str(Path("mine/deepspeed_zero2.yaml")), str(Path("mine/deepspeed/zero2.json"))]
    ds_file = Path(ClusterConfig.from_yaml_file(str(copied)).deepspeed_config["deepspeed_config_file"])
    assert ds_file == tmp_path / "mine" / "deepspeed" / "zero2.json"
    assert ds_file.read_text() == (ROOT / "launch/deepspeed/zero2.json").read_text()
    shipped = (ROOT / "launch/deepspeed_zero2.yaml").read_text()
    assert copied.read_text() == shipped.replace("launch/deepspeed/zero2.json", str(ds_file))

    again = _mmcat("configs", "copy", "launch/deepspeed_zero2", "mine", cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.strip() == (
        "mmcat configs: error: mine/deepspeed_zero2.yaml exists (pass --force to overwrite)")
    copied.write_text("edited")
    assert _mmcat("configs", "copy", "launch/deepspeed_zero2", "mine", "--force", cwd=tmp_path).returncode == 0
    assert copied.read_text() != "edited"


def test_copied_training_config_loads_like_the_shipped_one(tmp_path):
    from mmcat.config import TrainRunConfig, load_config
    from mmcat.shipped import copy_shipped

    assert copy_shipped("tiny_cpu", tmp_path / "my.yaml") == [tmp_path / "my.yaml"]
    overrides = ["data.root=/d", "output_dir=/o"]
    assert load_config(TrainRunConfig, tmp_path / "my.yaml", overrides) == load_config(TrainRunConfig, "tiny_cpu",
                                                                                       overrides)
    assert _mmcat("configs", "copy", "nope", ".", cwd=tmp_path).stderr.strip() == (
        "mmcat configs: error: no shipped config named 'nope' (see `mmcat configs list`)")


def test_shipped_launch_yaml_finds_its_deepspeed_json_outside_the_checkout(tmp_path, monkeypatch):
    """`accelerate launch --config_file $(mmcat configs path launch/deepspeed_zero3)` from another folder: the
    YAML's relative `launch/deepspeed/zero3.json` is not there, the shipped one is used."""
    from mmcat.config import TrainRunConfig, load_config
    from mmcat.train.accel import _deepspeed_plugin

    monkeypatch.chdir(tmp_path)
    ds_path = yaml.safe_load((ROOT / "launch/deepspeed_zero3.yaml").read_text())["deepspeed_config"]
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", ds_path["deepspeed_config_file"])
    plugin = _deepspeed_plugin(load_config(TrainRunConfig, None, ["data.root=/d", "output_dir=/o"]))
    assert plugin.hf_ds_config.config["zero_optimization"]["stage"] == 3


# ------------------------------------------------------------------------------------------------------ wheel
def _build_wheel(tmp_path: Path) -> Path:
    """A wheel built from a copy of the sources (an in-tree build would leave build/ and egg-info behind)."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("mmcat", "configs", "launch"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    return next((tmp_path / "dist").glob("mmcat-*.whl"))


def _fresh_venv(path: Path) -> Path:
    """A venv with no mmcat whose dependencies are this interpreter's site-packages (appended through a .pth, whose
    own .pth files -- an editable mmcat's finder among them -- are not executed): no GBs of torch reinstalled."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(site) / "_mmcat_test_dependencies.pth").write_text("\n".join(ours) + "\n")
    return python


@pytest.mark.slow
def test_wheel_installed_in_a_fresh_venv_trains_a_shipped_config_by_name(tmp_path, tiny_packed_dataset, tiny_text):
    wheel = _build_wheel(tmp_path)
    members = set(zipfile.ZipFile(wheel).namelist())
    sources = {f"mmcat/{p.relative_to(ROOT / 'mmcat').as_posix()}" for p in (ROOT / "mmcat").rglob("*.py")}
    shipped = {f"mmcat/{p.relative_to(ROOT).as_posix()}" for kind in ("configs", "launch")
               for p in (ROOT / kind).rglob("*") if p.suffix in (".yaml", ".json")}
    assert sorted((sources | shipped) - members) == [], "files missing from the wheel (pyproject.toml packages?)"

    python = _fresh_venv(tmp_path / "fresh")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in child_env().items() if k != "PYTHONPATH"}
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(python), "-c", "import mmcat; print(mmcat.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(tmp_path / "fresh"), where  # the wheel, not the checkout

    exe = (str(tmp_path / "fresh" / "bin" / "mmcat"),)
    listed = _mmcat("configs", "list", cwd=work, exe=exe, env=env)
    assert listed.returncode == 0 and "configs/tiny_cpu" in listed.stdout, listed.stderr
    copied = _mmcat("configs", "copy", "launch/deepspeed_zero2", ".", cwd=work, exe=exe, env=env)
    assert copied.returncode == 0, copied.stderr
    assert (work / "deepspeed" / "zero2.json").read_text() == (ROOT / "launch/deepspeed/zero2.json").read_text()

    run_dir = work / "run"
    proc = _mmcat("train", "--config", "tiny_cpu", f"data.root={tiny_packed_dataset}", f"output_dir={run_dir}",
                  f"model.text.name={tiny_text}", "model.text.pretrained=false", "model.hidden_dim=32",
                  "data.image_size=32", "data.max_text_length=32", "data.num_workers=0", "train.epochs=1",
                  "train.batch_size=16", "train.warmup_steps=0", cwd=work, exe=exe, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    used = yaml.safe_load((run_dir / "config.yaml").read_text())
    # values only tiny_cpu.yaml sets: the shipped file was applied
    assert (used["data"]["min_crop_scale"], used["model"]["modality_dropout"], used["train"]["lr_text"]) == (
        1.0, 0.3, 5e-5)
    assert metrics(run_dir)["global_step"] > 0 and (run_dir / "best" / "model.safetensors").is_file()
    assert json.loads((run_dir / "best" / "labels.json").read_text()) == json.loads(
        (tiny_packed_dataset / "labels.json").read_text())
