// A differentiable sum over groups of IPU replicas, as a PopART custom op for
// PopTorch: poptorch.custom_op([x], "ReplicaAllReduceSum",
// "ai.graphcore.proxynorm", 1, ...). Built into the same library as
// proxynorm_ipu.cpp by proxynorm/ops/ipu/Makefile; the Python side is
// ops.ipu.replica_all_reduce_sum, which SyncBatchNormAct calls once per
// layer to share its batch statistics across replicas.
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
// replicatedallreduce.cpp defines none, so autodiff drops its gradient), which is
// why this op exists.
//
// The lowering follows PopART's ReplicatedAllReduceOpx::grow (popart
// willow/src/popx/op/collectives/replicatedallreducex.cpp:39-65 at SDK 3.4):
// gcl::allReduceCrossReplica(graph, x, gcl::CollectiveOperator::ADD, prog,
// group, debugContext, options) from <gcl/Collectives.hpp>, out of place, with
// the session's GCL options (IrLowering::gclOptions, popart
// willow/include/popart/popx/irlowering.hpp:418; PopTorch sets them through
// options._Popart.set("gclOptions", {...})). Written, like proxynorm_ipu.cpp,
// against the Poplar SDK 3.x headers (popart::popx::Opx with poplar types);
// never compiled where it was written (no SDK there).

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <gcl/Collectives.hpp>
#include <poplar/Graph.hpp>
#include <poplar/Program.hpp>
#include <poplar/Tensor.hpp>

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
    // gcl::CommGroup(type, replicaGroupSize): the two-argument constructor that
    // PopART 3.0 (collectivesx.cpp:280-288, {ALL, 0}) and popxl-addons 3.4
    // (ops/replicated_strided_collectives/mgcl.cpp:26-31, 224) use; later
    // PopART adds a stride as a third argument, which consecutive groups do
    // not need. A group of every replica is asked for as ALL, as both of
    // those do ("GCL's preference of ALL"); it also spans poprun instances,
    // as the gradient all-reduce does (popart docs/popxl/distributed.rst:118-125).
    const gcl::CommGroup group =
        size == replicas
            ? gcl::CommGroup(gcl::CommGroupType::ALL, 0)
            : gcl::CommGroup(gcl::CommGroupType::CONSECUTIVE,
                             static_cast<unsigned>(size));
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
