"""The PopTorch engine: the loop's engine interface on Graphcore IPUs (SDK 3.3+, torch 2.0.1).

The same batch semantics as PyTorchEngine (train/engine.py): a host call carries
device_iterations global batches laid out [device iteration, accumulation step, replica,
micro-batch], PopART's input layout (docs/popart/glossary.rst in graphcore/popart), and
PopTorch's Mean reduction over accumulation and replicas makes each optimiser step the mean
over its global batch. The loss is computed inside the graph, as PopTorch needs: per
micro-batch, the mean cross-entropy marked by poptorch.identity_loss.

Where it differs from the PyTorch engine, by necessity:
- A NaN or infinite loss comes back after the step has been applied on the IPU; train_step
  still raises NonFiniteLoss (the loop then keeps its last good checkpoint).
- The learning rate changes only between host calls (setOptimizer), so with
  device_iterations > 1 the steps of one call share a learning rate.
- Optimiser state (momentum, RMSprop mean squares, Adam moments) lives in PopART's own
  tensors: a checkpoint carries it from IPU to IPU; between this engine and PyTorchEngine only
  the weights move (the optimiser state restarts, with a warning on the IPU side).
- norm sync_batch across replicas needs the IPU ops library (`make custom_ops`): each
  SyncBatchNormAct sums its float32 moments over groups of bn_group_size replicas (0 = all)
  with a custom all-reduce whose gradient op is the same all-reduce of the gradient
  (proxynorm/ops/ipu/replica_all_reduce.cpp; PopART's ReplicatedAllReduce has no gradient op at
  SDK 3.0-3.4, willow/src/op/collectives/replicatedallreduce.cpp): one in the forward and one
  in the backward pass of every micro-batch, so 2 x gradient_accumulation all-reduces per
  layer per optimiser step (recomputation reuses the forward one). bn_group_size must divide
  the replicas; under poprun a group must also lie within one instance (divide its replicas)
  unless it holds all replicas, the one cross-instance group GCL is known to form (the
  gradient all-reduce). Running statistics are updated in place on every replica
  (poptorch.Options.broadcastBuffers(False)); every replica of a group holds the same ones,
  and the host copy (checkpoints, evaluation) is replica 0's, i.e. group 0's (PopART returns
  the lowest replica of a variable's group: VariableRetrievalMode::OnePerGroup,
  willow/include/popart/variablesettings.hpp:24-31), as rank 0's under torchrun. Each
  evaluation overwrites the other groups' running statistics with group 0's: the training
  executable detaches for it, PopTorch copying the weights and buffers (replica 0's) to the
  host (poptorch python/_poplar_executor.py:1550-1566 at sdk/poptorch/3.3.0), and the next
  step re-attaches it, which writes that host copy to every replica (:1240-1241, then
  _on_device_attach's copyWeightsToDevice, :414-417); loading a checkpoint does the same.
  The PyTorch engine in one process averages the groups' instead.
- The IPU Model (ipu_model) does not replicate, and PopTorch caches none of its executables:
  PopTorchEngine.check refuses replicas > 1 and executable_cache_dir with it.

Poplar SDK 3.3 or later: the engine refuses an older PopTorch (whose torch is not 2.0.1) in
one line as it starts (proxynorm/ops/ipu/sdk.py). Nothing here imports poptorch at module
level: `import train.ipu_engine` works without it.
None of this has been run on an IPU or the IPU Model: PopTorch could not be installed where
it was written; tests/test_ipu_engine.py checks the host side against a stand-in, and
tests/test_ipu_op.py the sync_batch IPU code path with an emulated all-reduce.
"""
import copy
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from proxynorm import ops
from datasets.pipeline import EpochOrder, collate, ignore_interrupts, make_loader
from proxynorm.norms import BatchNormAct, norm_kind
from proxynorm.ops.ipu.sdk import sdk_problem
from train.config import ConfigError, global_batch_size
from train.optim import build_optimizer, param_groups
from train.steps import NonFiniteLoss, count_correct

# popart.RecomputationType.RecomputeAll (sessionoptions.hpp: None, Standard, NormOnly,
# Pipeline, RecomputeAll); PopTorch passes PopART enums as integers
RECOMPUTE_ALL = 4


def pipeline_stages(config):
    return len(config["pipeline_splits"]) + 1


