"""Building a training run: everything ``mmcat train`` prepares before its first step, in one ``TrainingSetup``.

Order matters and is kept: data checks before any work; the seed is set before the model is built (the same initial
weights on every rank); the resume decision and the fingerprint check come before the run directory is written; the
loader of epoch 0 is built once as a probe, for the epoch length that the step schedule needs. Running the setup
(steps, evaluation, checkpoints, logging) is ``mmcat.train.loop``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from omegaconf import OmegaConf

from mmcat.config import to_yaml
from mmcat.data import LoaderInfo, PersistentTrainLoader, label_counts, read_labels, train_shard_sizes
from mmcat.data.shards import check_data
from mmcat.files import write_atomic
from mmcat.modalities import training_modalities
from mmcat.models import build_model
from mmcat.models.text import load_tokenizer
from mmcat.train.accel import build_accelerator, describe, engine_name, resolve_precision, whole_model_init
from mmcat.train.checkpoint import check_fingerprint, decide_resume, read_fingerprint, run_fingerprint
from mmcat.train.speed import apply_backend_flags, compile_model
from mmcat.train.optim import build_loss, build_optimizer, build_scheduler, total_optimizer_steps

log = logging.getLogger("mmcat.train")

# build_train_loader's signature: (cfg, tokenizer, rank, world_size, epoch, skip_batches=0) -> LoaderInfo; an
# optional close() (PersistentTrainLoader) stops its workers at the end of the run
LoaderBuilder = Callable[..., LoaderInfo]


@dataclass
class TrainingSetup:
    """The prepared objects of one run (model, optimizer and scheduler already wrapped by ``accelerator.prepare``)."""

    cfg: Any
    accelerator: Accelerator
    out: Path  # RUN_DIR
    resume_from: Optional[Path]  # the checkpoint to resume from, None for a fresh start
    labels: List[str]
    fingerprint: Dict[str, Any]  # what a resumed run must keep equal (stored in every checkpoint)
    tokenizer: Any
    build_loader: LoaderBuilder  # the train loader of an epoch (the same loader every epoch: PersistentTrainLoader)
    batches_per_epoch: int  # per rank
    total_steps: int  # optimizer steps of the whole run
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    loss_fn: torch.nn.Module
    modalities: List[Any] = field(default_factory=list)  # the non-built-in ones (mmcat.modalities), e.g. attributes

    @property
    def modality_names(self) -> List[str]:
        return [str(n) for n in self.cfg.model.modalities]  # resolved: image, text, then the others


def _setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def _model_config(cfg: Any, acc: Any) -> Any:
    """The model section to build from: ``cfg.model``, except that DeepSpeed flattens parameters into contiguous
    buffers and rejects channels-last conv weights. The run's config stays as loaded (read-only)."""
    if acc.state.deepspeed_plugin is None or not cfg.model.image.channels_last:
        return cfg.model
    log.info("DeepSpeed: ResNet weights kept contiguous (model.image.channels_last ignored)")
    return OmegaConf.merge(cfg.model, {"image": {"channels_last": False}})


