"""Process helpers for the tests that kill parents and check what is left (children and
alive read Linux's /proc)."""
import os


def children(pid):
    """The pids whose parent is pid (read from /proc/*/stat, which every Linux kernel has)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


def alive(pid):
    """Whether the process runs (a zombie, waiting for init to reap it, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
