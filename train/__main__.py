"""`python -m train --config NAME [--flag value ...]`: train a named config.

User errors (bad config or flag, missing or corrupt data, a checkpoint from another model)
print one line and exit with status 2; everything else is in train/loop.py.
"""
import sys

from datasets import DataError
from train.checkpoint import CheckpointError
from train.config import ConfigError, describe_configs, parse_command_line


def one_line(error):
    """The message of a user error; a DataLoader worker's error arrives wrapped in its
    traceback, whose last line is 'module.ErrorType: message'."""
    last = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def main(argv=None):
    try:
        config, list_configs = parse_command_line(sys.argv[1:] if argv is None else argv)
        if list_configs:
            print("\n".join(describe_configs()))
            return 0
        from train.loop import run  # after parsing: --help and bad flags answer at once

        summary, status = run(config)
    except (ConfigError, DataError, CheckpointError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: the first asks for a checkpoint first
        print("interrupted", file=sys.stderr)
        return 130
    if summary is None:  # a torchrun process other than rank 0
        return status
    accuracy = summary["val_accuracy"]
    best = summary["best_val_accuracy"]
    speed = summary["train_images_per_second"]
    print(f"{config['config']}: {summary['status']}, val_accuracy "
          f"{'n/a' if accuracy is None else f'{accuracy:.2%}'} (best "
          f"{'n/a' if best is None else f'{best:.2%}'}), {summary['epochs']:g} epochs, "
          f"{summary['steps']} steps, {'n/a' if speed is None else f'{speed:.0f}'} images/s, "
          f"{summary['wall_seconds']:.0f} s; run folder {summary['run_dir']}")
    return status


if __name__ == "__main__":
    sys.exit(main())
