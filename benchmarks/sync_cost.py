"""Cost model past this machine: what sync BatchNorm would cost on IPU pods and GPU clusters.

    python -m benchmarks.sync_cost [--counts benchmarks/results/sync.json] [--no-readme]

Modelled, not measured. A training step of sync BatchNorm takes the compute of a step plus
every statistics all-reduce, which cannot overlap with compute: a layer's forward waits for
its group's moments, and its backward for their gradient. GroupNorm + Proxy Norm takes the
compute alone. DDP's gradient all-reduce is the same for both and overlaps with backward,
so it is left out of the comparison. What goes in:

- the statistics collectives of one step, measured: benchmarks/sync.py counts every
  all-reduce sync_batch issues per step, with its bytes, under torchrun
  (resnet50v2 for ResNet-50, efficientnet_b0);
- an all-reduce of n bytes over p replicas, with `domain` replicas per fast domain (IPU-Links
  within a Pod64, NVLink within a GPU node) and the rest reached over the slower scale-out
  links: a tree's latency plus a ring's bandwidth term at each level,
      T = 2 ceil(log2 p_in) a_in + 2 (p_in - 1)/p_in n/B_in
        + 2 ceil(log2 p_out) a_out + 2 (p_out - 1)/p_out n/B_out,
  p_in = min(p, domain), p_out = ceil(p / domain) (no second level when p_out = 1):
  a lower bound on what a real library achieves, so it flatters sync BatchNorm;
- compute per step = micro-batch / published training images/s per chip, measured by the
  vendors at large batches. Small micro-batches use a chip less well, so real compute per
  step is longer and the real overhead smaller than this model's.

Every link figure and throughput below names its source; `assumed` marks the latencies,
for which no vendor publishes a per-hop figure for these collectives.
"""
import argparse
import json
import math
import os
from dataclasses import dataclass, field

from benchmarks.measure import write_json
from benchmarks.readme import ROOT, markdown_table, replace_section
from benchmarks.sync import RESULTS as COUNTS

RESULTS = os.path.join(ROOT, "benchmarks", "results", "sync_cost.json")
DOCS_PAGE = os.path.join(ROOT, "docs", "scaling.md")
MODELS = {"ResNet-50": "resnet50v2", "EfficientNet-B0": "efficientnet_b0"}  # measured as
REPLICAS = (16, 64, 256, 1024)
MICRO_BATCHES = (1, 4, 16)
STATISTICS = ("sync_batch statistics, forward", "sync_batch statistics, backward")


@dataclass
class Fabric:
    name: str
    domain: int  # replicas per fast domain
    latency_in: float  # s per tree level, assumed
    bandwidth_in: float  # bytes/s per replica, one direction
    latency_out: float
    bandwidth_out: float
    images_per_second: dict  # per chip, by model
    bytes_scale: float = 1.0  # the fabric's statistics bytes against the measured ones
    sources: list = field(default_factory=list)


FABRICS = [
    Fabric(
        name="IPU pod (Bow IPUs: IPU-Links within a Pod64, GW-Links between Pods)",
        domain=64, latency_in=1e-6, bandwidth_in=64e9, latency_out=5e-6,
        bandwidth_out=200e9 / 8 / 4,
        images_per_second={"ResNet-50": 42029 / 16, "EfficientNet-B0": 42029 / 16},
        bytes_scale=0.5,
        sources=[
            "IPU-Link 512 Gbit/s (64 GB/s) within a Pod; GW-Links 2 x 100 Gbit/s per "
            "Bow-2000 (4 IPUs): 6.25 GB/s per IPU between Pods (Bow-2000 datasheet, "
            "docs.graphcore.ai/projects/bow-2000-datasheet)",
            "ResNet-50 v1.5 training 42,029 images/s on a Bow Pod16, i.e. 2,627 per IPU "
            "(graphcore.ai/performance-results); EfficientNet-B0: no published figure, "
            "assumed equal to ResNet-50 per image (on A100 the two are within 1%)",
            "the IPU path all-reduces float32 moments (proxynorm/ops/ipu/replica_all_reduce), "
            "half the measured float64 bytes",
            "assumed: 1 us per tree level within a Pod, 5 us between Pods",
        ]),
    Fabric(
        name="GPU cluster (DGX A100: NVLink within 8-GPU nodes, HDR InfiniBand between)",
        domain=8, latency_in=1e-6, bandwidth_in=300e9, latency_out=5e-6,
        bandwidth_out=200e9 / 8,
        images_per_second={"ResNet-50": 2470, "EfficientNet-B0": 2489},
        sources=[
            "NVLink 3: 600 GB/s bidirectional per A100 (300 GB/s each way); one 200 Gbit/s "
            "HDR InfiniBand adapter per GPU (25 GB/s)",
            "mixed-precision training on one A100 80GB: ResNet-50 v1.5 2,470 images/s, "
            "EfficientNet-B0 2,489 images/s (NVIDIA DeepLearningExamples, PyTorch ConvNets "
            "READMEs)",
            "assumed: 1 us per tree level within a node (NCCL's low-latency protocol costs "
            "about 1 us per hop: Hu et al., Demystifying NCCL, arXiv:2507.04786), 5 us "
            "between nodes",
        ]),
]


