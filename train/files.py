"""The run folder's files: written whole or not at all, and held by one run at a time.

- `RunFolder` is the one place that knows a run folder's file names (config.yml,
  metrics.jsonl, checkpoints, summary.json, .lock) and where runs go without --output-dir
  (runs/); every reader and writer asks it for a path. Its methods are the rules for taking
  a folder: a run never writes over another run's work.
- `write_atomically` writes to a new temporary file beside the target and renames it over
  the target: a crash, a full disk or a signal never leaves half a file or a stray
  temporary, and an existing name (a planted symlink) is never followed.
- `RunFolder.claim` makes a run folder this process's: an exclusive lock (fcntl.flock) on
  its `.lock` file, held until `release`; the kernel drops it when the process dies, so a
  crashed run's lock never blocks the next one.
- `claim` also removes the temporaries a run killed mid-write (kill -9, a lost machine) left
  behind: none can belong to a live run once the folder is held, and each can be as large
  as a checkpoint.
- `RunFolder.new` creates a default folder name that no other run has (two runs of one
  config started in the same second get -2, -3, ...).
"""
import errno
import fcntl
import glob
import json
import os
import re
import stat
import tempfile
import time


class RunFolderError(Exception):
    """A run folder that cannot be created, written or held: printed as one line."""


def reason(error):
    """An OSError's reason in words ("No space left on device")."""
    return error.strerror or str(error)


def write_atomically(path, write, binary=False, mode=0o644):
    """write(file) into a new temporary file in path's folder, flushed to disk, then renamed
    to path. RunFolderError (one line) when the folder cannot take it (an OSError, or an
    error raised because of one); the temporary is removed whatever stops the write, a
    KeyboardInterrupt included."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        # mkstemp opens with O_CREAT | O_EXCL: a name that exists, a symlink included, is
        # never opened, so nothing outside the folder can be overwritten through it
        fd, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.",
                                         suffix=".tmp")
    except OSError as error:
        raise RunFolderError(f"cannot write {path}: {reason(error)}") from None
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, mode)  # mkstemp creates 0600
        os.replace(temporary, path)
    except BaseException as error:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        cause = os_error(error)
        if cause is not None:
            raise RunFolderError(f"cannot write {path}: {reason(cause)}") from None
        raise


def os_error(error):
    """The OSError behind an error, if any: torch.save reports a full disk as a RuntimeError
    ("[enforce fail at inline_container.cc] unexpected pos") raised while handling it."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def write_json(path, data):
    def write(f):
        json.dump(data, f, indent=2)
        f.write("\n")
    write_atomically(path, write)


def write_yaml(path, data):
    import yaml

    write_atomically(path, lambda f: yaml.safe_dump(data, f, sort_keys=False))


