"""Bring your own model: rewrite any CNN's BatchNorms into our norm-act modules.

`convert_norms(model, norm="group_pn")` is `nn.SyncBatchNorm.convert_sync_batchnorm` for
every name in `proxynorm.norms.NORMS`, and returns the user's model: its class, submodule
tree, indexing and state_dict keys stay, only modules are swapped. A plain module swap
cannot do all of it: Proxy Norm needs the activation inside the norm layer, and which
activation follows which BatchNorm is only visible in the graph (torchvision's ResNet
calls one `relu` module after bn1, after bn2 and after the residual add). So the model is
traced with torch.fx for the analysis only:

  BatchNorm whose only user is a supported activation  -> one norm-act module, and the
      activation leaves the forward: an activation module called there alone becomes
      nn.Identity; a shared one, a function or a tensor method is left out of the forward
      of the module that calls it (its own code traced by torch.fx, installed on that
      instance as `forward`; every other module keeps its class's forward)
  any other BatchNorm (before a residual add, in a projection shortcut, DenseNet's
      transition, MobileNet's linear bottleneck)       -> the no-activation variant
      (`apply_act=False`: for the Proxy Norm names the scale-only group/layer norm)
  timm's BatchNormAct2d (and its SyncBatchNormAct): BatchNorm -> drop -> act in one
      module, converted as a unit -> one norm-act module with the activation of its `act`
      and its `drop` module kept as the new module's `drop` (between the affine and the
      activation, as timm; after Proxy Norm for the Proxy Norm names, whose activation
      must follow the affine directly); an Identity `act` is a plain BatchNorm.

nn.Identity modules between a BatchNorm and its activation (timm's ResNet blocks put
their unused `drop_block` there) are looked through, and for the Proxy Norm names drop
layers too (timm's DropBlock2d, torch's Dropout): the activation joins the norm and the
drop layer stays where it is, after the Proxy Norm layer now (the other norms keep
BatchNorm -> drop -> activation as it was). Supported activations are
proxynorm.activations.ACTS (relu, silu, exact gelu, relu6, hardswish, leaky_relu at
torch's default slope 0.01, mish), as modules (torch's, and timm's own: Swish, GELU,
HardSwish, Mish and their memory-efficient variants), functions or tensor methods, in
place or not. Proxy Norm computes its statistics through the activation itself, so any
other activation is a new entry in that registry, not new maths here. timm is never
imported here: its classes are looked up in `sys.modules`, where a model that holds one
has put them.
"""
import contextlib
import copy
import inspect
import itertools
import sys
import types
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from proxynorm.activations import ACTS
from proxynorm.norms import DEFAULT_GROUPS, get_norm_act, norm_kind

# exact types only: a subclass may do more in its forward (ours splits replicas) and
# would silently lose it; timm's norm-act classes are known (_timm_norm_act)
CONVERTIBLE = (nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# timm's BatchNorm -> drop -> act modules, by (module, class name): looked up in
# sys.modules, so that timm stays optional and is never imported for a model without it
_TIMM_NORM_ACTS = (("timm.layers.norm_act", "BatchNormAct2d"),
                   ("timm.layers.norm_act", "SyncBatchNormAct"))
# timm's own activation modules (timm.layers.create_act picks torch's where torch has
# them; these remain for gelu, exportable/scriptable configs and direct use)
_TIMM_ACT_MODULES = ("timm.layers.activations", "timm.layers.activations_me")
_TIMM_DROPS = (("timm.layers.drop", "DropBlock2d"),)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_TIMM_ACTS = {"Swish": "silu", "SwishMe": "silu", "GELU": "gelu", "HardSwish": "hardswish",
              "HardSwishMe": "hardswish", "Mish": "mish", "MishMe": "mish"}

_ACT_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu", nn.GELU: "gelu", nn.ReLU6: "relu6",
                nn.Hardswish: "hardswish", nn.LeakyReLU: "leaky_relu", nn.Mish: "mish"}
_ACT_FUNCTIONS = {F.relu: "relu", F.relu_: "relu", torch.relu: "relu", torch.relu_: "relu",
                  F.silu: "silu", F.gelu: "gelu", F.relu6: "relu6", F.hardswish: "hardswish",
                  F.leaky_relu: "leaky_relu", F.leaky_relu_: "leaky_relu", F.mish: "mish"}
