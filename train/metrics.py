"""What a run records: metrics.jsonl (one JSON object per line) and Weights & Biases.

Every record is a dict with "kind" ("train": one per log_every steps; "val": one per
validation) and the optimiser "step". wandb runs offline unless asked otherwise: it writes
into the run folder's wandb/ and needs no account (`wandb sync` uploads it later).
"""
import json
import os

from datasets import error_line
from train.config import ConfigError
from train.files import RunFolder, RunFolderError, reason, write_atomically


def read_records(path):
    """metrics.jsonl's records, in order ([] without the file); a line that is not a JSON
    object in UTF-8 (cut short by a crash, or damaged) is left out."""
    records = []
    if not os.path.exists(path):
        return records
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line.decode("utf-8"))
            except ValueError:  # UnicodeDecodeError is one
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def keep_records_until(source, target, step):
    """Writes into target (metrics.jsonl) the records of source with step <= step: what a run
    resumed at that step had logged, without the records of the steps it will do again."""
    records = [record for record in read_records(source)
               if isinstance(record.get("step"), int) and record["step"] <= step]
    if records or os.path.exists(target):
        write_atomically(target, lambda f: f.writelines(json.dumps(record) + "\n"
                                                        for record in records))


class NoLog:
    """What processes other than rank 0 log under torchrun: nothing."""

    def write(self, record):
        pass

    def close(self, summary=None):
        pass


class RunLog:
    """Appends records to metrics.jsonl, each whole or not at all: a write that fails (a full
    disk) cuts the file back to the record before, so no half line is left for the records
    a resumed run appends after it."""

    def __init__(self, run_dir, config):
        self.path = RunFolder(run_dir).metrics
        try:  # a resumed run appends; O_NOFOLLOW: never through a symlink planted there
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as error:
            raise RunFolderError(f"cannot write {self.path}: {reason(error)}") from None
        self.file = os.fdopen(fd, "ab", buffering=0)  # each write goes to the file at once
        self.wandb = None
        if config["wandb_mode"] != "disabled":
            self.wandb = start_wandb(run_dir, config)

    def write(self, record):
        line = (json.dumps(record) + "\n").encode()
        size = None
        try:
            size = os.fstat(self.file.fileno()).st_size
            written = 0
            while written < len(line):  # a short write is followed by the error, if any
                written += self.file.write(line[written:])
        except OSError as error:
            if size is not None:
                try:
                    os.ftruncate(self.file.fileno(), size)  # shrinking needs no space
                except OSError:
                    pass
            raise RunFolderError(f"cannot write {self.path}: {reason(error)}") from None
        if self.wandb is not None:
            values = {f"{record['kind']}/{k}": v for k, v in record.items()
                      if k not in ("kind", "step") and isinstance(v, (int, float))}
            self.wandb.log(values, step=record["step"])

    def close(self, summary=None):
        if not self.file.closed:
            try:
                self.file.close()
            except OSError as error:
                raise RunFolderError(f"cannot write {self.path}: {reason(error)}") from None
        if self.wandb is not None:
            if summary is not None:
                self.wandb.summary.update(
                    {k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            self.wandb.finish()
            self.wandb = None


def start_wandb(run_dir, config):
    os.environ["WANDB_DIR"] = os.path.abspath(run_dir)
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    try:
        return wandb.init(project=config["wandb_project"], name=os.path.basename(run_dir),
                          dir=os.path.abspath(run_dir), mode=config["wandb_mode"], config=config)
    except Exception as error:  # e.g. online without `wandb login`
        raise ConfigError(f"wandb_mode {config['wandb_mode']}: wandb could not start "
                          f"({error_line(error)}); "
                          f"use --wandb-mode offline or disabled") from None
