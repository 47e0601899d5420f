"""Model benchmark: training images/s and saved activation bytes per image vs micro-batch.

    python -m benchmarks.model [--models resnet50 efficientnet_b0] [--resolution 128]
        [--micro-batches 1 2 4 8 16 32] [--repeats 5] [--threads 2] [--device cpu|cuda]
        [--dtype float32|bfloat16] [--channels-last] [--no-readme]

One training step is forward, cross-entropy, backward and an SGD step (momentum 0.9), in
float32 on the CPU (or, with --device cuda, on the GPU, timed between
torch.cuda.synchronize() calls, where the fused variants run the Triton kernels), on random
images and labels. For each model and micro-batch the
variants (BatchNorm, GroupNorm, GroupNorm + Proxy Norm eager and fused, LayerNorm + Proxy
Norm fused) are timed in interleaved rounds, so background load falls on all alike, and
every number is also a ratio to BatchNorm's in the same run. A step's time is the fastest
of the repeats: on shared cores other work only ever adds time, in bursts that can slow a
two-thread step tenfold, and the median of a few repeats did not escape them in our runs;
every repeat's time is kept in the JSON, to judge the noise. Saved bytes are those of the
distinct storages autograd keeps for backward in one training forward, parameters
excluded (they do not grow with the micro-batch), divided by the micro-batch. A variant
that cannot run (e.g. BatchNorm with one value per channel) is recorded as null with its
error. Writes benchmarks/results/model.json, docs/model_benchmark.png and the table
between the `model` markers of docs/fused_op.md; on CUDA, benchmarks/results/model_cuda.json
and docs/model_benchmark_cuda.png, and the docs only when asked (--readme).
`--dtype bfloat16` runs the forward pass under bfloat16 autocast (float32 weights), as the
training application's precision 16.32; `--channels-last` holds the weights and the images
in channels_last, as its `--channels-last true`. Either writes its own files
(model_cuda_bfloat16_channels_last.json, say) and the docs only with --readme.
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F

from proxynorm import ops
from benchmarks.measure import (DTYPES, add_variant_flags, cpu_name, log2_x_axis, saved_bytes,
                                variant_suffix, write_json, write_png)
from benchmarks.readme import markdown_table, replace_section
from datasets import error_line
from models import get_model, list_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS_PAGE = os.path.join(ROOT, "docs", "fused_op.md")
BASELINE = "batch"
VARIANTS = {  # name: (norm, norm_kwargs)
    "batch": ("batch", {}),
    "group": ("group", {}),
    "group_pn_eager": ("group_pn", {"fused": False}),
    "group_pn_fused": ("group_pn", {}),
    "layer_pn_fused": ("layer_pn", {}),
}
NUM_CLASSES = 1000


class Trainer:
    """One variant of a model with its optimiser; `step` is one training step."""

    def __init__(self, model_name, norm, norm_kwargs, device, dtype=torch.float32,
                 memory_format=torch.preserve_format):
        torch.manual_seed(0)  # every variant starts from the same convolution weights
        self.model = get_model(model_name, norm=norm, num_classes=NUM_CLASSES,
                               norm_kwargs=norm_kwargs).train().to(device,
                                                                   memory_format=memory_format)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.device_type, self.autocast = torch.device(device).type, dtype == torch.bfloat16

    def loss(self, images, labels):
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(images)
        return F.cross_entropy(logits.float(), labels)

    def step(self, images, labels):
        self.loss(images, labels).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def activation_bytes(self, images, labels):
        return saved_bytes(lambda: self.loss(images, labels),
                           self.model.parameters())["activations"]


def failed(error):
    """The result of a variant that cannot run, with the first line of its error."""
    return {"ms": None, "images_per_second": None, "activation_bytes_per_image": None,
            "error": f"{type(error).__name__}: {error_line(error)}"}


def synchronize(device):
    """Waits for the GPU's queued work, so that a step's time is the work's, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_model(model_name, resolution, micro_batches, repeats, device, warmup=2,
                  dtype=torch.float32, memory_format=torch.preserve_format):
    """One result row per micro-batch: every variant's ms, images/s and saved bytes."""
    trainers, rows = {}, []
    for name, (norm, norm_kwargs) in VARIANTS.items():
        try:
            trainers[name] = Trainer(model_name, norm, norm_kwargs, device, dtype, memory_format)
        except (TypeError, ValueError) as error:
            trainers[name] = error
    for micro_batch in micro_batches:
        generator = torch.Generator().manual_seed(micro_batch)
        images = torch.randn(micro_batch, 3, resolution, resolution,
                             generator=generator).to(device, memory_format=memory_format)
        labels = torch.randint(NUM_CLASSES, (micro_batch,), generator=generator).to(device)
        variants, live = {}, {}
        for name, trainer in trainers.items():
            if isinstance(trainer, Exception):  # the model could not be built
                variants[name] = failed(trainer)
                continue
            try:
                for _ in range(warmup):
                    trainer.step(images, labels)
                live[name] = trainer
            except (RuntimeError, ValueError) as error:
                variants[name] = failed(error)
        times = {name: [] for name in live}
        for _ in range(repeats):
            for name, trainer in live.items():
                synchronize(device)
                start = time.perf_counter()
                trainer.step(images, labels)
                synchronize(device)
                times[name].append(time.perf_counter() - start)
        for name, trainer in live.items():
            seconds = min(times[name])
            variants[name] = {
                "ms": 1e3 * seconds, "ms_repeats": [1e3 * t for t in times[name]],
                "images_per_second": micro_batch / seconds,
                "activation_bytes_per_image":
                    trainer.activation_bytes(images, labels) / micro_batch}
        add_ratios(variants)
        row = {"model": model_name, "resolution": resolution, "micro_batch": micro_batch,
               "variants": {name: variants[name] for name in VARIANTS}}
        rows.append(row)
        print_row(row)
    return rows


