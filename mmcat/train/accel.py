"""One Accelerator for every launcher: plain python, torchrun, ``accelerate launch`` (DDP or DeepSpeed), SLURM.

What this module makes automatic (each was a silent failure before):
- no CUDA -> the gloo process-group backend (NCCL needs GPUs);
- no CUDA + several processes + plain DDP -> ``cpu=True``: without it accelerate silently runs every rank as an
  independent single process (no gradient sync, no reductions);
- no CUDA + DeepSpeed -> never ``cpu=True``: it silently drops DeepSpeed;
- under DeepSpeed, gradient accumulation, clipping and the micro-batch size come from the trainer config only:
  the DeepSpeed JSON must say ``"auto"`` for them (or the same number), else we stop before any work — DeepSpeed
  would otherwise silently override accelerate;
- combinations that cannot work (fp16 without CUDA) fail before any work with a config error.
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, ProjectConfiguration

from mmcat.errors import ConfigError
from mmcat.train.trackers import active_trackers

log = logging.getLogger(__name__)

# DeepSpeed keys the trainer config owns: JSON value must be "auto" or equal to ours.
_OWNED_KEYS = {
    "gradient_accumulation_steps": lambda c: c.train.grad_accum,
    "gradient_clipping": lambda c: float(c.train.clip_grad_norm),
    "train_micro_batch_size_per_gpu": lambda c: c.train.batch_size,
}


def deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def launched_distributed() -> bool:
    """torchrun / accelerate launch / DeepSpeed set LOCAL_RANK; a plain ``python`` run is a single process
    (passing a backend there makes accelerate expect a process group that nobody starts)."""
    return "LOCAL_RANK" in os.environ or deepspeed_requested()


def process_group_kwargs() -> List[Any]:
    """gloo when there is no CUDA (NCCL needs GPUs); accelerate's own default otherwise."""
    if not torch.cuda.is_available() and launched_distributed():
        return [InitProcessGroupKwargs(backend="gloo")]
    return []


def native_bf16() -> Tuple[bool, str]:
    """Whether the device that trains computes bf16 in hardware, and what says so. A CUDA GPU from Ampere on does;
    so does a CPU with AMX (Intel Sapphire Rapids on) or AVX512-BF16 (Cooper Lake, AMD Zen 4), where bf16 autocast
    makes a step of the demo model ~1.4x faster. Elsewhere bf16 is emulated, slower than fp32."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(including_emulation=False), "the GPU's bf16 support"
    for probe, name in (("_is_amx_tile_supported", "AMX"), ("_is_avx512_bf16_supported", "AVX512-BF16")):
        if getattr(torch.cpu, probe, lambda: False)():  # private probes: absent in some builds, then "no"
            return True, f"this CPU has {name}"
    return False, "this CPU has no bf16 instructions"


def resolve_precision(precision: str) -> Tuple[str, str]:
    """``train.precision`` as trained, and why when it was ``auto``: bf16 where it is native, full precision
    elsewhere (fp16 is never chosen: its loss scaling is a choice to make knowingly, on pre-Ampere GPUs)."""
    if precision != "auto":
        return precision, ""
    native, why = native_bf16()
    return ("bf16" if native else "no"), f"auto: {why}"


def check_precision(precision: str, use_deepspeed: bool) -> None:
    if precision == "fp16" and not torch.cuda.is_available():
        where = "DeepSpeed" if use_deepspeed else "mixed precision"
        raise ConfigError(f"config key 'train.precision': fp16 {where} needs a CUDA GPU; use bf16 or no on CPU")
    if precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError("config key 'train.precision': this GPU has no bf16 support; use fp16 (with loss scaling)")


def _deepspeed_plugin(cfg: Any) -> DeepSpeedPlugin:
    """Build the plugin from the JSON that ``accelerate launch`` points at, with the trainer's owned values filled in."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and path != "none":
        from mmcat.shipped import resolve_launch_path

        # a shipped launch YAML names launch/deepspeed/*.json relative to the checkout: found from any folder
        ds_config: Dict[str, Any] = json.loads(resolve_launch_path(path).read_text())
    else:  # `--use_deepspeed --zero_stage N` without a JSON: accelerate's env-var plugin settings
        ds_config = {"zero_optimization": {"stage": int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))}}
    for key, ours in _OWNED_KEYS.items():
        value = ds_config.get(key, "auto")
        if value != "auto" and value != ours(cfg):
            raise ConfigError(
                f"DeepSpeed config {path}: '{key}' is {value} but the trainer config says {ours(cfg)}; "
                f"set it to \"auto\" so mmcat's config is the single source"
            )
        ds_config[key] = ours(cfg)
    ds_config.pop("train_batch_size", None)  # derived by accelerate from the three values above
    for mode in ("bf16", "fp16"):  # precision too is the trainer's: "auto" (or agreeing) in the JSON
        want = cfg.train.precision == mode
        section = ds_config.get(mode)
        if section is None:
            if want:
                ds_config[mode] = {"enabled": True}
            continue
        enabled = section.get("enabled", "auto")
        if enabled != "auto" and bool(enabled) != want:
            raise ConfigError(
                f"DeepSpeed config {path}: '{mode}.enabled' is {enabled} but train.precision is "
                f"{cfg.train.precision}; set it to \"auto\" so mmcat's config is the single source"
            )
        if want or mode == "bf16":
            section["enabled"] = want
        else:  # an fp16 section without fp16 training: drop it (its loss-scale keys would still be read)
            del ds_config[mode]
    if cfg.train.precision == "bf16":
        # DeepSpeed casts parameters to bf16 but keeps buffers as loaded (fp32): BatchNorm would then mix dtypes
        ds_config.setdefault("data_types", {}).setdefault("buffer_dtype", "bf16")
    _gather_weights_for_export(ds_config, path)
    return DeepSpeedPlugin(hf_ds_config=ds_config)


