"""The training loop: one run of a resolved config, from data to summary.json.

`run(config)` trains and validates epoch by epoch, writes checkpoints and metrics into the
run folder, and returns (summary, exit status). It stops early, always at a whole
optimiser step, for `max_steps` (final checkpoint; status 0), SIGINT/SIGTERM (checkpoint;
status 128 + signal) or a NaN/infinite loss (no new checkpoint, so the last one stays the
last good one; status 1). Data that turns out unreadable during the run (a corrupt image
without skip_corrupt_images) stops it with a checkpoint at the last whole step, and a
resumed run does the validation it missed first; then the DataError goes on to the caller.

The run folder is held by one run at a time (train.files.RunFolder.claim), and a run never
writes over a newer or an unrelated run: see `take_run_dir`.
"""
import contextlib
import os
import signal
import sys
import time

import torch
from tqdm import tqdm

from datasets import DataError, error_line
from datasets.pipeline import EpochOrder, sample_seed
from proxynorm.norms import proxy_norm_path
from train import checkpoint, distributed, files
from train.build import build_model, engine_class, load_data, make_engine
from train.checkpoint import CheckpointError
from train.config import ConfigError, global_batch_size, run_name
from train.engine import resolve_device
from train.files import RunFolderError
from train.ipu_engine import PopTorchEngine
from train.metrics import NoLog, RunLog, keep_records_until
from train.optim import LRSchedule, WeightAverage
from train.steps import NonFiniteLoss


class StopSignals:
    """Turns SIGINT/SIGTERM into a request to stop after the current step; a second
    SIGINT interrupts at once, or, inside `deferred()` (a checkpoint being written), as soon
    as the block ends; a second SIGTERM, even one after the block, changes nothing."""

    def __init__(self):
        self.signal = None
        self.deferring = self.interrupt = False

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if self.signal == signal.SIGTERM:
            # the stop under way (checkpoint, summary, leaving the process group) is what a
            # repeat asks for: Linux can send a torchrun worker its parent-death SIGTERM more
            # than once (again as each launcher thread it is handed to exits), and the
            # default action would kill it before rank 0 writes summary.json or while a peer
            # waits in the last barrier
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    @contextlib.contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.interrupt:
            raise KeyboardInterrupt

    def handle(self, signum, frame):
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            if self.deferring:
                self.interrupt = True
                return
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint",
              file=sys.stderr, flush=True)


def take_run_dir(config, resume_path, saved):
    """(run folder, its lock): the folder this run writes, created and locked, with its
    metrics.jsonl cut back to the resumed step. RunFolderError when that would overwrite
    work: a fresh run into a folder holding a run, a resumed run into a folder holding
    another run, or an older checkpoint of a run resumed over its newer checkpoint_last.pt.
    A folder whose run stopped before its first checkpoint holds no work (RunFolder.holds_run):
    a fresh or resumed run takes it over."""
    if config["output_dir"] is not None:
        folder = files.RunFolder(config["output_dir"])
    elif resume_path is not None:
        folder = files.RunFolder.holding(resume_path)
    elif config["resume"] not in (None, "auto"):
        folder = files.RunFolder(config["resume"])  # a run folder without a checkpoint
    else:
        folder = files.RunFolder.new(run_name(config))
    path, lock = folder.path, folder.claim()
    try:
        if saved is None:
            folder.make_room()
            return path, lock
        source = files.RunFolder.holding(resume_path)
        if not os.path.samefile(source.path, path):
            folder.make_room(resuming=resume_path)
            keep_records_until(source.metrics, folder.metrics, saved["step"])
            return path, lock
        last = folder.last
        if os.path.isfile(last) and not os.path.samefile(last, resume_path):
            newer = checkpoint.load(last, mmap=True)["step"]
            if newer > saved["step"]:
                raise RunFolderError(
                    f"{last} is at step {newer}, past {resume_path} (step {saved['step']}): "
                    f"resuming here would overwrite it; continue the run with --resume {path}, "
                    f"or resume that checkpoint into a new folder with --output-dir")
        keep_records_until(folder.metrics, folder.metrics, saved["step"])
        return path, lock
    except BaseException:
        files.release(lock)
        raise


