"""Power decomposition of pre-activations against depth (Labatie et al. 2021, Figure 2).

    python -m analysis.power [--inputs digits|gaussian] [--width 64] [--depth 50] [--norms ...]
    python -m analysis.power --checkpoint PATH [--images 256]

The measured tensor is the pre-activation y = gamma * Norm(x) + beta: the input of the
activation, for every norm, Proxy Norm included. That is the paper's y^l, whose failure
modes (channel-wise collapse with LayerNorm, too little variability of instance statistics
with InstanceNorm) Proxy Norm is there to prevent: Proxy Norm normalises the
post-activation phi(y), so its effect shows in the next layers' y. Norm layers without an
activation (the last norm of a residual branch) have no pre-activation and are skipped.

For y of shape (N inputs, C channels, positions), with population moments throughout:
instance mean mu_nc and variance s2_nc over the positions of one input and channel, and
  channel_squared_mean       mean_c (mean_n mu_nc)^2        channel-wise collapse
  instance_mean_variance     mean_c var_n mu_nc
  mean_instance_variance     mean_c mean_n s2_nc
  instance_std_variance      mean_c var_n sqrt(s2_nc)       variability of instance stds
  instance_std_squared_mean  mean_c (mean_n sqrt(s2_nc))^2
Exactly (the law of total variance, twice):
  power = mean(y^2) = channel_squared_mean + instance_mean_variance + mean_instance_variance
  mean_instance_variance = instance_std_variance + instance_std_squared_mean
Each is also reported as a share of the power.

Runs on the paper's random network (Definition 1: `depth` times a 3x3 convolution with
circular padding and a constant `width`, then norm-act with ReLU, gamma ~ N(1, 0.2^2),
beta ~ N(0, 0.2^2); the Proxy Norm parameters keep their zero initialisation; BatchNorm
takes its statistics over all the inputs, in one batch) or on a checkpoint's model in eval
mode over its validation images. Writes analysis/results/power_LABEL.json and
docs/power_LABEL.png (one panel per share, one curve per norm).
"""
import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from analysis import checkpoint
from benchmarks.measure import write_json, write_png
from proxynorm.norms import get_norm_act

NORMS = ("batch", "instance", "layer", "group", "layer_pn", "group_pn")
TERMS = ("channel_squared_mean", "instance_mean_variance", "mean_instance_variance",
         "instance_std_variance", "instance_std_squared_mean")
PLOTTED = TERMS[:4]  # the last is the mean instance variance minus the std variance
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "analysis", "results")
DOCS = os.path.join(ROOT, "docs")


def instance_moments(y):
    """Instance means and variances (N, C) over the positions, the sum of y^2 and its count,
    in float64 so that the terms add up to the power to rounding."""
    y = y.detach().double().flatten(2)
    mean = y.mean(2)
    var = (y - mean[..., None]).square().mean(2)
    return mean, var, y.square().sum().item(), y.numel()


def power_terms(mean, var, power):
    """The decomposition (see the module docstring) from instance means and variances
    (N, C) and the power mean(y^2), with each term's share of the power."""
    std = var.sqrt()
    terms = {
        "channel_squared_mean": mean.mean(0).square().mean(),
        "instance_mean_variance": mean.var(0, unbiased=False).mean(),
        "mean_instance_variance": var.mean(),
        "instance_std_variance": std.var(0, unbiased=False).mean(),
        "instance_std_squared_mean": std.mean(0).square().mean(),
    }
    terms = {name: value.item() for name, value in terms.items()}
    shares = {name: value / power if power > 0 else None for name, value in terms.items()}
    return {"power": power, "terms": terms, "shares": shares}


def decompose(y):
    """The power decomposition of one tensor y of shape (N, C, *spatial)."""
    mean, var, sum_squares, count = instance_moments(y)
    return power_terms(mean, var, sum_squares / count)