def sync_batch_group(config):
    """Replicas per sync_batch statistics group on IPUs, as SyncBatchNormAct.ipu_group_size
    and the all-reduce's group_size take it: 1 when no statistics cross replicas (another
    norm, one replica, bn_group_size 1), 0 for all replicas, else bn_group_size."""
    replicas, size = config["replicas"], config["bn_group_size"]
    if not norm_kind(config["norm"]).synchronised or replicas == 1 or size == 1:
        return 1
    return 0 if size in (0, replicas) else size


def ipu_options(config, poptorch, popdist=None, training=True):
    """poptorch.Options for the config: training, or evaluation (training=False).

    Under poprun (popdist given) the replicas of this instance come from poprun; else
    replicas is the replication factor.
    """
    stages = pipeline_stages(config)
    if popdist is not None:
        options = popdist.poptorch.Options(ipus_per_replica=stages)
    else:
        options = poptorch.Options()
        options.replicationFactor(config["replicas"])
    options.randomSeed(config["seed"])  # the IPU's generator; PopTorch seeds torch's with it too
    if training:
        options.deviceIterations(config["device_iterations"])
        options.Training.gradientAccumulation(config["gradient_accumulation"])
        options.Training.accumulationAndReplicationReductionType(poptorch.ReductionType.Mean)
        options.outputMode(poptorch.OutputMode.Sum)  # per replica: summed over the call
        if sync_batch_group(config) != 1:
            # SyncBatchNormAct's in-place updates of its running statistics (copy_) are
            # refused under replication unless each replica keeps its own buffers (poptorch
            # poptorch/source/InplaceOps.cpp:224-233); the option gates only that check
            # (LowerToPopartFactories.cpp:41-43, SessionOptions.cpp:464). Per-replica
            # BatchNorm lowers to PopART's own op, which updates its statistics itself, as
            # graphcore/examples' replicated CNNs run it without the option.
            options.broadcastBuffers(False)
        options.Precision.enableStochasticRounding(config["stochastic_rounding"])
        if config["recompute_checkpoints"] and stages == 1:
            # pipelined models recompute already (PopTorch's default); one stage needs asking,
            # as graphcore/examples' vision/cnns/pytorch/utils/ipu_settings.py does
            options._Popart.set("explicitRecomputation", True)
            options._Popart.set("autoRecomputation", RECOMPUTE_ALL)
    else:
        # pipelined inference runs at least one batch per stage per call
        options.deviceIterations(stages)
    # PopART's default computes variances as E[x^2] - E[x]^2 (sessionoptions.hpp); our op
    # and PopART's norms read this option (proxynorm/ops/ipu/proxynorm_ipu.cpp)
    options.enableStableNorm(config["stable_norm"])
    half = config["precision"].startswith("16.")
    options.Precision.setPartialsType(torch.float16 if half else torch.float32)
    if stages > 1:
        options.setExecutionStrategy(poptorch.PipelinedExecution(poptorch.AutoStage.SameAsIpu))
    if config["available_memory_proportion"] is not None:
        options.setAvailableMemoryProportion(
            {f"IPU{i}": config["available_memory_proportion"] for i in range(stages)})
    if config["executable_cache_dir"] is not None:
        options.enableExecutableCaching(config["executable_cache_dir"])
    if config["ipu_model"]:
        options.useIpuModel(True)
    if config["compile_only"]:
        options.useOfflineIpuTarget()
    return options


def ipu_optimizer(config, model, poptorch):
    """The config's optimiser as a poptorch.optim class, on train.optim's parameter groups.

    Optimiser state in float32 whatever the precision (graphcore/examples' defaults);
    loss_scaling scales the loss in the graph and is divided out of the update.
    """
    groups = param_groups(model, config["weight_decay"])
    common = {"lr": config["lr"], "loss_scaling": config["loss_scaling"],
              "accum_type": torch.float32}
    clip = {"max_grad_norm": config["grad_clip_norm"]} if config["grad_clip_norm"] > 0 else {}
    name = config["optimizer"]
    if name == "sgd":
        return poptorch.optim.SGD(groups, momentum=config["momentum"],
                                  nesterov=config["nesterov"] and config["momentum"] > 0,
                                  velocity_accum_type=torch.float32, **common, **clip)
    moments = {"first_order_momentum_accum_type": torch.float32,
               "second_order_momentum_accum_type": torch.float32}
    if name == "rmsprop":  # TensorFlow's: eps inside the square root, mean square from 1
        return poptorch.optim.RMSprop(groups, alpha=config["rmsprop_decay"],
                                      eps=config["optimizer_eps"], momentum=config["momentum"],
                                      use_tf_variant=True, **moments, **common)
    return poptorch.optim.AdamW(groups, betas=tuple(config["adam_betas"]),
                                eps=config["optimizer_eps"], **moments, **common, **clip)