_GATHER_KEY = "stage3_gather_16bit_weights_on_model_save"


def _gather_weights_for_export(ds_config: Dict[str, Any], path: Any) -> None:
    """ZeRO-3: ``best/`` is written from the full weights that accelerate's ``get_state_dict`` gathers onto rank 0,
    which DeepSpeed only allows with ``stage3_gather_16bit_weights_on_model_save`` -- false by default, so a run
    chosen with launcher flags only (``--use_deepspeed --zero_stage 3``, no JSON) used to fail at its first export,
    after a whole epoch. The key only decides whether weights may be gathered when saving (mmcat's checkpoints use
    DeepSpeed's own sharded ``save_state``; the artifact is fp32 either way), so mmcat always sets it, and says so
    when the JSON or the launcher had said false."""
    zero = ds_config.setdefault("zero_optimization", {})
    if str(zero.get("stage")) != "3":
        return
    launcher = os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "").lower()
    if zero.get(_GATHER_KEY) is False or launcher == "false":
        where = f"DeepSpeed config {path}" if zero.get(_GATHER_KEY) is False else "the launcher"
        log.warning("%s says %s=false: set to true, best/ is exported from the gathered weights", where, _GATHER_KEY)
    zero[_GATHER_KEY] = True


def build_accelerator(cfg: Any) -> Accelerator:
    use_ds = deepspeed_requested()
    check_precision(cfg.train.precision, use_ds)
    out = Path(cfg.output_dir)
    kwargs_handlers = process_group_kwargs()
    extra: Dict[str, Any] = {}
    if use_ds:
        extra["deepspeed_plugin"] = _deepspeed_plugin(cfg)
    precision = str(cfg.train.precision)
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launcher_precision not in (None, "no", precision):  # 'no' is accelerate launch's default
        log.warning("the launcher asks for mixed precision %r, the mmcat config for %r: using train.precision=%r",
                    launcher_precision, precision, precision)
    accelerator = Accelerator(
        cpu=multi_cpu_ddp(),
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=active_trackers(cfg.train.report_to) or None,  # checked before the run dir is written
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard")),
        kwargs_handlers=kwargs_handlers,
        step_scheduler_with_optimizer=False,  # we step it once per optimizer step ourselves
        **extra,
    )
    check_distributed(accelerator)
    if accelerator.gradient_accumulation_steps != cfg.train.grad_accum:  # pragma: no cover - guarded above
        raise ConfigError("gradient accumulation disagrees between accelerate and the trainer config")
    return accelerator


def multi_cpu_ddp() -> bool:
    return not torch.cuda.is_available() and launched_distributed() and not deepspeed_requested()


def check_distributed(accelerator: Accelerator) -> None:
    """Refuse to train N copies of one model side by side: a launched world must really be distributed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and (accelerator.num_processes != world or accelerator.distributed_type.value == "NO"):
        raise RuntimeError(f"launched with WORLD_SIZE={world} but accelerate set up "
                           f"{accelerator.distributed_type.value} with {accelerator.num_processes} process(es)")


def engine_name(accelerator: Accelerator) -> str:
    """What writes the checkpoint's model/optimizer state (its layout differs per engine)."""
    ds = accelerator.state.deepspeed_plugin
    return f"DeepSpeed ZeRO-{ds.zero_stage}" if ds is not None else accelerator.distributed_type.value


def describe(accelerator: Accelerator, precision_note: str = "") -> str:
    engine = engine_name(accelerator)
    note = f" ({precision_note})" if precision_note else ""
    return (
        f"device={accelerator.device} precision={accelerator.mixed_precision}{note} "
        f"world_size={accelerator.num_processes} "
        f"engine={engine} backend={getattr(accelerator.state, 'backend', None)}"
    )


def unwrap(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The MultimodalClassifier inside DDP or a DeepSpeed engine.

    accelerate's ``unwrap_model`` imports deepspeed whenever it is installed, only to test for its engine: 3-5 s
    of start-up in every process that does not use it (most runs, and most of the test suite). So it is asked only
    under DeepSpeed; otherwise the one possible wrapper is DDP (``train.compile`` compiles the module in place)."""
    if accelerator.state.deepspeed_plugin is not None:
        return accelerator.unwrap_model(model)
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The whole model's weights (ZeRO-3: gathered onto rank 0 by accelerate), without the deepspeed import of
    ``unwrap`` above where no DeepSpeed runs."""
    if accelerator.state.deepspeed_plugin is not None:
        return accelerator.get_state_dict(model)
    return accelerator.get_state_dict(unwrap(accelerator, model), unwrap=False)


@contextmanager
def whole_model_init(accelerator: Accelerator) -> Iterator[None]:
    """Build models with whole parameters even under ZeRO-3.

    accelerate registers its ZeRO-3 config with transformers, which then builds Hugging Face models inside
    ``deepspeed.zero.Init`` (partitioned, already bf16) while torchvision's ResNet is built whole in fp32: the
    engine then meets mixed dtypes, and a model built for evaluation would have empty parameters. Our models fit
    on one device, so we build them whole and let the engine partition them in ``prepare``.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or not plugin.hf_ds_config.is_zero3():
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()
