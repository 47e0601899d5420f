"""Model table: parameters and multiply-accumulates of every model family and norm.

    python -m benchmarks.models [--no-readme]

Builds each model on the meta device (no memory, no compute) at its native resolution and
counts with torch.utils.flop_counter.FlopCounterMode, which counts the FLOPs of
convolutions and matrix products (2 per multiply-accumulate) and nothing else: norms,
activations, Proxy Norm, pooling and additions are not counted, so MACs do not depend on
the norm. Reported in GMACs, the number papers call "FLOPs" (ResNet-50: 4.1). Writes
benchmarks/results/models.json and the table between the `models` markers of docs/models.md.
"""
import argparse
import os

import torch

from benchmarks.measure import write_json
from benchmarks.readme import ROOT, markdown_table, replace_section
from models import get_model

NORMS = ("batch", "group", "group_pn", "layer_pn")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "models.json")
DOCS_PAGE = os.path.join(ROOT, "docs", "models.md")
G16 = {"group_dim": 16, "expand_ratio": 4}  # Masters et al. 2021's G16 recipe


def variants():
    """(model, variant label, get_model options, input resolution)."""
    for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                 "resnet50v2", "resnet101v2", "resnext50v2_32x4d"):
        yield name, "", {}, 224
    for name in ("cifar_resnet20", "cifar_resnet56", "cifar_preact_resnet20",
                 "cifar_preact_resnet56", "cifar_preact_resnet110"):
        yield name, "", {"num_classes": 10}, 32
    for name in ("digits_resnet", "digits_preact_resnet"):
        yield name, "", {"num_classes": 10, "in_channels": 1}, 32
    for i, resolution in enumerate((224, 240, 260, 300, 380, 456)):
        name = f"efficientnet_b{i}"
        yield name, "G1", {"group_dim": 1}, resolution
        yield name, "G16 (expand 4)", G16, resolution


def measure(name, norm, options, resolution):
    # torch >= 2.1: imported where it counts, so that the module (its DOCS_PAGE, RESULTS)
    # still imports on torch 2.0, PopTorch's, which has no FLOP counter
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = get_model(name, norm=norm, **options).eval()
        x = torch.empty(1, options.get("in_channels", 3), resolution, resolution)
    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return params, counter.get_total_flops() // 2


def table(rows):
    header = ["model", "variant", "resolution", "GMACs"] + [f"params, `{n}`" for n in NORMS]
    lines = []
    for row in rows:
        macs = {r["macs"] for r in row["norms"].values()}
        gmacs = f"{macs.pop() / 1e9:.3f}" if len(macs) == 1 else "varies"
        lines.append([f"`{row['model']}`", row["variant"], row["resolution"], gmacs] +
                     [f"{row['norms'][n]['params']:,}" for n in NORMS])
    note = ("GMACs: multiply-accumulates of one image's forward pass, convolutions and the "
            "classifier only (what papers call FLOPs; FlopCounterMode's FLOPs / 2). "
            "ImageNet models have 1,000 classes, the CIFAR and digits models 10 (digits: 1 "
            "input channel). G16: group_dim=16, expand_ratio=4. `python -m benchmarks.models`.")
    return markdown_table(header, lines) + "\n\n" + note


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite docs/models.md")
    args = parser.parse_args(argv)
    rows = []
    for name, variant, options, resolution in variants():
        row = {"model": name, "variant": variant, "options": options, "resolution": resolution,
               "norms": {}}
        for norm in NORMS:
            params, macs = measure(name, norm, options, resolution)
            row["norms"][norm] = {"params": params, "macs": macs}
        print(f"{name:16} {variant:15} {resolution:4} {macs / 1e9:7.3f} GMACs "
              + " ".join(f"{n}={r['params']:,}" for n, r in row["norms"].items()), flush=True)
        rows.append(row)
    write_json(RESULTS, {"torch": torch.__version__, "macs": "FlopCounterMode FLOPs / 2",
                         "rows": rows})
    print(table(rows))
    if not args.no_readme:
        replace_section("models", table(rows), DOCS_PAGE)


if __name__ == "__main__":
    main()
