"""`python -m train --config NAME [--flag value ...]`: train a named config.

User errors and a broken environment (bad config or flag, missing or corrupt data, a
checkpoint from another model, a run folder that cannot be written or is in use) print one
line and exit with status 2, as does a torchrun peer that died or hung (collective_timeout);
everything else is in train/loop.py.
"""
import os
import signal
import sys


def interrupted_while_starting(signum, frame):
    """Ctrl-C before the run has written anything: leave at once, without the traceback of
    whichever import it landed in."""
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, interrupted_while_starting)

from datasets import DataError, error_line  # noqa: E402 (after the handler: imports are slow)
from train.checkpoint import CheckpointError  # noqa: E402
from train.build import parse_command_line  # noqa: E402
from train.config import ConfigError, describe_configs  # noqa: E402
from train.distributed import CollectiveError  # noqa: E402
from train.files import RunFolderError  # noqa: E402


def main(argv=None):
    try:
        config, action = parse_command_line(sys.argv[1:] if argv is None else argv)
        if action == "list":
            print("\n".join(describe_configs()))
            return 0
        if action == "print":
            import yaml

            print(yaml.safe_dump(config, sort_keys=False), end="")
            return 0
        from train.loop import run  # after parsing: --help and bad flags answer at once

        # from here on the run may write files: Ctrl-C unwinds, so nothing is left half-done
        signal.signal(signal.SIGINT, signal.default_int_handler)
        summary, status = run(config)
    except (ConfigError, DataError, CheckpointError, RunFolderError, CollectiveError) as error:
        print(f"error: {error_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: the first asks for a checkpoint first
        print("interrupted", file=sys.stderr)
        return 130
    if summary is None:  # a torchrun process other than rank 0
        return status
    from train.loop import summary_line

    print(summary_line(summary))
    return status


if __name__ == "__main__":
    sys.exit(main())
