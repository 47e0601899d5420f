"""Layer benchmark: forward+backward time, bandwidth and saved bytes of norm-act layers.

    python -m benchmarks.layer [--threads 2] [--repeats 20] [--device cpu|cuda]
        [--dtype float32|bfloat16] [--channels-last] [--no-readme] [--readme]

Times BatchNorm+ReLU/SiLU, GroupNorm+ReLU and GroupNorm + Proxy Norm + ReLU/SiLU run
eagerly, under torch.compile and through the fused op, at four activation shapes; every
time is also given as a ratio to BatchNorm+ReLU measured in the same run.

Bandwidth: any layer computing this function must at least read x and write out
(forward), then read x and grad_out and write grad_x (backward): MIN_TENSORS = 5 tensors
of x's size, per-channel vectors neglected. A variant's bytes/s is that minimum over its
step time, whatever it really moves, and its `copy_fraction` divides that by the bandwidth
of a copy of a tensor of x's size (the fastest `dst.copy_(src)`, its read and its write
counted, timed in the same interleaved rounds, so from the same cache level under the same
load). 1.0 would be a step as fast as 2.5 copies of x; extra passes over memory, saved
intermediates and arithmetic are what keep a variant below it.

Writes benchmarks/results/layer.json and the table between the `layer` markers of
docs/fused_op.md. With --device cuda each step is timed between torch.cuda.synchronize()
calls, a fused variant runs whatever ops.fused_op picks for a CUDA input (recorded
as unavailable where that is nothing, rather than timing the eager path twice), and the
results go to benchmarks/results/layer_cuda.json, the docs only with --readme.

`--dtype bfloat16` feeds the layers bfloat16 activations and gradients and runs each step
under bfloat16 autocast, as the training application's precision 16.32 does (the
parameters stay float32; autocast runs GroupNorm in float32, BatchNorm and the fused op
take the bfloat16 input as it is); `--channels-last` gives x and grad_out the channels_last
layout, as `--channels-last true` gives the application's layers. Either writes its own
JSON (layer_cuda_bfloat16_channels_last.json, say) and the docs only with --readme.
"""
import argparse
import math
import os
import time

import torch

from proxynorm import ops
from benchmarks.measure import (DTYPES, add_variant_flags, cpu_name,
                                saved_bytes as saved_storage_bytes, variant_suffix, write_json)
from benchmarks.readme import ROOT, markdown_table, replace_section
from proxynorm.norms import get_norm_act, norm_kind

SHAPES = [(8, 64, 56, 56), (8, 256, 28, 28), (32, 512, 7, 7), (2, 256, 56, 56)]
GROUPS = 32
BASELINE = "batch_relu"
VARIANTS = {  # name: (norm, act, how it runs)
    "batch_relu": ("batch", "relu", "eager"),
    "batch_silu": ("batch", "silu", "eager"),
    "group_relu": ("group", "relu", "eager"),
    "group_pn_relu_eager": ("group_pn", "relu", "eager"),
    "group_pn_relu_compiled": ("group_pn", "relu", "compiled"),
    "group_pn_relu_fused": ("group_pn", "relu", "fused"),
    "group_pn_silu_eager": ("group_pn", "silu", "eager"),
    "group_pn_silu_fused": ("group_pn", "silu", "fused"),
}
MIN_TENSORS = 5  # x, out (forward); x, grad_out, grad_x (backward)
COPY = "copy"  # the memory-copy step timed beside the variants
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DOCS_PAGE = os.path.join(ROOT, "docs", "fused_op.md")


def build(norm, act, how, channels, device):
    options = {"fused": how == "fused"} if norm_kind(norm).proxy else {}
    layer = get_norm_act(norm, channels, act=act, groups=GROUPS, **options).train().to(device)
    return torch.compile(layer) if how == "compiled" else layer


def unavailable(how, x):
    """Why a variant cannot run on x, or None: a fused variant needs a fused op for x."""
    if how == "fused" and ops.fused_op(x) is None:
        return f"no fused op for {x.device.type} {x.dtype} input"
    return None


def forward(layer, x):
    """layer(x), under bfloat16 autocast for bfloat16 x (float32 x: autocast off)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.dtype == torch.bfloat16):
        return layer(x)


def step(layer, x, grad_out):
    out = forward(layer, x)
    return torch.autograd.grad(out, [x, *layer.parameters()], grad_out.to(out.dtype))


def saved_bytes(layer, x):
    """Bytes of the distinct storages autograd keeps for backward (x counted once)."""
    split = saved_storage_bytes(lambda: forward(layer, x), layer.parameters())
    return split["activations"] + split["parameters"]


def synchronize(device):
    """Waits for the GPU's queued work, so that a step's time is the work's, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fastest_ms(steps, repeats, device, warmup=3):
    """Fastest time of each step (name: callable), timed in interleaved rounds so that any
    background load falls on every step alike. The fastest, not the median: other work
    on the machine only ever adds time, and on 2 shared cores it adds a lot."""
    for run in steps.values():
        for _ in range(warmup):  # also compiles the torch.compile variant
            run()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, run in steps.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * min(t) for name, t in times.items()}