# the registry's leaky_relu is torch's default; another slope is another activation
_LEAKY_SLOPE = nn.LeakyReLU().negative_slope
_ACT_METHODS = {"relu": "relu", "relu_": "relu"}
# activations that exist but that the registry lacks: an error for Proxy Norm, which must
# hold the activation, rather than a silent scale-only norm in front of them
_OTHER_ACT_FUNCTIONS = {
    F.elu, F.elu_, F.selu, F.celu, F.hardtanh, F.hardtanh_,
    F.hardsigmoid, F.sigmoid, F.tanh, F.softplus, F.prelu, F.rrelu, F.logsigmoid,
    F.softsign, F.tanhshrink, F.threshold, torch.sigmoid, torch.tanh, torch.sigmoid_,
    torch.tanh_}
_OTHER_ACT_METHODS = {"sigmoid", "sigmoid_", "tanh", "tanh_"}
_NOT_ACTIVATIONS = (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.GLU,
                    nn.MultiheadAttention)


class ConversionError(ValueError):
    """A part of the model that convert_norms cannot convert; the message names it."""


@dataclass
class ConversionReport:
    """What convert_norms did, by BatchNorm module name (names as in the original model).

    norm_act:     {name: activation}: BatchNorm + following activation, or a timm
                  BatchNormAct2d with an activation -> one norm-act module (the activation's
                  registry name; for a BatchNormAct2d's activation outside the registry,
                  kept as it is by the norms without Proxy Norm, its class name)
    norm_only:    [name]: no activation follows -> the no-activation variant
    left:         {name: reason}: left as they were (strict=False only)
    forwards:     [name]: modules whose own forward was regenerated without the
                  activations their norm-act modules now apply (shared activation
                  modules, F.relu, x.relu(); see convert_norms)
    groups:       {name: (channels, groups)} where the default group count is below
                  DEFAULT_GROUPS (see default_groups; groups=None only)
    dropped_bias: [name]: a nonzero BatchNorm shift with no place in the scale-only
                  norm of the Proxy Norm names (the network starts from a different function)
    """
    norm: str
    norm_act: dict = field(default_factory=dict)
    norm_only: list = field(default_factory=list)
    left: dict = field(default_factory=dict)
    forwards: list = field(default_factory=list)
    groups: dict = field(default_factory=dict)
    dropped_bias: list = field(default_factory=list)

    def counts(self):
        return {"norm_act": len(self.norm_act), "norm_only": len(self.norm_only),
                "left": len(self.left)}

    def __str__(self):
        acts = {}
        for act in self.norm_act.values():
            acts[act] = acts.get(act, 0) + 1
        by_act = ", ".join(f"{act} {n}" for act, n in acts.items())
        lines = [f"convert_norms to {self.norm}: {len(self.norm_act)} BatchNorm+activation "
                 f"pairs -> norm-act modules{f' ({by_act})' if by_act else ''}; "
                 f"{len(self.norm_only)} BatchNorms without activation -> norms without "
                 f"activation; {len(self.left)} left as they were"]
        lines += [f"  left: {name}: {reason}" for name, reason in self.left.items()]
        if self.groups:
            lines.append(f"  groups below {DEFAULT_GROUPS}, to divide the channels with 2 or "
                         f"more per group: " + ", ".join(f"{name} {c}->{g}" for name, (c, g)
                                                         in self.groups.items()))
        if self.dropped_bias:
            lines.append("  nonzero BatchNorm shift dropped (scale-only norm): "
                         + ", ".join(self.dropped_bias))
        return "\n".join(lines)