def all_reduce_seconds(size, replicas, fabric):
    """Modelled time of one all-reduce of `size` bytes over `replicas` replicas."""
    if replicas <= 1:
        return 0.0
    inner = min(replicas, fabric.domain)
    outer = math.ceil(replicas / fabric.domain)
    seconds = (2 * math.ceil(math.log2(inner)) * fabric.latency_in
               + 2 * (inner - 1) / inner * size / fabric.bandwidth_in)
    if outer > 1:
        seconds += (2 * math.ceil(math.log2(outer)) * fabric.latency_out
                    + 2 * (outer - 1) / outer * size / fabric.bandwidth_out)
    return seconds


def statistics_call_bytes(counts, model):
    """Bytes of each statistics all-reduce sync_batch issues in one step of `model`."""
    for launch in counts["results"]:
        if launch["model"] == model:
            collectives = launch["rows"][0]["norms"]["sync_batch"]["collectives"]
            return [size for source in STATISTICS for size in collectives[source]["call_bytes"]]
    raise SystemExit(f"benchmarks.sync_cost: {model} is not in the counts; run "
                     f"`python -m benchmarks.sync --models {model}` first")


def project(counts):
    """Per fabric, model, micro-batch and replica count: compute and sync time per step and
    GN+PN's images/s against sync BatchNorm's (same compute, no statistics collectives)."""
    rows = []
    for fabric in FABRICS:
        for label, model in MODELS.items():
            calls = statistics_call_bytes(counts, model)
            for micro_batch in MICRO_BATCHES:
                compute = micro_batch / fabric.images_per_second[label]
                for replicas in REPLICAS:
                    sync = sum(all_reduce_seconds(size * fabric.bytes_scale, replicas, fabric)
                               for size in calls)
                    rows.append({"fabric": fabric.name, "model": label, "measured_as": model,
                                 "micro_batch": micro_batch, "replicas": replicas,
                                 "collectives_per_step": len(calls),
                                 "compute_us": 1e6 * compute, "sync_us": 1e6 * sync,
                                 "speedup": (compute + sync) / compute})
    return rows


def table(report):
    header = ["fabric", "model", "micro-batch"] + [f"{p} replicas" for p in REPLICAS]
    lines = []
    for fabric in FABRICS:
        for label in MODELS:
            for micro_batch in MICRO_BATCHES:
                cells = {r["replicas"]: r for r in report["projection"]
                         if (r["fabric"], r["model"], r["micro_batch"])
                         == (fabric.name, label, micro_batch)}
                lines.append([fabric.name.split(" (")[0], label, micro_batch,
                              *(f"{cells[p]['speedup']:.2f}x ({cells[p]['sync_us']:.0f} us)"
                                for p in REPLICAS)])
    calls = {label: next(r["collectives_per_step"] for r in report["projection"]
                         if r["model"] == label) for label in MODELS}
    sources = "\n".join(f"- {f.name}: " + "; ".join(f.sources) + "." for f in FABRICS)
    note = (f"**Modelled, not measured**: GN+PN's training images/s over sync BatchNorm's with "
            f"statistics shared by all replicas, both with the same compute per step, and in "
            f"brackets the statistics all-reduces' time per step. Measured: the collectives per step "
            f"({', '.join(f'{label} {n}' for label, n in calls.items())} all-reduces, counted "
            f"by `benchmarks/sync.py`). The rest comes from published figures:\n\n{sources}\n\n"
            f"`python -m benchmarks.sync_cost` (`make bench-sync`).")
    return markdown_table(header, lines) + "\n\n" + note


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default=COUNTS, help="benchmarks.sync's JSON")
    parser.add_argument("--output", default=RESULTS, help="JSON path")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite docs/scaling.md")
    args = parser.parse_args(argv)
    try:
        with open(args.counts) as f:
            counts = json.load(f)
    except (OSError, ValueError) as error:
        raise SystemExit(f"benchmarks.sync_cost: cannot read {args.counts} ({error}); run "
                         f"`python -m benchmarks.sync` first")
    report = {"fabrics": [vars(f) for f in FABRICS], "projection": project(counts)}
    write_json(args.output, report, significant=5)
    print(table(report))
    if not args.no_readme:
        replace_section("sync_cost", table(report), DOCS_PAGE)


if __name__ == "__main__":
    main()