def build_training(cfg: Any, build_loader: Optional[LoaderBuilder] = None) -> TrainingSetup:
    """Check the data, start the accelerator, decide on resume, write RUN_DIR/config.yaml, measure the epoch (epoch
    0's loader), build the model, optimizer, scheduler and loss. ``build_loader`` makes an epoch's train loader
    (default: a ``PersistentTrainLoader``, whose workers live for the whole run; a benchmark passes one that
    replays batches held in memory)."""
    check_data(cfg)  # bad data settings: one line before any work (splits, shards, labels)
    cfg, modalities = _with_modalities(cfg)
    cfg, precision_note = _with_precision(cfg)
    acc = build_accelerator(cfg)
    _setup_logging(acc.is_main_process)
    set_seed(cfg.seed, device_specific=False)  # same init on every rank; DDP/DeepSpeed also broadcast it
    out = Path(cfg.output_dir)
    resume_from, labels, fingerprint = _resume_decision(cfg, acc, out)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "config.yaml", to_yaml(cfg))
    log.info("mmcat train: %s; modalities: %s", describe(acc, precision_note), ", ".join(cfg.model.modalities))

    tokenizer = load_tokenizer(cfg.model.text)
    build_loader = build_loader or PersistentTrainLoader()
    probe = build_loader(cfg, tokenizer, acc.process_index, acc.num_processes, epoch=0)
    total_steps = total_optimizer_steps(cfg, probe.batches_per_epoch)
    log.info("train: %d shards, %d samples/epoch, %d batches/epoch/rank, %d optimizer steps",
             probe.num_shards, probe.samples_per_epoch, probe.batches_per_epoch, total_steps)
    model, optimizer, scheduler = _build_model(cfg, acc, len(labels), total_steps, modalities)
    loss_fn = build_loss(cfg, label_counts(cfg.data, cfg.data.train_split)).to(acc.device)
    return TrainingSetup(cfg, acc, out, resume_from, labels, fingerprint, tokenizer, build_loader,
                         probe.batches_per_epoch, total_steps, model, optimizer, scheduler, loss_fn, modalities)


def _with_modalities(cfg: Any) -> Tuple[Any, List[Any]]:
    """The config with ``model.modalities`` resolved (null -> what the data has; written to config.yaml and
    best/config.yaml, so a resumed run and the artifact build the same model) and the non-built-in modalities."""
    names, modalities = training_modalities(cfg)
    cfg = OmegaConf.merge(cfg, {"model": {"modalities": names}})
    OmegaConf.set_readonly(cfg, True)
    return cfg, modalities


def _with_precision(cfg: Any) -> Tuple[Any, str]:
    """The config with ``train.precision: auto`` resolved (bf16 where the device has it in hardware, else no) and
    why. The resolved value is what config.yaml and the checkpoint fingerprint hold: resuming on a machine that
    resolves ``auto`` otherwise is refused, not silently continued in another precision."""
    precision, why = resolve_precision(str(cfg.train.precision))
    if not why:
        return cfg, ""
    cfg = OmegaConf.merge(cfg, {"train": {"precision": precision}})
    OmegaConf.set_readonly(cfg, True)
    return cfg, why


def _resume_decision(cfg: Any, acc: Accelerator, out: Path) -> Tuple[Optional[Path], List[str], Dict[str, Any]]:
    """(checkpoint to resume from or None, labels, fingerprint); a checkpoint written under other settings is
    refused here, before any work: a changed setting would silently change the run."""
    resume_from = decide_resume(acc, cfg.train.resume, out / "checkpoints")
    labels = read_labels(cfg.data)
    fingerprint = run_fingerprint(cfg, acc.num_processes, engine_name(acc), labels, train_shard_sizes(cfg.data))
    if resume_from is not None:
        check_fingerprint(read_fingerprint(resume_from), fingerprint, resume_from)
    return resume_from, labels, fingerprint


def _build_model(cfg: Any, acc: Accelerator, num_labels: int, total_steps: int,
                 modalities: List[Any]) -> Tuple[Any, Any, Any]:
    """Model, optimizer and scheduler, wrapped by ``accelerator.prepare`` (DDP or a DeepSpeed engine)."""
    with whole_model_init(acc):
        model = build_model(_model_config(cfg, acc), num_labels=num_labels, modalities=modalities)
    if cfg.train.grad_checkpointing:
        model.enable_grad_checkpointing()
    if cfg.train.compile:
        compile_model(model)
    use_ds = acc.state.deepspeed_plugin is not None
    flags = apply_backend_flags(acc.device, cfg)
    optimizer = build_optimizer(model, cfg, acc.device.type, use_ds)
    log.info("speed: tf32=%s cudnn_benchmark=%s fused_adamw=%s", flags["tf32"], flags["cudnn_benchmark"],
             bool(optimizer.defaults.get("fused")))
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    return acc.prepare(model, optimizer, scheduler)
