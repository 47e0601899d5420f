"""Layer benchmark: forward+backward time and saved activation bytes of norm-act layers.

    python -m benchmarks.layer [--threads 2] [--repeats 20] [--no-readme]

Times BatchNorm+ReLU, GroupNorm+ReLU and GroupNorm + Proxy Norm + ReLU/SiLU run eagerly,
under torch.compile and through the fused op, at four activation shapes; every number is
also given as a ratio to BatchNorm+ReLU measured in the same run. Writes
benchmarks/results/layer.json and the table between the `layer` markers of docs/fused_op.md.
"""
import argparse
import math
import os
import time

import torch

import custom_ops
from benchmarks.measure import cpu_name, saved_bytes as saved_storage_bytes, write_json
from benchmarks.readme import ROOT, markdown_table, replace_section
from models.norms import get_norm_act

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
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "layer.json")
DOCS_PAGE = os.path.join(ROOT, "docs", "fused_op.md")


def build(norm, act, how, channels):
    options = {"fused": how == "fused"} if norm.endswith("_pn") else {}
    layer = get_norm_act(norm, channels, act=act, groups=GROUPS, **options).train()
    return torch.compile(layer) if how == "compiled" else layer


def step(layer, x, grad_out):
    out = layer(x)
    return torch.autograd.grad(out, [x, *layer.parameters()], grad_out)


def saved_bytes(layer, x):
    """Bytes of the distinct storages autograd keeps for backward (x counted once)."""
    split = saved_storage_bytes(lambda: layer(x), layer.parameters())
    return split["activations"] + split["parameters"]


def fastest_ms(layers, x, grad_out, repeats, warmup=3):
    """Fastest time of each layer's step, timed in interleaved rounds so that any
    background load falls on every layer alike. The fastest, not the median: other work
    on the machine only ever adds time, and on 2 shared cores it adds a lot."""
    for layer in layers.values():
        for _ in range(warmup):  # also compiles the torch.compile variant
            step(layer, x, grad_out)
    times = {name: [] for name in layers}
    for _ in range(repeats):
        for name, layer in layers.items():
            start = time.perf_counter()
            step(layer, x, grad_out)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * min(t) for name, t in times.items()}


def measure(repeats):
    results = []
    for shape in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(shape, requires_grad=True)
        grad_out = torch.randn(shape)
        layers = {name: build(norm, act, how, shape[1])
                  for name, (norm, act, how) in VARIANTS.items()}
        ms = fastest_ms(layers, x, grad_out, repeats)
        row = {"shape": list(shape), "variants": {}}
        for name, layer in layers.items():
            row["variants"][name] = {"ms": ms[name],
                                     "saved_bytes": saved_bytes(layer, x)}
            print(f"{str(shape):18} {name:24} {ms[name]:8.2f} ms "
                  f"{row['variants'][name]['saved_bytes'] / 2**20:7.1f} MiB", flush=True)
        base = row["variants"][BASELINE]
        for result in row["variants"].values():
            result["time_ratio"] = result["ms"] / base["ms"]
            result["bytes_ratio"] = result["saved_bytes"] / base["saved_bytes"]
        results.append(row)
    return results


def geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summarise(results):
    summary = {}
    for name in VARIANTS:
        summary[name] = {
            "time_ratio_geomean": geomean([r["variants"][name]["time_ratio"] for r in results]),
            "bytes_ratio_max": max(r["variants"][name]["bytes_ratio"] for r in results)}
    return summary


def table(report):
    header = ["layer (fwd+bwd, fp32)"] + ["x".join(map(str, r["shape"])) for r in report["results"]]
    header += ["time, geomean", "saved bytes, max"]
    rows = []
    for name in VARIANTS:
        cells = [f"{r['variants'][name]['time_ratio']:.2f}x" for r in report["results"]]
        s = report["summary"][name]
        rows.append([f"`{name}`", *cells, f"**{s['time_ratio_geomean']:.2f}x**",
                     f"{s['bytes_ratio_max']:.2f}x"])
    base_ms = ", ".join(f"{r['variants'][BASELINE]['ms']:.1f}" for r in report["results"])
    env = report["environment"]
    note = (f"Ratios to `{BASELINE}` in the same run (its times: {base_ms} ms). "
            f"{env['threads']} threads, {env['cpu']}, ATen CPU capability "
            f"{env['cpu_capability']}, torch {env['torch']}; fastest of {env['repeats']} "
            f"repeats. `python -m benchmarks.layer` (`make bench-layer`).")
    return markdown_table(header, rows) + "\n\n" + note


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite docs/fused_op.md")
    args = parser.parse_args(argv)
    if not custom_ops.cpu.load():
        raise SystemExit("benchmarks.layer: the fused CPU op is not built; run `make custom_ops`")
    torch.set_num_threads(args.threads)
    results = measure(args.repeats)
    report = {
        "environment": {"threads": args.threads, "repeats": args.repeats, "cpu": cpu_name(),
                        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                        "torch": torch.__version__},
        "results": results, "summary": summarise(results)}
    write_json(report, RESULTS)
    print(table(report))
    if not args.no_readme:
        replace_section("layer", table(report), DOCS_PAGE)


if __name__ == "__main__":
    main()
