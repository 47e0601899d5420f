"""timm's models with any normalisation: `get_model("timm:NAME")`.

The model is timm's own (`timm.create_model(NAME, pretrained=False, num_classes=...,
in_chans=...)`: nothing is downloaded), which models.get_model rewrites with
`convert_norms`: BatchNorm + activation and timm's BatchNormAct2d become our norm-act
modules (proxynorm/convert.py). It keeps timm's activations, widths and defaults: our
family options (group_dim, expand_ratio, drop_rate, drop_path_rate, ...) and `act` are
refused, not ignored, as for torchvision:NAME (models/torchvision_models.py). timm is an
optional dependency (the `timm` extra; `make install` puts it in .venv), imported only
here, on first use.
"""
import difflib

PREFIX = "timm:"
LABEL = "timm"


def _timm():
    try:
        import timm
    except ImportError:
        raise ValueError(f"{PREFIX}NAME models need timm, which is not installed (pip install "
                         f"timm, or this package's extra: pip install '.[timm]')") from None
    return timm


def names():
    """timm's model names (its architectures; NAME may also carry a pretrained tag, e.g.
    resnet50.a1_in1k, which only picks the default config: nothing is downloaded)."""
    return _timm().list_models()


def check_name(name):
    """ValueError for a NAME that timm does not know: one line with the close names."""
    timm = _timm()
    if not timm.is_model(name):
        close = difflib.get_close_matches(str(name), names(), n=5, cutoff=0.6)
        hint = f"close names: {', '.join(close)}" if close else "no close name"
        raise ValueError(f"unknown timm model '{name}' ({hint}; all: timm.list_models())")


def create(name, num_classes, in_channels=3):
    """timm's model `name` with random weights, its BatchNorms as timm builds them; timm
    itself adapts the stem to in_channels."""
    return _timm().create_model(name, pretrained=False, num_classes=num_classes,
                                in_chans=in_channels)
