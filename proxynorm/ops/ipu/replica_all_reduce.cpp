// A differentiable sum over groups of IPU replicas, as a PopART custom op for
// PopTorch: poptorch.custom_op([x], "ReplicaAllReduceSum",
// "ai.graphcore.proxynorm", 1, ...). Built into the same library as
// proxynorm_ipu.cpp by proxynorm/ops/ipu/Makefile; the Python side is
// ops.ipu.replica_all_reduce_sum, which SyncBatchNormAct calls in the forward
// pass of each layer to share its batch statistics across replicas. With the
// grad op (the same all-reduce in the backward pass) that is two all-reduces
// per layer per micro-batch: 2 x gradient_accumulation per optimiser step.
//
//   input  : 0 x, any shape, float32 or float16
//   output : 0 y = sum of x over this replica's group, x's shape and type
//   attribute: group_size (int): consecutive groups of that many replicas,
//              numbered globally as GCL numbers them (under poprun: across
//              instances); 0 = all replicas. It must divide the global
//              replication factor.
//
// Gradient: for y_r = sum_q x_q over a group, dL/dx_r = sum_q dL/dy_q, i.e. the
// same all-reduce of the incoming gradient over the same groups (the rule that
// proxynorm/norms.py's AllReduceSum uses under torchrun). PopART's own
// ReplicatedAllReduce has no grad op at SDK 3.0-3.4 (willow/src/op/collectives/
// replicatedallreduce.cpp defines none, so autodiff drops its gradient), which
// is why this op exists.
//
// The lowering follows PopART's ReplicatedAllReduceOpx::grow (popart
// willow/src/popx/op/collectives/replicatedallreducex.cpp:39-65 at SDK 3.4):
// gcl::allReduceCrossReplica(graph, x, gcl::CollectiveOperator::ADD, prog,
// group, debugContext, options) from <gcl/Collectives.hpp>, out of place, with
// the session's GCL options (IrLowering::gclOptions, popart
// willow/include/popart/popx/irlowering.hpp:418 at 3.4, :412 at 3.3; PopTorch
// sets them through options._Popart.set("gclOptions", {...})). Written, like
// proxynorm_ipu.cpp, against the Poplar SDK 3.3 headers (popart::popx::Opx with
// poplar types; the IPU path needs SDK 3.3 or later, proxynorm/ops/ipu/sdk.py);
// never compiled where it was written (no SDK there).

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include <gcl/Collectives.hpp>
#include <poplar/Graph.hpp>
#include <poplar/Program.hpp>
#include <poplar/Tensor.hpp>

#include <popart/analysis/replicaequal/replicaequalanalysisproxy.hpp>
#include <popart/attributes.hpp>
#include <popart/datatype.hpp>
#include <popart/error.hpp>
#include <popart/ir.hpp>
#include <popart/names.hpp>
#include <popart/op.hpp>
#include <popart/operatoridentifier.hpp>
#include <popart/opmanager.hpp>
#include <popart/opserialiser.hpp>
#include <popart/popx/devicex.hpp>
#include <popart/popx/irlowering.hpp>
#include <popart/popx/opx.hpp>
#include <popart/popx/opxmanager.hpp>
#include <popart/sessionoptions.hpp>
#include <popart/tensorinfo.hpp>