class Run:
    """The state of one run and the steps of the loop."""

    def __init__(self, config):
        self.started = time.time()
        self.passed_over = []  # resume auto: the newer runs it cannot continue, and why
        self.proxy_path = None  # how Proxy Norm layers compute (PyTorch engines; see start_engine)
        resume_path = checkpoint.find_resume(config, self.passed_over)
        saved = checkpoint.load(resume_path) if resume_path else None
        changed = checkpoint.check_compatible(saved, config, resume_path) if saved else []

        torch.manual_seed(config["seed"])
        self.global_batch = global_batch_size(config)
        self.data = load_data(config)
        self.engine, self.context = engine, context = self.start_engine(config)
        if context.distributed and not context.collective and config["output_dir"] is None \
                and resume_path is None:
            raise ConfigError("under poprun, give --output-dir: the instances cannot agree on "
                              "a time-stamped run folder")
        self.steps_per_call = engine.steps_per_call  # max_steps is a multiple (engine check)
        self.order = EpochOrder(len(self.data.train), self.global_batch, config["seed"],
                                self.steps_per_call, config["gradient_accumulation"],
                                context.rank, context.world_size)
        self.steps_per_epoch = self.order.steps_per_epoch
        # one host call: steps_per_call global batches (this process's share of them)
        call_batch = self.global_batch * self.steps_per_call
        self.train_loader = engine.make_loader(
            self.data.train, call_batch // context.world_size, self.order,
            config["num_workers"], True, config["seed"])
        # the images the training metrics cover: all, unless poprun instances report alone
        self.images_per_call = call_batch // (context.world_size if not context.collective else 1)
        # validation is split over torchrun processes and summed; poprun instances see it all
        shards = context.world_size if context.collective else 1
        val_keys = [(0, i) for i in range(context.rank % shards, len(self.data.val), shards)]
        self.val_loader = engine.make_loader(self.data.val, engine.eval_batch, val_keys,
                                             config["num_workers"], True, config["seed"])
        self.schedule = LRSchedule(config, self.steps_per_epoch)
        self.average = (WeightAverage(self.engine.model, config["weight_avg_decay"])
                        if config["weight_avg_decay"] > 0 else None)
        total = config["epochs"] * self.steps_per_epoch
        self.total_steps = min(total, config["max_steps"]) if config["max_steps"] else total

        self.step, self.val_accuracy, self.best_val_accuracy = 0, None, None
        self.skipped_images, self.last_checkpoint_step = 0, None
        self.train_seconds, self.train_images, self.wall_before = 0.0, 0, 0.0
        self.validation_due, self.signals = False, StopSignals()

        path, self.lock = self.claim_run_dir(config, resume_path, saved)
        self.folder = files.RunFolder(path)
        try:
            self.start(config, resume_path, saved, changed)
        except BaseException:
            files.release(self.lock)
            raise

    @property
    def run_dir(self):
        return self.folder.path

    def claim_run_dir(self, config, resume_path, saved):
        """(run folder, lock): rank 0 takes it (take_run_dir); every process learns the
        folder, or the one-line reason it could not be taken."""
        context = self.context
        if not context.is_main:
            if not context.collective:  # poprun: --output-dir or --resume is given
                return config["output_dir"] or files.RunFolder.holding(resume_path).path, None
            path, problem = context.from_main(None)
            if problem:
                raise RunFolderError(problem)
            return path, None
        try:
            path, lock = take_run_dir(config, resume_path, saved)
        except (RunFolderError, CheckpointError) as error:
            context.from_main((None, str(error)))
            raise
        context.from_main((path, None))
        return path, lock

    def start(self, config, resume_path, saved, changed):
        """The rest of the set-up, once the run folder is this run's."""
        self.config = config = {**config, "output_dir": self.run_dir}
        context = self.context
        processes = f" in {context.world_size} processes" if context.distributed else ""
        self.say(f"{config['config']}: {config['model']} with {config['norm']} on "
                 f"{config['data']} ({len(self.data.train)} training, {len(self.data.val)} "
                 f"validation images), global batch {self.global_batch} = "
                 f"{config['micro_batch_size']} x {config['gradient_accumulation']} x "
                 f"{config['replicas']}, {self.engine.device}{processes}; run folder "
                 f"{self.run_dir}")
        if self.conversion is not None:  # the report's summary: its counts, by activation
            self.say(f"{config['model']}: {str(self.conversion).splitlines()[0]}")
        if self.proxy_path is not None:
            self.say(f"Proxy Norm layers: {self.proxy_path}")
        for reason in self.passed_over:
            self.say(f"resume auto: passed over {reason}")
        if saved is not None:
            self.restore(saved, resume_path, changed)
        elif config["resume"] == "auto":
            self.say("resume auto: no run of this config to continue; starting afresh"
                     if self.passed_over else
                     "resume auto: no checkpoint of this config yet; starting afresh")
        elif config["resume"] is not None:
            self.say(f"--resume {config['resume']}: its run stopped before its first "
                     f"checkpoint; starting afresh there")
        if context.distributed:  # each replica's own dropout and stochastic depth
            torch.manual_seed(sample_seed(config["seed"], self.step, -2 - context.rank))

        self.log = NoLog()
        if context.is_main:
            files.write_yaml(self.folder.config, config)
            self.log = RunLog(self.run_dir, config)

    def start_engine(self, config):
        """(engine, process context): PopTorch where it runs (its poprun instance, if any, is
        the context), else the PyTorch engine, alone or under torchrun."""
        engine_type = engine_class(config)
        engine_type.check(config)  # the engine that runs here: PyTorch for ipu without PopTorch
        if engine_type is PopTorchEngine:
            model, self.conversion = build_model(config, self.data, report=True)
            engine = make_engine(config, model)
            return engine, distributed.Context(engine.instance, engine.instances,
                                               host_collectives=False)
        device = distributed.local_device(resolve_device(config["engine"]))
        context = distributed.setup(config, device)
        model, self.conversion = build_model(config, self.data, context, report=True)
        engine = make_engine(config, model, context, device)
        # what the Proxy Norm layers compute with here (the environment decides, not the config)
        self.proxy_path = proxy_norm_path(model, device, torch.bfloat16 if engine.autocast
                                          else torch.float32)
        return engine, context

    def say(self, line, file=None):
        """Prints a line once: from rank 0 under torchrun."""
        if self.context.is_main:
            print(line, file=file or sys.stdout, flush=True)

    def restore(self, saved, path, changed):
        try:  # the steps of the checkpoint's own run, at its global batch
            run_steps = saved["config"]["epochs"] * (
                len(self.data.train) // global_batch_size(saved["config"]))
        except (KeyError, TypeError, ZeroDivisionError):
            run_steps = None
        if run_steps is not None and saved["step"] > run_steps:
            raise CheckpointError(f"{path} is damaged: step {saved['step']} is past the end of "
                                  f"its run ({run_steps} steps)")
        checkpoint.load_state(self.engine, saved["engine"], path)
        if self.average is not None and saved["weight_average"] is not None:
            checkpoint.load_state(self.average, saved["weight_average"], path)
        checkpoint.restore_rng_state(saved["rng"])
        self.step = self.last_checkpoint_step = saved["step"]
        self.val_accuracy = saved["val_accuracy"]
        self.best_val_accuracy = saved["best_val_accuracy"]
        self.skipped_images = saved["skipped_images"]
        if saved["totals"] is not None:  # the parts before this one
            self.train_seconds = saved["totals"]["train_seconds"]
            self.train_images = saved["totals"]["train_images"]
            self.wall_before = saved["totals"]["wall_seconds"]
        self.validation_due = saved["validation_due"] and self.config["validation"]
        self.epoch_line = f"epoch {self.step // self.steps_per_epoch}/{self.config['epochs']}"
        into = "" if os.path.samefile(files.RunFolder.holding(path).path, self.run_dir) else \
            f" into {self.run_dir}"
        self.say(f"resuming {path} at step {self.step} "
                 f"(epoch {self.step / self.steps_per_epoch:.2f}){into}"
                 + ("; validating the epoch it ended first" if self.validation_due else ""))
        if saved["config"].get("epochs") != self.config["epochs"] and self.schedule_changed(
                saved["config"]["epochs"]):
            changed = changed + [f"epochs {saved['config']['epochs']} -> "
                                 f"{self.config['epochs']}, which changes the learning-rate "
                                 f"schedule"]
        if changed:
            self.say(f"warning: resuming with changed settings ({', '.join(changed)}): the run "
                     f"is no longer an exact continuation", file=sys.stderr)

    def schedule_changed(self, epochs):
        """Whether the learning rate of a step still to come differs with `epochs`."""
        before = LRSchedule({**self.config, "epochs": epochs}, self.steps_per_epoch)
        stride = max(1, self.steps_per_epoch // 4)
        steps = [*range(self.step, self.total_steps, stride), self.total_steps - 1]
        return any(before(step) != self.schedule(step) for step in steps if step >= self.step)

    # -- checkpoints -------------------------------------------------------------------
    def checkpoint(self):
        return checkpoint.make(
            config=self.config, step=self.step, steps_per_epoch=self.steps_per_epoch,
            engine=self.engine.state_dict(),
            weight_average=self.average.state_dict() if self.average else None,
            val_accuracy=self.val_accuracy, best_val_accuracy=self.best_val_accuracy,
            skipped_images=self.skipped_images, validation_due=self.validation_due,
            num_classes=self.data.num_classes, in_channels=self.data.in_channels,
            totals={"train_seconds": self.train_seconds, "train_images": self.train_images,
                    "wall_seconds": self.wall_seconds()})

    def wall_seconds(self):
        """Since the run started, over all of its parts (a resumed run's up to its
        checkpoint, and this part's)."""
        return self.wall_before + time.time() - self.started

    def save_checkpoints(self, improved=False, epoch_end=False):
        """The checkpoints of this step; a second Ctrl-C waits until they are written."""
        if self.context.is_main:
            state = self.checkpoint()
            with self.signals.deferred():
                checkpoint.save(self.folder.last, state)
                if improved:
                    checkpoint.save(self.folder.best, state)
                epoch = self.step // self.steps_per_epoch
                every = self.config["checkpoint_every"]
                if epoch_end and every and epoch % every == 0:
                    checkpoint.save(self.folder.epoch_checkpoint(epoch), state)
        self.last_checkpoint_step = self.step

    def keep_work(self, error):
        """A DataError after training began: a checkpoint at this whole step (unless one
        is), then the error, saying what was kept."""
        if not self.step:  # nothing trained: nothing to keep
            return DataError(error_line(error))
        if self.step != self.last_checkpoint_step:
            self.save_checkpoints()
        return DataError(f"{error_line(error)}; {self.folder.LAST} holds step {self.step}; fix "
                         f"the data (or pass --skip-corrupt-images) and continue with --resume "
                         f"{self.run_dir}")

    # -- the loop ----------------------------------------------------------------------
    def train(self):
        """Train to total_steps; returns the exit status."""
        with self.signals as stop:
            if self.validation_due:  # the run stopped in this step's validation
                self.save_checkpoints(self.validate_or_keep(stop))
            while self.step < self.total_steps:
                epoch = self.step // self.steps_per_epoch
                try:
                    self.train_epoch(epoch, stop)  # raises NonFiniteLoss
                except DataError as error:
                    raise self.keep_work(error) from None
                epoch_end = self.step % self.steps_per_epoch == 0
                if self.stopping(stop) and not epoch_end:
                    self.save_checkpoints()
                    return 128 + stop.signal
                if epoch_end and self.average is not None:
                    self.average.update(self.engine.model)
                improved = False
                if self.config["validation"] and (epoch_end or self.step == self.total_steps):
                    improved = self.validate_or_keep(stop)
                self.save_checkpoints(improved, epoch_end)
                if self.stopping(stop):
                    return 128 + stop.signal
        return 0

    def validate_or_keep(self, stop):
        """validate(); when the validation data fails, the checkpoint says the validation is
        still due, so that the resumed run does it first."""
        self.validation_due = True
        try:
            improved = self.validate(stop)
        except DataError as error:
            self.last_checkpoint_step = None  # this step's checkpoint must say validation_due
            raise self.keep_work(error) from None
        if improved is None:  # stopped by a signal: still due
            return False
        self.validation_due = False
        return improved

    def stopping(self, stop):
        """Whether a stop was asked for, in any process: under torchrun a signal may reach
        only some, and every process must stop after the same step."""
        if self.context.any(stop.signal is not None):
            stop.signal = stop.signal or signal.SIGTERM
            return True
        return False

    def train_epoch(self, epoch, stop):
        start_step = self.step - epoch * self.steps_per_epoch
        end_step = min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)
        self.order.set_epoch(epoch, start_step)
        loss_sum = correct = seen = 0
        window_loss, window_correct, window_seen, window_start = 0.0, 0, 0, time.time()
        started = time.time()
        progress = tqdm(total=end_step, initial=start_step, desc=f"epoch {epoch + 1}",
                        unit="step", leave=False, dynamic_ncols=True,
                        disable=None if self.context.is_main else True)
        images_per_call = self.images_per_call
        for images, targets, skipped in self.train_loader:
            for path in skipped:
                self.skipped_images += 1
                print(f"warning: skipped corrupt image {path} ({self.skipped_images} so far)",
                      file=sys.stderr)
            lr = self.schedule(self.step)  # once per host call: IPUs run several steps per call
            self.engine.set_lr(lr)
            loss, n_correct = self.engine.train_step(images, targets)
            self.step += self.steps_per_call
            loss_sum += loss * images_per_call
            correct, seen = correct + n_correct, seen + images_per_call
            window_loss += loss * images_per_call
            window_correct, window_seen = window_correct + n_correct, window_seen + images_per_call
            progress.update(self.steps_per_call)
            if self.step % self.config["log_every"] < self.steps_per_call:
                elapsed = time.time() - window_start
                self.log.write({"kind": "train", "step": self.step,
                                "epoch": self.step / self.steps_per_epoch,
                                "loss": window_loss / window_seen,
                                "accuracy": window_correct / window_seen, "lr": lr,
                                "images_per_second": window_seen / max(elapsed, 1e-9)})
                progress.set_postfix(loss=f"{window_loss / window_seen:.3f}",
                                     images_per_s=f"{window_seen / max(elapsed, 1e-9):.0f}")
                window_loss, window_correct, window_seen, window_start = 0.0, 0, 0, time.time()
            if self.stopping(stop):
                break
            if self.step - epoch * self.steps_per_epoch >= end_step:
                break
        progress.close()
        seconds = time.time() - started
        self.train_seconds += seconds
        self.train_images += seen
        stopped = (f", stopped at step {self.step} (max_steps)" if self.step % self.steps_per_epoch
                   and self.step == self.total_steps else "")
        self.epoch_line = (f"epoch {epoch + 1}/{self.config['epochs']}{stopped}: train loss "
                           f"{loss_sum / max(seen, 1):.4f}, accuracy {correct / max(seen, 1):.2%}, "
                           f"{seen / max(seconds, 1e-9):.0f} images/s")
        if self.step % self.steps_per_epoch and self.step < self.total_steps:
            return  # stopped by a signal mid-epoch
        if self.step % self.steps_per_epoch == 0:  # the epoch's averages (this process's
            # images; since the resumed step when the run resumed inside the epoch)
            self.log.write({"kind": "train_epoch", "step": self.step, "epoch": epoch + 1,
                            "loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1),
                            "images": seen, "images_per_second": seen / max(seconds, 1e-9)})
        if not self.config["validation"]:
            self.say(self.epoch_line)

    def validate(self, stop):
        """Validates (the weight average when there is one); returns whether it is the best,
        or None when a signal stopped it."""
        model = self.average.model if self.average is not None and self.average.updates else None
        loss_sum = correct = seen = 0
        progress = tqdm(self.val_loader, desc="validation", unit="batch", leave=False,
                        dynamic_ncols=True, disable=None if self.context.is_main else True)
        for images, targets, _ in progress:
            batch_loss, batch_correct = self.engine.eval_step(images, targets, model)
            loss_sum, correct = loss_sum + batch_loss, correct + batch_correct
            seen += len(images)
            # torchrun processes may hold a batch more or less: they finish, then agree
            if stop.signal is not None and not self.context.collective:
                progress.close()
                return None
        progress.close()
        loss_sum, correct, seen = self.context.sum(loss_sum, correct, seen)
        self.val_accuracy = correct / seen
        improved = self.best_val_accuracy is None or self.val_accuracy > self.best_val_accuracy
        if improved:
            self.best_val_accuracy = self.val_accuracy
        self.log.write({"kind": "val", "step": self.step, "epoch": self.step / self.steps_per_epoch,
                        "val_loss": loss_sum / seen, "val_accuracy": self.val_accuracy,
                        "best_val_accuracy": self.best_val_accuracy})
        self.say(f"{self.epoch_line}; val loss {loss_sum / seen:.4f}, accuracy "
                 f"{self.val_accuracy:.2%} (best {self.best_val_accuracy:.2%})")
        return improved

    def compile(self):
        """compile_only: build the executables for one host call's batch, train nothing."""
        images, targets, _ = next(iter(self.train_loader))
        self.engine.compile(images, targets)
        cache = self.config["executable_cache_dir"]
        self.say(f"compiled the training and validation executables"
                 f"{f' into {cache}' if cache else ' (no executable_cache_dir: not kept)'}")
        return 0

    def summary(self, status):
        config = self.config
        return {
            "config": config, "status": status,
            "epochs": self.step / self.steps_per_epoch, "steps": self.step,
            "val_accuracy": self.val_accuracy, "best_val_accuracy": self.best_val_accuracy,
            "train_images_per_second": self.train_images / self.train_seconds
            if self.train_seconds else None,
            "train_images": self.train_images, "wall_seconds": self.wall_seconds(),
            "global_batch_size": self.global_batch, "steps_per_epoch": self.steps_per_epoch,
            "device": str(self.engine.device), "proxy_norm_path": self.proxy_path,
            "skipped_images": self.skipped_images,
            "run_dir": self.run_dir,
        }


def epochs_text(epochs):
    """Epochs as a person reads them: 3, 1.2, 1.14 (two decimals at most), 0.004."""
    text = f"{epochs:.2f}".rstrip("0").rstrip(".")
    return f"{epochs:.1g}" if text == "0" and epochs else text


def summary_line(summary):
    """The line a run ends with: how it ended, its accuracy, length, speed and folder."""
    def share(value):
        return "n/a" if value is None else f"{value:.2%}"

    speed = summary["train_images_per_second"]
    ended = (f"stopped at step {summary['steps']} (max_steps)"
             if summary["status"] == "max_steps" else summary["status"])
    return (f"{summary['config']['config']}: {ended}, val_accuracy "
            f"{share(summary['val_accuracy'])} (best {share(summary['best_val_accuracy'])}), "
            f"{epochs_text(summary['epochs'])} epochs, {summary['steps']} steps, "
            f"{'n/a' if speed is None else f'{speed:.0f}'} images/s, "
            f"{summary['wall_seconds']:.0f} s; run folder {summary['run_dir']}")


def run(config, on_start=None):
    """Trains the resolved config; returns (summary, exit status); the summary is None in
    every process but rank 0 under torchrun. The run folder stays locked until it returns.
    `on_start(run)`, if given, sees the Run once it is set up, before its first step (its
    engine's model as built from the seed, or as restored when resuming)."""
    run = Run(config)
    try:
        if on_start is not None:
            on_start(run)
        return conclude(run, config)
    finally:
        files.release(run.lock)


def conclude(run, config):
    status, message = "finished", None
    try:
        if config["compile_only"]:
            exit_status, status = run.compile(), "compiled"
        else:
            with run.context.collective_failures(only_transport=True):  # a peer died or hung
                exit_status = run.train()
    except NonFiniteLoss as error:
        exit_status, status = 1, "diverged"
        kept = (f"the last good checkpoint is {run.folder.last} "
                f"(step {run.last_checkpoint_step})" if run.last_checkpoint_step is not None
                else "no checkpoint had been written")
        applied = "applied on the IPU, then stopped" if error.applied else \
            "stopped before applying it"
        message = (f"error: {error} at step {run.step + 1} (epoch "
                   f"{run.step // run.steps_per_epoch + 1}); {applied}; {kept}")
    except RunFolderError as error:  # a full disk: the checkpoint before stays the last
        kept = (f"{run.folder.LAST} holds step {run.last_checkpoint_step}"
                if run.last_checkpoint_step is not None else "no checkpoint was written")
        raise RunFolderError(f"{error}; {kept}") from None
    else:
        if exit_status:
            status = "interrupted"
            message = (f"stopped at step {run.step}; checkpoint written; continue with "
                       f"--resume {run.run_dir}")
        elif config["max_steps"] and run.step == config["max_steps"]:
            status = "max_steps"
    summary = run.summary(status)
    run.engine.close()
    run.log.close(summary)
    run.context.close()
    if not run.context.is_main:
        return None, exit_status  # rank 0 reports for every process
    files.write_json(run.folder.summary, summary)
    if message:
        print(message, file=sys.stderr, flush=True)
    return summary, exit_status
