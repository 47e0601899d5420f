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
from datasets.pipeline import EpochOrder, make_loader
from train import checkpoint
from train.config import ConfigError, global_batch_size
from train.engine import NonFiniteLoss, make_engine
from train.metrics import RunLog
from train.optim import LRSchedule, WeightAverage


def build_model(config, data):
    """The config's model for this dataset; only BatchNorms get replica options (the
    batch-independent norms have no statistics to split and reject unknown options)."""
    from models import get_model

    norm_kwargs = None
    if config["norm"] == "batch":
        norm_kwargs = {"stats_chunks": config["replicas"]}
    elif config["norm"] == "sync_batch":
        norm_kwargs = {"stats_chunks": config["replicas"], "bn_group_size": config["bn_group_size"]}
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
        self.run_dir = choose_run_dir(config, resume_path)
        if saved is None and os.path.exists(os.path.join(self.run_dir, checkpoint.LAST)):
            raise ConfigError(f"{self.run_dir} already holds a run: continue it with --resume auto "
                              f"or choose another --output-dir")
        self.config = config = {**config, "output_dir": self.run_dir}
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
        self.engine = make_engine(config, build_model(config, self.data))
        pin = self.engine.device.type == "cuda"
        self.order = EpochOrder(len(self.data.train), self.global_batch, config["seed"])
        self.steps_per_epoch = self.order.steps_per_epoch
        self.train_loader = make_loader(self.data.train, self.global_batch, self.order,
                                        config["num_workers"], pin, config["seed"])
        val_batch = config["micro_batch_size"] * config["replicas"]
        self.val_loader = make_loader(self.data.val, val_batch,
                                      [(0, i) for i in range(len(self.data.val))],
                                      config["num_workers"], pin, config["seed"])
        self.schedule = LRSchedule(config, self.steps_per_epoch)
        self.average = (WeightAverage(self.engine.model, config["weight_avg_decay"])
                        if config["weight_avg_decay"] > 0 else None)
        total = config["epochs"] * self.steps_per_epoch
        self.total_steps = min(total, config["max_steps"]) if config["max_steps"] else total

        self.step, self.val_accuracy, self.best_val_accuracy = 0, None, None
        self.skipped_images, self.last_checkpoint_step = 0, None
        self.train_seconds, self.train_images = 0.0, 0
        print(f"{config['config']}: {config['model']} with {config['norm']} on {config['data']} "
              f"({len(self.data.train)} training, {len(self.data.val)} validation images), global "
              f"batch {self.global_batch} = {config['micro_batch_size']} x "
              f"{config['gradient_accumulation']} x {config['replicas']}, {self.engine.device}; "
              f"run folder {self.run_dir}", flush=True)
        if saved is not None:
            self.restore(saved, resume_path, changed)
        elif config["resume"] == "auto":
            print("resume auto: no checkpoint of this config yet; starting afresh", flush=True)

        os.makedirs(self.run_dir, exist_ok=True)
        write_yaml(os.path.join(self.run_dir, "config.yml"), config)
        self.log = RunLog(self.run_dir, config)

    def restore(self, saved, path, changed):
        checkpoint.load_state(self.engine, saved["engine"], path)
        if self.average is not None and saved["weight_average"] is not None:
            checkpoint.load_state(self.average, saved["weight_average"], path)
        checkpoint.restore_rng_state(saved["rng"])
        self.step = self.last_checkpoint_step = saved["step"]
        self.val_accuracy = saved["val_accuracy"]
        self.best_val_accuracy = saved["best_val_accuracy"]
        self.skipped_images = saved["skipped_images"]
        print(f"resuming {path} at step {self.step} (epoch {self.step / self.steps_per_epoch:.2f})")
        if changed:
            print(f"warning: resuming with changed settings ({', '.join(changed)}): the run is no "
                  f"longer an exact continuation", file=sys.stderr)

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
        state = self.checkpoint()
        checkpoint.save(os.path.join(self.run_dir, checkpoint.LAST), state)
        self.last_checkpoint_step = self.step
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
                if stop.signal is not None and not epoch_end:
                    self.save_checkpoints()
                    return 128 + stop.signal
                if epoch_end and self.average is not None:
                    self.average.update(self.engine.model)
                improved = False
                if self.config["validation"] and (epoch_end or self.step == self.total_steps):
                    improved = self.validate(stop)
                self.save_checkpoints(improved, epoch_end)
                if stop.signal is not None:
                    return 128 + stop.signal
        return 0

    def train_epoch(self, epoch, stop):
        start_step = self.step - epoch * self.steps_per_epoch
        end_step = min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)
        self.order.set_epoch(epoch, start_step)
        loss_sum = correct = seen = 0
        window_loss, window_correct, window_seen, window_start = 0.0, 0, 0, time.time()
        started = time.time()
        progress = tqdm(total=end_step, initial=start_step, desc=f"epoch {epoch + 1}",
                        unit="step", leave=False, disable=None, dynamic_ncols=True)
        for images, targets, skipped in self.train_loader:
            for path in skipped:
                self.skipped_images += 1
                print(f"warning: skipped corrupt image {path} ({self.skipped_images} so far)",
                      file=sys.stderr)
            lr = self.schedule(self.step)
            self.engine.set_lr(lr)
            loss, n_correct = self.engine.train_step(images, targets)
            self.step += 1
            loss_sum += loss * len(images)
            correct, seen = correct + n_correct, seen + len(images)
            window_loss += loss * len(images)
            window_correct, window_seen = window_correct + n_correct, window_seen + len(images)
            progress.update(1)
            if self.step % self.config["log_every"] == 0:
                elapsed = time.time() - window_start
                self.log.write({"kind": "train", "step": self.step,
                                "epoch": self.step / self.steps_per_epoch,
                                "loss": window_loss / window_seen,
                                "accuracy": window_correct / window_seen, "lr": lr,
                                "images_per_second": window_seen / max(elapsed, 1e-9)})
                progress.set_postfix(loss=f"{window_loss / window_seen:.3f}",
                                     images_per_s=f"{window_seen / max(elapsed, 1e-9):.0f}")
                window_loss, window_correct, window_seen, window_start = 0.0, 0, 0, time.time()
            if self.step - epoch * self.steps_per_epoch >= end_step or stop.signal is not None:
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
            print(self.epoch_line, flush=True)

    def validate(self, stop):
        """Validates (the weight average when there is one); returns whether it is the best."""
        model = self.average.model if self.average is not None and self.average.updates else None
        loss_sum = correct = seen = 0
        for images, targets, _ in self.val_loader:
            batch_loss, batch_correct = self.engine.eval_step(images, targets, model)
            loss_sum, correct = loss_sum + batch_loss, correct + batch_correct
            seen += len(images)
            if stop.signal is not None:
                return False
        self.val_accuracy = correct / seen
        improved = self.best_val_accuracy is None or self.val_accuracy > self.best_val_accuracy
        if improved:
            self.best_val_accuracy = self.val_accuracy
        self.log.write({"kind": "val", "step": self.step, "epoch": self.step / self.steps_per_epoch,
                        "val_loss": loss_sum / seen, "val_accuracy": self.val_accuracy,
                        "best_val_accuracy": self.best_val_accuracy})
        print(f"{self.epoch_line}; val loss {loss_sum / seen:.4f}, accuracy "
              f"{self.val_accuracy:.2%} (best {self.best_val_accuracy:.2%})", flush=True)
        return improved

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
    """Trains the resolved config; returns (summary, exit status)."""
    run = Run(config)
    status, message = "finished", None
    try:
        exit_status = run.train()
    except NonFiniteLoss as error:
        exit_status, status = 1, "diverged"
        kept = (f"the last good checkpoint is {os.path.join(run.run_dir, checkpoint.LAST)} "
                f"(step {run.last_checkpoint_step})" if run.last_checkpoint_step is not None
                else "no checkpoint had been written")
        message = (f"error: {error} at step {run.step + 1} (epoch "
                   f"{run.step // run.steps_per_epoch + 1}); stopped before applying it; {kept}")
    else:
        if exit_status:
            status = "interrupted"
            message = (f"stopped at step {run.step}; checkpoint written; continue with "
                       f"--resume {run.run_dir}")
        elif config["max_steps"] and run.step == config["max_steps"]:
            status = "max_steps"
    summary = run.summary(status)
    write_json(os.path.join(run.run_dir, "summary.json"), summary)
    run.log.close(summary)
    if message:
        print(message, file=sys.stderr, flush=True)
    return summary, exit_status
