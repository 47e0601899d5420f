"""Synchronisation benchmark: what each norm costs across real processes, measured.

    python -m benchmarks.sync [--models cifar_preact_resnet20 resnet50v2 efficientnet_b0]
        [--processes 2 4] [--micro-batches 1 4 16] [--rounds 5] [--no-readme] [--report-only]

For each model and number of processes, one `torchrun` launch on 127.0.0.1 (gloo on the
CPU, NCCL on GPUs, one process per replica, the cores split between the processes) trains
every norm through the application's own engine: DistributedDataParallel, the sync_batch
process group over all replicas, the running-statistics average after each step. Each
step is one optimiser step on a global batch of micro-batch x processes random images.
The norms are timed in interleaved rounds after a barrier, so background load falls on
all of them alike; a step's time is rank 0's fastest.

Collectives are counted, not estimated, in the second step of each norm (DDP rebuilds its
gradient buckets after the first): torch.distributed's
all_reduce is wrapped (the sync_batch statistics, forward and backward; the BatchNorm
running statistics; the step's loss and accuracy), and DDP's gradient all-reduce, which
DDP issues from C++, is counted by a communication hook that forwards each bucket to
torch's own allreduce_hook. Every norm trains with that hook in every step, timed ones
included, so they stay comparable.

Writes benchmarks/results/sync.json, docs/sync_benchmark.png and the table between the
`sync` markers of docs/scaling.md (`--report-only`: the figure and the table from the JSON,
nothing launched). benchmarks/sync_cost.py projects the counts to pods.
"""
import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
import types

import torch

from benchmarks.measure import cpu_name, log2_x_axis, write_json, write_png
from benchmarks.readme import ROOT, markdown_table, replace_section
from proxynorm.norms import norm_kind
from train.distributed import free_port

RESULTS = os.path.join(ROOT, "benchmarks", "results", "sync.json")
PLOT = os.path.join(ROOT, "docs", "sync_benchmark.png")
DOCS_PAGE = os.path.join(ROOT, "docs", "scaling.md")
NORMS = ("batch", "sync_batch", "group_pn", "layer_pn")
BASELINE = "sync_batch"
RESOLUTION = {"cifar_preact_resnet20": 32, "digits_preact_resnet": 28}  # others: 64 px
NUM_CLASSES = {"cifar_preact_resnet20": 10, "digits_preact_resnet": 10}  # others: 1000
DDP = "gradients (DDP)"
SOURCES = {  # the function that called all_reduce: what the collective is for
    "forward": "sync_batch statistics, forward",
    "backward": "sync_batch statistics, backward",
    "average_running_stats": "BatchNorm running statistics",
    "sum": "loss and accuracy",
}


