"""proxynorm: GroupNorm/LayerNorm + Proxy Norm for your own CNNs (Labatie et al., NeurIPS 2021).

    import proxynorm
    model = proxynorm.convert_norms(torchvision.models.resnet50(), norm="group_pn")
    layer = proxynorm.get_norm_act("group_pn", 64, act="relu", groups=32)

What is here: the norm-act layers and their factory (`get_norm_act`, `NORMS`), Proxy Norm's
maths written once (`proxy_norm_act`, `proxy_stats`, `proxy_quantiles`), `convert_norms`
for torchvision and timm CNNs, `norm_layer`/`norm_act_layer` for a model's own norm slot,
and the fused ops the layers pick by themselves
(`proxynorm.ops`: a CPU op built on first use, Triton kernels on CUDA, a PopART op on IPUs).
docs/library.md has the whole account. The training application of the same repository
imports this package as any user would; nothing else of it is installed.
"""
from proxynorm.activations import ACTS
from proxynorm.convert import ConversionError, ConversionReport, convert_norms
from proxynorm.factories import norm_act_layer, norm_layer
from proxynorm.norms import (BATCH_INDEPENDENT, DEFAULT_GROUPS, NORM_KINDS, NORMS, BatchNormAct,
                             GroupNormAct, GroupNormProxyAct, NormKind, SyncBatchNormAct,
                             get_norm_act, norm_kind)
from proxynorm.proxy import NUM_PROXY_SAMPLES, PROXY_EPS, proxy_norm_act, proxy_quantiles, proxy_stats

__version__ = "0.1.0"

__all__ = [
    "ACTS", "BATCH_INDEPENDENT", "DEFAULT_GROUPS", "NORM_KINDS", "NORMS", "NUM_PROXY_SAMPLES", "PROXY_EPS",
    "BatchNormAct", "ConversionError", "ConversionReport", "GroupNormAct", "GroupNormProxyAct",
    "NormKind", "norm_kind",
    "SyncBatchNormAct", "convert_norms", "get_norm_act", "norm_act_layer", "norm_layer",
    "proxy_norm_act", "proxy_quantiles", "proxy_stats",
]