def add_ratios(variants):
    """Images/s and saved bytes as ratios to the baseline (null where either is missing)."""
    base = variants[BASELINE]
    for result in variants.values():
        for key, ratio in (("images_per_second", "speed_ratio"),
                           ("activation_bytes_per_image", "bytes_ratio")):
            ok = result[key] is not None and base[key]
            result[ratio] = result[key] / base[key] if ok else None


def print_row(row):
    for name, r in row["variants"].items():
        if r["ms"] is None:
            print(f"{row['model']:16} mb {row['micro_batch']:3} {name:16} null: {r['error']}")
        else:
            speed = f"{r['speed_ratio']:.2f}x" if r["speed_ratio"] is not None else "-"
            print(f"{row['model']:16} mb {row['micro_batch']:3} {name:16} "
                  f"{r['images_per_second']:8.2f} img/s ({speed:>6}) "
                  f"{r['activation_bytes_per_image'] / 2**20:8.2f} MiB/img", flush=True)


def ratio_cell(value):
    return "null" if value is None else f"{value:.2f}x"


def table(report):
    rows, env = report["results"], report["environment"]
    micro_batches = env["micro_batches"]
    header = (["model", "variant"] + [f"images/s, mb {mb}" for mb in micro_batches]
              + ["saved bytes/image, max"])
    lines, base_notes = [], []
    for model_name in env["models"]:
        by_mb = {r["micro_batch"]: r for r in rows if r["model"] == model_name}
        for name in VARIANTS:
            cells = [ratio_cell(by_mb[mb]["variants"][name]["speed_ratio"]) for mb in micro_batches]
            byte_ratios = [by_mb[mb]["variants"][name]["bytes_ratio"] for mb in micro_batches]
            byte_ratios = [r for r in byte_ratios if r is not None]
            lines.append([f"`{model_name}`", f"`{name}`", *cells,
                          ratio_cell(max(byte_ratios) if byte_ratios else None)])
        base = [by_mb[mb]["variants"][BASELINE] for mb in micro_batches]
        speeds = ", ".join("null" if b["images_per_second"] is None
                           else f"{b['images_per_second']:.1f}" for b in base)
        sizes = [b["activation_bytes_per_image"] for b in base
                 if b["activation_bytes_per_image"] is not None]
        size = f"{max(sizes) / 2**20:.1f} MiB" if sizes else "null"
        base_notes.append(f"`{model_name}` {speeds} images/s, up to {size} per image")
    precision = "float32" if env.get("dtype", "float32") == "float32" else \
        "bfloat16 autocast (float32 weights)"
    layout = ", channels_last" if env.get("channels_last") else ""
    note = (f"Training step (forward, cross-entropy, backward, SGD), {precision}{layout}, "
            f"{env['resolution']}x{env['resolution']} random images; ratios to `{BASELINE}` "
            f"at the same micro-batch (mb) in the same run ({'; '.join(base_notes)}). Saved "
            f"bytes: activations autograd keeps for backward, per image, parameters excluded. "
            f"{machine(env)}, torch {env['torch']}; fastest of {env['repeats']} "
            f"interleaved repeats. `python -m benchmarks.model` (`make bench`).")
    return markdown_table(header, lines) + "\n\n" + note