class CollectiveCounter:
    """Counts all_reduce calls and bytes by purpose while `active`."""

    def __init__(self):
        self.active = False
        self.calls = collections.Counter()
        self.bytes = collections.Counter()
        self.sizes = collections.defaultdict(list)  # bytes of each call, in order

    def record(self, source, tensor):
        if self.active:
            size = tensor.numel() * tensor.element_size()
            self.calls[source] += 1
            self.bytes[source] += size
            self.sizes[source].append(size)

    def wrap_all_reduce(self):
        """Counts every torch.distributed.all_reduce (the norms and the engine look it up
        on the module at call time, so they all reach the wrapper)."""
        original = torch.distributed.all_reduce

        def all_reduce(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_name
            if caller != "_allreduce_fut":  # DDP's, through torch's hook: counted by ddp_hook
                self.record(SOURCES.get(caller, caller), tensor)
            return original(tensor, *args, **kwargs)

        torch.distributed.all_reduce = all_reduce

    def ddp_hook(self, process_group, bucket):
        """DDP's gradient all-reduce, counted; the reduction itself is torch's own hook."""
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        self.record(DDP, bucket.buffer())
        return default_hooks.allreduce_hook(process_group, bucket)

    def take(self):
        counts = {source: {"calls": self.calls[source], "bytes": self.bytes[source],
                           "call_bytes": self.sizes[source]} for source in sorted(self.calls)}
        self.calls.clear(), self.bytes.clear(), self.sizes.clear()
        return counts


def worker_config(model, norm, micro_batch, world_size, threads, device):
    from train.build import resolve_config

    return resolve_config(overrides={
        "model": model, "norm": norm, "micro_batch_size": micro_batch,
        "replicas": world_size, "gradient_accumulation": 1, "bn_group_size": 0,
        "engine": device.type, "cpu_threads": threads, "label_smoothing": 0.0})


def worker(args):
    """One process of a torchrun launch: every norm at every micro-batch; rank 0 writes
    its times and counts to args.part."""
    import torch.distributed as dist

    from train import distributed
    from train.build import build_model, make_engine
    from train.engine import resolve_device

    device = distributed.local_device(resolve_device("auto"))
    world_size = distributed.world_size_from_env()
    setup_config = worker_config(args.model, "sync_batch", 1, world_size, args.threads, device)
    context = distributed.setup(setup_config, device)  # also builds the sync_batch group
    counter = CollectiveCounter()
    counter.wrap_all_reduce()
    resolution = RESOLUTION.get(args.model, 64)
    data = types.SimpleNamespace(num_classes=NUM_CLASSES.get(args.model, 1000), in_channels=3)
    results = []
    for micro_batch in args.micro_batches:
        generator = torch.Generator().manual_seed(micro_batch * world_size + context.rank)
        images = torch.randn(micro_batch, 3, resolution, resolution, generator=generator)
        targets = torch.randint(data.num_classes, (micro_batch,), generator=generator)
        engines, row = {}, {"micro_batch": micro_batch, "norms": {}}
        for norm in args.norms:
            config = worker_config(args.model, norm, micro_batch, world_size, args.threads,
                                   device)
            torch.manual_seed(0)
            engine = make_engine(config, build_model(config, data, context), context, device)
            engine.network.register_comm_hook(dist.group.WORLD, counter.ddp_hook)
            engine.train_step(images, targets)  # warm-up; DDP settles its buckets after it
            counter.active = True
            engine.train_step(images, targets)
            counter.active = False
            engines[norm] = engine
            row["norms"][norm] = {"collectives": counter.take(), "seconds": []}
        for _ in range(args.rounds):
            for norm, engine in engines.items():
                dist.barrier()
                start = time.perf_counter()
                engine.train_step(images, targets)
                row["norms"][norm]["seconds"].append(time.perf_counter() - start)
        for result in row["norms"].values():
            result["images_per_second"] = micro_batch * world_size / min(result["seconds"])
        results.append(row)
        if context.is_main:
            print(f"{args.model} x{world_size} mb {micro_batch}: " + ", ".join(
                f"{norm} {r['images_per_second']:.1f}" for norm, r in row["norms"].items())
                + " images/s", flush=True)
        del engines
    if context.is_main:
        with open(args.part, "w") as f:
            json.dump({"model": args.model, "processes": world_size, "resolution": resolution,
                       "num_classes": data.num_classes, "rows": results}, f)
    context.close()


def launch(model, processes, args):
    """One torchrun launch; returns rank 0's part of the report."""
    threads = max(1, args.cores // processes)
    with tempfile.TemporaryDirectory() as folder:
        part = os.path.join(folder, "part.json")
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
            "-m", "benchmarks.sync", "--worker", "--part", part, "--models", model,
            "--threads", str(threads), "--rounds", str(args.rounds),
            "--micro-batches", *map(str, args.micro_batches), "--norms", *args.norms]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        if subprocess.run(command, env=env, cwd=ROOT).returncode != 0:
            raise SystemExit(f"benchmarks.sync: the torchrun launch for {model} on "
                             f"{processes} processes failed (its output is above)")
        with open(part) as f:
            result = json.load(f)
    result["threads_per_process"] = threads
    return result


def beyond_ddp(collectives):
    """(calls, bytes) per step of every collective except DDP's gradient all-reduce."""
    others = [c for source, c in collectives.items() if source != DDP]
    return sum(c["calls"] for c in others), sum(c["bytes"] for c in others)


def table(report):
    env = report["environment"]
    proxies = [n for n in env["norms"] if norm_kind(n).proxy]
    header = (["model", "processes", "micro-batch"] + [f"`{n}` images/s" for n in env["norms"]]
              + [f"{n} / {BASELINE}" for n in proxies])
    rows = []
    for launch_result in report["results"]:
        for row in launch_result["rows"]:
            speed = {n: r["images_per_second"] for n, r in row["norms"].items()}
            rows.append([f"`{launch_result['model']}`", launch_result["processes"],
                         row["micro_batch"], *(f"{speed[n]:.1f}" for n in env["norms"]),
                         *(f"**{speed[n] / speed[BASELINE]:.2f}x**" for n in proxies)])
    counts_header = ["model"] + [f"`{n}`: calls, KiB per step" for n in env["norms"]] + [
        "DDP gradients: calls, MiB"]
    counts = []
    for model in env["models"]:
        first = next(r for r in report["results"] if r["model"] == model)["rows"][0]["norms"]
        cells = []
        for norm in env["norms"]:
            calls, size = beyond_ddp(first[norm]["collectives"])
            cells.append(f"{calls}, {size / 1024:.1f}")
        ddp = first[env["norms"][0]]["collectives"].get(DDP, {"calls": 0, "bytes": 0})
        counts.append([f"`{model}`", *cells, f"{ddp['calls']}, {ddp['bytes'] / 2**20:.1f}"])
    note = (f"Training images/s per optimiser step over all processes (global batch = "
            f"micro-batch x processes), on {env['cpu']} ({env['cores']} cores split between "
            f"the processes: {', '.join(sorted({str(r['threads_per_process']) for r in report['results']}))} "
            f"thread(s) each), gloo over 127.0.0.1, torch {env['torch']}; fastest of "
            f"{env['rounds']} interleaved rounds. Collectives per step beyond DDP's gradient "
            f"all-reduce, counted by instrumenting torch.distributed (every norm also sums the "
            f"step's loss and accuracy; `batch` averages its running statistics once per step; "
            f"`sync_batch` all-reduces each layer's moments forward and backward). "
            f"`python -m benchmarks.sync` (`make bench-sync`).")
    return (markdown_table(header, rows) + "\n\n" + markdown_table(counts_header, counts)
            + "\n\n" + note)


def plot(report, path):
    """Images/s against micro-batch, a row of panels per number of processes and a column
    per model (one y scale per model, so that its rows compare), one line per norm."""
    from matplotlib.figure import Figure  # no pyplot: no backend or global state to touch

    env = report["environment"]
    figure = Figure(figsize=(3.6 * len(env["models"]), 2.8 * len(env["processes"]) + 0.8))
    axes = figure.subplots(len(env["processes"]), len(env["models"]), sharey="col",
                           squeeze=False)
    for launch_result in report["results"]:
        axis = axes[env["processes"].index(launch_result["processes"])][
            env["models"].index(launch_result["model"])]
        for norm in env["norms"]:
            points = [(row["micro_batch"], row["norms"][norm]["images_per_second"])
                      for row in launch_result["rows"]]
            axis.plot(*zip(*points), marker="o", label=norm)
        axis.set_title(f"{launch_result['model']}, {launch_result['processes']} processes",
                       fontsize=9)
        log2_x_axis(axis, env["micro_batches"], "")
        axis.grid(alpha=0.3)
    figure.supxlabel("micro-batch per process", fontsize=10)
    figure.supylabel("training images/s (all processes)", fontsize=10)
    figure.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center",
                  ncol=len(env["norms"]), fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.5 / figure.get_figheight()))
    write_png(figure, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+",
                        default=["cifar_preact_resnet20", "resnet50v2", "efficientnet_b0"])
    parser.add_argument("--processes", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--micro-batches", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--norms", nargs="+", default=list(NORMS), choices=NORMS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                        help="CPU cores to split between the processes")
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--output", default=RESULTS, help="JSON path")
    parser.add_argument("--plot", default=PLOT, help="PNG path")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite docs/scaling.md")
    parser.add_argument("--report-only", action="store_true",
                        help="launch nothing: redraw the figure and the table from --output")
    args = parser.parse_args(argv)
    if args.worker:
        args.model = args.models[0]
        return worker(args)
    if args.report_only:
        with open(args.output) as f:
            report = json.load(f)
    else:
        if BASELINE not in args.norms:
            raise SystemExit(f"benchmarks.sync: --norms must include the baseline {BASELINE}")
        results = [launch(model, processes, args) for model in args.models
                   for processes in args.processes]
        report = {
            "environment": {"models": args.models, "processes": args.processes,
                            "micro_batches": args.micro_batches, "norms": args.norms,
                            "rounds": args.rounds, "cores": args.cores, "cpu": cpu_name(),
                            "torch": torch.__version__},
            "results": results}
        write_json(args.output, report, significant=5)
    plot(report, args.plot)
    print(table(report))
    if not args.no_readme:
        replace_section("sync", table(report), DOCS_PAGE)


if __name__ == "__main__":
    main()