def make_folder(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise RunFolderError(f"cannot create run folder {path}: {reason(error)}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunFolderError(f"cannot write into run folder {path}: permission denied")


def release(lock):
    if lock is not None and not lock.closed:
        lock.close()  # closing the file drops the flock


class RunFolder:
    """A run's folder: `path` and the paths of the files a run writes there.

    A run writes config.yml first, then metrics.jsonl and its checkpoints as it goes, and
    summary.json when it ends; .lock names the process that holds the folder.
    """

    ROOT = "runs"  # where a run goes without --output-dir: runs/CONFIG-YYYYmmdd-HHMMSS
    CONFIG, METRICS, SUMMARY = "config.yml", "metrics.jsonl", "summary.json"
    LAST, BEST, LOCK = "checkpoint_last.pt", "checkpoint_best.pt", ".lock"
    # what a run that validated leaves; also checkpoint_epochN.pt (checkpoint_every) and
    # wandb/ (Weights & Biases' own)
    NAMES = (LOCK, CONFIG, METRICS, LAST, BEST, SUMMARY)
    # write_atomically's temporaries of those files: .NAME.XXXXXXXX.tmp (mkstemp's 8 letters)
    TEMPORARY = re.compile(r"\.(%s|checkpoint_\w+\.pt)\.[a-z0-9_]{8}\.tmp"
                           % "|".join(map(re.escape, (CONFIG, METRICS, SUMMARY))))

    def __init__(self, path):
        self.path = path

    @property
    def config(self):
        return os.path.join(self.path, self.CONFIG)

    @property
    def metrics(self):
        return os.path.join(self.path, self.METRICS)

    @property
    def summary(self):
        return os.path.join(self.path, self.SUMMARY)

    @property
    def last(self):
        return os.path.join(self.path, self.LAST)

    @property
    def best(self):
        return os.path.join(self.path, self.BEST)

    def epoch_checkpoint(self, epoch):
        """checkpoint_epochN.pt: kept every checkpoint_every epochs."""
        return os.path.join(self.path, f"checkpoint_epoch{epoch}.pt")

    @classmethod
    def holding(cls, checkpoint):
        """The folder a checkpoint file is in."""
        return cls(os.path.dirname(checkpoint) or ".")

    @classmethod
    def checkpoint_of(cls, path):
        """A run folder's checkpoint_last.pt (the run's last weights), or path itself: a
        checkpoint file."""
        return cls(path).last if os.path.isdir(path) else path

    @classmethod
    def of_config(cls, name):
        """runs/NAME-*: where `new` puts the runs of config NAME."""
        return [cls(path) for path in glob.glob(os.path.join(cls.ROOT, f"{glob.escape(name)}-*"))]

    @classmethod
    def new(cls, name):
        """Creates runs/NAME-YYYYmmdd-HHMMSS, or -2, -3, ... when a run started in the same
        second has it (os.mkdir is exclusive: two processes never get one name)."""
        make_folder(cls.ROOT)
        base = os.path.join(cls.ROOT, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        for number in range(1, 1000):
            path = base if number == 1 else f"{base}-{number}"
            try:
                os.mkdir(path)
                return cls(path)
            except FileExistsError:
                continue
            except OSError as error:
                raise RunFolderError(f"cannot create run folder {path}: {reason(error)}") \
                    from None
        raise RunFolderError(f"cannot create a run folder: {base} and 998 more names are taken")

    def claim(self):
        """Locks the folder for this process; returns the lock's file, for `release`.
        RunFolderError when another run holds it."""
        path = self.path
        make_folder(path)
        try:
            fd = os.open(os.path.join(path, self.LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW,
                         0o644)
        except OSError as error:
            raise RunFolderError(f"cannot lock run folder {path}: {reason(error)}") from None
        lock = os.fdopen(fd, "r+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = lock.read().strip() or "?"
            lock.close()
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderError(f"{path} is in use by another run (process {holder}): "
                                     f"wait for it to end or choose another --output-dir") \
                    from None
            raise RunFolderError(f"cannot lock run folder {path}: {reason(error)}") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self.remove_stale_temporaries()
        return lock

    def remove_stale_temporaries(self):
        """Removes the temporaries of a run's files from a folder this process holds: a run
        killed while writing one (kill -9) leaves it, and no live run can be writing it."""
        for name in os.listdir(self.path):
            full = os.path.join(self.path, name)
            try:
                if self.TEMPORARY.fullmatch(name) and stat.S_ISREG(os.lstat(full).st_mode):
                    os.unlink(full)
            except OSError:  # gone already, or not ours to remove: it only costs space
                pass

    def holds_run(self):
        """Whether the folder holds a run to protect: one that wrote a checkpoint (finished,
        stopped or crashed since). A run that failed before its first checkpoint left nothing
        to continue, and a live run holds the folder's lock."""
        try:
            names = os.listdir(self.path)
        except OSError:
            return False
        return any(name.startswith("checkpoint") and name.endswith(".pt") for name in names)

    def holds_unfinished_start(self):
        """Whether the folder holds what a run that stopped before its first checkpoint
        leaves: its config.yml (written first), perhaps metrics.jsonl and summary.json, no
        checkpoint."""
        return os.path.isfile(self.config) and not self.holds_run()

    def holds_other_files(self):
        """Whether the folder holds a run file's name that no run of ours left (metrics.jsonl
        or summary.json without the config.yml a run writes first)."""
        return not os.path.isfile(self.config) and any(
            os.path.lexists(path) for path in (self.config, self.metrics, self.summary,
                                               self.last))

    def make_room(self, resuming=None):
        """Readies the folder, held (`claim`), for a fresh run, or for the run of checkpoint
        `resuming` of another folder: RunFolderError when it holds work that run would write
        over (holds_run, holds_other_files). The files of a run that stopped before its first
        checkpoint go: nothing of it can be continued, and this run takes the folder."""
        if self.holds_run() or self.holds_other_files():
            if resuming is None:
                raise RunFolderError(f"{self.path} already holds a run: continue it with "
                                     f"--resume {self.path}, or choose another --output-dir")
            raise RunFolderError(f"{self.path} already holds another run: give an empty "
                                 f"--output-dir to continue {resuming} there")
        for path in (self.metrics, self.summary):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as error:
                raise RunFolderError(f"cannot remove {path}: {reason(error)}") from None