namespace proxynorm_ipu {

const popart::OperatorIdentifier ReplicaAllReduceSumId = {
    "ai.graphcore.proxynorm", "ReplicaAllReduceSum", 1};
const popart::OperatorIdentifier ReplicaAllReduceSumGradId = {
    "ai.graphcore.proxynorm", "ReplicaAllReduceSumGrad", 1};

namespace {

// Replicas per group for group_size (0 = all) out of `replicas` global
// replicas; throws unless the groups tile the replicas.
int64_t replicasPerGroup(const char *opName, int64_t groupSize,
                         int64_t replicas) {
  if (groupSize < 0) {
    throw popart::error("{}: group_size must be >= 0 (0 = all replicas), got "
                        "{}",
                        opName, groupSize);
  }
  const int64_t size = groupSize == 0 ? replicas : groupSize;
  if (replicas % size != 0) {
    throw popart::error("{}: group_size={} does not divide the {} replicas",
                        opName, groupSize, replicas);
  }
  return size;
}

// The global replication factor as PopART's collectives read it: the total
// over all instances under poprun (enableDistributedReplicatedGraphs), else
// the local replicatedGraphCount, else 1 (SessionOptions::
// getGlobalReplicationFactor, popart willow/src/sessionoptions.cpp:245;
// declared in sessionoptions.hpp since SDK 3.0). PopART's ReplicatedAllReduceOp
// builds its default ReplicaGrouping from the same value
// (willow/src/op/collectives/replicatedallreduce.cpp:40-47).
int64_t globalReplicas(const popart::Op &op) {
  return op.getIr().getSessionOptions().getGlobalReplicationFactor();
}

// Whether the sum runs over every replica (group_size 0, or all of them).
bool sumsOverAllReplicas(const popart::Op &op, int64_t groupSize) {
  return groupSize == 0 || groupSize == globalReplicas(op);
}

// Op::fwdPropagateIsReplicaEqual for a sum over groups of replicas, as PopART's
// ReplicatedAllReduceOp overrides it (willow/src/op/collectives/
// replicatedallreduce.cpp:78-104 at sdk/poplar/3.3.0, the same at 3.0-3.4;
// the base's signature: willow/include/popart/op.hpp:1062-1065 at 3.3.0).
// Output `out` is equal on every replica when the group holds all of them;
// otherwise, like PopART's op, defer to Op's default (outputs equal where all
// inputs are): the analysis tracks equality over all replicas only (PopART's
// TODO T51589), not within smaller groups.
// Why it matters: with RNG state management on
// (SessionOptions::_enableRngStateManagement, sessionoptions.hpp:1194), the
// StochasticRounding transform gives identical stochastic-rounding seeds only
// to the ops whose outputs this analysis finds replica-equal
// (willow/src/transforms/stochasticrounding.cpp:31-47 at 3.3.0). Without the
// override the group's mean and variance computed from the sum, and the
// float16 running statistics updated from them, would round differently per
// replica, and so would the shift K (the running mean) about which the next
// step's sums are taken, and which must be common to the group. The option is
// off by default, and then every op gets identical seeds (:54-60); PopTorch
// 3.3 does not register it among the options options._Popart.set accepts
// (poptorch scripts/PopParse.py:66), so it matters to PopART sessions that
// turn it on.
std::tuple<popart::ReplEqOutputMap, popart::ReplEqModifiedInputMap>
replicaEqualSum(const popart::Op &op, int64_t groupSize, popart::OutIndex out,
                const popart::AliasModel &aliasModel,
                const popart::ReplEqInputMap &inputMap,
                popart::ReplicaEqualAnalysisProxy &proxy) {
  if (sumsOverAllReplicas(op, groupSize)) {
    popart::ReplEqOutputMap result;
    result[out] = true;
    return std::make_tuple(result,
                           proxy.getModifiedInputMapFromAliases(&op, result));
  }
  return op.Op::fwdPropagateIsReplicaEqual(aliasModel, inputMap, proxy);
}

void checkInput(const char *opName, const popart::TensorInfo &x) {
  const auto type = x.dataType();
  if (type != popart::DataType::FLOAT && type != popart::DataType::FLOAT16) {
    throw popart::error("{}: input must be float32 or float16", opName);
  }
}

} // namespace

// ---------------------------------------------------------------------------
// IR ops
// ---------------------------------------------------------------------------

class ReplicaAllReduceSumOp : public popart::Op {
public:
  static popart::InIndex xIn() { return 0; }
  static popart::OutIndex out() { return 0; }

  ReplicaAllReduceSumOp(const popart::OperatorIdentifier &opid,
                        int64_t groupSize,
                        const popart::Op::Settings &settings)
      : popart::Op(opid, settings), groupSize_(groupSize) {}

  std::unique_ptr<popart::Op> clone() const final {
    return std::make_unique<ReplicaAllReduceSumOp>(*this);
  }

  void setup() final {
    checkInput("ReplicaAllReduceSum", inInfo(xIn()));
    replicasPerGroup("ReplicaAllReduceSum", groupSize_, globalReplicas(*this));
    outInfo(out()) = inInfo(xIn());
  }

  std::vector<std::unique_ptr<popart::Op>> getGradOps() final;

  void appendOutlineAttributes(popart::OpSerialiserBase &os) const final {
    popart::Op::appendOutlineAttributes(os);
    os.appendAttribute("group_size", groupSize_);
  }

  // A few values per channel: not worth outlining for its own sake.
  float getSubgraphValue() const final { return getLowSubgraphValue(); }

