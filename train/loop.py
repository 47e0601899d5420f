"""The training loop: one run of a resolved config, from data to summary.json.

`run(config)` trains and validates epoch by epoch, writes checkpoints and metrics into the
run folder, and returns (summary, exit status). It stops early, always at a whole
optimiser step, for `max_steps` (final checkpoint; status 0), SIGINT/SIGTERM (checkpoint;
status 128 + signal) or a NaN/infinite loss (no new checkpoint, so the last one stays the
last good one; status 1).
"""
import difflib
import os
import signal
import sys
import time

import torch
import yaml
from tqdm import tqdm

from datasets import cluttered_digits, get_dataset
from datasets.pipeline import EpochOrder, sample_seed
from train import checkpoint, distributed
from train.config import ConfigError, global_batch_size
from train.engine import NonFiniteLoss, make_engine, poptorch_available, resolve_device
from train.metrics import NoLog, RunLog
from train.optim import LRSchedule, WeightAverage


def build_model(config, data, context=None):
    """The config's model for this dataset; only BatchNorms get replica options (the
    batch-independent norms have no statistics to split and reject unknown options).

    In one process BatchNorm emulates the replicas (stats_chunks); under torchrun each
    process is one replica and sync_batch all-reduces within the context's process group.
    """
    from models import get_model

    norm_kwargs = None
    distributed = context is not None and context.distributed
    chunks = 1 if distributed else config["replicas"]
    if config["norm"] == "batch":
        norm_kwargs = {"stats_chunks": chunks}
    elif config["norm"] == "sync_batch":
        norm_kwargs = {"stats_chunks": chunks, "bn_group_size": config["bn_group_size"],
                       "process_group": context.bn_process_group if distributed else None}
    model_kwargs = {key: config[key] for key in ("group_dim", "expand_ratio", "drop_rate",
                                                 "drop_path_rate") if config[key] is not None}
    try:
        model = get_model(config["model"], norm=config["norm"], num_classes=data.num_classes,
                          groups=config["groups"], act=config["act"],
                          in_channels=data.in_channels, norm_kwargs=norm_kwargs, **model_kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model {config['model']} with norm {config['norm']}: {error}") from None
    check_module_names(config, model)
    return model


def check_module_names(config, model):
    """pipeline_splits and recompute_checkpoints must name distinct modules of the model."""
    names = [name for name, _ in model.named_modules() if name]
    for key in ("pipeline_splits", "recompute_checkpoints"):
        for name in config[key]:
            if name not in names:
                near = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
                near = f"; nearby: {', '.join(near)}" if near else ""
                raise ConfigError(f"{key}: {config['model']} has no module '{name}'{near}")
            if config[key].count(name) > 1:
                raise ConfigError(f"{key}: '{name}' is given twice")


class StopSignals:
    """Turns SIGINT/SIGTERM into a request to stop after the current step; a second
    SIGINT interrupts at once."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint",
              file=sys.stderr, flush=True)


def choose_run_dir(config, resume_path):
    if config["output_dir"] is not None:
        return config["output_dir"]
    if resume_path is not None:
        return os.path.dirname(resume_path) or "."
    return os.path.join("runs", f"{config['config']}-{time.strftime('%Y%m%d-%H%M%S')}")


def write_yaml(path, data):
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    os.replace(temporary, path)


def write_json(path, data):
    import json

    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(temporary, path)


class Run:
    """The state of one run and the steps of the loop."""

    def __init__(self, config):
        self.started = time.time()
        resume_path = checkpoint.find_resume(config)
        saved = checkpoint.load(resume_path) if resume_path else None
        changed = checkpoint.check_compatible(saved, config, resume_path) if saved else []

        torch.manual_seed(config["seed"])
        self.global_batch = global_batch_size(config)
        self.data = get_dataset(
            config["data"], data_path=config["data_path"], image_size=config["image_size"],
            seed=config["seed"], skip_corrupt_images=config["skip_corrupt_images"],
            mixup_alpha=config["mixup_alpha"], cutmix_alpha=config["cutmix_alpha"],
            synthetic_samples=config["synthetic_samples"],
            synthetic_num_classes=config["synthetic_num_classes"],
            clutter_options={name: config[name] for name in cluttered_digits.OPTIONS})
        self.engine, self.context = engine, context = self.start_engine(config)
        if context.distributed and not context.collective and config["output_dir"] is None \
                and resume_path is None:
            raise ConfigError("under poprun, give --output-dir: the instances cannot agree on "
                              "a time-stamped run folder")
        self.run_dir = context.from_main(choose_run_dir(config, resume_path))
        if saved is None and os.path.exists(os.path.join(self.run_dir, checkpoint.LAST)):
            raise ConfigError(f"{self.run_dir} already holds a run: continue it with --resume auto "
                              f"or choose another --output-dir")
        self.config = config = {**config, "output_dir": self.run_dir}
        self.steps_per_call = engine.steps_per_call
        if config["max_steps"] % self.steps_per_call:
            raise ConfigError(f"max_steps {config['max_steps']} must be a multiple of "
                              f"device_iterations {self.steps_per_call}")
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
        self.train_seconds, self.train_images = 0.0, 0
        processes = f" in {context.world_size} processes" if context.distributed else ""
        self.say(f"{config['config']}: {config['model']} with {config['norm']} on "
                 f"{config['data']} ({len(self.data.train)} training, {len(self.data.val)} "
                 f"validation images), global batch {self.global_batch} = "
                 f"{config['micro_batch_size']} x {config['gradient_accumulation']} x "
                 f"{config['replicas']}, {engine.device}{processes}; run folder {self.run_dir}")
        if saved is not None:
            self.restore(saved, resume_path, changed)
        elif config["resume"] == "auto":
            self.say("resume auto: no checkpoint of this config yet; starting afresh")
        if context.distributed:  # each replica's own dropout and stochastic depth
            torch.manual_seed(sample_seed(config["seed"], self.step, -2 - context.rank))

        self.log = NoLog()
        if context.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            write_yaml(os.path.join(self.run_dir, "config.yml"), config)
            self.log = RunLog(self.run_dir, config)

    def start_engine(self, config):
        """(engine, process context): PopTorch where it is installed (its poprun instance,
        if any, is the context), else the PyTorch engine, alone or under torchrun."""
        if config["engine"] == "ipu" and poptorch_available():
            engine = make_engine(config, build_model(config, self.data))
            return engine, distributed.Context(engine.instance, engine.instances,
                                               host_collectives=False)
        if config["compile_only"]:
            raise ConfigError("compile_only compiles IPU executables: it needs engine ipu and "
                              "PopTorch (a Poplar SDK host)")
        device = distributed.local_device(resolve_device(config["engine"]))
        context = distributed.setup(config, device)
        engine = make_engine(config, build_model(config, self.data, context), context, device)
        return engine, context

    def say(self, line, file=None):
        """Prints a line once: from rank 0 under torchrun."""
        if self.context.is_main:
            print(line, file=file or sys.stdout, flush=True)

    def restore(self, saved, path, changed):
        checkpoint.load_state(self.engine, saved["engine"], path)
        if self.average is not None and saved["weight_average"] is not None:
            checkpoint.load_state(self.average, saved["weight_average"], path)
        checkpoint.restore_rng_state(saved["rng"])
        self.step = self.last_checkpoint_step = saved["step"]
        self.val_accuracy = saved["val_accuracy"]
        self.best_val_accuracy = saved["best_val_accuracy"]
        self.skipped_images = saved["skipped_images"]
        self.say(f"resuming {path} at step {self.step} "
                 f"(epoch {self.step / self.steps_per_epoch:.2f})")
        if changed:
            self.say(f"warning: resuming with changed settings ({', '.join(changed)}): the run "
                     f"is no longer an exact continuation", file=sys.stderr)

    # -- checkpoints -------------------------------------------------------------------
    def checkpoint(self):
        return {
            "format": checkpoint.FORMAT, "config": self.config, "step": self.step,
            "epoch": self.step / self.steps_per_epoch, "engine": self.engine.state_dict(),
            "weight_average": self.average.state_dict() if self.average else None,
            "rng": checkpoint.rng_state(), "val_accuracy": self.val_accuracy,
            "best_val_accuracy": self.best_val_accuracy, "skipped_images": self.skipped_images,
        }

    def save_checkpoints(self, improved=False, epoch_end=False):
        self.last_checkpoint_step = self.step
        if not self.context.is_main:
            return
        state = self.checkpoint()
        checkpoint.save(os.path.join(self.run_dir, checkpoint.LAST), state)
        if improved:
            checkpoint.save(os.path.join(self.run_dir, checkpoint.BEST), state)
        epoch = self.step // self.steps_per_epoch
        every = self.config["checkpoint_every"]
        if epoch_end and every and epoch % every == 0:
            checkpoint.save(os.path.join(self.run_dir, f"checkpoint_epoch{epoch}.pt"), state)

    # -- the loop ----------------------------------------------------------------------
    def train(self):
        """Train to total_steps; returns the exit status."""
        with StopSignals() as stop:
            while self.step < self.total_steps:
                epoch = self.step // self.steps_per_epoch
                self.train_epoch(epoch, stop)  # raises NonFiniteLoss
                epoch_end = self.step % self.steps_per_epoch == 0
                if self.stopping(stop) and not epoch_end:
                    self.save_checkpoints()
                    return 128 + stop.signal
                if epoch_end and self.average is not None:
                    self.average.update(self.engine.model)
                improved = False
                if self.config["validation"] and (epoch_end or self.step == self.total_steps):
                    improved = self.validate(stop)
                self.save_checkpoints(improved, epoch_end)
                if self.stopping(stop):
                    return 128 + stop.signal
        return 0

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
        self.epoch_line = (f"epoch {epoch + 1}/{self.config['epochs']}: train loss "
                           f"{loss_sum / max(seen, 1):.4f}, accuracy {correct / max(seen, 1):.2%}, "
                           f"{seen / max(seconds, 1e-9):.0f} images/s")
        if self.step % self.steps_per_epoch and self.step < self.total_steps:
            return  # stopped by a signal mid-epoch
        if not self.config["validation"]:
            self.say(self.epoch_line)

    def validate(self, stop):
        """Validates (the weight average when there is one); returns whether it is the best."""
        model = self.average.model if self.average is not None and self.average.updates else None
        loss_sum = correct = seen = 0
        for images, targets, _ in self.val_loader:
            batch_loss, batch_correct = self.engine.eval_step(images, targets, model)
            loss_sum, correct = loss_sum + batch_loss, correct + batch_correct
            seen += len(images)
            # torchrun processes may hold a batch more or less: they finish, then agree
            if stop.signal is not None and not self.context.collective:
                return False
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
            "wall_seconds": time.time() - self.started,
            "global_batch_size": self.global_batch, "steps_per_epoch": self.steps_per_epoch,
            "device": str(self.engine.device), "skipped_images": self.skipped_images,
            "run_dir": self.run_dir,
        }


def run(config):
    """Trains the resolved config; returns (summary, exit status); the summary is None in
    every process but rank 0 under torchrun."""
    run = Run(config)
    status, message = "finished", None
    try:
        if config["compile_only"]:
            exit_status, status = run.compile(), "compiled"
        else:
            exit_status = run.train()
    except NonFiniteLoss as error:
        exit_status, status = 1, "diverged"
        kept = (f"the last good checkpoint is {os.path.join(run.run_dir, checkpoint.LAST)} "
                f"(step {run.last_checkpoint_step})" if run.last_checkpoint_step is not None
                else "no checkpoint had been written")
        applied = "applied on the IPU, then stopped" if error.applied else \
            "stopped before applying it"
        message = (f"error: {error} at step {run.step + 1} (epoch "
                   f"{run.step // run.steps_per_epoch + 1}); {applied}; {kept}")
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
    write_json(os.path.join(run.run_dir, "summary.json"), summary)
    if message:
        print(message, file=sys.stderr, flush=True)
    return summary, exit_status