def popdist_if_launched():
    """The popdist module when poprun started this process, else None."""
    try:
        import popdist
        import popdist.poptorch  # noqa: F401
    except ImportError:
        return None
    return popdist if popdist.isPopdistEnvSet() else None


def cross_entropy(logits, targets, label_smoothing=0.0):
    """Per-sample cross-entropy in float32, as F.cross_entropy(..., reduction="none") with
    label smoothing, for class indices or class probabilities (mixup). Written out because
    PopTorch's cross_entropy takes neither probabilities nor label smoothing."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    if targets.dim() == 1:
        loss = -log_probs.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    else:
        loss = -(targets * log_probs).sum(dim=1)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * log_probs.mean(dim=1)
    return loss


class TrainingLoss(nn.Module):
    """The model with its loss, as PopTorch trains it; per micro-batch: (the mean
    cross-entropy, marked as the loss, and the number of correct predictions)."""

    def __init__(self, model, label_smoothing):
        super().__init__()
        self.model, self.label_smoothing = model, label_smoothing

    def forward(self, images, targets):
        import poptorch

        logits = self.model(images)
        loss = cross_entropy(logits, targets, self.label_smoothing).mean()
        correct = count_correct(logits, targets).float()
        return poptorch.identity_loss(loss, reduction="mean"), correct


class PerSampleLoss(nn.Module):
    """The model with its loss per sample, for evaluation: (loss, correct) per sample, so that
    padding can be masked off on the host."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, targets):
        logits = self.model(images)
        labels = targets.argmax(dim=1) if targets.dim() == 2 else targets
        return cross_entropy(logits, targets), (logits.argmax(dim=1) == labels).float()


