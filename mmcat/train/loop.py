"""``mmcat train``: the one training loop for every launcher (python, torchrun, accelerate launch, DeepSpeed, SLURM)."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from accelerate.utils import send_to_device, set_seed
from tqdm.auto import tqdm

from mmcat.config import ConfigError, to_container, to_yaml
from mmcat.data import iterate_batches
from mmcat.evaluation import dummy_batch, evaluate, forward_batch
from mmcat.metrics import confusion_image, format_table, summary
from mmcat.train.accel import build_accelerator, describe, whole_model_init
from mmcat.train.checkpoint import (TrainerState, list_checkpoints, load_checkpoint, resolve_resume,
                                   save_checkpoint)
from mmcat.train.optim import build_loss, build_optimizer, build_scheduler, total_optimizer_steps
from mmcat.train.preempt import REQUEUE_EXIT_CODE, PreemptionFlag

log = logging.getLogger("mmcat.train")


def _setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _flat_hparams(cfg: Any) -> Dict[str, Any]:
    """TensorBoard hparams take scalars only: flatten the config tree and stringify the rest."""
    flat: Dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk("", to_container(cfg))
    return flat


class _Meter:
    """Throughput and data-wait fraction over the window since the last read."""

    def __init__(self, samples: int) -> None:
        self.start, self.samples, self.wait = time.perf_counter(), samples, 0.0

    def read(self, samples: int) -> Tuple[float, float]:
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        rate, wait = (samples - self.samples) / elapsed, min(1.0, self.wait / elapsed)
        self.start, self.samples, self.wait = now, samples, 0.0
        return rate, wait


class Trainer:
    """Holds the prepared objects and the position; `run()` returns the process exit code."""

    def __init__(self, cfg: Any) -> None:
        from mmcat.data import build_train_loader, label_counts, read_labels
        from mmcat.data.sources import check_data
        from mmcat.models import build_model
        from mmcat.models.text import load_tokenizer

        check_data(cfg)  # bad data settings: one line before any work (splits, shards, labels)
        self.cfg = cfg
        self.accelerator = acc = build_accelerator(cfg)
        _setup_logging(acc.is_main_process)
        set_seed(cfg.seed, device_specific=False)  # same init on every rank; DDP/DeepSpeed also broadcast it
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        if cfg.train.resume in ("none", "") and list_checkpoints(self.ckpt_root):
            raise ConfigError(f"output_dir {self.out} holds checkpoints of an earlier run: set train.resume=latest "
                              f"to continue it, or choose a new output_dir")
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.out / "config.yaml", to_yaml(cfg))
        log.info("mmcat train: %s", describe(acc))

        self.labels = read_labels(cfg.data)
        self.tokenizer = load_tokenizer(cfg.model.text)
        self._build_train_loader = build_train_loader
        probe = build_train_loader(cfg, self.tokenizer, acc.process_index, acc.num_processes, epoch=0)
        self.batches_per_epoch = probe.batches_per_epoch
        self.total_steps = total_optimizer_steps(cfg, self.batches_per_epoch)
        log.info("train: %d shards, %d samples/epoch, %d batches/epoch/rank, %d optimizer steps",
                 probe.num_shards, probe.samples_per_epoch, self.batches_per_epoch, self.total_steps)

        model_cfg = cfg.model
        if acc.state.deepspeed_plugin is not None and cfg.model.image.channels_last:
            # DeepSpeed flattens parameters into contiguous buffers and rejects channels-last conv weights
            log.info("DeepSpeed: ResNet weights kept contiguous (model.image.channels_last ignored)")
            model_cfg = cfg.model.copy()
            model_cfg.image.channels_last = False
        with whole_model_init(acc):
            model = build_model(model_cfg, num_labels=len(self.labels))
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, cfg, self.total_steps)
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        self.loss_fn = build_loss(cfg, label_counts(cfg.data, cfg.data.train_split)).to(acc.device)
        self.deepspeed = acc.state.deepspeed_plugin is not None
        self.dummy = dummy_batch(self.tokenizer, cfg.data.image_size)
        self.state = TrainerState()
        # accumulation windows carry across epoch ends (DeepSpeed's semantics), so these outlive an epoch
        self._pending = torch.zeros(3, dtype=torch.long)
        self._save_pending = False

    # ------------------------------------------------------------------------------------------ evaluation
    def _eval_batches(self, split: str):
        from mmcat.data import build_eval_loader

        acc = self.accelerator
        return build_eval_loader(self.cfg.data, split, self.tokenizer, self.cfg.train.batch_size,
                                 self.cfg.data.num_workers, rank=acc.process_index, world_size=acc.num_processes)

    def evaluate_split(self, split: str, model: Optional[torch.nn.Module] = None) -> Dict[str, Dict]:
        return evaluate(model or self.model, self._eval_batches(split), self.accelerator, self.labels, self.dummy)

    def _eval_and_export(self) -> bool:
        """Validate; export ``best/`` when val macro-F1 improves. Returns True when early stopping says stop."""
        acc, st = self.accelerator, self.state
        res = self.evaluate_split(self.cfg.data.val_split)
        st.last_eval_step = st.global_step
        fused = res["fused"]
        acc.log({f"val/{m}/{k}": res[m][k] for m in ("fused", "image_only", "text_only")
                 for k in ("accuracy", "macro_f1", "weighted_f1")}, step=st.global_step)
        if acc.is_main_process:
            log.info("step %d val: %s", st.global_step, {m: round(res[m]["macro_f1"], 4)
                                                          for m in ("fused", "image_only", "text_only")})
            tb = acc.get_tracker("tensorboard", unwrap=True)
            tb.add_image("val/confusion_matrix", confusion_image(fused["confusion_matrix"]), st.global_step,
                         dataformats="HWC")
        if fused["macro_f1"] > st.best_metric:
            st.best_metric, st.best_step, st.evals_without_improvement = fused["macro_f1"], st.global_step, 0
            self._export_best({m: summary(res[m]) for m in ("fused", "image_only", "text_only")})
        else:
            st.evals_without_improvement += 1
        patience = self.cfg.train.early_stopping_patience
        if patience > 0 and st.evals_without_improvement >= patience:
            log.info("early stopping at step %d: no val macro-F1 gain in %d evaluations (best %.4f at step %d)",
                     st.global_step, patience, st.best_metric, st.best_step)
            return True
        return False

    def _export_best(self, val_metrics: Dict) -> None:
        from mmcat.artifact import export_artifact

        acc = self.accelerator
        state_dict = acc.get_state_dict(self.model)  # ZeRO-3: gathers the full weights onto rank 0
        if acc.is_main_process:
            export_artifact(self.out / "best", state_dict, acc.unwrap_model(self.model), self.cfg, self.labels,
                            self.tokenizer, metrics={"global_step": self.state.global_step, "val": val_metrics})
            log.info("exported best/ (val macro-F1 %.4f at step %d)", self.state.best_metric, self.state.global_step)
        acc.wait_for_everyone()

    def _save(self) -> None:
        self._save_pending = False
        save_checkpoint(self.accelerator, self.ckpt_root, self.state, self.cfg.train.keep_checkpoints)

    # ---------------------------------------------------------------------------------------------- train
    def run(self) -> int:
        cfg, acc, t = self.cfg, self.accelerator, self.cfg.train
        resume_from = resolve_resume(t.resume, self.ckpt_root)
        if resume_from is not None:
            self.state = load_checkpoint(acc, resume_from)
        st = self.state
        acc.init_trackers("mmcat", config=_flat_hparams(cfg))
        preempt = PreemptionFlag().install()
        self.meter = _Meter(st.samples_seen)
        self.bar = tqdm(total=self.total_steps, initial=st.global_step, disable=not acc.is_main_process,
                        desc="train", dynamic_ncols=True)
        try:
            stop = st.global_step >= self.total_steps
            while not stop and st.epoch < t.epochs:
                stop, preempted = self._run_epoch(preempt)
                if preempted:
                    self._save()
                    log.warning("preempted at step %d: checkpoint saved, exiting %d for requeue",
                                st.global_step, REQUEUE_EXIT_CODE)
                    return REQUEUE_EXIT_CODE
            if st.last_eval_step != st.global_step:
                self._eval_and_export()
            self._save()
            return self._finish()
        finally:
            preempt.uninstall()
            self.bar.close()
            acc.end_training()

    def _run_epoch(self, preempt: PreemptionFlag) -> Tuple[bool, bool]:
        """Train from the current position to the end of the epoch. Returns (stop, preempted)."""
        cfg, acc, st = self.cfg, self.accelerator, self.state
        info = self._build_train_loader(cfg, self.tokenizer, acc.process_index, acc.num_processes,
                                        epoch=st.epoch, skip_batches=st.batch_in_epoch)
        self._record_data_plan(info)
        with iterate_batches(info.loader) as batches:
            return self._train_batches(batches, preempt)

    def _record_data_plan(self, info) -> None:
        """RUN_DIR/data_plan/epoch-E-rank-R.json: which shards each rank read, for auditing distributed runs."""
        acc, st = self.accelerator, self.state
        plan_dir = self.out / "data_plan"
        plan_dir.mkdir(parents=True, exist_ok=True)
        plan = {"epoch": st.epoch, "rank": acc.process_index, "world_size": acc.num_processes,
                "batches": info.batches_per_epoch, "start_batch": st.batch_in_epoch,
                "shards": list(info.rank_shards or []),
                "resampled": info.rank_shards is None}
        _write_atomic(plan_dir / f"epoch-{st.epoch}-rank-{acc.process_index}.json", json.dumps(plan, indent=1))

    def _train_batches(self, batches, preempt: PreemptionFlag) -> Tuple[bool, bool]:
        acc, st, t = self.accelerator, self.state, self.cfg.train
        local = self._pending  # samples, skipped samples, preemption requested — since the last optimizer step
        fetch_start = time.perf_counter()
        for batch in batches:
            self.meter.wait += time.perf_counter() - fetch_start
            batch = send_to_device(batch, acc.device, non_blocking=True)
            with acc.accumulate(self.model):
                logits = forward_batch(self.model, batch, "fused")
                loss = self.loss_fn(logits.float(), batch["labels"])
                acc.backward(loss)
                if acc.sync_gradients and not self.deepspeed and t.clip_grad_norm > 0:
                    acc.clip_grad_norm_(self.model.parameters(), t.clip_grad_norm)  # DeepSpeed clips itself
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            st.batch_in_epoch += 1
            local[0] += batch["labels"].shape[0]
            local[1] += int(batch.get("skipped", 0))
            if acc.sync_gradients:
                local[2] = int(preempt.requested)
                # one small collective per optimizer step: exact global counts, and all ranks stop together
                totals = acc.reduce(local.to(acc.device), "sum").tolist()
                local.zero_()
                self.scheduler.step()
                st.global_step += 1
                st.samples_seen += totals[0]
                st.skipped_samples += totals[1]
                self.bar.update(1)
                if totals[2] > 0:
                    return True, True
                self._log_step(loss)
                stop = st.global_step >= self.total_steps
                if t.eval_every > 0 and st.global_step % t.eval_every == 0:
                    stop = self._eval_and_export() or stop
                if self._save_pending or (t.save_every > 0 and st.global_step % t.save_every == 0):
                    self._save()
                if stop:
                    return True, False
            fetch_start = time.perf_counter()
        st.epoch, st.batch_in_epoch = st.epoch + 1, 0
        stop = t.eval_every == 0 and self._eval_and_export()
        if t.save_every == 0:
            # a checkpoint holds no half-accumulated gradients: mid-window, save at the next optimizer step
            self._save_pending = not acc.sync_gradients
            if acc.sync_gradients:
                self._save()
        return stop, False

    def _log_step(self, loss: torch.Tensor) -> None:
        st, t = self.state, self.cfg.train
        if st.global_step % t.log_every and st.global_step != 1:
            return
        rate, wait_fraction = self.meter.read(st.samples_seen)
        logs = {"train/loss": loss.item(), "train/samples_per_s": rate, "train/data_wait_fraction": wait_fraction,
                "train/epoch": st.epoch, "train/skipped_samples": st.skipped_samples}
        logs.update({f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(self.optimizer.param_groups)})
        self.accelerator.log(logs, step=st.global_step)
        self.bar.set_postfix(loss=f"{logs['train/loss']:.3f}", sps=f"{rate:.1f}", wait=f"{wait_fraction:.2f}")

    def _finish(self) -> int:
        """Final metrics of the exported artifact itself (what gets deployed), on val and test."""
        from mmcat.artifact import load_artifact

        acc, st = self.accelerator, self.state
        acc.wait_for_everyone()
        with whole_model_init(acc):
            art = load_artifact(self.out / "best", device=acc.device)
        results: Dict[str, Any] = {}
        for split in filter(None, (self.cfg.data.val_split, self.cfg.data.test_split)):  # test_split may be null
            res = self.evaluate_split(split, model=art.model)
            results[split] = {m: summary(res[m]) for m in ("fused", "image_only", "text_only")}
            if acc.is_main_process:
                print(format_table(res, title=f"[{split}] best model (step {st.best_step})"), flush=True)
        results.update(global_step=st.global_step, samples_seen=st.samples_seen, best_step=st.best_step,
                       skipped_samples=st.skipped_samples, world_size=acc.num_processes)
        if acc.is_main_process:
            _write_atomic(self.out / "metrics.json", json.dumps(results, indent=2))
            log.info("done: %d steps, %d samples, metrics in %s", st.global_step, st.samples_seen,
                     self.out / "metrics.json")
        return 0


def train(cfg: Any) -> int:
    return Trainer(cfg).run()