def pre_activation_layers(model):
    """(name, module) of the norm-act layers that an activation follows, in model order."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, (_BatchNorm, nn.GroupNorm))
            and not isinstance(getattr(module, "act", nn.Identity()), nn.Identity)]


def decompose_model(model, images, batch_size=None):
    """Power decomposition of every pre-activation of `model` over `images`.

    The model runs in its current mode (train mode: BatchNorm statistics over each batch of
    `batch_size` images; None = all at once). Returns one dict per layer: name, depth (1 =
    first) and the decomposition.
    """
    layers = pre_activation_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no norm layer followed by an activation")
    moments = {name: [] for name, _ in layers}

    def record(name, y):
        moments[name].append(instance_moments(y))

    handles = []
    for name, module in layers:
        if isinstance(module, nn.GroupNorm):
            # the fused Proxy Norm op never materialises y: recompute it from the input,
            # as the layer does (GroupNorm, then its affine)
            handles.append(module.register_forward_hook(
                lambda m, inputs, out, name=name: record(name, F.group_norm(
                    inputs[0], m.num_groups, m.weight, m.bias, m.eps))))
        else:  # BatchNormAct: the input of its activation, with whichever statistics it used
            handles.append(module.act.register_forward_pre_hook(
                lambda m, inputs, name=name: record(name, inputs[0])))
    try:
        with torch.no_grad():
            for batch in images.split(batch_size or len(images)):
                model(batch)
    finally:
        for handle in handles:
            handle.remove()
    results = []
    for depth, (name, _) in enumerate(layers, 1):
        means, variances, sums, counts = zip(*moments[name])
        decomposition = power_terms(torch.cat(means), torch.cat(variances), sum(sums) / sum(counts))
        results.append({"layer": name, "depth": depth, **decomposition})
    return results


class RandomNet(nn.Module):
    """The paper's random network: `depth` x (3x3 conv with circular padding -> norm-act)."""

    def __init__(self, norm, in_channels, width, depth, groups, act="relu"):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else width, width, 3, padding=1,
                      padding_mode="circular", bias=False) for i in range(depth))
        self.norms = nn.ModuleList(get_norm_act(norm, width, act=act, groups=groups)
                                   for _ in range(depth))

    def randomise(self, seed):
        """He-normal convolutions, gamma ~ N(1, 0.2^2), beta ~ N(0, 0.2^2). Every norm draws
        the same numbers for the same seed, so the networks differ only by their norm."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for conv, norm in zip(self.convs, self.norms):
                fan_in = conv.weight[0].numel()
                conv.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
                norm.weight.normal_(1.0, 0.2, generator=generator)
                norm.bias.normal_(0.0, 0.2, generator=generator)
        return self

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = norm(conv(x))
        return x


def random_inputs(kind, count, size, seed):
    """`count` inputs of size x size: standard Gaussian noise with 3 channels, or
    scikit-learn's real 8x8 digits (the first `count`; every class appears in the first
    ten) upsampled bilinearly, 1 channel, standardised over the whole set."""
    if kind == "gaussian":
        return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))
    from sklearn.datasets import load_digits

    digits = torch.tensor(load_digits().images[:count], dtype=torch.float32)[:, None]
    images = F.interpolate(digits, size=(size, size), mode="bilinear", align_corners=False)
    return (images - images.mean()) / images.std()


def plot(curves, path, title, xlabel):
    """One panel per share, one curve per label; curves: {label: decompose_model result}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4 * len(PLOTTED), 3.4))
    for ax, term in zip(axes, PLOTTED):
        for i, (label, layers) in enumerate(curves.items()):
            # batch and instance norm share their channel means (beta) exactly: the dashes
            # keep a curve under another visible
            ax.plot([r["depth"] for r in layers], [r["shares"][term] for r in layers],
                    label=label, linestyle=("-", "--")[i % 2])
        ax.set_title(term.replace("_", " "), fontsize=10)
        ax.set_xlabel(xlabel)
        if term.startswith("instance_"):
            # shares of 1e-4 to 1e-1 tell the norms apart; symlog still draws 0 as 0
            ax.set_yscale("symlog", linthresh=1e-4)
            ax.set_ylim(0, 1)
        else:
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.set_ylabel("share of the power")
    axes[0].legend(fontsize=8, loc="center right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_png(fig, path)
    plt.close(fig)


def summary_lines(curves):
    """Shares at a few depths, for the terminal."""
    depths = sorted({r["depth"] for layers in curves.values() for r in layers})
    picks = sorted({depths[0], depths[len(depths) // 4], depths[len(depths) // 2], depths[-1]})
    lines = [f"{'':10} {'depth':>5}  " + "  ".join(f"{t[:22]:>22}" for t in PLOTTED)]
    for label, layers in curves.items():
        for r in layers:
            if r["depth"] in picks:
                cells = [f"{r['shares'][t]:22.4f}" if r["shares"][t] is not None else f"{'-':>22}"
                         for t in PLOTTED]
                lines.append(f"{label:10} {r['depth']:5d}  " + "  ".join(cells))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="a training checkpoint: its model over its "
                        "validation images, instead of the random network")
    parser.add_argument("--norms", nargs="+", default=list(NORMS), choices=NORMS,
                        help="random network: the norms to compare")
    parser.add_argument("--inputs", default="digits", choices=("digits", "gaussian"),
                        help="random network: its inputs")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--groups", type=int, default=8, help="GroupNorm groups for group, "
                        "group_pn (8 = 8 channels per group at width 64)")
    parser.add_argument("--size", type=int, default=16, help="random network: input side")
    parser.add_argument("--images", type=int, default=None,
                        help="number of inputs (default: 64 random, 256 checkpoint)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="output JSON (default analysis/results/power_LABEL.json)")
    parser.add_argument("--figure", help="output PNG (default docs/power_LABEL.png)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.checkpoint:
        try:
            model, config = checkpoint.load(args.checkpoint)
            images = checkpoint.validation_images(config, args.images or 256)
        except checkpoint.CheckpointError as error:
            raise SystemExit(f"analysis.power: {error}")
        label = f"{config['model']}_{config['norm']}"
        curves = {config["norm"]: decompose_model(model, images, batch_size=64)}
        setting = {"checkpoint": args.checkpoint, "config": config, "images": len(images)}
        title = f"{args.checkpoint}: {label}, eval mode, {len(images)} validation images"
        xlabel = "norm layer followed by an activation"
    else:
        images = random_inputs(args.inputs, args.images or 64, args.size, args.seed)
        label = f"random_{args.inputs}"
        curves = {}
        for norm in args.norms:
            net = RandomNet(norm, images.shape[1], args.width, args.depth, args.groups)
            curves[norm] = decompose_model(net.randomise(args.seed).train(), images)
            print(f"{norm}: done", flush=True)
        setting = {"network": "random", "inputs": args.inputs, "images": len(images),
                   "size": args.size, "width": args.width, "depth": args.depth,
                   "groups": args.groups, "seed": args.seed}
        title = (f"random network, width {args.width}, {len(images)} {args.inputs} inputs "
                 f"{args.size}x{args.size}, groups {args.groups}")
        xlabel = "depth"
    json_path = args.json or os.path.join(RESULTS, f"power_{label}.json")
    figure_path = args.figure or os.path.join(DOCS, f"power_{label}.png")
    write_json(json_path, {"setting": setting, "norms": curves}, significant=5)
    plot(curves, figure_path, title, xlabel)
    print("\n".join(summary_lines(curves)))
    print(f"wrote {os.path.relpath(json_path)} and {os.path.relpath(figure_path)}")


if __name__ == "__main__":
    main()