def measure(repeats, device, dtype=torch.float32, memory_format=torch.contiguous_format):
    results = []
    for shape in SHAPES:
        torch.manual_seed(0)

        def tensor():
            return torch.randn(shape, device=device).to(dtype=dtype, memory_format=memory_format)

        x = tensor().requires_grad_()
        grad_out = tensor()
        source, target = tensor(), torch.empty_like(x)
        layers, missing = {}, {}
        for name, (norm, act, how) in VARIANTS.items():
            missing[name] = unavailable(how, x)
            if missing[name] is None:
                layers[name] = build(norm, act, how, shape[1], device)
        steps = {name: (lambda layer=layer: step(layer, x, grad_out))
                 for name, layer in layers.items()}
        steps[COPY] = lambda: target.copy_(source)
        ms = fastest_ms(steps, repeats, device)
        nbytes = x.numel() * x.element_size()
        copy_bytes_per_s = 2 * nbytes / (ms[COPY] / 1e3)  # its read and its write
        row = {"shape": list(shape), "copy_ms": ms[COPY],
               "copy_bytes_per_s": copy_bytes_per_s, "variants": {}}
        print(f"{str(shape):18} {COPY:24} {ms[COPY]:8.2f} ms "
              f"{copy_bytes_per_s / 1e9:7.1f} GB/s", flush=True)
        for name in VARIANTS:
            if name not in layers:
                row["variants"][name] = {"ms": None, "unavailable": missing[name]}
                print(f"{str(shape):18} {name:24} unavailable: {missing[name]}", flush=True)
                continue
            bytes_per_s = MIN_TENSORS * nbytes / (ms[name] / 1e3)
            result = row["variants"][name] = {
                "ms": ms[name], "saved_bytes": saved_bytes(layers[name], x),
                "bytes_per_s": bytes_per_s, "copy_fraction": bytes_per_s / copy_bytes_per_s}
            print(f"{str(shape):18} {name:24} {ms[name]:8.2f} ms "
                  f"{result['saved_bytes'] / 2**20:7.1f} MiB {bytes_per_s / 1e9:7.1f} GB/s "
                  f"({result['copy_fraction']:.2f} of copy)", flush=True)
        base = row["variants"][BASELINE]
        for result in row["variants"].values():
            if result["ms"] is not None:
                result["time_ratio"] = result["ms"] / base["ms"]
                result["bytes_ratio"] = result["saved_bytes"] / base["saved_bytes"]
        results.append(row)
    return results


def geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def summarise(results):
    summary = {}
    for name in VARIANTS:
        measured = [r["variants"][name] for r in results if r["variants"][name]["ms"] is not None]
        summary[name] = {
            "time_ratio_geomean": geomean([v["time_ratio"] for v in measured]),
            "copy_fraction_geomean": geomean([v["copy_fraction"] for v in measured]),
            "bytes_ratio_max": max((v["bytes_ratio"] for v in measured), default=None)}
    return summary


def machine(env):
    if env.get("device") == "cuda":
        return f"{env['cpu']} (CUDA, timed between synchronisations)"
    return (f"{env['threads']} threads, {env['cpu']}, ATen CPU capability "
            f"{env['cpu_capability']}")


def table(report):
    env = report["environment"]
    layout = ", channels_last" if env.get("channels_last") else ""
    dtype = {"float32": "fp32", "bfloat16": "bf16"}[env.get("dtype", "float32")]
    header = [f"layer (fwd+bwd, {dtype}{layout})"] + [
        "x".join(map(str, r["shape"])) for r in report["results"]]
    header += ["time, geomean", "of copy bandwidth, geomean", "saved bytes, max"]
    rows = []
    for name in VARIANTS:
        cells = [f"{v['time_ratio']:.2f}x" if v["ms"] is not None else "n/a"
                 for v in (r["variants"][name] for r in report["results"])]
        s = report["summary"][name]
        if s["time_ratio_geomean"] is None:
            rows.append([f"`{name}`", *cells, "n/a", "n/a", "n/a"])
            continue
        rows.append([f"`{name}`", *cells, f"**{s['time_ratio_geomean']:.2f}x**",
                     f"{s['copy_fraction_geomean']:.2f}", f"{s['bytes_ratio_max']:.2f}x"])
    results = report["results"]
    base_ms = ", ".join(f"{r['variants'][BASELINE]['ms']:.1f}" for r in results)
    copy = ", ".join(f"{r['copy_bytes_per_s'] / 1e9:.0f}" for r in results)
    note = (f"Ratios to `{BASELINE}` in the same run (its times: {base_ms} ms). Of copy "
            f"bandwidth: the {MIN_TENSORS} tensors of x's size a step must move at least "
            f"(forward reads x and writes out, backward reads x and grad_out and writes "
            f"grad_x) per second of the step, over the bandwidth of a copy of x in the same "
            f"run ({copy} GB/s, read and write counted): 1.00 is a step as fast as 2.5 "
            f"copies of x. {machine(env)}, torch {env['torch']}; fastest of "
            f"{env['repeats']} repeats. `python -m benchmarks.layer` (`make bench-layer`).")
    return markdown_table(header, rows) + "\n\n" + note


def device_name(device):
    """The machine that ran the steps: the CPU's name, or the GPU's."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    add_variant_flags(parser)
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite docs/fused_op.md")
    parser.add_argument("--readme", action="store_true",
                        help="rewrite docs/fused_op.md with a CUDA run's table")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.layer: --device cuda, but no CUDA device is available")
    if device.type == "cpu" and not ops.cpu.load():
        raise SystemExit("benchmarks.layer: the fused CPU op is not built; run `make custom_ops`")
    torch.set_num_threads(args.threads)
    results = measure(args.repeats, device, DTYPES[args.dtype],
                      torch.channels_last if args.channels_last else torch.contiguous_format)
    report = {
        "environment": {"threads": args.threads, "repeats": args.repeats,
                        "device": args.device, "cpu": device_name(device),
                        "dtype": args.dtype, "channels_last": args.channels_last,
                        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                        "torch": torch.__version__},
        "results": results, "summary": summarise(results)}
    suffix = variant_suffix(args)
    write_json(os.path.join(RESULTS_DIR, f"layer{suffix}.json"), report)
    print(table(report))
    if (not suffix and not args.no_readme) or args.readme:
        replace_section("layer", table(report), DOCS_PAGE)


if __name__ == "__main__":
    main()