  // Equal on every replica when summed over all of them (replicaEqualSum).
  std::tuple<popart::ReplEqOutputMap, popart::ReplEqModifiedInputMap>
  fwdPropagateIsReplicaEqual(
      const popart::AliasModel &aliasModel,
      const popart::ReplEqInputMap &inputMap,
      popart::ReplicaEqualAnalysisProxy &proxy) const final {
    return replicaEqualSum(*this, groupSize_, out(), aliasModel, inputMap,
                           proxy);
  }

  int64_t groupSize() const { return groupSize_; }

private:
  int64_t groupSize_;
};

// The same all-reduce, applied to the gradient of the output. It reads only
// that gradient (no forward tensor stays alive for it), so recomputation never
// needs the forward input again for this op's sake.
class ReplicaAllReduceSumGradOp : public popart::Op {
public:
  static popart::InIndex gradOutIn() { return 0; }
  static popart::OutIndex gradXOut() { return 0; }

  explicit ReplicaAllReduceSumGradOp(const ReplicaAllReduceSumOp &fwd)
      : popart::Op(ReplicaAllReduceSumGradId, fwd.getSettings()),
        groupSize_(fwd.groupSize()) {}

  std::unique_ptr<popart::Op> clone() const final {
    return std::make_unique<ReplicaAllReduceSumGradOp>(*this);
  }

  void setup() final {
    checkInput("ReplicaAllReduceSumGrad", inInfo(gradOutIn()));
    outInfo(gradXOut()) = inInfo(gradOutIn());
  }

  const std::vector<popart::GradInOutMapper> &gradInputInfo() const final {
    using F = ReplicaAllReduceSumOp;
    static const std::vector<popart::GradInOutMapper> info = {
        {gradOutIn(), F::out(), popart::GradOpInType::GradOut}};
    return info;
  }

  const std::map<int, int> &gradOutToNonGradIn() const final {
    using F = ReplicaAllReduceSumOp;
    static const std::map<int, int> info = {{gradXOut(), F::xIn()}};
    return info;
  }

  void appendOutlineAttributes(popart::OpSerialiserBase &os) const final {
    popart::Op::appendOutlineAttributes(os);
    os.appendAttribute("group_size", groupSize_);
  }

  float getSubgraphValue() const final { return getLowSubgraphValue(); }

  // The gradient summed over all replicas is equal on every replica, as the
  // forward sum is (replicaEqualSum).
  std::tuple<popart::ReplEqOutputMap, popart::ReplEqModifiedInputMap>
  fwdPropagateIsReplicaEqual(
      const popart::AliasModel &aliasModel,
      const popart::ReplEqInputMap &inputMap,
      popart::ReplicaEqualAnalysisProxy &proxy) const final {
    return replicaEqualSum(*this, groupSize_, gradXOut(), aliasModel, inputMap,
                           proxy);
  }

