"""Memory plan table: what one IPU holds per pipeline stage, and the largest micro-batch.

    python -m benchmarks.plan [--no-readme]

Runs the planner (`python -m train.plan`) on two ImageNet recipes of configs.yml, each
with BatchNorm and GroupNorm + Proxy Norm: ResNet-50 (resnet50_batch: micro-batch 16,
precision 16.16, one stage) and EfficientNet-B0 G16 (efficientnet_b0_g16_layer_pn:
micro-batch 8, precision 16.32, two stages split at blocks.3; also with its own LayerNorm
+ Proxy Norm). Activations are measured in a CPU training step, so this takes a minute or
two. Writes benchmarks/results/plan.json and the table between the `plan` markers of
docs/memory.md.
"""
import argparse
import os

import torch

from benchmarks.measure import cpu_name, write_json
from benchmarks.readme import ROOT, markdown_table, replace_section
from train.build import resolve_config
from train.plan import MB, NOT_MODELLED, bytes_per_sample, plan

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "plan.json")
DOCS_PAGE = os.path.join(ROOT, "docs", "memory.md")
CASES = [  # model label, config, the options the table states (pinned), norms
    ("`resnet50`", "resnet50_batch", {"precision": "16.16", "pipeline_splits": []},
     ("batch", "group_pn")),
    ("`efficientnet_b0` G16", "efficientnet_b0_g16_layer_pn",
     {"precision": "16.32", "pipeline_splits": ["blocks.3"]}, ("batch", "group_pn", "layer_pn")),
]


def per_stage(values):
    return " / ".join(f"{value / MB:,.1f}" for value in values)


def table(rows):
    header = ["model", "norm", "precision", "micro-batch", "stages",
              "weights + grads + optimiser MB", "activations (+ stash) MB per sample",
              "activations (+ stash) MB at the micro-batch", "total MB",
              "largest micro-batch"]
    lines = []
    for row in rows:
        report, fit = row["report"], row["report"]["norms"][row["norm"]]
        stages = report["stages"]
        splits = ", ".join(f"`{name}`" for name in report["pipeline_splits"])
        lines.append([
            row["model"],
            f"`{row['norm']}`", report["precision"], report["micro_batch_size"],
            f"{len(stages)}" + (f" (from {splits})" if splits else ""),
            per_stage(s["weight_bytes"] for s in fit["stages"]),
            per_stage(bytes_per_sample(s) for s in fit["stages"]),
            " / ".join(f"{s['activation_bytes'] / MB:,.1f}" + (
                f" + {s['stash_bytes'] / MB:,.1f}" if s["stash_size"] else "")
                for s in stages),
            per_stage(s["total_bytes"] for s in stages), fit["largest_micro_batch"]])
    budget = rows[0]["report"]["device_memory_mb"]
    note = (f"One IPU per stage, one replica; MB = 10^6 bytes; the budget is "
            f"device_memory_mb = {budget} MB (an IPU Mk2's In-Processor Memory); values per "
            f"pipeline stage are separated by /. Weights + grads + optimiser: parameters and "
            f"gradients in the weight dtype (16.16: 2 bytes, 16.32: 4), the gradient "
            f"accumulator (both configs accumulate) and the optimiser state (SGD's velocity; "
            f"RMSprop's mean square and momentum) in float32, as the IPU engine keeps them. "
            f"Activations: the storages autograd saved in one training step on the CPU in "
            f"bfloat16 (float16's 2 bytes), parameters excluded, at micro-batches 1 and 2 "
            f"(per sample) and at the config's. A pipelined stage also stashes its input for "
            f"2 x (stages after it) + 1 micro-batches, since PopTorch recomputes a pipeline "
            f"stage's activations in the backward pass (PopART's RecomputationType::Pipeline, "
            f"PopTorch's default); per sample includes it, and + N is the stash. Largest "
            f"micro-batch: where every stage's total still fits {budget} MB. Not modelled: "
            f"{NOT_MODELLED}. Configs `resnet50_batch` and `efficientnet_b0_g16_layer_pn` "
            f"with `--norm`; `python -m benchmarks.plan` (`make plan`).")
    return markdown_table(header, lines) + "\n\n" + note


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite docs/memory.md")
    args = parser.parse_args(argv)
    rows = []
    for label, config_name, options, norms in CASES:
        for norm in norms:
            config = resolve_config(config_name, {**options, "norm": norm})
            report = plan(config, norms=[norm])
            rows.append({"model": label, "config": config_name, "norm": norm, "report": report})
            fit = report["norms"][norm]
            print(f"{config_name:30} {norm:9} activations per sample "
                  f"{per_stage(bytes_per_sample(s) for s in fit['stages'])} MB, "
                  f"largest micro-batch {fit['largest_micro_batch']}", flush=True)
    write_json(RESULTS, {"torch": torch.__version__, "cpu": cpu_name(), "rows": rows})
    print(table(rows))
    if not args.no_readme:
        replace_section("plan", table(rows), DOCS_PAGE)


if __name__ == "__main__":
    main()