class PopTorchEngine:
    """The model on IPUs through PopTorch: one host call runs steps_per_call optimiser steps.

    `model` is the torch module the loop reads (weight averaging, checkpoints): PopTorch copies
    the weights back from the IPU when it is read. Evaluation runs a second, inference
    executable on a copy of the network, loaded with the weights of the model asked for.
    The training executable is built on the first train_step (or compile), so the loop may
    copy `model` before then.
    """

    @staticmethod
    def check(config, local_replicas=None):
        """ConfigError for the settings PopTorch cannot run as the PyTorch engine would. It
        reads the config alone (no PopTorch), so a config an IPU host would refuse is refused
        anywhere as it is resolved (train.build.check_config).

        local_replicas: the replicas of this poprun instance (None: all of them, no poprun).
        """
        stages = pipeline_stages(config)
        # PopTorch trains a model of N stages as 2N - 1 (the backward pass adds N - 1) and
        # needs that many micro-batches per step (popart_compiler/source/Compiler.cpp)
        if stages > 1 and config["gradient_accumulation"] < 2 * stages - 1:
            raise ConfigError(f"pipeline_splits: {stages} pipeline stages train as "
                              f"{2 * stages - 1}, so gradient_accumulation must be >= "
                              f"{2 * stages - 1}, got {config['gradient_accumulation']}")
        # a host call runs device_iterations steps, and a run stops between calls
        if config["max_steps"] % config["device_iterations"]:
            raise ConfigError(f"max_steps {config['max_steps']} must be a multiple of "
                              f"device_iterations {config['device_iterations']}")
        group, replicas = sync_batch_group(config), config["replicas"]
        local = replicas if local_replicas is None else local_replicas
        if group > 1 and (replicas % group or local % group):
            where = (f"the {replicas} replicas" if local == replicas else
                     f"the {local} replicas of each poprun instance, or be 0 (all {replicas} "
                     f"replicas: the only group that may span instances)")
            raise ConfigError(f"norm sync_batch: bn_group_size {group} must divide {where}")
        # PopTorch refuses an offline target with the IPU Model (poptorch
        # popart_compiler/source/CompilerImpl.cpp:654-656 at sdk/poptorch/3.3.0)
        if config["compile_only"] and config["ipu_model"]:
            raise ConfigError("compile_only compiles for a real IPU (an offline target); it "
                              "cannot be combined with ipu_model")
        # The IPU Model does not replicate: "Replication is not supported on IPU Model
        # targets" (popart docs/popart/performance.rst:83 at sdk/poplar/3.3.0;
        # docs/popxl/graph.rst:229), and PopTorch's replicated examples need hardware
        # (docs/user_guide/device_iterations.py:5-7)
        if config["ipu_model"] and replicas > 1:
            raise ConfigError(f"ipu_model: the IPU Model does not run replicated graphs, so "
                              f"replicas must be 1, got {replicas} (the same global batch: "
                              f"--replicas 1 --gradient-accumulation "
                              f"{config['gradient_accumulation'] * replicas})")
        # PopTorch only warns that "enableExecutableCaching doesn't work with the IPU model"
        # (CompilerImpl.cpp:640-643 at sdk/poptorch/3.3.0): nothing would be cached
        if config["ipu_model"] and config["executable_cache_dir"] is not None:
            raise ConfigError("executable_cache_dir: PopTorch caches no IPU Model executable; "
                              "unset it (--executable-cache-dir null) with ipu_model")
        if config["channels_last"]:
            raise ConfigError("channels_last is a CPU/GPU memory format: PopTorch lays out the "
                              "IPU's tensors itself; unset it (--channels-last false) with "
                              "engine ipu")
        if config["optimizer"] == "rmsprop" and config["grad_clip_norm"] > 0:
            raise ConfigError("grad_clip_norm: PopTorch's RMSprop has no gradient clipping; use "
                              "sgd or adamw, or --grad-clip-norm 0")

    @staticmethod
    def norm_kwargs(config, context=None):
        """The options of the model's norm layers (None: none), as build_model builds them:
        each replica holds one micro-batch (stats_chunks 1), and sync_batch layers share
        statistics over sync_batch_group(config) replicas (ipu_group_size). `context` is the
        PyTorch engine's and does not apply."""
        kind = norm_kind(config["norm"])
        if kind.synchronised:
            return {"stats_chunks": 1, "bn_group_size": config["bn_group_size"],
                    "ipu_group_size": sync_batch_group(config)}
        if kind.batch_statistics:
            return {"stats_chunks": 1}
        return None

    def __init__(self, model, config):
        import poptorch

        # SDK 3.3 or later (PopTorch's torch 2.0.1); an older one is refused in one line
        problem = sdk_problem(getattr(poptorch, "__version__", "unknown"), torch.__version__)
        if problem:
            raise ConfigError(problem)
        self.poptorch = poptorch
        self.popdist = popdist_if_launched()
        stages = pipeline_stages(config)
        if self.popdist is not None:
            self.popdist.init()
            self.instance = self.popdist.getInstanceIndex()
            self.instances = self.popdist.getNumInstances()
            self.local_replicas = self.popdist.getNumLocalReplicas()
            if self.popdist.getNumTotalReplicas() != config["replicas"]:
                raise ConfigError(f"poprun --num-replicas {self.popdist.getNumTotalReplicas()} "
                                  f"but replicas is {config['replicas']}: make them agree")
            if self.popdist.getNumIpusPerReplica() != stages:
                raise ConfigError(f"poprun --ipus-per-replica {self.popdist.getNumIpusPerReplica()}"
                                  f" but pipeline_splits make {stages} stages: make them agree")
        else:
            self.instance, self.instances, self.local_replicas = 0, 1, config["replicas"]
        self.check(config, self.local_replicas)
        if sync_batch_group(config) != 1 and not ops.ipu.is_built():
            raise ConfigError(f"norm sync_batch across IPU replicas needs the IPU ops library "
                              f"{os.path.relpath(ops.ipu.LIBRARY)}: run `make custom_ops` "
                              f"on this Poplar SDK host")

        self.device = torch.device("cpu")  # the loop hands host tensors; PopTorch moves them
        self.steps_per_call = config["device_iterations"]
        self.accumulation = config["gradient_accumulation"]
        self.micro_batch = config["micro_batch_size"]
        # this instance's samples of one host call, and of one evaluation call
        self.call_batch = self.steps_per_call * global_batch_size(config) // self.instances
        self.eval_batch = self.micro_batch * self.local_replicas * stages
        self.input_dtype = torch.float16 if config["precision"].startswith("16.") else torch.float32

        self.model = self.prepare(model, config)
        self.eval_net = PerSampleLoss(copy.deepcopy(self.model)).eval()
        self.train_net = TrainingLoss(self.model, config["label_smoothing"])
        self.options = ipu_options(config, poptorch, self.popdist)
        self.eval_options = ipu_options(config, poptorch, self.popdist, training=False)
        self.optimizer = ipu_optimizer(config, self.model, poptorch)
        # the PyTorch engine's optimiser, never stepped: the checkpoint format both engines read
        self.host_optimizer = build_optimizer(config, self.model)
        self.lr = config["lr"]
        self.training_model = self.inference_model = None  # PopTorch's, built on first use
        self.weights_version = 0  # counts changes of the trained weights (steps, loads)
        self.eval_weights = None  # (model, weights_version) last loaded into eval_net

    def prepare(self, model, config):
        """The model as the IPU runs it: in the config's precision, with its pipeline stages
        and recomputation checkpoints marked. Its layers were built for this engine
        (norm_kwargs); a model built for the PyTorch engine is refused, as its BatchNorms
        would split each replica's micro-batch into stats_chunks."""
        expected = self.norm_kwargs(config) or {}
        for name, module in model.named_modules():
            if isinstance(module, BatchNormAct) and any(
                    getattr(module, key, value) != value for key, value in expected.items()):
                raise ValueError(f"{name}: the model was not built for the PopTorch engine "
                                 f"(train.build.build_model builds it for the config's engine)")
        poptorch = self.poptorch
        # 16.32 keeps float32 weights and is fed float16 images, as graphcore/examples does
        if config["precision"] == "16.16":
            model.half()
        modules = dict(model.named_modules())
        for stage, name in enumerate(config["pipeline_splits"], start=1):
            poptorch.BeginBlock(modules[name], ipu_id=stage)

        def keep_output(module, inputs, output):
            if poptorch.isRunningOnIpu():
                return poptorch.recomputationCheckpoint(output)
            return None

        for name in config["recompute_checkpoints"]:
            modules[name].register_forward_hook(keep_output)
        return model

    # -- data ---------------------------------------------------------------------------
    def make_loader(self, view, batch_size, sampler, num_workers=0, pin_memory=False, seed=0):
        """(images, targets, skipped) batches in the sampler's order.

        Training (an EpochOrder, batch_size = call_batch) goes through poptorch.DataLoader,
        which takes the micro-batch and multiplies it by device iterations x this instance's
        replicas x gradient accumulation. Synchronous mode: the asynchronous one iterates a
        copy of the loader in its own process (the loop's EpochOrder.set_epoch would not
        reach it) and carries only tensors (not the skipped files). The loop shards the order
        between poprun instances (EpochOrder's rank, world_size), hence no automatic
        partitioning. Evaluation (a list of keys, up to eval_batch samples per batch;
        eval_step pads the last) uses the PyTorch loader. pin_memory does not apply.
        """
        if not isinstance(sampler, EpochOrder):
            return make_loader(view, batch_size, sampler, num_workers, False, seed)
        if batch_size != self.call_batch:
            raise ValueError(f"a host call of this engine takes {self.call_batch} samples, "
                             f"got a batch size of {batch_size}")
        poptorch = self.poptorch
        return poptorch.DataLoader(
            self.options, view, batch_size=self.micro_batch, sampler=sampler,
            num_workers=num_workers, drop_last=True, persistent_workers=num_workers > 0,
            auto_distributed_partitioning=False, mode=poptorch.DataLoaderMode.Sync,
            collate_fn=collate, worker_init_fn=ignore_interrupts,
            generator=torch.Generator().manual_seed(seed))

    def device_targets(self, targets):
        """Class indices as int32 (the IPU has no int64), class probabilities as float32."""
        return targets.int() if targets.dim() == 1 else targets.float()

    # -- executables ----------------------------------------------------------------------
    def get_training_model(self):
        if self.training_model is None:
            self.model.train()
            self.training_model = self.poptorch.trainingModel(
                self.train_net, options=self.options, optimizer=self.optimizer)
        return self.training_model

    def get_inference_model(self):
        if self.inference_model is None:
            self.inference_model = self.poptorch.inferenceModel(self.eval_net,
                                                                options=self.eval_options)
        return self.inference_model

    def claim_device(self, executable):
        """Training and evaluation take the same IPUs: detach the other one first (PopTorch
        copies its weights and optimiser state to the host as it detaches)."""
        other = (self.inference_model if executable is self.training_model
                 else self.training_model)
        if other is not None and other.isAttachedToDevice():
            other.detachFromDevice()

    def compile(self, images, targets):
        """Compile the training and evaluation executables without running them: what
        compile_only does (for an offline IPU target; executable_cache_dir keeps them).
        images and targets: one host call's batch, as train_step takes."""
        self.get_training_model().compile(images.to(self.input_dtype),
                                          self.device_targets(targets))
        eval_images = images.new_zeros((self.eval_batch, *images.shape[1:]))
        self.get_inference_model().compile(eval_images.to(self.input_dtype),
                                           torch.zeros(self.eval_batch, dtype=torch.int32))

    def close(self):
        """Release the IPUs (the weights stay readable in `model`)."""
        for executable in (self.training_model, self.inference_model):
            if executable is not None:
                executable.destroy()
        self.training_model = self.inference_model = None

    # -- steps ----------------------------------------------------------------------------
    def set_lr(self, lr):
        if lr == self.lr:
            return
        self.lr = lr
        for group in (*self.optimizer.param_groups, *self.host_optimizer.param_groups):
            group["lr"] = lr
        if self.training_model is not None:
            self.training_model.setOptimizer(self.optimizer)  # lr is a variable: no recompilation

    def train_step(self, images, targets):
        """steps_per_call optimiser steps on a host call's batch: (mean loss, number correct).

        Raises NonFiniteLoss if the loss is NaN or infinite: unlike on the PyTorch engine
        the steps have been applied by then.
        """
        if len(images) != self.call_batch:
            raise ValueError(f"expected {self.call_batch} samples ({self.steps_per_call} global "
                             f"batches, this instance's share), got {len(images)}")
        training_model = self.get_training_model()
        self.claim_device(training_model)
        loss_sums, correct = training_model(images.to(self.input_dtype),
                                            self.device_targets(targets))
        self.weights_version += 1
        # Sum output mode: per replica, the micro-batch mean losses summed over the call
        micro_batches = self.steps_per_call * self.accumulation * self.local_replicas
        mean_loss = loss_sums.double().sum().item() / micro_batches
        if not math.isfinite(mean_loss):
            raise NonFiniteLoss(mean_loss, applied=True)
        return mean_loss, int(correct.double().sum().item())

    @torch.no_grad()
    def eval_step(self, images, targets, model=None):
        """(summed loss, number correct) of `model` (default: the trained one) on a batch of
        at most eval_batch samples, padded to the compiled size and masked."""
        count = len(images)
        if count > self.eval_batch:
            raise ValueError(f"an evaluation batch takes at most {self.eval_batch} samples, "
                             f"got {count}")
        self.load_eval_weights(self.model if model is None else model)
        padding = self.eval_batch - count
        if padding:
            images = torch.cat([images, images.new_zeros((padding, *images.shape[1:]))])
            targets = torch.cat([targets, targets.new_zeros((padding, *targets.shape[1:]))])
        inference_model = self.get_inference_model()
        self.claim_device(inference_model)
        losses, correct = inference_model(images.to(self.input_dtype), self.device_targets(targets))
        return losses[:count].double().sum().item(), int(correct[:count].sum().item())

    def load_eval_weights(self, model):
        """Copies `model`'s weights into the evaluation network (and onto its IPUs) when they
        are not the ones it holds: the trained model after a step, or the weight average."""
        if self.eval_weights == (model, self.weights_version):
            return
        self.eval_net.model.load_state_dict(model.state_dict())
        if self.inference_model is not None and self.inference_model.isAttachedToDevice():
            self.inference_model.copyWeightsToDevice()
        self.eval_weights = (model, self.weights_version)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self):
        """PyTorchEngine's format: the model's state (plain tensors, PopTorch unwraps them)
        and the PyTorch engine's optimiser state dict, plus PopART's optimiser state under
        ipu_state/ipu_param, which only this engine reads."""
        model_state = {name[len("model."):]: value
                       for name, value in self.train_net.state_dict().items()}
        ipu_state = self.optimizer.state_dict()  # read back from the IPU when it changed
        return {"model": model_state,
                "optimizer": {**self.host_optimizer.state_dict(),
                              "ipu_state": ipu_state["ipu_state"],
                              "ipu_param": ipu_state["ipu_param"]}}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.weights_version += 1
        if self.training_model is not None and self.training_model.isAttachedToDevice():
            self.training_model.copyWeightsToDevice()
        optimizer = state["optimizer"]
        if optimizer.get("ipu_state") is not None:
            self.optimizer.set_state_dict({"ipu_state": optimizer["ipu_state"],
                                           "ipu_param": optimizer["ipu_param"]})
        elif optimizer.get("state"):
            print("warning: this checkpoint's optimiser state is the PyTorch engine's and does "
                  "not move to the IPU: momentum and running averages restart", file=sys.stderr)
