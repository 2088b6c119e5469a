"""The training loop: the one code path for ``launch debug``, ``launch local`` and ``launch slurm``.

``run_training`` is what every worker calls. With one process the process
group, DDP and all collectives are no-ops, so the debugger sees exactly the
code that runs on a cluster.
"""

from __future__ import annotations

import logging
import math
import socket
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ddp import checkpoint as ckpt
from ddp import distributed, rng
from ddp.config import Config
from ddp.consistency import check_ranks_agree
from ddp.data import ResumableDistributedSampler, ShardSampler, make_loader
from ddp.env import DistEnv
from ddp.evaluation import evaluate
from ddp.model import ddp_module, unwrap, wrap
from ddp.optim import build_optimizer, build_schedule
from ddp.precision import autocast, grad_scaler
from ddp.reporting import MetricsSink, Progress, Waited, setup_logging, write_environment
from ddp.resume import TrainState, capture_state, changed_only_by_optimizer_step, record_restart, restore_state
from ddp.signals import StopRequest, StopVote
from ddp.transfer import count_samples, to_device
from ddp.watchdog import Watchdog, collective_timeout
from jobs.registry import JobError, make_job

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite and ``train.on_nonfinite`` is ``error``."""


@dataclass(frozen=True)
class Outcome:
    status: str  # "finished", "stopped" (a stop signal: resumable) or "already_finished"
    step: int
    epoch: int
    metrics: dict
    checkpoint: Path | None


def run_training(config: Config, run_dir: Path, env: DistEnv, *, num_workers: int | None = None,
                 stop: StopRequest | None = None) -> Outcome:
    """Train the config's job in this process, as one of ``env.world_size`` workers.

    ``stop``: a caller that must see stop signals from before training starts (a SLURM task)
    passes its own, already installed; installing and uninstalling it stays the caller's.
    """
    run_dir = Path(run_dir)
    log_file = setup_logging(run_dir, env)
    with _failure_logged(log_file):
        device = distributed.select_device(env, config.train.device)
        if config.run.deterministic:
            rng.use_deterministic_algorithms()
        timeout_s = collective_timeout(config.ddp.timeout_s, config.watchdog.timeout_s)
        with distributed.process_group(env, device, config.ddp.backend, timeout_s), \
                (nullcontext(stop) if stop is not None else StopRequest()) as stop:
            return Trainer(config, run_dir, env, device, stop, num_workers).fit()


@contextmanager
def _failure_logged(log_file: Path):
    """A failure's message to the log (and so rank 0's console), its traceback to the log file only."""
    try:
        yield
    except Exception as err:
        text = f"{type(err).__name__}: {err}"
        if "Original Traceback" in text:  # raised in a DataLoader worker: its last line is the error
            text = text.strip().splitlines()[-1]
        log.error("%s", text)
        with open(log_file, "a") as handle:
            traceback.print_exc(file=handle)
        raise


class Trainer:
    def __init__(self, config: Config, run_dir: Path, env: DistEnv, device: torch.device, stop: StopRequest,
                 num_workers: int | None = None):
        self.config, self.run_dir, self.env, self.device, self.stop = config, run_dir, env, device, stop
        train = config.train
        self.job = make_job(config.job, env)
        hostnames = distributed.all_gather_object(socket.gethostname())
        if env.is_main:
            write_environment(run_dir, env, device, distributed.backend_for(device, config.ddp.backend), hostnames)
        if env.is_main:
            self.job.prepare_datasets()  # downloads happen once, before the other ranks look
        distributed.barrier()

        # Same seed on every rank before building the model: identical initial weights.
        rng.seed_everything(config.run.seed)
        bare_model = self.job.build_model()
        train_set, val_set = self.job.build_datasets()
        if len(train_set) == 0:
            raise JobError(f"the training set is empty: {type(self.job).__name__}.build_datasets() returned no "
                           "samples; check the job's data paths and settings")
        # From here on each rank draws its own stream (dropout, mixup).
        rng.seed_everything(config.run.seed + 1 + env.rank)
        # Before DDP's constructor, which fails obscurely (or hangs) on models that differ.
        check_ranks_agree(config, bare_model, self.job, len(train_set))

        self.model = wrap(bare_model, device, env, train, config.ddp)
        self.ddp = ddp_module(self.model)
        self.optimizer = build_optimizer(unwrap(self.model), config.optim)

        data = config.data
        self.sampler = ResumableDistributedSampler(len(train_set), env.rank, env.world_size, config.run.seed,
                                                   drop_last=data.drop_last)
        self.train_loader = make_loader(train_set, self.sampler, data, data.batch_size, seed=config.run.seed,
                                        rank=env.rank, device=device, num_workers=num_workers,
                                        drop_last=data.drop_last)
        self.val_loader = None
        if val_set is not None and len(val_set) > 0:
            self.val_loader = make_loader(val_set, ShardSampler(len(val_set), env.rank, env.world_size), data,
                                          data.eval_batch_size or data.batch_size, seed=config.run.seed,
                                          rank=env.rank, device=device, num_workers=num_workers)
        self.train_size = len(train_set)
        micro_per_epoch = len(ResumableDistributedSampler(len(train_set), 0, env.world_size, 0,
                                                          drop_last=data.drop_last))
        micro_per_epoch = (micro_per_epoch // data.batch_size if data.drop_last
                           else math.ceil(micro_per_epoch / data.batch_size))
        self.steps_per_epoch = max(1, math.ceil(micro_per_epoch / train.accumulate))
        self.total_steps = train.epochs * self.steps_per_epoch
        if train.max_steps is not None:
            self.total_steps = min(self.total_steps, train.max_steps)
        self.scheduler = build_schedule(self.optimizer, config.schedule, self.total_steps, config.optim.lr)
        self.scaler = grad_scaler(train.precision, device)
        self.memory_format = torch.channels_last if train.channels_last else None

        self.state = TrainState()
        self.writer = ckpt.CheckpointWriter(run_dir / "checkpoints", config.checkpoint.keep_last,
                                            config.checkpoint.async_save) if env.is_main else None
        self.sink = MetricsSink(run_dir, enabled=env.is_main)
        self.stop_vote = StopVote(stop, every_s=train.stop_check_s)
        self.last_checkpoint: Path | None = None
        self.skipped_steps = 0  # on_nonfinite=skip
        self.scaler_skips = torch.zeros((), device=device)  # fp16: steps the gradient scaler skipped
        self.watchdog = Watchdog(run_dir, env, config.watchdog.timeout_s)

    # -- checkpoints ---------------------------------------------------------

    def resume_if_possible(self) -> None:
        if not self.config.checkpoint.resume:
            return
        found = None
        if self.env.is_main:
            try:
                found = ckpt.latest_valid(self.run_dir / "checkpoints")
            except ckpt.CheckpointError as err:
                found = err
        found = distributed.broadcast_object(found)
        if isinstance(found, ckpt.CheckpointError):
            raise found
        if found is None:
            return
        saved = ckpt.load(found.path, map_location=self.device)
        self.state = restore_state(self, saved)
        self.last_checkpoint = found.path
        if self.env.is_main:
            log.info("resuming from %s: step %d, epoch %d, %d samples into the epoch", found.path,
                     self.state.step, self.state.epoch, self.state.consumed)

    def save_checkpoint(self, is_best: bool = False) -> None:
        self.watchdog.beat(self.state.step, "checkpoint")
        states = distributed.all_gather_object(rng.capture())  # every rank's generators, to rank 0

        def write() -> Path:
            return self.writer.save(capture_state(self, states), self.state.step, is_best=is_best,
                                    deferrable=changed_only_by_optimizer_step(self))

        self.last_checkpoint = self._on_main_then_agree(write)

    def _on_main_then_agree(self, action):
        """``action()`` on rank 0 (which alone writes checkpoints), its result or its error on every rank.

        With a plain barrier, a failed write (disk full, file-size limit) would end
        rank 0 while the others wait in the barrier until the process group's
        timeout; here every rank raises the same error at once.
        """
        self.watchdog.beat(self.state.step, "checkpoint-agree")
        error, result = None, None
        if self.env.is_main:
            try:
                result = action()
            except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
                error = err
        if error is None:
            message = None
        elif isinstance(error, ckpt.CheckpointError):
            message = str(error)  # says what and where already
        else:
            message = f"rank 0 failed to save a checkpoint: {type(error).__name__}: {error}"
        message, result = distributed.broadcast_object((message, result))
        if error is not None:
            raise error
        if message is not None:
            raise ckpt.CheckpointError(message)
        return result

    # -- the loop --------------------------------------------------------------

    def fit(self) -> Outcome:
        train = self.config.train
        self.resume_if_possible()
        if self.env.is_main and self.env.restart_count > 0:
            record_restart(self.run_dir, self.env, self.last_checkpoint, self.state)
        if self._done():
            log.info("run already finished (step %d, epoch %d); nothing to do", self.state.step, self.state.epoch)
            return Outcome("already_finished", self.state.step, self.state.epoch, {}, self.last_checkpoint)
        self.model.train()
        metrics: dict = {}
        self.watchdog.start()
        try:
            while not self._done():
                stopped = self._train_epoch()
                epoch_finished = self.state.consumed == 0
                if epoch_finished or self._done():
                    is_best = False
                    due = self._done() or self.state.epoch % train.eval_every_epochs == 0
                    if self.val_loader is not None and due:
                        metrics = self._evaluate()
                        is_best = self._update_best(metrics)
                    self.save_checkpoint(is_best=is_best)
                elif stopped:
                    self.save_checkpoint()
                if stopped:
                    self._finish_writes()
                    log.warning("stopped by %s at step %d; checkpoint %s", self.stop.signal_name or "request",
                                self.state.step, self.last_checkpoint)
                    return Outcome("stopped", self.state.step, self.state.epoch, metrics, self.last_checkpoint)
            self.stop_vote.close()
            self._finish_writes()
            return Outcome("finished", self.state.step, self.state.epoch, metrics, self.last_checkpoint)
        finally:
            self.watchdog.stop()
            if self.writer:
                self.writer.wait()
            self.sink.close()

    def _finish_writes(self) -> None:
        """Wait for a background checkpoint write; its failure ends every rank, not only rank 0."""
        self._on_main_then_agree(lambda: self.writer.wait())

    def _beating(self, loader, phase: str):
        """``loader``'s batches, with a watchdog beat before each fetch (a hung loader is a stall too)."""
        index = 0
        self.watchdog.beat(self.state.step, phase, index)
        for batch in loader:
            yield batch
            index += 1
            self.watchdog.beat(self.state.step, phase, index)

    def _done(self) -> bool:
        max_steps = self.config.train.max_steps
        return self.state.epoch >= self.config.train.epochs or (max_steps is not None and self.state.step >= max_steps)

    def _train_epoch(self) -> bool:
        """One epoch (or its rest, after a resume), or up to max_steps or a stop. True if a stop was agreed."""
        config, train, env, state = self.config, self.config.train, self.env, self.state
        self.sampler.set_epoch(state.epoch, state.consumed)  # by the library, every epoch
        micro_batches = len(self.train_loader)
        progress = Progress(env.is_main and train.progress_bar, total=self.steps_per_epoch,
                            initial=self.steps_per_epoch - math.ceil(micro_batches / train.accumulate),
                            desc=f"epoch {state.epoch}")
        precision = autocast(train.precision, self.device)
        # The window's losses stay on the device, unread, until its log step: no host sync and
        # no extra kernel per step (a list append costs ~0.1 us; each tensor op ~5 us on a CPU).
        window_losses: list[torch.Tensor] = []
        window_first_step = state.step
        window_start, window_samples, epoch_start = time.perf_counter(), 0, time.perf_counter()
        every = config.checkpoint.every_steps
        stop_requested = completed = False
        beat = self.watchdog.beat
        batches = Waited(self._beating(self.train_loader, "data"))  # the time the loop is blocked on data
        moves_batches = self.device.type != "cpu" or self.memory_format is not None  # else .to() is a no-op
        for micro, batch in enumerate(batches):
            beat(state.step, "forward")
            if moves_batches:
                batch = to_device(batch, self.device, self.memory_format)
            samples = count_samples(batch)
            boundary = (micro + 1) % train.accumulate == 0 or micro + 1 == micro_batches
            sync = nullcontext() if boundary or self.ddp is None else self.ddp.no_sync()
            with sync:
                with precision:
                    loss = self.job.training_step(self.model, batch)
                beat(state.step, "backward")
                self.scaler.scale(loss / train.accumulate if train.accumulate > 1 else loss).backward()
            loss = loss.detach()
            window_losses.append(loss)
            state.consumed = min(self.train_size, state.consumed + samples * env.world_size)
            window_samples += samples * env.world_size
            if not boundary:
                continue
            beat(state.step, "optimizer")
            self._optimizer_step(loss)
            state.step += 1
            progress.update(1)
            # Every rank learns of a stop signal at the same step (see StopVote).
            stop_requested = self.stop_vote.agreed()
            # A checkpoint step (or a stop) is also a log step, so a non-finite loss is caught before it is saved.
            log_now = (state.step % train.log_every == 0 or micro + 1 == micro_batches
                       or bool(every and state.step % every == 0) or stop_requested)
            if log_now:
                beat(state.step, "log")
                self._log_window(window_losses, window_first_step, window_samples,
                                 time.perf_counter() - window_start, batches.take())
                window_losses, window_first_step = [], state.step
                window_samples, window_start = 0, time.perf_counter()
            if stop_requested and micro + 1 < micro_batches:
                break  # on the epoch's last batch, the epoch ends as usual (evaluated, saved), then the stop
            if self._done():
                break
            if every and state.step % every == 0 and micro + 1 < micro_batches:
                self.save_checkpoint()
        else:
            completed = True
        progress.close()
        if completed:
            state.epoch += 1
            state.consumed = 0
            if env.is_main:
                self.sink.write(state.step, {"train/epoch_time_s": time.perf_counter() - epoch_start},
                                epoch=state.epoch)
        return stop_requested

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        train = self.config.train
        if self.writer is not None:
            self.writer.before_update()  # an asynchronous checkpoint's copy of what this step changes
        if train.on_nonfinite == "skip" and not self._gradients_finite():
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            log.warning("step %d: non-finite gradients, step skipped on every rank (%d so far)",
                        self.state.step + 1, self.skipped_steps)
            self.scheduler.step()
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
        self.scheduler.step()

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

    def _log_window(self, losses: list[torch.Tensor], first_step: int, samples: int, seconds: float,
                    data_wait_s: float = 0.0) -> None:
        """Reduce the window's figures over ranks, log them on rank 0.

        ``losses`` are the window's micro-batch losses, still on the device, read
        here in one transfer; micro-batch i belongs to step first_step + 1 + i // accumulate.
        """
        accumulate = self.config.train.accumulate
        values = torch.stack(losses).double().tolist() if losses else []
        bad_steps = [first_step + 1 + i // accumulate for i, value in enumerate(values) if not math.isfinite(value)]
        # A skipped NaN must not make the logged loss NaN: only finite losses are averaged.
        local = [sum(value for value in values if math.isfinite(value)), float(len(values)),
                 float(len(bad_steps)), float(bad_steps[0]) if bad_steps else -1.0, data_wait_s]
        # Each rank fills its own row, so one all-reduce gathers them all: [sum, count, bad, first bad
        # step, data wait] per rank. (all_gather_object would pickle, and make two collectives.)
        rows = torch.zeros(self.env.world_size, len(local), dtype=torch.float64)
        rows[self.env.rank] = torch.tensor(local, dtype=torch.float64)
        gathered = distributed.all_reduce_sum(rows.to(self.device)).tolist()
        totals = [sum(column) for column in zip(*gathered)]
        if totals[2] > 0 and self.config.train.on_nonfinite == "error" and not self.scaler.is_enabled():
            raise NonFiniteLossError(self._nonfinite_message(gathered))
        if self.env.is_main:
            loss = totals[0] / (totals[1] - totals[2]) if totals[1] > totals[2] else float("nan")
            lr = self.optimizer.param_groups[0]["lr"]
            waited = totals[4] / len(gathered) / max(seconds, 1e-9)  # the ranks' mean share of the window
            scalars = {"train/loss": loss, "train/lr": lr, "train/samples_per_s": samples / max(seconds, 1e-9),
                       "train/data_wait_share": waited}
            if self.config.train.on_nonfinite == "skip" or self.scaler.is_enabled():
                scalars["train/skipped_steps"] = self.skipped_steps + int(self.scaler_skips.item())
            self.sink.write(self.state.step, scalars, epoch=self.state.epoch)
            log.info("epoch %d step %d loss %.4f lr %.4g %.0f samples/s (%.0f%% waiting for data)", self.state.epoch,
                     self.state.step, loss, lr, scalars["train/samples_per_s"], 100 * waited)

    def _nonfinite_message(self, rows: list[list[float]]) -> str:
        """Which step first, on which rank(s), and where to resume from."""
        bad = [(int(row[3]), rank) for rank, row in enumerate(rows) if row[2] > 0]
        step = min(first for first, _ in bad)
        ranks = [rank for first, rank in bad if first == step]
        others = sorted({rank for _, rank in bad} - set(ranks))
        later = f" (later also on rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))})" if others else ""
        checkpoint = (f"the last good checkpoint is {self.last_checkpoint}; continue from it with `launch resume "
                      f"{self.run_dir}` and a change" if self.last_checkpoint else
                      "no checkpoint was written before it; start again with a change")
        return (f"the loss became NaN or infinite at step {step} on rank{'s' if len(ranks) > 1 else ''} "
                f"{', '.join(map(str, ranks))}{later}; {checkpoint}: a lower optim.lr, train.clip_grad_norm, "
                "or train.on_nonfinite=skip to drop such steps")

    def _evaluate(self) -> dict:
        metrics = evaluate(self.model, self._beating(self.val_loader, "evaluate"), self.job.evaluation_step,
                           self.device, autocast(self.config.train.precision, self.device))
        metrics = {f"val/{name}": value for name, value in metrics.items()}
        if self.env.is_main:
            self.sink.write(self.state.step, metrics, epoch=self.state.epoch)
            log.info("epoch %d step %d %s", self.state.epoch, self.state.step,
                     " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def _update_best(self, metrics: dict) -> bool:
        name = self.config.checkpoint.best_metric
        if name is None or name not in metrics:
            return False
        value = metrics[name]
        better = (self.state.best is None or
                  (value > self.state.best if self.config.checkpoint.best_mode == "max" else value < self.state.best))
        if better:
            self.state.best = value
        return better
