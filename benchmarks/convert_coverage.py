"""Which of timm's CNNs convert_norms takes: a model or two of each family, converted with
random weights, each either checked or refused in one line.

    python -m benchmarks.convert_coverage [--models NAME ...] [--norm group_pn] [--no-readme]
        [--report-only]

A converted model is checked in float64 at its own input size: no BatchNorm module is
left, and in train mode (dropout off: drop_rate 0, nn.Dropout in eval) each sample's
output is that of the sample alone, to 1e-9 of the outputs' largest magnitude (float64
leaves rounding far below it; a norm over the batch moves it by far more). A refusal is
convert_norms' ConversionError; anything else that goes wrong is a failure and shown as
such. Nothing is downloaded (pretrained=False). Writes
benchmarks/results/convert_coverage.json and the table between the `convert_coverage`
markers of docs/library.md; --report-only rewrites the table from the JSON.
"""
import argparse
import json
import os

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from benchmarks.measure import write_json
from benchmarks.readme import ROOT, markdown_table, replace_section
from proxynorm.convert import ConversionError, convert_norms

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       "convert_coverage.json")
DOCS_PAGE = os.path.join(ROOT, "docs", "library.md")
TOLERANCE = 1e-9
# a model or two per timm family with BatchNorms, small variants (the result is the
# family's code, not its size); nasnet/pnasnet (331 px) left out for time
MODELS = (
    "resnet10t", "resnet50", "resnet26d", "resnetblur18", "resnetaa50", "seresnext26d_32x4d",
    "ecaresnet26t", "legacy_seresnet18", "skresnet18", "res2net50_26w_4s", "resnest14d",
    "resnetv2_50", "gcresnet33ts", "regnetx_002", "regnety_008", "regnetz_b16",
    "efficientnet_b0", "efficientnet_lite0", "tf_efficientnetv2_b0", "mobilenetv2_100",
    "mobilenetv3_large_100", "mobilenetv4_conv_small", "mnasnet_100", "fbnetc_100",
    "fbnetv3_b", "tinynet_a", "hardcorenas_a", "lcnet_050", "mixnet_s", "ghostnet_100",
    "ghostnetv2_100", "repghostnet_050", "rexnet_100", "dla34", "dpn68", "densenet121",
    "hrnet_w18_small", "vgg11_bn", "inception_v3", "inception_v4", "inception_resnet_v2",
    "xception41", "legacy_xception", "selecsls42b", "ese_vovnet19b_dw", "gernet_s",
    "repvgg_a0", "mobileone_s0", "cspresnet50", "cspdarknet53", "darknet53",
    "cs3darknet_s", "tresnet_m", "convmixer_768_32", "fastvit_t8", "efficientformer_l1",
    "coatnet_nano_rw_224", "maxvit_nano_rw_256", "halonet26t", "botnet26t_256",
    "lambda_resnet26t", "levit_128s", "mobilevit_xxs", "efficientvit_b0",
    "tiny_vit_5m_224", "repvit_m1", "hgnetv2_b0", "nf_resnet26", "nfnet_l0",
    "inception_next_tiny", "starnet_s1",
)


def create(name):
    """timm's `name` with random weights, drop_rate 0 where it takes one (check() puts the
    nn.Dropout modules left in eval mode)."""
    import timm

    try:
        return timm.create_model(name, pretrained=False, num_classes=10, drop_rate=0.0)
    except TypeError:  # a model without drop_rate
        return timm.create_model(name, pretrained=False, num_classes=10)


def check(name, norm="group_pn"):
    """One model's record: its family (timm's module), then the outcome: converted (with
    the report's counts, BatchNorms left and the batch dependence), refused (the reason)
    or failed (the error)."""
    model = create(name)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    record = {"model": name, "family": type(model).__module__.rpartition(".")[2],
              "input_size": list(size)}
    try:
        converted, report = convert_norms(model, norm, report=True)
    except ConversionError as error:
        return {**record, "outcome": "refused", "reason": str(error)}
    record.update(report.counts(), forwards=len(report.forwards))
    try:
        converted = converted.double().train()
        for module in converted.modules():
            if isinstance(module, nn.Dropout):
                module.eval()
        x = torch.randn((3, *size), generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
        with torch.no_grad():
            together, alone = converted(x)[:1], converted(x[:1])
        dependence = ((together - alone).abs().max() / together.abs().max()).item()
    except Exception as error:  # reported, not raised: the table shows it
        return {**record, "outcome": "failed", "reason": f"{type(error).__name__}: {error}"}
    left = sum(isinstance(m, _BatchNorm) for m in converted.modules())
    ok = left == 0 and dependence < TOLERANCE
    return {**record, "outcome": "converted" if ok else "failed", "batch_norms_left": left,
            "batch_dependence": dependence}


def describe(record):
    if record["outcome"] == "refused":  # the page says strict=False once
        return f"refused: {record['reason'].split('; pass strict=False')[0]}"
    if record["outcome"] == "failed" and "batch_dependence" not in record:
        return f"**failed**: {record['reason']}"
    counts = (f"{record['norm_act']} norm-act, {record['norm_only']} norm-only"
              + (f", {record['forwards']} forwards regenerated" if record["forwards"] else ""))
    if record["outcome"] == "failed":
        return (f"**failed**: {counts}; {record['batch_norms_left']} BatchNorms left, batch "
                f"dependence {record['batch_dependence']:.1e}")
    if not record["norm_act"] and not record["norm_only"]:
        return "nothing to convert (no BatchNorm module)"
    return f"converted: {counts}"


def table(records, norm):
    rows = [[f"`{r['model']}`", r["family"], describe(r)] for r in records]
    converted = sum(r["outcome"] == "converted" for r in records)
    refused = sum(r["outcome"] == "refused" for r in records)
    note = (f"{converted} of {len(records)} convert to `{norm}` and pass the checks, "
            f"{refused} are refused in one line, {len(records) - converted - refused} fail. "
            f"Converted: no BatchNorm left and, in train mode in float64 at the model's input "
            f"size, each sample's output that of the sample alone (to 1e-9 of the largest "
            f"output). `python -m benchmarks.convert_coverage`.")
    return markdown_table(["timm model", "family", "result"], rows) + "\n\n" + note


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), metavar="NAME",
                        help="timm model names (default: a model or two per family)")
    parser.add_argument("--norm", default="group_pn", help="the norm to convert to")
    parser.add_argument("--output", default=RESULTS, help="the JSON to write")
    parser.add_argument("--no-readme", action="store_true",
                        help="do not rewrite docs/library.md's table")
    parser.add_argument("--report-only", action="store_true",
                        help="check nothing: rewrite the table from --output's JSON")
    args = parser.parse_args(argv)
    if args.report_only:
        with open(args.output) as f:
            report = json.load(f)
        records, norm = report["models"], report["norm"]
    else:
        records, norm = [], args.norm
        for name in args.models:
            records.append(check(name, norm))
            print(f"{name}: {describe(records[-1])}", flush=True)
        write_json(args.output, {"torch": torch.__version__,
                                 "timm": __import__("timm").__version__, "norm": norm,
                                 "models": records}, significant=3)
    text = table(records, norm)
    print(text)
    if not args.no_readme:
        replace_section("convert_coverage", text, DOCS_PAGE)


if __name__ == "__main__":
    main()