def default_groups(channels, limit=DEFAULT_GROUPS):
    """The largest divisor of `channels` not above `limit` that leaves at least 2 channels
    per group (GroupNorm's statistics then never reduce to one channel's, InstanceNorm)."""
    for groups in range(min(limit, max(1, channels // 2)), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def layer_groups(groups, channels):
    """The GroupNorm groups of a layer of `channels` for a `groups` argument as convert_norms
    and the factories take it: None (default_groups), an int, or a callable channels -> groups."""
    if groups is None:
        return default_groups(channels)
    return groups(channels) if callable(groups) else groups


def convert_norms(model: nn.Module, norm: str = "group_pn",
                  groups: Union[int, Callable[[int], int], None] = None,
                  eps: Optional[float] = None, strict: bool = True, report: bool = False,
                  norm_kwargs: Optional[dict] = None
                  ) -> Union[nn.Module, Tuple[nn.Module, "ConversionReport"]]:
    """A copy of `model` whose BatchNorms are `norm` layers from get_norm_act.

        model, report = convert_norms(torchvision.models.resnet50(), "group_pn", report=True)
        model.fc = nn.Linear(2048, 10)        # still a ResNet: same class, modules, names

    model: any nn.Module that torch.fx can trace around its BatchNorms (torchvision's
    and timm's classification CNNs can). It is not modified: the result is a deep copy of
    the same class with the same submodule tree (`model.layer1[0].conv1` indexes as
    before), in which each BatchNorm is replaced by the new norm under the same name, so the
    state_dict keys are the original's (Proxy Norm adds `proxy_weight`/`proxy_bias`
    beside a BatchNorm's `weight`/`bias`; the running statistics go). An activation that
    a norm-act module now applies is gone from the forward: a module called there alone
    becomes nn.Identity; otherwise (a shared module, F.relu, x.relu()) the calling
    module's forward is regenerated without that call and set on the instance (see
    `ConversionReport.forwards`). Load pretrained weights before converting:
    BatchNorm's weight and bias become the new norm's affine (the Proxy Norm names'
    scale-only norm keeps the weight only), its running statistics and momentum go to
    `batch`/`sync_batch`; nothing else changes. Activations that no BatchNorm feeds (after
    a residual add) stay. timm's BatchNormAct2d becomes one norm-act module with its
    activation and keeps its `act` and `drop` children (see the module docstring).

    norm: a name from proxynorm.NORMS. groups: GroupNorm groups for `group`/`group_pn`:
    None picks, per layer, the largest divisor of its channels not above DEFAULT_GROUPS
    (32) that leaves 2 channels per group (the report lists layers that got fewer than
    32); an int (it must divide every layer's channels) or a callable channels -> groups.
    eps: None keeps each BatchNorm's eps. norm_kwargs: further get_norm_act options
    (e.g. {"fused": False}, {"stats_chunks": 4}).

    What it cannot convert raises one ConversionError (a ValueError) naming the module:
    a forward that torch.fx cannot trace or that traces differently in train and eval
    mode beyond a `training` argument that follows it (`F.dropout(x, training=
    self.training)`, which a regenerated forward keeps following) (a module without
    BatchNorms is then kept whole instead, which is always safe);
    an activation after a BatchNorm, or in a timm BatchNormAct2d, that Proxy Norm cannot
    hold (Proxy Norm names only: the other norms leave it after, or in, a norm without
    activation); a BatchNorm1d (its input may be (N, C), which a per-sample norm cannot
    normalise), a BatchNorm subclass other than timm's BatchNormAct2d and SyncBatchNormAct,
    a call of F.batch_norm over activations (one over a weight, as timm's ScaledStdConv2d
    standardises it in NFNets, is no BatchNorm and stays); a group count that does not
    divide a layer's channels.
    strict=False leaves the BatchNorms concerned as they were (the whole model when its
    own forward cannot be traced) and lists them in the report's `left`; bad groups stay
    an error.

    report=True returns (model, ConversionReport), else the model alone. The report maps
    BatchNorm names to what became of them (norm_act, norm_only, left, groups,
    dropped_bias); counts() gives the numbers, str() a short summary.
    """
    norm_kind(norm)  # an unknown name is one error before any work
    model = copy.deepcopy(model)
    result = ConversionReport(norm)
    traced = _trace(model, strict, result)
    if traced is not None:
        _convert(model, *traced, norm, groups, eps, dict(norm_kwargs or {}), strict, result)
    return (model, result) if report else model


# ---- tracing ---------------------------------------------------------------------------

class _TraceFailure(Exception):
    def __init__(self, name, module, error):
        super().__init__(str(error))
        self.name, self.module, self.error = name, module, error


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with the modules in `leaves` kept whole, every BatchNorm,
    GroupNorm and timm activation module a leaf (torch's are leaves already), and each node
    tagged with the module whose forward made it (convert_scope) and which of that
    module's calls it was (convert_call, an index into `calls[scope]`)."""

    def __init__(self, leaves):
        super().__init__()
        self.leaves = leaves
        self.module_path = [""]
        self.call_path = [0]
        self.callers = {}  # traced (non-leaf) module name -> the module that called it
        # traced module name -> per call, the names of its forward's parameters that the
        # call left None (None: its signature cannot say); the root's calls are the user's
        self.calls = {"": [frozenset()]}

    def is_leaf_module(self, module, name):
        return (name in self.leaves or isinstance(module, (_BatchNorm, nn.GroupNorm))
                or type(module).__module__ in _TIMM_ACT_MODULES
                or super().is_leaf_module(module, name))

    def call_module(self, module, forward, args, kwargs):
        name = self.path_of_module(module)
        if self.is_leaf_module(module, name):
            return super().call_module(module, forward, args, kwargs)
        self.callers.setdefault(name, self.module_path[-1])
        calls = self.calls.setdefault(name, [])
        calls.append(_left_none(module.forward, args, kwargs))
        self.module_path.append(name)
        self.call_path.append(len(calls) - 1)
        try:
            return super().call_module(module, forward, args, kwargs)
        except _TraceFailure:
            raise
        except Exception as error:  # the innermost module being traced is the culprit
            raise _TraceFailure(name, module, error) from error
        finally:
            self.module_path.pop()
            self.call_path.pop()

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta["convert_scope"] = self.module_path[-1]
        node.meta["convert_call"] = self.call_path[-1]
        return node


def _left_none(forward, args, kwargs):
    """The names of `forward`'s parameters that a call with `args` and `kwargs` leaves
    None (passed None or defaulting to it), or None when its signature cannot say."""
    try:
        bound = inspect.signature(forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return frozenset(name for name, value in bound.arguments.items() if value is None)


@contextlib.contextmanager
def _in_mode(model, training):
    """`model` in train or eval mode inside the block; every submodule's own mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def _trace_once(model, leaves, training):
    """(graph, tracer) of `model` traced in train or eval mode."""
    tracer = _Tracer(leaves)
    with _in_mode(model, training):
        try:
            graph = tracer.trace(model)
        except _TraceFailure:
            raise
        except Exception as error:
            raise _TraceFailure("", model, error) from error
    return graph, tracer


def _mark_mode_arguments(train_graph, eval_graph):
    """Tag (convert_mode) the nodes of two traces, in train and eval mode, that differ only
    in a `training` argument that follows the mode, True in one and False in the other:
    `F.dropout(x, p, training=self.training)`, as timm's GhostNets' heads call it. The
    comparison reads it as the mode, and a regenerated forward passes `self.training`."""
    for a, b in zip(train_graph.nodes, eval_graph.nodes):
        if (a.op, a.target, a.name) == (b.op, b.target, b.name) \
                and a.kwargs.get("training") is True and b.kwargs.get("training") is False:
            a.meta["convert_mode"] = b.meta["convert_mode"] = True


def _arguments(node):
    """(args, kwargs) of `node`, a `training` argument that follows the mode marked so."""
    if node.meta.get("convert_mode"):
        return node.args, {**node.kwargs, "training": "<the mode>"}
    return node.args, node.kwargs


def _scope_code(graph):
    """{module name: what its own forward did}: ops, targets and constant arguments of
    the nodes it made, its tensor arguments reduced to a mark."""
    code = {}
    for node in graph.nodes:
        args = fx.node.map_arg(_arguments(node), lambda _: "%")
        code.setdefault(node.meta.get("convert_scope", ""), []).append(
            (node.op, str(node.target), repr(args)))
    return code


def _mode_difference(train, evaluation):
    """The module whose own forward traces differently in train and eval mode, or None.

    A module called in one mode only is its caller's doing; else the module whose own
    nodes differ (a mode-dependent op, or a leaf called in one mode only). A `training`
    argument that follows the mode is no difference (_mark_mode_arguments).
    """
    (train_graph, train_tracer), (eval_graph, eval_tracer) = train, evaluation
    _mark_mode_arguments(train_graph, eval_graph)
    for callers, other in ((train_tracer.callers, eval_tracer.callers),
                           (eval_tracer.callers, train_tracer.callers)):
        for name, caller in callers.items():
            if name not in other:
                return caller
    train_code, eval_code = _scope_code(train_graph), _scope_code(eval_graph)
    for name in list(train_code) + list(eval_code):
        if train_code.get(name) != eval_code.get(name):
            return name
    for a, b in zip(train_graph.nodes, eval_graph.nodes):  # the same ops, wired differently
        if (a.name, repr(_arguments(a))) != (b.name, repr(_arguments(b))):
            return a.meta.get("convert_scope", "")
    return None


def _depends_on_input(node):
    """Whether `node`'s value depends on the model's inputs, not on its parameters alone
    (timm's ScaledStdConv2d standardises its weight with F.batch_norm: no batch there)."""
    seen, stack = set(), [node]
    while stack:
        node = stack.pop()
        if node.op == "placeholder":
            return True
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return False


def _has_batch_norm(module):
    return any(isinstance(m, _BatchNorm) for m in module.modules())


def _describe(name, module):
    return f"{name} ({type(module).__name__})" if name else f"the model ({type(module).__name__})"


def _trace(model, strict, result):
    """(the fx graph of `model` in train mode, its tracer's `calls`), or None when the
    model itself cannot be traced (strict=False, or no BatchNorm module in it: nothing to
    convert). Modules that cannot be traced become leaves: silently when they hold no
    BatchNorm, else a ConversionError or (strict=False) their BatchNorms are `left`."""
    leaves = {}  # name -> reason
    modules = dict(model.named_modules())
    for _ in range(len(modules) + 1):
        try:
            train = _trace_once(model, leaves, True)
            evaluation = _trace_once(model, leaves, False)
        except _TraceFailure as failure:
            name, module = failure.name, failure.module
            first_line = (str(failure.error).strip().splitlines() or [""])[0]
            reason = (f"torch.fx cannot trace its forward ({type(failure.error).__name__}: "
                      f"{first_line})")
        else:
            name = _mode_difference(train, evaluation)
            if name is None:
                break
            module = modules[name]
            reason = ("its forward traces differently in train and eval mode (a graph "
                      "would freeze one of them)")
        if not _has_batch_norm(module):
            if not name:  # a model without BatchNorm modules (a ViT): nothing to convert
                return None
            # nothing to convert inside: keep it whole, and its kind everywhere (the same
            # forward fails the same way; one retrace per module would be slow)
            leaves.update((other, reason) for other, m in modules.items()
                          if type(m) is type(module) and not _has_batch_norm(m))
            continue
        if strict:
            raise ConversionError(
                f"{_describe(name, module)}: {reason}, so its BatchNorms cannot be "
                f"converted; pass strict=False to leave them as they are")
        for bn_name, bn in module.named_modules(prefix=name):
            if isinstance(bn, _BatchNorm):
                result.left[bn_name] = f"inside {_describe(name, module)}: {reason}"
        if not name:
            return None
        leaves[name] = reason
    else:  # unreachable: every round adds a leaf
        raise ConversionError("convert_norms: tracing did not settle")
    return train[0], train[1].calls


# ---- rewriting -------------------------------------------------------------------------

def _activation(node, modules):
    """(registry name or None, description) if `node` is an activation, else None."""
    if node.op == "call_module":
        return _activation_module(node.target, modules[node.target])
    if node.op == "call_function":
        target = node.target
        name = getattr(target, "__name__", str(target))
        if target is F.gelu and node.kwargs.get("approximate", "none") != "none":
            return None, f"{name}(approximate='{node.kwargs['approximate']}')"
        if target in (F.leaky_relu, F.leaky_relu_):
            slope = node.args[1] if len(node.args) > 1 else node.kwargs.get(
                "negative_slope", _LEAKY_SLOPE)
            if slope != _LEAKY_SLOPE:
                return None, f"{name}(negative_slope={slope})"
        if target in _ACT_FUNCTIONS:
            return _ACT_FUNCTIONS[target], name
        if target in _OTHER_ACT_FUNCTIONS:
            return None, name
        return None
    if node.op == "call_method":
        if node.target in _ACT_METHODS:
            return _ACT_METHODS[node.target], f"Tensor.{node.target}"
        if node.target in _OTHER_ACT_METHODS:
            return None, f"Tensor.{node.target}"
    return None


def _activation_module(name, module):
    """(registry name or None, description) if `module` is an activation module, else None."""
    kind = type(module)
    if kind is nn.GELU and module.approximate != "none":
        return None, f"{name} (GELU(approximate='{module.approximate}'))"
    if kind is nn.LeakyReLU and module.negative_slope != _LEAKY_SLOPE:
        return None, f"{name} (LeakyReLU(negative_slope={module.negative_slope}))"
    if kind in _ACT_MODULES:
        return _ACT_MODULES[kind], name
    if kind.__module__ in _TIMM_ACT_MODULES:
        return _TIMM_ACTS.get(kind.__name__), f"{name} (timm's {kind.__name__})"
    if kind.__module__ == "torch.nn.modules.activation" and \
            not issubclass(kind, _NOT_ACTIVATIONS):
        return None, f"{name} ({kind.__name__})"
    return None


def _timm_norm_act(module):
    """Whether `module` is one of timm's BatchNorm -> drop -> act modules (exact type)."""
    kind = type(module)
    return any(kind is getattr(sys.modules.get(where), name, None)
               for where, name in _TIMM_NORM_ACTS)


def _only_input(node, source):
    """Whether `source` is the only tensor `node` reads (as its first argument)."""
    inputs = node.all_input_nodes
    return len(inputs) == 1 and inputs[0] is source and node.args and node.args[0] is source


def _passed_through(module, proxy):
    """Whether a module between a BatchNorm and an activation leaves them a pair: nn.Identity
    (timm's ResNet blocks call an unused `drop_block` there) and, for Proxy Norm, a drop
    layer (timm's DropBlock2d, torch's Dropout), which then acts on the Proxy Norm layer's
    output, where a timm BatchNormAct2d's drop goes too."""
    kind = type(module)
    return kind is nn.Identity or (proxy and (
        kind in _DROPOUTS or any(kind is getattr(sys.modules.get(where), name, None)
                                 for where, name in _TIMM_DROPS)))


def _follower(bn_node, modules, proxy):
    """(act name or None, description, node) of the activation that is bn_node's only
    user and reads nothing else, or None; modules that _passed_through are looked through."""
    node = bn_node
    while True:
        users = list(node.users)
        if len(users) != 1 or not _only_input(users[0], node):
            return None
        user = users[0]
        if not (user.op == "call_module" and _passed_through(modules[user.target], proxy)):
            break
        node = user
    found = _activation(user, modules)
    return None if found is None else (found[0], found[1], user)


def _unsupported_kind(module):
    if type(module) is nn.BatchNorm1d:
        return ("BatchNorm1d: its input may be (N, C), which a per-sample norm cannot "
                "normalise")
    return (f"{type(module).__name__} is a BatchNorm subclass whose forward may do more "
            f"than BatchNorm's")


def _convert(model, graph, calls, norm, groups, eps, norm_kwargs, strict, result):
    """Swap the BatchNorms of `model` (traced as `graph`, its modules' `calls` as
    _Tracer's) for `norm` layers, in place."""
    proxy = norm_kind(norm).proxy
    modules = dict(model.named_modules())
    sites = {}  # BatchNorm module name -> its call nodes (a module may be called twice)
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], _BatchNorm):
            sites.setdefault(node.target, []).append(node)
        elif node.op == "call_function" and node.target is F.batch_norm \
                and _depends_on_input(node.args[0]):  # else a weight's standardisation
            scope = node.meta.get("convert_scope", "")
            where = _describe(scope, modules[scope])
            reason = f"{where} calls torch.nn.functional.batch_norm, which is not a module"
            if strict:
                raise ConversionError(f"{reason}; pass strict=False to leave it as it is")
            result.left[f"{scope or '<model>'}:{node.name}"] = reason

    def refuse(name, reason):
        if strict:
            raise ConversionError(f"{name}: {reason}; pass strict=False to leave it as it is")
        result.left[name] = reason

    layers, absorbed = {}, []  # new norm layers by name; activation nodes they now hold
    for name, nodes in sites.items():
        bn = modules[name]
        is_timm = _timm_norm_act(bn)
        # timm's SyncBatchNormAct has them only when timm's convert_sync_batchnorm made it
        act_module, drop = (getattr(bn, "act", None), getattr(bn, "drop", None)) if is_timm \
            else (None, None)
        if act_module is not None and type(act_module) is not nn.Identity:
            found = _activation_module(f"{name}.act", act_module) or (
                None, f"{name}.act ({type(act_module).__name__}, not an activation it knows)")
            if found[0] is None and proxy:
                refuse(name, f"its activation {found[1]} is one that Proxy Norm cannot hold; "
                             f"supported: {', '.join(a for a in ACTS if a != 'identity')}")
                continue
            # the other norms keep an activation outside the registry as it is
            keep = None if found[0] is not None else act_module
            layers[name] = _new_norm(name, bn, norm, found[0] or "identity", groups, eps,
                                     norm_kwargs, result, drop, keep)
            result.norm_act[name] = found[0] or type(act_module).__name__
            continue
        if type(bn) not in CONVERTIBLE and not is_timm:
            refuse(name, _unsupported_kind(bn))
            continue
        followers = [_follower(node, modules, proxy) for node in nodes]
        if proxy:
            for found in followers:
                if found is not None and found[0] is None:
                    refuse(name, f"followed by {found[1]}, an activation that Proxy Norm "
                                 f"cannot hold; supported: "
                                 f"{', '.join(a for a in ACTS if a != 'identity')}")
                    break
            if name in result.left:
                continue
        acts = {None if found is None else found[0] for found in followers}
        if len(acts) > 1:
            refuse(name, "called more than once, followed by different activations")
            continue
        act = acts.pop()
        layers[name] = _new_norm(name, bn, norm, act, groups, eps, norm_kwargs, result, drop)
        if act is None:
            result.norm_only.append(name)
        else:
            result.norm_act[name] = act
            absorbed.extend(found[2] for found in followers)
    # the forwards are traced before any module changes, then everything is swapped
    identities, forwards = _plan_activation_removal(model, graph, calls, absorbed, modules)
    for name, layer in itertools.chain(layers.items(), ((n, nn.Identity()) for n in identities)):
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, layer)
    for name, forward in forwards.items():
        forward.install(model.get_submodule(name))
        result.forwards.append(name)


def _plan_activation_removal(model, graph, calls, absorbed, modules):
    """How the activations that norm-act modules now apply leave the forward.

    Returns (names of activation modules to replace by nn.Identity: each is called once in
    the whole model, at a site absorbed, under its only name; {module name: _Forward} for
    the modules whose own forward calls the rest, regenerated without those calls).
    """
    counts = Counter(node.target for node in graph.nodes if node.op == "call_module")
    names = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    identities, by_scope = [], {}
    for node in absorbed:
        if node.op == "call_module" and counts[node.target] == 1 \
                and names[id(modules[node.target])] == 1:
            identities.append(node.target)
        else:
            by_scope.setdefault(node.meta.get("convert_scope", ""), set()).add(node)
    forwards = {}
    for scope, drop in by_scope.items():
        owner = modules[scope]
        # Its forward is traced alone once per way the model calls it: an argument a call
        # leaves None is traced as None (`if shortcut is None: shortcut = x` then holds, as
        # in timm's DLA), the others as tensors. Each call's activation calls in the whole
        # model's trace then match that trace's one by one.
        patterns = calls[scope]
        if None in patterns:  # a signature inspect cannot read: every argument a tensor
            patterns = [frozenset()] * len(patterns)
        ran = {}
        for node in graph.nodes:
            if node.meta.get("convert_scope", "") == scope and _activation(node, modules):
                ran.setdefault(node.meta["convert_call"], []).append(node)
        graphs, own_modules = {}, dict(owner.named_modules())
        for pattern in dict.fromkeys(patterns):
            local = _trace_own_forward(owner, scope, pattern)
            _follow_mode(local, owner, scope, pattern)
            own = [n for n in local.nodes if _activation(n, own_modules) is not None]
            dropped = set()
            for index in (i for i, p in enumerate(patterns) if p == pattern):
                nodes = ran.get(index, [])
                if len(nodes) != len(own):
                    raise ConversionError(
                        f"{_describe(scope, owner)}: its forward traced alone calls "
                        f"{len(own)} activations where the model's call {index} ran "
                        f"{len(nodes)} (an argument other than None changes its code)")
                mine = {i for i, n in enumerate(nodes) if n in drop}
                if index != patterns.index(pattern) and mine != dropped:
                    raise ConversionError(
                        f"{_describe(scope, owner)}: its forward is called more than once "
                        f"and keeps an activation after a converted norm in one call but "
                        f"not in another")
                dropped = mine
            for i in sorted(dropped):
                node = own[i]
                node.replace_all_uses_with(node.args[0])
                local.erase_node(node)
            local.lint()
            graphs[pattern] = local
        forwards[scope] = _Forward.from_graphs(graphs, inspect.signature(owner.forward),
                                               type(owner).__name__)
    return identities, forwards


class _OwnForwardTracer(fx.Tracer):
    """torch.fx's tracer with every submodule a leaf: the root's own forward only."""

    def is_leaf_module(self, module, name):
        return True


def _trace_own_forward(module, name, none=frozenset(), training=True):
    """The fx graph of `module`'s own forward in train or eval mode, its parameters in
    `none` traced as None."""
    with _in_mode(module, training):
        try:
            return _OwnForwardTracer().trace(
                module, concrete_args={parameter: None for parameter in none} or None)
        except Exception as error:  # traced before as part of the model: should not happen
            raise ConversionError(f"{_describe(name, module)}: torch.fx cannot trace its "
                                  f"forward alone ({type(error).__name__}: {error})") from None


def _follow_mode(graph, module, name, none):
    """Where `graph` (the module's own forward in train mode) passes the mode on
    (`training=self.training`), pass `self.training` instead of the traced True."""
    if not any(node.kwargs.get("training") is True for node in graph.nodes):
        return
    _mark_mode_arguments(graph, _trace_own_forward(module, name, none, training=False))
    for node in list(graph.nodes):
        if node.meta.get("convert_mode"):
            with graph.inserting_before(node):
                mode = graph.get_attr("training")
            node.kwargs = {**node.kwargs, "training": mode}


class _Forward:
    """A module's own forward, traced by torch.fx without the activations that converted
    norm-act modules now apply, set on the instance as its `forward`.

    One traced function per way the model calls it (which of its parameters a call leaves
    None); a call picks its function by the same rule. The module keeps its class,
    children and state_dict; the code calls the same children by the same names.
    Picklable (torch.save of the whole model, deepcopy): it is kept as its sources and
    rebuilt on load.
    """

    def __init__(self, sources, signature, label):
        # sources: {names left None: (source, namespace)}; signature: the forward's own
        self.sources, self.signature, self.label = sources, signature, label
        self.functions = {}
        for pattern, (source, namespace) in sources.items():
            scope = dict(namespace)
            exec(compile(source, f"<forward of {label}, converted by proxynorm>", "exec"),
                 scope)
            self.functions[pattern] = scope["forward"]
        self.optional = frozenset().union(*sources)
        self.module = None

    @classmethod
    def from_graphs(cls, graphs, signature, label):
        codes = {pattern: graph.python_code(root_module="self")
                 for pattern, graph in graphs.items()}
        return cls({pattern: (code.src, dict(code.globals)) for pattern, code in codes.items()},
                   signature, label)

    def install(self, module):
        self.module = module
        module.forward = self  # an instance attribute: nn.Module.__call__ calls it

    def __call__(self, *args, **kwargs):
        if not self.optional:  # one trace, every parameter its own name: no binding
            return self.functions[frozenset()](self.module, *args, **kwargs)
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        pattern = frozenset(name for name in self.optional if bound.arguments[name] is None)
        function = self.functions.get(pattern)
        if function is None:
            seen = "; ".join(", ".join(sorted(p)) or "none" for p in self.functions)
            raise TypeError(
                f"{self.label}.forward, as convert_norms traced it, takes calls that leave "
                f"None: {seen}; this call leaves {', '.join(sorted(pattern)) or 'none'}")
        # positionally: fx renames a parameter it traced as None
        return function(self.module, *bound.args, **bound.kwargs)

    @property
    def __signature__(self):  # what inspect (torch.export, jit.trace) sees: forward's own
        return self.signature

    def __reduce__(self):
        # modules (torch, math) travel by name; fx puts only importable objects in there
        sources = {pattern: (source, {key: ("module", value.__name__)
                                      if isinstance(value, types.ModuleType)
                                      else ("object", value)
                                      for key, value in namespace.items()})
                   for pattern, (source, namespace) in self.sources.items()}
        return _rebuild_forward, (sources, self.signature, self.label, self.module)


def _rebuild_forward(sources, signature, label, module):
    import importlib

    forward = _Forward({pattern: (source, {key: importlib.import_module(value)
                                           if kind == "module" else value
                                           for key, (kind, value) in namespace.items()})
                        for pattern, (source, namespace) in sources.items()},
                       signature, label)
    forward.module = module
    return forward


def _new_norm(name, bn, norm, act, groups, eps, norm_kwargs, result, drop=None, keep=None):
    """The `norm` layer for BatchNorm `bn` with activation `act` (None: none), its affine
    and (batch names) statistics copied; drop: the module between norm and activation
    (timm's); keep: an activation module outside the registry to apply as it is."""
    channels = bn.num_features
    group_count = None
    kind = norm_kind(norm)
    if kind.groups == "any":
        group_count = layer_groups(groups, channels)
        if groups is None and group_count != DEFAULT_GROUPS:
            result.groups[name] = (channels, group_count)
    kwargs = dict(norm_kwargs)
    batch = kind.batch_statistics
    if batch:
        kwargs.setdefault("momentum", bn.momentum)
    try:
        layer = get_norm_act(norm, channels, act=act or "identity", groups=group_count,
                             eps=bn.eps if eps is None else eps, apply_act=act is not None,
                             drop=drop, **kwargs)
    except ValueError as error:
        raise ConversionError(f"{name}: {error}") from None
    except TypeError as error:
        raise TypeError(f"{name}: {error}") from None
    reference = next(itertools.chain(bn.parameters(), bn.buffers()), None)
    if reference is not None and reference.is_floating_point():
        layer.to(device=reference.device, dtype=reference.dtype)
    if keep is not None:
        layer.act = keep
    layer.train(bn.training)
    with torch.no_grad():
        for attr in ("weight", "bias"):
            old, new = getattr(bn, attr), getattr(layer, attr, None)
            if old is None or not isinstance(new, torch.Tensor):
                if attr == "bias" and old is not None and norm != "none" and bool(old.any()):
                    result.dropped_bias.append(name)
                continue
            new.copy_(old)
            new.requires_grad_(old.requires_grad)
        if batch and bn.track_running_stats:
            for attr in ("running_mean", "running_var", "num_batches_tracked"):
                getattr(layer, attr).copy_(getattr(bn, attr))
        elif batch:  # statistics of the batch in eval mode too, as the BatchNorm did
            layer.track_running_stats = False
            layer.running_mean = layer.running_var = layer.num_batches_tracked = None
    return layer
