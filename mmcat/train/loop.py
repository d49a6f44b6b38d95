"""``mmcat train``: the one training loop for every launcher (python, torchrun, accelerate launch, DeepSpeed, SLURM).

``Trainer`` runs a ``TrainingSetup`` (built by ``mmcat.train.setup``): the step loop, evaluation and ``best/``
export, checkpoints, logging.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from accelerate.utils import send_to_device
from tqdm.auto import tqdm

from mmcat.calibration import EvalScores, temperatures_of, write_calibration
from mmcat.config import to_container
from mmcat.data import close_loader, iterate_batches
from mmcat.data.device_decode import decode_batch
from mmcat.hashing import stable_seed
from mmcat.evaluation import dummy_batch, evaluate
from mmcat.metrics import format_table, summary
from mmcat.modalities import modes_for
from mmcat.models import forward_batch
from mmcat.models.balance import aux_losses
from mmcat.train import competition
from mmcat.train.accel import full_state_dict, unwrap, whole_model_init
from mmcat.train.checkpoint import TrainerState, load_checkpoint, save_checkpoint, weights_sha256
from mmcat.train.preempt import REQUEUE_EXIT_CODE, PreemptionFlag
from mmcat.files import write_atomic
from mmcat.train.setup import TrainingSetup, build_training
from mmcat.train.perf import peak_flops, perf_scalars, training_flops_per_sample
from mmcat.train.speed import backend_flags, compiled_graphs, pad_text_to_bucket
from mmcat.train import trackers
from mmcat.train.tensorboard import per_class_f1

log = logging.getLogger("mmcat.train")


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


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def seed_step_rng(seed: int, rank: int, epoch: int, batch_in_epoch: int) -> None:
    """Seed the random numbers one micro-batch draws (dropout, modality dropout) from its position alone: a
    resumed run draws what the uninterrupted run drew, and each rank draws its own masks."""
    torch.manual_seed(stable_seed(seed, "step", rank, epoch, batch_in_epoch))


# what a stretch of training ended with: keep going (None), the run is complete, or a stop was asked for
DONE, STOPPED = "done", "stopped"


class Trainer:
    """Runs a ``TrainingSetup``: the step loop, evaluation/export, checkpoints, logging. ``run()`` returns the
    process exit code.

    Every decision (log, evaluate, checkpoint, stop) is taken at an optimizer-step boundary, so a checkpoint never
    holds a half-accumulated gradient window. Randomness inside a step (dropout, modality dropout) is seeded from
    (seed, rank, epoch, batch): ranks draw different masks, and a resumed run draws exactly the numbers that the
    uninterrupted run drew, whatever else consumed random numbers in between (loader start-up, evaluation).
    """

    def __init__(self, setup: TrainingSetup) -> None:
        self.setup = setup
        self.cfg, self.accelerator, self.out = setup.cfg, setup.accelerator, setup.out
        self.model, self.optimizer, self.scheduler = setup.model, setup.optimizer, setup.scheduler
        self.loss_fn, self.labels, self.tokenizer = setup.loss_fn, setup.labels, setup.tokenizer
        self.batches_per_epoch, self.total_steps = setup.batches_per_epoch, setup.total_steps
        self.ckpt_root = self.out / "checkpoints"
        self.dummy = dummy_batch(self.tokenizer, self.cfg.data.image_size, setup.modalities)
        self.modes = modes_for(setup.modality_names)
        self.state = TrainerState()
        self.core = unwrap(self.accelerator, self.model)  # the MultimodalClassifier inside DDP / DeepSpeed
        self.preempt = PreemptionFlag()
        # sums since the last optimizer step (windows carry across epoch ends, DeepSpeed's semantics):
        # samples, skipped samples, micro-batches (on the host), and the loss (on the device)
        self._window = torch.zeros(3, dtype=torch.float64)
        self._loss_sum = torch.zeros((), dtype=torch.float64)
        self.aux_names = list(self.core.aux_weights)
        self._aux_sum = torch.zeros(len(self.aux_names), dtype=torch.float64)
        self._aux_mean: Dict[str, float] = {}
        self._steps_this_run = 0
        self._saved_step = -1
        self._unlogged: Optional[Tuple[float, Any]] = None  # (loss, grad norm) of a step that log_every skipped
        self._flops_per_sample: Optional[float] = None  # counted on the first batch (mmcat.train.perf)
        self._eval_loaders: Dict[str, Any] = {}  # split -> its loader, reused by every evaluation
        self._peak = peak_flops(_device_name(self.accelerator.device), str(self.cfg.train.precision),
                                backend_flags(self.accelerator.device.type, self.cfg)["tf32"])

    # ---------------------------------------------------------------------------------------------- running
    def run(self) -> int:
        acc = self.accelerator
        if self.setup.resume_from is not None:
            self.state = load_checkpoint(acc, self.setup.resume_from)
        acc.init_trackers("mmcat", init_kwargs=trackers.init_kwargs(
            [str(t) for t in acc.log_with], self.out, resuming=self.setup.resume_from is not None))
        trackers.remember_runs(acc, self.out)
        trackers.store_config(acc, _flat_hparams(self.cfg))  # a continued MLflow run keeps its parameters
        self.preempt.install()
        self.meter = _Meter(self.state.samples_seen)
        self.bar = tqdm(total=self.total_steps, initial=self.state.global_step, disable=not acc.is_main_process,
                        desc="train", dynamic_ncols=True)
        try:
            outcome = self._train()
            self._close_train_loader()  # its workers would idle through the final evaluations
            if outcome == DONE:
                outcome = self._finish()
            return 0 if outcome == DONE else self._exit_for_stop()
        finally:
            self._close_train_loader()
            for loader in self._eval_loaders.values():
                close_loader(loader)  # persistent workers ignore SIGTERM: stopped here, or the exit would wait
            self.preempt.uninstall()
            self.bar.close()
            acc.end_training()

    def _train(self) -> str:
        """Epochs until the last optimizer step (or early stopping), then the final evaluation and checkpoint."""
        st, t = self.state, self.cfg.train
        outcome = self._at_boundary(done=st.global_step >= self.total_steps)  # a resumed pending evaluation
        while outcome is None:
            outcome = DONE if st.epoch >= t.epochs else self._run_epoch()
        # early stopping (decided by the evaluation after the step's log) or data that ran out before the planned
        # step count end the run on a step that log_every may have skipped: the curves must reach it
        self._log_unlogged()
        if outcome == STOPPED:
            return outcome
        st.eval_pending = st.last_eval_step != st.global_step
        st.save_pending = True
        return self._at_boundary(done=True)

    def _close_train_loader(self) -> None:
        close = getattr(self.setup.build_loader, "close", None)  # PersistentTrainLoader; absent for plain builders
        if close is not None:
            close()

    def _run_epoch(self) -> Optional[str]:
        cfg, acc, st = self.cfg, self.accelerator, self.state  # st.epoch advances in the last _train_step
        info = self.setup.build_loader(cfg, self.tokenizer, acc.process_index, acc.num_processes, epoch=st.epoch,
                                       skip_batches=st.batch_in_epoch)
        self._record_shards_read(info)
        with iterate_batches(info.loader) as batches:
            fetch_start = time.perf_counter()
            for batch in batches:
                self.meter.wait += time.perf_counter() - fetch_start
                outcome = self._train_step(batch)
                if outcome is not None:
                    return outcome
                fetch_start = time.perf_counter()
        return None

    # --------------------------------------------------------------------------------------------- the step
    def _train_step(self, batch: Dict[str, Any]) -> Optional[str]:
        """One micro-batch: forward, loss, backward; on the window's last micro-batch the optimizer step and the
        decisions taken at its boundary (log, evaluate/export, checkpoint, stop)."""
        acc, st, t = self.accelerator, self.state, self.cfg.train
        if self.cfg.train.compile:  # repeated text shapes: no recompile per distinct longest text
            batch = pad_text_to_bucket(batch, self.tokenizer.pad_token_id or 0, int(self.cfg.data.max_text_length))
        batch = send_to_device(decode_batch(batch, acc.device), acc.device, non_blocking=True)
        if self._flops_per_sample is None:
            self._flops_per_sample = self._count_flops(batch)
            log.info("perf: %.4g model FLOPs per sample (forward + backward); device peak %s", self._flops_per_sample,
                     f"{self._peak:.4g} FLOP/s" if self._peak else "unknown (no MFU; samples/s and FLOP/s logged)")
        seed_step_rng(self.cfg.seed, acc.process_index, st.epoch, st.batch_in_epoch)
        grad_norm = None
        self.core.training_progress = st.global_step / max(self.total_steps, 1)  # modality-dropout schedule
        with acc.accumulate(self.model):
            loss = self._loss(batch)
            acc.backward(loss)
            if acc.sync_gradients:  # DeepSpeed clips itself and only reports the norm
                grad_norm = acc.clip_grad_norm_(self.model.parameters(), t.clip_grad_norm or float("inf"))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._count_micro_batch(batch, loss)
        if not acc.sync_gradients:
            return None  # inside an accumulation window: no optimizer step, no decision
        loss_mean, stop_votes = self._reduce_window()
        if not acc.optimizer_step_was_skipped:  # fp16 overflow: no update, so no schedule step either
            self.scheduler.step()
            self._count_optimizer_step()
        done = st.global_step >= self.total_steps
        budget_spent = not done and 0 < t.stop_after_steps <= self._steps_this_run
        self._log_step(loss_mean, grad_norm, force=done or budget_spent or stop_votes > 0)
        if stop_votes > 0 or budget_spent:
            return STOPPED  # pending evaluation/checkpoint flags travel in the checkpoint
        return self._at_boundary(done)

    def _loss(self, batch: Dict[str, Any]) -> torch.Tensor:
        """The fused loss plus each auxiliary head's weighted loss (mmcat.models.balance); the auxiliary losses are
        also summed over the window for ``train/aux_loss/<m>`` (on the device: no sync)."""
        logits, aux = forward_batch(self.model, batch, "fused", with_aux=True)
        loss = self.loss_fn(logits.float(), batch["labels"])
        if aux:
            parts = aux_losses({k: v[0] for k, v in aux.items()}, {k: v[1] for k, v in aux.items()},
                               batch["labels"], self.loss_fn)
            weights = self.core.aux_weights
            loss = loss + sum(weights[k] * v for k, v in parts.items())
            now = torch.stack([parts[k].detach().double() for k in self.aux_names])
            self._aux_sum = self._aux_sum.to(now.device) + now
        return loss

    def _count_flops(self, batch: Dict[str, Any]) -> float:
        """Forward + backward FLOPs per sample of this batch's shapes, counted on one forward in eval mode (no
        BatchNorm statistics or random numbers touched; eager even under train.compile)."""
        import torch._dynamo

        self.model.eval()
        try:
            with torch._dynamo.config.patch(disable=True):
                return training_flops_per_sample(lambda: forward_batch(self.model, batch, "fused"),
                                                 int(batch["labels"].shape[0]))
        finally:
            self.model.train()

    def _count_micro_batch(self, batch: Dict[str, Any], loss: torch.Tensor) -> None:
        """Advance the position in the epoch and add the micro-batch to the window's sums."""
        st, t = self.state, self.cfg.train
        st.batch_in_epoch += 1
        if st.batch_in_epoch == self.batches_per_epoch:
            # the epoch ends with this micro-batch: its evaluation and checkpoint come at this optimizer step, or at
            # the next one when the epoch ends inside an accumulation window
            st.epoch, st.batch_in_epoch = st.epoch + 1, 0
            st.eval_pending |= t.eval_every == 0
            st.save_pending |= t.save_every == 0
        self._window += torch.tensor([batch["labels"].shape[0], int(batch.get("skipped", 0)), 1], dtype=torch.float64)
        self._loss_sum = self._loss_sum + loss.detach().double()  # stays on the device: no sync per micro-batch

    def _reduce_window(self) -> Tuple[float, float]:
        """One small collective per optimizer step: exact global counts, the window's mean loss over all ranks, and
        whether any rank was asked to stop (all ranks stop together). Returns (mean loss, stop votes)."""
        acc, st = self.accelerator, self.state
        local = torch.cat([self._window.to(acc.device), self._loss_sum.reshape(1).to(acc.device),
                           torch.tensor([float(self.preempt.requested)], dtype=torch.float64, device=acc.device),
                           self._aux_sum.to(acc.device)])
        samples, skipped, micro, loss_sum, stop_votes, *aux_sums = acc.reduce(local, "sum").tolist()
        self._aux_mean = {k: v / max(micro, 1) for k, v in zip(self.aux_names, aux_sums)}
        self._window.zero_()
        self._loss_sum = torch.zeros((), dtype=torch.float64)
        self._aux_sum = torch.zeros(len(self.aux_names), dtype=torch.float64)
        st.samples_seen += int(samples)
        st.skipped_samples += int(skipped)
        return loss_sum / max(micro, 1), stop_votes

    def _count_optimizer_step(self) -> None:
        st, t = self.state, self.cfg.train
        st.global_step += 1
        self._steps_this_run += 1
        self.bar.update(1)
        st.eval_pending |= t.eval_every > 0 and st.global_step % t.eval_every == 0
        st.save_pending |= t.save_every > 0 and st.global_step % t.save_every == 0

    def _at_boundary(self, done: bool) -> Optional[str]:
        """Pending evaluation/export and checkpoint at an optimizer-step boundary; DONE when training is over."""
        st = self.state
        if st.eval_pending and st.last_eval_step != st.global_step:
            if self._eval_and_export() == STOPPED:
                return STOPPED
        st.eval_pending = False
        if st.save_pending:
            self._save()
        return DONE if done or st.stopped_early else None

    def _exit_for_stop(self) -> int:
        """A stop was asked for (signal or ``train.stop_after_steps``): checkpoint at this boundary and exit."""
        st = self.state
        if self._saved_step != st.global_step:
            self._save()
        code = self.preempt.exit_code if self.preempt.requested else REQUEUE_EXIT_CODE
        reason = self.preempt.describe() if self.preempt.requested else "train.stop_after_steps"
        if self.accelerator.is_main_process:
            hint = "continue with train.resume=latest" if code != REQUEUE_EXIT_CODE else "exiting for requeue"
            log.warning("stopped (%s) at step %d: checkpoint saved in %s; %s (exit %d)", reason, st.global_step,
                        self.ckpt_root / f"step-{st.global_step}", hint, code)
        return code

    # ------------------------------------------------------------------------------------------ evaluation
    def _eval_batches(self, split: str):
        """The split's loader, built on its first evaluation; its workers persist across evaluations."""
        from mmcat.data import build_eval_loader

        if split not in self._eval_loaders:
            acc = self.accelerator
            self._eval_loaders[split] = build_eval_loader(
                self.cfg.data, split, self.tokenizer, self.cfg.train.batch_size, self.cfg.data.num_workers,
                rank=acc.process_index, world_size=acc.num_processes, modalities=self.setup.modalities,
                persistent=True)
        return self._eval_loaders[split]

    def evaluate_split(self, split: str, model: Optional[torch.nn.Module] = None,
                       calibration: Optional[EvalScores] = None) -> Optional[Dict[str, Dict]]:
        """Metrics of ``split``; None when a stop was asked for during the evaluation. A ``model`` passed in is the
        exported artifact: it runs in full precision, as ``mmcat eval`` and predict run it, so metrics.json is what
        they measure even after bf16 training."""
        return evaluate(model or self.model, self._eval_batches(split), self.accelerator, self.labels, self.dummy,
                        modes=self.modes, stop_requested=lambda: self.preempt.requested, calibration=calibration,
                        mixed_precision=model is None)

    def _eval_and_export(self) -> Optional[str]:
        """Validate; export ``best/`` when val macro-F1 improves; decide early stopping."""
        acc, st = self.accelerator, self.state
        res = self.evaluate_split(self.cfg.data.val_split)
        if res is None:
            return STOPPED
        st.last_eval_step = st.global_step
        fused = res["fused"]
        acc.log({**{f"val/{m}/{k}": res[m][k] for m in self.modes for k in ("accuracy", "macro_f1", "weighted_f1")},
                 **{f"val/influence/{m}": v["changed"] for m, v in res["influence"].items()},  # is each input used
                 **per_class_f1(fused["per_class"])}, step=st.global_step)
        if acc.is_main_process:
            log.info("step %d val: %s", st.global_step, {m: round(res[m]["macro_f1"], 4) for m in self.modes})
            trackers.log_confusion(acc, fused["confusion_matrix"], self.labels, st.global_step)
        self._check_competition(res)
        if fused["macro_f1"] > st.best_metric:
            st.best_metric, st.best_step, st.evals_without_improvement = fused["macro_f1"], st.global_step, 0
            self._export_best({m: summary(res[m]) for m in self.modes})
        else:
            st.evals_without_improvement += 1
        patience = self.cfg.train.early_stopping_patience
        if patience > 0 and st.evals_without_improvement >= patience:
            log.info("early stopping at step %d: no val macro-F1 gain in %d evaluations (best %.4f at step %d)",
                     st.global_step, patience, st.best_metric, st.best_step)
            st.stopped_early = True
        return None

    def _check_competition(self, res: Dict[str, Dict]) -> None:
        """Warn (log + each tracker's text) when a modality's ablation stays near chance while the fused model holds
        or improves (mmcat.train.competition): another modality took all the gradient; say so too when a warned
        modality recovers."""
        st = self.state
        competition.record(st.ablation_history, res, self.modes)
        warn, recovered = competition.update(st.ablation_history, st.competition_warned, len(self.labels))
        if not self.accelerator.is_main_process:
            return
        n = len(self.labels)
        notes = [(name, log.warning, competition.message(name, st.ablation_history, n)) for name in warn]
        notes += [(name, log.info, competition.recovery_message(name, st.ablation_history, n)) for name in recovered]
        for name, emit, msg in notes:
            emit(msg)
            trackers.log_warning(self.accelerator, "warnings/modality_competition", msg, st.global_step, name)

    def _export_best(self, val_metrics: Dict) -> None:
        from mmcat.artifact import export_artifact

        acc = self.accelerator
        state_dict = full_state_dict(acc, self.model)  # ZeRO-3: gathers the full weights onto rank 0
        if acc.is_main_process:
            export_artifact(self.out / "best", state_dict, self.core, self.cfg, self.labels,
                            self.tokenizer, metrics={"global_step": self.state.global_step, "val": val_metrics},
                            modalities=self.setup.modalities)
            log.info("exported best/ (val macro-F1 %.4f at step %d)", self.state.best_metric, self.state.global_step)
        acc.wait_for_everyone()

    def _save(self) -> None:
        self.state.save_pending = False
        save_checkpoint(self.accelerator, self.ckpt_root, self.state, self.cfg.train.keep_checkpoints,
                        self.setup.fingerprint)
        self._saved_step = self.state.global_step

    # --------------------------------------------------------------------------------------------- logging
    def _record_shards_read(self, info) -> None:
        """RUN_DIR/shards_read/epoch-E-rank-R.json: which shards each rank read, for auditing distributed runs."""
        acc, st = self.accelerator, self.state
        record_dir = self.out / "shards_read"
        record_dir.mkdir(parents=True, exist_ok=True)
        record = {"epoch": st.epoch, "rank": acc.process_index, "world_size": acc.num_processes,
                "batches": info.batches_per_epoch, "start_batch": st.batch_in_epoch,
                "shards": list(info.rank_shards or []),
                "resampled": info.rank_shards is None}
        write_atomic(record_dir / f"epoch-{st.epoch}-rank-{acc.process_index}.json", json.dumps(record, indent=1))

    def _log_step(self, loss: float, grad_norm: Any, force: bool) -> None:
        """``train/loss`` is the mean over the accumulation window and all ranks. Steps between ``log_every``
        multiples are skipped, except the first one and the last one (:meth:`_log_unlogged`)."""
        st, t = self.state, self.cfg.train
        if not force and st.global_step % t.log_every and st.global_step != 1:
            self._unlogged = (loss, grad_norm)
            return
        self._unlogged = None
        rate, wait_fraction = self.meter.read(st.samples_seen)
        logs = {"train/loss": loss, "train/samples_per_s": rate, "train/data_wait_fraction": wait_fraction,
                "train/epoch": st.epoch, "train/skipped_samples": st.skipped_samples}
        if grad_norm is not None:
            logs["train/grad_norm"] = float(grad_norm)
        logs.update({f"train/aux_loss/{k}": v for k, v in self._aux_mean.items()})
        logs.update(perf_scalars(self._flops_per_sample or 0.0, rate, self.accelerator.num_processes, self._peak))
        if self.accelerator.device.type == "cuda":  # what the run needs of the card, for sizing batches and ZeRO stages
            logs["perf/peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.accelerator.device) / 2**30
        if self.cfg.train.compile:  # recompiles show up as a growing count
            logs["perf/compiled_graphs"] = compiled_graphs()
        logs.update({f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(self.optimizer.param_groups)})
        self.accelerator.log(logs, step=st.global_step)
        self.bar.set_postfix(loss=f"{loss:.3f}", sps=f"{rate:.1f}", wait=f"{wait_fraction:.2f}")

    def _log_unlogged(self) -> None:
        """Log the last optimizer step of this process if ``log_every`` skipped it."""
        if self._unlogged is not None:
            self._log_step(*self._unlogged, force=True)

    # ---------------------------------------------------------------------------------------------- finish
    def _finish(self) -> str:
        """Final metrics of the exported artifact itself (what gets deployed), on val and test. The val pass also
        fits the temperatures of calibrated scores (``best/calibration.json``), which the test pass then uses."""
        from mmcat.artifact import load_artifact

        acc, st = self.accelerator, self.state
        acc.wait_for_everyone()
        with whole_model_init(acc):
            art = load_artifact(self.out / "best", device=acc.device)
        results: Dict[str, Any] = {}
        gaps: Dict[str, Dict[str, float]] = {}  # fused minus <m>_only macro-F1, per split
        influence: Dict[str, Dict[str, Dict[str, float]]] = {}  # per split: does the fused model use each input
        unused: Optional[List[str]] = None  # judged on the first split (val)
        temperatures: Optional[Dict[str, float]] = None  # fit on val
        calibration: Dict[str, Any] = {}
        for split in filter(None, (self.cfg.data.val_split, self.cfg.data.test_split)):  # test_split may be null
            scores = EvalScores(self.setup.modality_names, temperatures, fit=temperatures is None)
            res = self.evaluate_split(split, model=art.model, calibration=scores)
            if res is None:
                return STOPPED  # the final checkpoint exists: a resumed run only repeats these evaluations
            results[split] = {m: summary(res[m]) for m in self.modes}
            calibration[split] = self._calibration(split, res["calibration"])
            temperatures = temperatures_of(res["calibration"]["fit"]) if temperatures is None else temperatures
            gaps[split] = competition.ablation_gaps(res)
            influence[split] = res["influence"]
            if unused is None:
                unused = competition.warn_unused(res, len(self.labels), split, log, acc.is_main_process)
            if acc.is_main_process:
                print(format_table(res, title=f"[{split}] best model (step {st.best_step})"), flush=True)
        results.update(global_step=st.global_step, samples_seen=st.samples_seen, best_step=st.best_step,
                       skipped_samples=st.skipped_samples, world_size=acc.num_processes,
                       modalities=list(self.setup.modality_names), precision=str(acc.mixed_precision),
                       ablation_gap=gaps, calibration=calibration,
                       weak_modalities=list(st.competition_warned), modality_influence=influence,
                       unused_modalities=unused or [],
                       final_weights_sha256=weights_sha256(full_state_dict(acc, self.model)))
        if acc.is_main_process:
            write_atomic(self.out / "metrics.json", json.dumps(results, indent=2))
            log.info("done: %d steps, %d samples, metrics in %s", st.global_step, st.samples_seen,
                     self.out / "metrics.json")
        return DONE

    def _calibration(self, split: str, cal: Dict[str, Any]) -> Dict[str, Any]:
        """The val pass writes ``best/calibration.json`` and reports what was fit (per input combination:
        temperature, ECE before / after); the test pass reports ECE before / after under those temperatures and
        the coverage of the fused model at precision 0.90 / 0.95 / 0.99."""
        if cal["fit"] is not None:
            if self.accelerator.is_main_process:
                write_calibration(self.out / "best", cal["fit"], split)
            return {"fit": cal["fit"]}
        return {"by_input": cal["by_input"], "coverage_at_precision": cal["coverage_at_precision"]}


def train(cfg: Any) -> int:
    return Trainer(build_training(cfg)).run()