def machine(env):
    if env.get("device") == "cuda":
        return f"{env['cpu']} (CUDA, timed between synchronisations)"
    return f"{env['threads']} threads, {env['cpu']}, ATen CPU capability {env['cpu_capability']}"


def plot(report, path):
    """Per model: images/s and saved MiB/image against micro-batch, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["environment"]["models"]
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 7), squeeze=False)
    for column, model_name in enumerate(models):
        rows = [r for r in report["results"] if r["model"] == model_name]
        for i, name in enumerate(VARIANTS):
            for ax, key, scale in ((axes[0][column], "images_per_second", 1),
                                   (axes[1][column], "activation_bytes_per_image", 2**20)):
                points = [(r["micro_batch"], r["variants"][name][key] / scale) for r in rows
                          if r["variants"][name][key] is not None]
                if points:  # dashes keep a line under another (equal bytes) visible
                    ax.plot(*zip(*points), marker="o", label=name, linestyle=("-", "--")[i % 2])
        axes[0][column].set_title(f"{model_name}, {report['environment']['resolution']} px",
                                  fontsize=10)
        axes[0][column].set_ylabel("training images/s")
        axes[1][column].set_ylabel("saved activations, MiB/image")
        for ax in axes[:, column]:
            log2_x_axis(ax, report["environment"]["micro_batches"], "micro-batch")
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    write_png(fig, path)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "efficientnet_b0"],
                        choices=list_models(), metavar="MODEL")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--micro-batches", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    add_variant_flags(parser)
    parser.add_argument("--output", help="JSON path (default: "
                        "benchmarks/results/model[_cuda][_bfloat16][_channels_last].json)")
    parser.add_argument("--plot", help="PNG path (default: "
                        "docs/model_benchmark[_cuda][_bfloat16][_channels_last].png)")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite docs/fused_op.md")
    parser.add_argument("--readme", action="store_true",
                        help="rewrite docs/fused_op.md with a CUDA run's table")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.model: --device cuda, but no CUDA device is available")
    if device.type == "cpu" and not ops.cpu.load():
        raise SystemExit("benchmarks.model: the fused CPU op is not built; run `make custom_ops`")
    torch.set_num_threads(args.threads)
    results = []
    for model_name in args.models:
        results += measure_model(
            model_name, args.resolution, args.micro_batches, args.repeats, device,
            dtype=DTYPES[args.dtype],
            memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    report = {
        "environment": {"models": args.models, "resolution": args.resolution,
                        "micro_batches": args.micro_batches, "threads": args.threads,
                        "repeats": args.repeats, "device": args.device, "cpu": device_name(device),
                        "dtype": args.dtype, "channels_last": args.channels_last,
                        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                        "torch": torch.__version__},
        "results": results}
    suffix = variant_suffix(args)
    write_json(args.output or os.path.join(ROOT, "benchmarks", "results", f"model{suffix}.json"),
               report)
    plot(report, args.plot or os.path.join(ROOT, "docs", f"model_benchmark{suffix}.png"))
    print(table(report))
    if (not suffix and not args.no_readme) or args.readme:
        try:
            replace_section("model", table(report), DOCS_PAGE)
        except ValueError as error:
            raise SystemExit(f"benchmarks.model: docs/fused_op.md not updated: {error}")


def device_name(device):
    """The machine that ran the steps: the CPU's name, or the GPU's."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()

if __name__ == "__main__":
    main()
