"""The built-in training loop, top to bottom: resume, epochs of steps, evaluation, checkpoints, stops.

Every rank runs the same sequence: the stop vote, the log window's reduction,
evaluation and checkpoints are collectives at the same steps on every rank.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ddp import storage
from ddp.checkpointer import Checkpointer
from ddp.config import Config
from ddp.evaluation import evaluate
from ddp.layout import RunDir
from ddp.metric_watch import MetricWatch
from ddp.model import unwrap
from ddp.precision import autocast
from ddp.reporting import MetricsSink, Progress, Waited, write_run_state
from ddp.session import Session
from ddp.trainer.assembly import Parts, full_job_section
from ddp.trainer.state import TrainState, check_fits
from ddp.trainer.window import Stragglers, Window
from ddp.transfer import count_samples, to_device
from ddp.watchdog import Watchdog

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite and ``train.on_nonfinite`` is ``error``."""


@dataclass(frozen=True)
class Outcome:
    status: str  # "finished", "early_stopped", "stopped" (a stop signal: resumable) or "already_finished"
    step: int
    epoch: int
    metrics: dict
    checkpoint: Path | None


class Trainer:
    def __init__(self, config: Config, run_dir: RunDir, session: Session, parts: Parts, watchdog: Watchdog):
        self.config, self.run_dir, self.session, self.parts, self.watchdog = config, run_dir, session, parts, watchdog
        self.env, self.device = session.env, session.device
        self.model, self.optimizer = parts.model, parts.optimizer
        self.schedule, self.scaler = parts.schedule, parts.scaler
        self.loader = parts.train_loader
        self.state = TrainState()
        c = config.checkpoint
        self.checkpointer = Checkpointer(run_dir.checkpoints, env=self.env, device=self.device, keep_last=c.keep_last,
                                         async_save=c.async_save, resume=c.resume)
        early = config.train.early_stop
        self.early = MetricWatch(early.metric, early.mode, early.min_delta) if early.metric else None
        self.stragglers = Stragglers(config.watchdog.straggler_factor, config.watchdog.straggler_windows,
                                     parts.hostnames)
        self.steps_per_epoch = parts.steps_per_epoch(config.train.accumulate)
        self.memory_format = torch.channels_last if config.train.channels_last else None
        self.sink: MetricsSink | None = None
        self.skipped_steps = 0  # on_nonfinite=skip
        self.scaler_skips = torch.zeros((), device=self.device)  # fp16: steps the gradient scaler skipped
        self.metrics: dict = {}

    # -- checkpoints ---------------------------------------------------------------------------------

    def checkpoint_state(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer, "schedule": self.schedule, "scaler": self.scaler,
                "loader": self.loader, "train_state": self.state, "train_size": self.parts.train_size,
                "config": self.config.to_dict(), "config_hash": self.config.hash()}

    def resume(self) -> None:
        if not self.config.checkpoint.resume and self.env.is_main:
            moved = self.run_dir.abandon(time.strftime("%Y%m%d-%H%M%S"))
            if moved is not None:
                log.warning("starting over (checkpoint.resume=false): the earlier run's checkpoints and metrics "
                            "were moved to %s", moved)
        found = self.checkpointer.restore(self.checkpoint_state(), validate=lambda saved: check_fits(
            saved, config=self.config.to_dict(), train_size=self.parts.train_size, model=unwrap(self.model),
            optimizer=self.optimizer, full_job_config=full_job_section(self.parts.job)))
        if found is not None and self.env.is_main:
            log.info("resuming from %s: step %d, epoch %d, %d samples into the epoch", found.path, self.state.step,
                     self.loader.epoch, self.loader.consumed)
        if self.early is not None:
            self.early.load_state_dict(self.state.early_stop)
        # Steps after the checkpoint are trained again: their records go, so each step is logged once.
        self.sink = MetricsSink(self.run_dir, enabled=self.env.is_main, after_step=self.state.step)
        self.schedule.update(self.state.step, self.progress())

    def save(self, kind: str, best: bool = False) -> None:
        self.watchdog.beat(self.state.step, "checkpoint")
        deferrable = self._changed_only_by_optimizer_step() if self.config.checkpoint.async_save else frozenset()
        self.checkpointer.save(self.checkpoint_state(), self.state.step, best=best, kind=kind, deferrable=deferrable)
        if self.env.is_main:
            write_run_state(self.run_dir, "running", **self._position())

    def _changed_only_by_optimizer_step(self) -> frozenset[int]:
        """The storages of the parameters and of the optimizer's state: nothing but the optimizer step changes
        them (forward and backward only read them), so an asynchronous checkpoint may copy them while the next
        step's forward and backward run. Buffers (BatchNorm's statistics) are not among them."""
        tensors = list(unwrap(self.model).parameters())
        tensors += [value for state in self.optimizer.state.values() for value in state.values()
                    if isinstance(value, torch.Tensor)]
        return frozenset(t.untyped_storage().data_ptr() for t in tensors if t.numel() > 0)

    # -- the run -------------------------------------------------------------------------------------

    def progress(self) -> float:
        """The fraction of the run done: samples seen over samples planned, or steps over max_steps."""
        train = self.config.train
        planned = train.epochs * self.parts.train_size
        done = self.loader.epoch * self.parts.train_size + self.loader.consumed
        fraction = done / planned if planned else 1.0
        if train.max_steps is not None:
            fraction = max(fraction, self.state.step / train.max_steps)
        return fraction

    def done(self) -> bool:
        train = self.config.train
        return (self.loader.epoch >= train.epochs or self.state.stopped_early is not None
                or (train.max_steps is not None and self.state.step >= train.max_steps))

    def fit(self) -> Outcome:
        self.resume()
        if self.done():
            log.info("run already finished (%s); nothing to do", self._describe_end())
            return self._outcome("already_finished")
        if self.env.is_main:
            write_run_state(self.run_dir, "running", **self._position())
        self.model.train()
        self.watchdog.start()
        try:
            while not self.done():
                stopped = self.train_epoch()
                epoch_ended = self.loader.consumed == 0
                if epoch_ended or self.done():
                    self.end_of_epoch()
                elif stopped:
                    self.save("stop")
                if stopped:
                    self.checkpointer.wait()
                    log.warning("stopped by %s at step %d; checkpoint %s", self.session.stop.signal_name or "request",
                                self.state.step, self.checkpointer.last)
                    return self._outcome("stopped")
            self.session.vote.close()
            self.checkpointer.wait()
            status = "early_stopped" if self.state.stopped_early else "finished"
            log.info("%s", self._describe_end())
            return self._outcome(status)
        finally:
            self.watchdog.stop()
            self.checkpointer.close()
            self.sink.close()

    def end_of_epoch(self) -> None:
        """Evaluate when due, keep the best, watch for early stopping and the plateau, save."""
        train, best = self.config.train, False
        due = self.done() or self.loader.epoch % train.eval_every_epochs == 0
        if self.parts.val_loader is not None and due:
            self.metrics = self.evaluate()
            best = self._update_best(self.metrics)
            self.schedule.observe(self.metrics, self.loader.epoch)
            self.schedule.update(self.state.step, self.progress())
            if self.early is not None and self.early.observe(self.metrics, self.loader.epoch) is False \
                    and self.early.bad >= train.early_stop.patience:
                self.state.stopped_early = {"epoch": self.loader.epoch, "best": self.early.best,
                                            "best_epoch": self.early.best_epoch}
            if self.early is not None:
                self.state.early_stop = self.early.state_dict()
        self.save("epoch", best=best)

    def train_epoch(self) -> bool:
        """One epoch (or its rest, after a resume), or up to max_steps or a stop. True if a stop was agreed."""
        config, train, env, state = self.config, self.config.train, self.env, self.state
        micro_batches = len(self.loader)
        bar = Progress(env.is_main and train.progress_bar, total=self.steps_per_epoch,
                       initial=self.steps_per_epoch - math.ceil(micro_batches / train.accumulate),
                       desc=f"epoch {self.loader.epoch}")
        precision = autocast(train.precision, self.device)
        window = Window(train.accumulate, state.step)
        window_start = epoch_start = time.perf_counter()
        every = config.checkpoint.every_steps
        stop = False
        beat = self.watchdog.beat
        clock = time.perf_counter
        batches = Waited(self._beating(self.loader, "data"))  # the time the loop is blocked on data
        moves_batches = self.device.type != "cpu" or self.memory_format is not None  # else .to() is a no-op
        ddp = self.parts.ddp
        for micro, batch in enumerate(batches):
            beat(state.step, "forward")
            started = clock()
            if moves_batches:
                batch = to_device(batch, self.device, self.memory_format)
            window.samples += count_samples(batch)
            boundary = (micro + 1) % train.accumulate == 0 or micro + 1 == micro_batches
            with nullcontext() if boundary or ddp is None else ddp.no_sync():
                with precision:
                    loss = self.parts.job.training_step(self.model, batch)
                window.own_s += clock() - started
                beat(state.step, "backward")
                self.scaler.scale(loss / train.accumulate if train.accumulate > 1 else loss).backward()
            window.losses.append(loss.detach())
            if not boundary:
                continue
            beat(state.step, "optimizer")
            self._optimizer_step()
            state.step += 1
            self.schedule.update(state.step, self.progress())
            bar.update(1)
            stop = self.session.vote.agreed()  # every rank learns of a stop signal at the same step
            done = self.done()
            # A checkpoint step (or a stop, or the run's last step) is also a log step, so a non-finite loss is
            # caught before it is saved, and the last steps' losses are logged.
            if (state.step % train.log_every == 0 or micro + 1 == micro_batches
                    or bool(every and state.step % every == 0) or stop or done):
                beat(state.step, "log")
                self._log(window, clock() - window_start, batches.take())
                window, window_start = Window(train.accumulate, state.step), clock()
            if stop and micro + 1 < micro_batches:
                break  # on the epoch's last batch, the epoch ends as usual (evaluated, saved), then the stop
            if done:
                break
            if every and state.step % every == 0 and micro + 1 < micro_batches:
                self.save("step")
        bar.close()
        if self.loader.consumed == 0 and env.is_main:  # the epoch was completed
            self.sink.write(state.step, {"train/epoch_time_s": clock() - epoch_start}, epoch=self.loader.epoch)
        return stop

    def _beating(self, loader, phase: str):
        """``loader``'s batches, with a watchdog beat before each fetch (a hung loader is a stall too)."""
        index = 0
        self.watchdog.beat(self.state.step, phase, index)
        for batch in loader:
            yield batch
            index += 1
            self.watchdog.beat(self.state.step, phase, index)

    def _optimizer_step(self) -> None:
        train = self.config.train
        self.checkpointer.before_update()  # an asynchronous checkpoint's copy of what this step changes
        if train.on_nonfinite == "skip" and not self._gradients_finite():
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            log.warning("step %d: non-finite gradients, step skipped on every rank (%d so far)",
                        self.state.step + 1, self.skipped_steps)
            return
        if train.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), train.clip_grad_norm)
        if self.scaler.is_enabled():
            # The scaler skips a step whose gradients overflowed and lowers its scale: counted on
            # the device by comparing scales (get_scale() would wait for the GPU at every step).
            scale_before = self.scaler._scale.clone()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.is_enabled():
            self.scaler_skips += self.scaler._scale < scale_before
        self.optimizer.zero_grad(set_to_none=True)

    def _gradients_finite(self) -> bool:
        """DDP has averaged the gradients, so every rank reaches the same answer without a collective.

        Under fp16 the gradient scaler already skips steps with overflowing gradients; that is left alone.
        """
        if self.scaler.is_enabled():
            return True
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return True
        return bool(torch.isfinite(torch.stack([g.detach().float().norm() for g in grads]).sum()).item())

    # -- reporting -----------------------------------------------------------------------------------

    def _log(self, window: Window, seconds: float, data_wait_s: float) -> None:
        """Reduce the window over ranks; rank 0 writes the scalars; every rank checks the loss."""
        storage.raise_if_failed()  # a write that failed in a background thread (a full disk)
        reduced = window.reduce(self.device, data_wait_s, seconds)
        if reduced.bad_steps and self.config.train.on_nonfinite == "error" and not self.scaler.is_enabled():
            raise NonFiniteLossError(self._nonfinite_message(reduced.bad_steps))
        stragglers = self.stragglers.observe(reduced.own_s, self.state.step - window.first_step)
        if not self.env.is_main:
            return
        samples = window.samples * self.env.world_size
        lr = self.optimizer.param_groups[0]["lr"]
        scalars = {"train/loss": reduced.loss, "train/lr": lr, "train/samples_per_s": samples / max(seconds, 1e-9),
                   "train/data_wait_share": reduced.data_wait_share}
        if self.config.train.on_nonfinite == "skip" or self.scaler.is_enabled():
            scalars["train/skipped_steps"] = self.skipped_steps + int(self.scaler_skips.item())
        for found in stragglers:
            log.warning("straggler: rank %d on %s has been %.1fx slower than the median rank for %d log windows "
                        "(%.1f ms of its own work per step against %.1f ms)", found["rank"], found["host"],
                        found["slowdown"], found["windows"], found["own_ms_per_step"], found["median_ms_per_step"])
            scalars.update({"straggler/rank": found["rank"], "straggler/slowdown": found["slowdown"]})
        self.sink.write(self.state.step, scalars, epoch=self.loader.epoch)
        log.info("epoch %d step %d loss %.4f lr %.4g %.0f samples/s (%.0f%% waiting for data)", self.loader.epoch,
                 self.state.step, reduced.loss, lr, scalars["train/samples_per_s"], 100 * reduced.data_wait_share)

    def _nonfinite_message(self, bad: list[tuple[int, int]]) -> str:
        """Which step first, on which rank(s), and where to resume from."""
        step = min(first for first, _ in bad)
        ranks = [rank for first, rank in bad if first == step]
        others = sorted({rank for _, rank in bad} - set(ranks))
        later = f" (later also on rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))})" if others else ""
        last = self.checkpointer.last
        checkpoint = (f"the last good checkpoint is {last}; continue from it with "
                      f"`{self.run_dir.command('resume')}` and a change" if last else
                      "no checkpoint was written before it; start again with a change")
        return (f"the loss became NaN or infinite at step {step} on rank{'s' if len(ranks) > 1 else ''} "
                f"{', '.join(map(str, ranks))}{later}; {checkpoint}: a lower optim.lr, train.clip_grad_norm, "
                "or train.on_nonfinite=skip to drop such steps")

    def evaluate(self) -> dict:
        metrics = evaluate(self.model, self._beating(self.parts.val_loader, "evaluate"),
                           self.parts.job.evaluation_step, self.device,
                           autocast(self.config.train.precision, self.device))
        metrics = {f"val/{name}": value for name, value in metrics.items()}
        if self.env.is_main:
            self.sink.write(self.state.step, metrics, epoch=self.loader.epoch)
            log.info("epoch %d step %d %s", self.loader.epoch, self.state.step,
                     " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def _update_best(self, metrics: dict) -> bool:
        c = self.config.checkpoint
        if c.best_metric is None or c.best_metric not in metrics:
            return False
        watch = MetricWatch(c.best_metric, c.best_mode, best=self.state.best)
        if watch.observe(metrics, self.loader.epoch):
            self.state.best = watch.best
            return True
        return False

    def _position(self) -> dict:
        return {"step": self.state.step, "epoch": self.loader.epoch,
                "checkpoint": str(self.checkpointer.last) if self.checkpointer.last else None,
                "best": self.state.best, "metrics": self.metrics}

    def _describe_end(self) -> str:
        ended = self.state.stopped_early
        if ended:
            return (f"finished (early stop at epoch {ended['epoch']}, best {self.config.train.early_stop.metric} "
                    f"{ended['best']:.4g} at epoch {ended['best_epoch']})")
        return f"finished at step {self.state.step}, epoch {self.loader.epoch}"

    def _outcome(self, status: str) -> Outcome:
        return Outcome(status, self.state.step, self.loader.epoch, self.metrics, self.checkpointer.last)