  int64_t groupSize() const { return groupSize_; }

private:
  int64_t groupSize_;
};

std::vector<std::unique_ptr<popart::Op>> ReplicaAllReduceSumOp::getGradOps() {
  std::vector<std::unique_ptr<popart::Op>> ops;
  ops.emplace_back(std::make_unique<ReplicaAllReduceSumGradOp>(*this));
  return ops;
}

namespace {

const popart::OpDefinition::DataTypes kAnyFloat = {popart::DataType::FLOAT16,
                                                   popart::DataType::FLOAT};

const popart::OpDefinition replicaAllReduceSumDef(
    {popart::OpDefinition::Inputs({{"x", kAnyFloat}}),
     popart::OpDefinition::Outputs({{"y", kAnyFloat}}),
     popart::OpDefinition::Attributes({{"group_size", {"*"}}})});

popart::OpCreator<ReplicaAllReduceSumOp> replicaAllReduceSumCreator(
    popart::OpDefinitions({{ReplicaAllReduceSumId, replicaAllReduceSumDef}}),
    [](const popart::OpCreatorInfo &info) -> std::unique_ptr<popart::Op> {
      // poptorch.custom_op passes a Python int as an ONNX int64 attribute
      const int64_t groupSize =
          info.attributes.getAttribute<popart::Attributes::Int>("group_size",
                                                                0);
      return std::make_unique<ReplicaAllReduceSumOp>(info.opid, groupSize,
                                                     info.settings);
    },
    true);

} // namespace

// ---------------------------------------------------------------------------
// Poplar lowering
// ---------------------------------------------------------------------------

// Shared by the forward and grad Opx: y = sum of x over the groups.
class ReplicaAllReduceSumOpxBase : public popart::popx::Opx {
public:
  ReplicaAllReduceSumOpxBase(popart::Op *op, popart::popx::Devicex *devicex)
      : popart::popx::Opx(op, devicex) {}

protected:
  void growSum(poplar::program::Sequence &prog, int64_t groupSize) const {
    const poplar::Tensor &x = getInTensor(0);
    // IrLowering::getGlobalReplicationFactor (irlowering.hpp:521 at SDK 3.4,
    // :503 at 3.0; irlowering.cpp:2577): what PopART's collectives lower with
    // (collectivesx.cpp:151).
    const int64_t replicas =
        static_cast<int64_t>(dv_p->lowering().getGlobalReplicationFactor());
    const int64_t size =
        replicasPerGroup("ReplicaAllReduceSum", groupSize, replicas);
    if (size == 1) {
      // One replica per group (or an unreplicated graph, e.g. the IPU Model):
      // the sum is x itself; a copy keeps the op out of place.
      setOutTensor(0, cloneNcopy(prog, x, "copy"));
      return;
    }
    // The group as PopART 3.3 and 3.4 ask GCL for a ReplicaGrouping's, in
    // toGclCommGroup (willow/src/popx/op/collectives/collectivesx.cpp:275-279
    // at sdk/poplar/3.3.0 and 3.4.0): gcl::CommGroup{CONSECUTIVE, group size,
    // stride}, stride 1 for consecutive replicas, and every replica as one
    // CONSECUTIVE group of all of them (ReplicaGrouping(R) is R replicas with
    // stride 1 and group size R: willow/src/replicagrouping.cpp:36-37). That is
    // how PopART 3.3 lowers its gradient all-reduce, which spans poprun
    // instances (willow/src/patterns/optimizerdecompose.cpp:427-435: the
    // weight's grouping over the global replication factor; popart
    // docs/popxl/distributed.rst:118-125). PopART 3.0 still asked for a single
    // group as {ALL, 0} (collectivesx.cpp:280-288 at 3.0.0, marked for removal,
    // TODO T68176) and 3.1 dropped it; popxl-addons keeps that form for a group
    // of a Poplar graph's every replica ("GCL's preference of ALL",
    // ops/replicated_strided_collectives/mgcl.cpp:26-31 at sdk-release-3.3.0).
    const gcl::CommGroup group(gcl::CommGroupType::CONSECUTIVE,
                               static_cast<unsigned>(size), 1U);
    const poplar::Tensor y = gcl::allReduceCrossReplica(
        graph(), x, gcl::CollectiveOperator::ADD, prog, group,
        debugContext("replicaAllReduceSum"), dv_p->lowering().gclOptions);
    setOutTensor(0, y);
  }
};

class ReplicaAllReduceSumOpx : public ReplicaAllReduceSumOpxBase {
public:
  ReplicaAllReduceSumOpx(popart::Op *op, popart::popx::Devicex *devicex)
      : ReplicaAllReduceSumOpxBase(op, devicex) {
    verifyOp<ReplicaAllReduceSumOp>(op, ReplicaAllReduceSumId);
  }

  void grow(poplar::program::Sequence &prog) const final {
    growSum(prog, getOp<ReplicaAllReduceSumOp>().groupSize());
  }
};

class ReplicaAllReduceSumGradOpx : public ReplicaAllReduceSumOpxBase {
public:
  ReplicaAllReduceSumGradOpx(popart::Op *op, popart::popx::Devicex *devicex)
      : ReplicaAllReduceSumOpxBase(op, devicex) {
    verifyOp<ReplicaAllReduceSumGradOp>(op, ReplicaAllReduceSumGradId);
  }

  void grow(poplar::program::Sequence &prog) const final {
    growSum(prog, getOp<ReplicaAllReduceSumGradOp>().groupSize());
  }
};

namespace {
popart::popx::OpxCreator<ReplicaAllReduceSumOpx>
    replicaAllReduceSumOpxCreator(ReplicaAllReduceSumId);
popart::popx::OpxCreator<ReplicaAllReduceSumGradOpx>
    replicaAllReduceSumGradOpxCreator(ReplicaAllReduceSumGradId);
} // namespace

} // namespace proxynorm_ipu
