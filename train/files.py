"""The run folder's files: written whole or not at all, and held by one run at a time.

- `write_atomically` writes to a new temporary file beside the target and renames it over
  the target: a crash, a full disk or a signal never leaves half a file or a stray
  temporary, and an existing name (a planted symlink) is never followed.
- `claim` makes a run folder this process's: an exclusive lock (fcntl.flock) on its `.lock`
  file, held until `release`; the kernel drops it when the process dies, so a crashed
  run's lock never blocks the next one.
- `claim` also removes the temporaries a run killed mid-write (kill -9, a lost machine) left
  behind: none can belong to a live run once the folder is held, and each can be as large
  as a checkpoint.
- `new_run_dir` creates a default folder name that no other run has (two runs of one config
  started in the same second get -2, -3, ...).
"""
import errno
import fcntl
import json
import os
import re
import stat
import tempfile
import time

RUN_FILES = ("config.yml", "metrics.jsonl", "summary.json", "checkpoint_last.pt")
LOCK = ".lock"
# write_atomically's temporaries of a run's files: .NAME.XXXXXXXX.tmp (mkstemp's 8 letters)
RUN_TEMPORARY = re.compile(r"\.(config\.yml|metrics\.jsonl|summary\.json|checkpoint_\w+\.pt)"
                           r"\.[a-z0-9_]{8}\.tmp")


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


def new_run_dir(config_name, root="runs"):
    """Creates and returns runs/NAME-YYYYmmdd-HHMMSS, or -2, -3, ... when a run started in
    the same second has it (os.mkdir is exclusive: two processes never get one name)."""
    make_folder(root)
    base = os.path.join(root, f"{config_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    for number in range(1, 1000):
        path = base if number == 1 else f"{base}-{number}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
        except OSError as error:
            raise RunFolderError(f"cannot create run folder {path}: {reason(error)}") from None
    raise RunFolderError(f"cannot create a run folder: {base} and 998 more names are taken")


def claim(path):
    """Locks the run folder for this process; returns the lock's file, for `release`.
    RunFolderError when another run holds it."""
    make_folder(path)
    lock_path = os.path.join(path, LOCK)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        raise RunFolderError(f"cannot lock run folder {path}: {reason(error)}") from None
    lock = os.fdopen(fd, "r+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = lock.read().strip() or "?"
        lock.close()
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunFolderError(f"{path} is in use by another run (process {holder}): wait "
                                 f"for it to end or choose another --output-dir") from None
        raise RunFolderError(f"cannot lock run folder {path}: {reason(error)}") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    remove_stale_temporaries(path)
    return lock


def remove_stale_temporaries(path):
    """Removes the temporaries of a run's files from a folder this process holds: a run
    killed while writing one (kill -9) leaves it, and no live run can be writing it."""
    for name in os.listdir(path):
        full = os.path.join(path, name)
        try:
            if RUN_TEMPORARY.fullmatch(name) and stat.S_ISREG(os.lstat(full).st_mode):
                os.unlink(full)
        except OSError:  # gone already, or not ours to remove: it only costs space
            pass


def release(lock):
    if lock is not None and not lock.closed:
        lock.close()  # closing the file drops the flock


def holds_run(path):
    """Whether the folder holds a run to protect: one that wrote a checkpoint (finished,
    stopped or crashed since). A run that failed before its first checkpoint left nothing to
    continue, and a live run holds the folder's lock."""
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return any(name.startswith("checkpoint") and name.endswith(".pt") for name in names)


def holds_unfinished_start(path):
    """Whether the folder holds what a run that stopped before its first checkpoint leaves:
    its config.yml (written first), perhaps metrics.jsonl and summary.json, no checkpoint."""
    return os.path.isfile(os.path.join(path, "config.yml")) and not holds_run(path)


def holds_other_files(path):
    """Whether the folder holds a run file's name that no run of ours left (metrics.jsonl
    or summary.json without the config.yml a run writes first)."""
    return not os.path.isfile(os.path.join(path, "config.yml")) and any(
        os.path.lexists(os.path.join(path, name)) for name in RUN_FILES)
