// GroupNorm (no affine of its own) + affine + activation + Proxy Norm, fused into one
// PopART custom op for PopTorch: poptorch.custom_op(..., "GroupNormProxyAct",
// "ai.graphcore.proxynorm", 1, ...). Built by proxynorm/ops/ipu/Makefile; see
// proxynorm/ops/ipu/__init__.py for the Python side.
//
//   inputs : 0 x (N, C, *spatial), 1 weight (C), 2 bias (C), 3 proxy_mean (C),
//            4 proxy_rstd (C); float32 or float16 each
//   output : 0 out = (act(weight * (x - mu) * rstd + bias) - proxy_mean) * proxy_rstd,
//              x's shape and type, with mu and rstd = 1/sqrt(biased var + epsilon) the
//              float32 statistics of each (sample, group)
//   attributes: groups (int), act ("relu", "silu", "gelu", "identity"), epsilon (float)
//
// One output: the grad op recomputes the (N, G) statistics from x, which it reads
// anyway. Statistics as extra outputs would have no consumer in the forward graph
// (PopTorch's own custom-op test keeps such outputs in the loss, "Popart errors if this
// is unused", poptorch tests/custom_ops_test.py), and a pipeline would stash them
// beside x; the cost is one more reduction over x in the backward pass.
//
// Written against the Poplar SDK 3.x headers (PopART 3.0-3.4, where popart::popx::Opx is
// the Opx base; SDK 2.x custom ops derived from PopOpx instead). The SDK 3.x PopTorch
// ships with torch 2.0.

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <poplar/Graph.hpp>
#include <poplar/Program.hpp>
#include <poplar/Tensor.hpp>
#include <poplar/Type.hpp>
#include <popops/Cast.hpp>
#include <popops/ElementWise.hpp>
#include <popops/Expr.hpp>
#include <popops/Reduce.hpp>

#include <popart/attributes.hpp>
#include <popart/datatype.hpp>
#include <popart/error.hpp>
#include <popart/ir.hpp>
#include <popart/names.hpp>
#include <popart/op.hpp>
#include <popart/operatoridentifier.hpp>
#include <popart/opmanager.hpp>
#include <popart/opserialiser.hpp>
#include <popart/popx/opx.hpp>
#include <popart/popx/opxmanager.hpp>
#include <popart/sessionoptions.hpp>
#include <popart/tensorinfo.hpp>

namespace proxynorm_ipu {

const popart::OperatorIdentifier GroupNormProxyActId = {
    "ai.graphcore.proxynorm", "GroupNormProxyAct", 1};
const popart::OperatorIdentifier GroupNormProxyActGradId = {
    "ai.graphcore.proxynorm", "GroupNormProxyActGrad", 1};

enum class Act { Relu, Silu, Gelu, Identity };

Act parseAct(const std::string &name) {
  if (name == "relu")
    return Act::Relu;
  if (name == "silu")
    return Act::Silu;
  if (name == "gelu")
    return Act::Gelu;
  if (name == "identity")
    return Act::Identity;
  throw popart::error("GroupNormProxyAct: unknown act '{}'; valid names: relu, "
                      "silu, gelu, identity",
                      name);
}

std::string actName(Act act) {
  switch (act) {
  case Act::Relu:
    return "relu";
  case Act::Silu:
    return "silu";
  case Act::Gelu:
    return "gelu";
  case Act::Identity:
    return "identity";
  }
  return "?";
}

// ---------------------------------------------------------------------------
// IR ops
// ---------------------------------------------------------------------------

class GroupNormProxyActOp : public popart::Op {
public:
  static popart::InIndex xIn() { return 0; }
  static popart::InIndex weightIn() { return 1; }
  static popart::InIndex biasIn() { return 2; }
  static popart::InIndex proxyMeanIn() { return 3; }
  static popart::InIndex proxyRstdIn() { return 4; }
  static popart::OutIndex out() { return 0; }

  GroupNormProxyActOp(const popart::OperatorIdentifier &opid, int64_t groups,
                      Act act, float epsilon,
                      const popart::Op::Settings &settings)
      : popart::Op(opid, settings), groups_(groups), act_(act),
        epsilon_(epsilon) {}

  std::unique_ptr<popart::Op> clone() const final {
    return std::make_unique<GroupNormProxyActOp>(*this);
  }

  void setup() final {
    const popart::TensorInfo &x = inInfo(xIn());
    if (x.rank() < 2) {
      throw popart::error("GroupNormProxyAct: x must be (N, C, *spatial), got "
                          "rank {}",
                          x.rank());
    }
    const int64_t channels = x.dim(1);
    if (groups_ < 1 || channels % groups_ != 0) {
      throw popart::error("GroupNormProxyAct: groups={} must divide the {} "
                          "channels",
                          groups_, channels);
    }
    for (popart::InIndex i = weightIn(); i <= proxyRstdIn(); ++i) {
      if (inInfo(i).shape() != popart::Shape{channels}) {
        throw popart::error("GroupNormProxyAct: input {} must have shape ({}),"
                            " one value per channel",
                            i, channels);
      }
    }
    for (popart::InIndex i = xIn(); i <= proxyRstdIn(); ++i) {
      const auto type = inInfo(i).dataType();
      if (type != popart::DataType::FLOAT &&
          type != popart::DataType::FLOAT16) {
        throw popart::error("GroupNormProxyAct: input {} must be float32 or "
                            "float16",
                            i);
      }
    }
    outInfo(out()) = x;
  }

  std::vector<std::unique_ptr<popart::Op>> getGradOps() final;

  // Op::appendAttributes calls this too; outlining must not merge ops that
  // differ in these.
  void appendOutlineAttributes(popart::OpSerialiserBase &os) const final {
    popart::Op::appendOutlineAttributes(os);
    os.appendAttribute("groups", groups_);
    os.appendAttribute("act", actName(act_));
    os.appendAttribute("epsilon", epsilon_);
  }

  float getSubgraphValue() const final { return getHighSubgraphValue(); }

  int64_t groups() const { return groups_; }
  Act act() const { return act_; }
  float epsilon() const { return epsilon_; }

private:
  int64_t groups_;
  Act act_;
  float epsilon_;
};

// One grad op for all five inputs: they share the recomputed statistics and
// pre-activation and their per-(sample, channel) sums. It reads the forward inputs
// only, so no forward intermediate stays alive until the backward pass.
class GroupNormProxyActGradOp : public popart::Op {
public:
  static popart::InIndex gradOutIn() { return 0; }
  static popart::InIndex xIn() { return 1; }
  static popart::InIndex weightIn() { return 2; }
  static popart::InIndex biasIn() { return 3; }
  static popart::InIndex proxyMeanIn() { return 4; }
  static popart::InIndex proxyRstdIn() { return 5; }
  static popart::OutIndex gradXOut() { return 0; }
  static popart::OutIndex gradWeightOut() { return 1; }
  static popart::OutIndex gradBiasOut() { return 2; }
  static popart::OutIndex gradProxyMeanOut() { return 3; }
  static popart::OutIndex gradProxyRstdOut() { return 4; }

  explicit GroupNormProxyActGradOp(const GroupNormProxyActOp &fwd)
      : popart::Op(GroupNormProxyActGradId, fwd.getSettings()),
        groups_(fwd.groups()), act_(fwd.act()), epsilon_(fwd.epsilon()) {}

  std::unique_ptr<popart::Op> clone() const final {
    return std::make_unique<GroupNormProxyActGradOp>(*this);
  }

  void setup() final {
    outInfo(gradXOut()) = inInfo(xIn());
    outInfo(gradWeightOut()) = inInfo(weightIn());
    outInfo(gradBiasOut()) = inInfo(biasIn());
    outInfo(gradProxyMeanOut()) = inInfo(proxyMeanIn());
    outInfo(gradProxyRstdOut()) = inInfo(proxyRstdIn());
  }

  const std::vector<popart::GradInOutMapper> &gradInputInfo() const final {
    using F = GroupNormProxyActOp;
    using popart::GradOpInType;
    static const std::vector<popart::GradInOutMapper> info = {
        {gradOutIn(), F::out(), GradOpInType::GradOut},
        {xIn(), F::xIn(), GradOpInType::In},
        {weightIn(), F::weightIn(), GradOpInType::In},
        {biasIn(), F::biasIn(), GradOpInType::In},
        {proxyMeanIn(), F::proxyMeanIn(), GradOpInType::In},
        {proxyRstdIn(), F::proxyRstdIn(), GradOpInType::In}};
    return info;
  }

  const std::map<int, int> &gradOutToNonGradIn() const final {
    using F = GroupNormProxyActOp;
    static const std::map<int, int> info = {
        {gradXOut(), F::xIn()},
        {gradWeightOut(), F::weightIn()},
        {gradBiasOut(), F::biasIn()},
        {gradProxyMeanOut(), F::proxyMeanIn()},
        {gradProxyRstdOut(), F::proxyRstdIn()}};
    return info;
  }

  void appendOutlineAttributes(popart::OpSerialiserBase &os) const final {
    popart::Op::appendOutlineAttributes(os);
    os.appendAttribute("groups", groups_);
    os.appendAttribute("act", actName(act_));
    os.appendAttribute("epsilon", epsilon_);
  }

  float getSubgraphValue() const final { return getHighSubgraphValue(); }

  int64_t groups() const { return groups_; }
  Act act() const { return act_; }
  float epsilon() const { return epsilon_; }

private:
  int64_t groups_;
  Act act_;
  float epsilon_;
};

std::vector<std::unique_ptr<popart::Op>> GroupNormProxyActOp::getGradOps() {
  std::vector<std::unique_ptr<popart::Op>> ops;
  ops.emplace_back(std::make_unique<GroupNormProxyActGradOp>(*this));
  return ops;
}

namespace {

const popart::OpDefinition::DataTypes kAnyFloat = {popart::DataType::FLOAT16,
                                                   popart::DataType::FLOAT};

const popart::OpDefinition groupNormProxyActDef(
    {popart::OpDefinition::Inputs({{"x", kAnyFloat},
                                   {"weight", kAnyFloat},
                                   {"bias", kAnyFloat},
                                   {"proxy_mean", kAnyFloat},
                                   {"proxy_rstd", kAnyFloat}}),
     popart::OpDefinition::Outputs({{"out", kAnyFloat}}),
     popart::OpDefinition::Attributes(
         {{"groups", {"*"}}, {"act", {"*"}}, {"epsilon", {"*"}}})});

popart::OpCreator<GroupNormProxyActOp> groupNormProxyActCreator(
    popart::OpDefinitions({{GroupNormProxyActId, groupNormProxyActDef}}),
    [](const popart::OpCreatorInfo &info) -> std::unique_ptr<popart::Op> {
      // poptorch.custom_op turns Python int / float / str attributes into
      // ONNX int64 / float / string attributes.
      const int64_t groups =
          info.attributes.getAttribute<popart::Attributes::Int>("groups");
      const std::string act =
          info.attributes.getAttribute<popart::Attributes::String>(
              "act", std::string("relu"));
      const float epsilon =
          info.attributes.getAttribute<popart::Attributes::Float>("epsilon",
                                                                  1e-5f);
      return std::make_unique<GroupNormProxyActOp>(
          info.opid, groups, parseAct(act), epsilon, info.settings);
    },
    true);

} // namespace

// ---------------------------------------------------------------------------
// Poplar lowering
// ---------------------------------------------------------------------------

namespace pe = popops::expr;

constexpr float kSqrtHalf = 0.70710678118654752f;   // 1/sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f; // 1/sqrt(2 pi)

// act(a), with a a float expression.
pe::Any actExpr(Act act, const pe::Expr &a) {
  switch (act) {
  case Act::Relu:
    return pe::Any(pe::Max(a, pe::Const(0.0f)));
  case Act::Silu:
    return pe::Any(a * pe::Sigmoid(a));
  case Act::Gelu: // exact (erf) GELU, as torch.nn.GELU's default
    return pe::Any(0.5f * a * (1.0f + pe::Erf(a * kSqrtHalf)));
  case Act::Identity:
    break;
  }
  return pe::Any(a);
}

// g * act'(a), with a and g float expressions. ReLU's derivative at 0 is 0, as
// PyTorch's threshold_backward.
pe::Any actGradTimes(Act act, const pe::Expr &a, const pe::Expr &g) {
  switch (act) {
  case Act::Relu:
    return pe::Any(pe::Select(g, pe::Const(0.0f), pe::Gt(a, pe::Const(0.0f))));
  case Act::Silu:
    return pe::Any(
        g * (pe::Sigmoid(a) * (1.0f + a * (1.0f - pe::Sigmoid(a)))));
  case Act::Gelu:
    return pe::Any(g * (0.5f * (1.0f + pe::Erf(a * kSqrtHalf)) +
                        kInvSqrt2Pi * a * pe::Exp(-0.5f * a * a)));
  case Act::Identity:
    break;
  }
  return pe::Any(g);
}

// Placeholder p read as float32: a Cast only where the tensor is not float32 (a
// same-type Cast would cost a copy outside generated codelets).
pe::Any asFloat(const pe::PlaceHolder &p, const poplar::Tensor &t) {
  if (t.elementType() == poplar::FLOAT)
    return pe::Any(p);
  return pe::Any(pe::Cast(p, poplar::FLOAT));
}

struct Dims {
  std::size_t n;  // samples
  std::size_t c;  // channels
  std::size_t g;  // groups
  std::size_t cg; // channels per group
  std::size_t s;  // spatial positions (1 without spatial dimensions)
  std::size_t groupSize() const { return cg * s; }
};

Dims dimsOf(const poplar::Tensor &x, int64_t groups) {
  Dims d;
  d.n = x.dim(0);
  d.c = x.dim(1);
  d.g = static_cast<std::size_t>(groups);
  d.cg = d.c / d.g;
  d.s = (d.n * d.c == 0) ? 1 : x.numElements() / (d.n * d.c);
  return d;
}

// Shared by the forward and grad Opx. Every full-size pass is one popops::map or
// reduce; per-channel and per-(sample, group) factors are folded into small
// (N, C) tensors first, so a full-size map never has more broadcast operands
// than it needs. (popops generates one fused codelet only for same-shape,
// alias-free operands; broadcast operands run op by op.)
class ProxyNormOpxBase : public popart::popx::Opx {
public:
  ProxyNormOpxBase(popart::Op *op, popart::popx::Devicex *devicex)
      : popart::popx::Opx(op, devicex) {}

protected:
  poplar::Tensor toFloat(const poplar::Tensor &t,
                         poplar::program::Sequence &prog,
                         const std::string &name) const {
    if (t.elementType() == poplar::FLOAT)
      return t;
    return popops::cast(graph(), t, poplar::FLOAT, prog, debugContext(name));
  }

  poplar::Tensor castTo(const poplar::Tensor &t, const poplar::Type &type,
                        poplar::program::Sequence &prog,
                        const std::string &name) const {
    if (t.elementType() == type)
      return t;
    return popops::cast(graph(), t, type, prog, debugContext(name));
  }

  poplar::Tensor sumOver(const poplar::Tensor &t, std::size_t dim,
                         poplar::program::Sequence &prog,
                         const std::string &name) const {
    return popops::reduce(graph(), t, poplar::FLOAT, {dim},
                          popops::Operation::ADD, prog, debugContext(name));
  }

  // Per-(sample, group) mean and 1/sqrt(biased var + eps), float32, (N, G).
  // Default: one pass (sum and sum of squares, float32 partials), as PopART's
  // GroupNorm; the session option enableStableNorm switches to two passes
  // (mean first, then the centred squares) for inputs whose mean dwarfs their
  // spread.
  std::pair<poplar::Tensor, poplar::Tensor>
  groupStatistics(const poplar::Tensor &x, const Dims &d, float eps,
                  bool stable, poplar::program::Sequence &prog) const {
    const poplar::Tensor xg = x.reshape({d.n * d.g, d.groupSize()});
    const float invK = 1.0f / static_cast<float>(d.groupSize());
    poplar::Tensor mean;
    poplar::Tensor rstd;
    if (stable) {
      const poplar::Tensor sum = sumOver(xg, 1, prog, "sum");
      mean = popops::map(graph(), pe::_1 * invK, {sum}, prog,
                         debugContext("mean"));
      const poplar::Tensor centred = popops::map(
          graph(), pe::Sub(asFloat(pe::_1, xg), pe::_2),
          {xg, mean.reshape({d.n * d.g, 1})}, prog, debugContext("centred"));
      const poplar::Tensor sumSquares = popops::reduce(
          graph(), centred, poplar::FLOAT, {1}, popops::Operation::SQUARE_ADD,
          prog, debugContext("sumSquares"));
      rstd = popops::map(graph(), 1.0f / pe::Sqrt(pe::_1 * invK + eps),
                         {sumSquares}, prog, debugContext("rstd"));
    } else {
      std::vector<poplar::Tensor> sums;
      popops::reduceMany(
          graph(),
          {popops::SingleReduceOp(xg, {1}, popops::Operation::ADD,
                                  poplar::FLOAT, "sum"),
           popops::SingleReduceOp(xg, {1}, popops::Operation::SQUARE_ADD,
                                  poplar::FLOAT, "sumSquares")},
          sums, prog, debugContext("moments"));
      mean = popops::map(graph(), pe::_1 * invK, {sums[0]}, prog,
                         debugContext("mean"));
      rstd = popops::map(
          graph(),
          1.0f / pe::Sqrt(pe::Max(pe::_2 * invK - pe::Square(pe::_1 * invK),
                                  pe::Const(0.0f)) +
                          eps),
          {sums[0], sums[1]}, prog, debugContext("rstd"));
    }
    return {mean.reshape({d.n, d.g}), rstd.reshape({d.n, d.g})};
  }

  // GroupNorm + affine folded to a = x * scale + shift with (N, C) factors:
  // scale = weight * rstd, shift = bias - mean * scale.
  std::pair<poplar::Tensor, poplar::Tensor>
  foldedAffine(const Dims &d, const poplar::Tensor &weight,
               const poplar::Tensor &bias, const poplar::Tensor &mean,
               const poplar::Tensor &rstd,
               poplar::program::Sequence &prog) const {
    const poplar::Tensor scale =
        popops::map(graph(), pe::_1 * pe::_2,
                    {weight.reshape({1, d.g, d.cg}), rstd.reshape({d.n, d.g, 1})},
                    prog, debugContext("scale"));
    const poplar::Tensor shift = popops::map(
        graph(), pe::_1 - pe::_2 * pe::_3,
        {bias.reshape({1, d.g, d.cg}), mean.reshape({d.n, d.g, 1}), scale},
        prog, debugContext("shift"));
    return {scale.reshape({d.n, d.c}), shift.reshape({d.n, d.c})};
  }

  // The pre-activation a, float32, (N, C, S); a fresh tensor, never an alias of x.
  poplar::Tensor preActivation(const poplar::Tensor &x, const Dims &d,
                               const poplar::Tensor &scale,
                               const poplar::Tensor &shift,
                               poplar::program::Sequence &prog) const {
    const poplar::Tensor x3 = x.reshape({d.n, d.c, d.s});
    const poplar::Tensor scale3 = scale.reshape({d.n, d.c, 1});
    const poplar::Tensor shift3 = shift.reshape({d.n, d.c, 1});
    if (x.elementType() == poplar::FLOAT) {
      return popops::map(graph(), pe::_1 * pe::_2 + pe::_3,
                         {x3, scale3, shift3}, prog,
                         debugContext("preActivation"));
    }
    poplar::Tensor a = popops::cast(graph(), x3, poplar::FLOAT, prog,
                                    debugContext("castX"));
    popops::mapInPlace(graph(), pe::_1 * pe::_2 + pe::_3, {a, scale3, shift3},
                       prog, debugContext("preActivation"));
    return a;
  }
};

class GroupNormProxyActOpx : public ProxyNormOpxBase {
public:
  GroupNormProxyActOpx(popart::Op *op, popart::popx::Devicex *devicex)
      : ProxyNormOpxBase(op, devicex) {
    verifyOp<GroupNormProxyActOp>(op, GroupNormProxyActId);
  }

  void grow(poplar::program::Sequence &prog) const final {
    using F = GroupNormProxyActOp;
    auto &op = getOp<F>();
    const poplar::Tensor &x = getInTensor(F::xIn());
    const Dims d = dimsOf(x, op.groups());

    poplar::Tensor mean;
    poplar::Tensor rstd;
    std::tie(mean, rstd) =
        groupStatistics(x, d, op.epsilon(),
                        op.getIr().getSessionOptions().enableStableNorm, prog);

    const poplar::Tensor weight = toFloat(getInTensor(F::weightIn()), prog, "weight");
    const poplar::Tensor bias = toFloat(getInTensor(F::biasIn()), prog, "bias");
    const poplar::Tensor proxyMean =
        toFloat(getInTensor(F::proxyMeanIn()), prog, "proxyMean");
    const poplar::Tensor proxyRstd =
        toFloat(getInTensor(F::proxyRstdIn()), prog, "proxyRstd");

    poplar::Tensor scale;
    poplar::Tensor shift;
    std::tie(scale, shift) = foldedAffine(d, weight, bias, mean, rstd, prog);

    poplar::Tensor z = preActivation(x, d, scale, shift, prog);
    if (op.act() != Act::Identity) {
      popops::mapInPlace(graph(), actExpr(op.act(), pe::_1), {z}, prog,
                         debugContext("act"));
    }
    popops::mapInPlace(graph(), (pe::_1 - pe::_2) * pe::_3,
                       {z, proxyMean.reshape({1, d.c, 1}),
                        proxyRstd.reshape({1, d.c, 1})},
                       prog, debugContext("proxyNormalise"));

    setOutTensor(F::out(),
                 castTo(z.reshape(x.shape()), x.elementType(), prog, "castOut"));
  }
};

// With mu, rstd and a = x * scale + shift recomputed (as the forward computed them:
// the same function and session option), z = act(a), y = (x - mu) * rstd,
// g = dout * act'(a) and da = proxy_rstd * g:
//   grad_proxy_rstd = sum dout * (z - proxy_mean)
//   grad_proxy_mean = -proxy_rstd * sum dout
//   grad_bias       = proxy_rstd * sum g,  grad_weight = proxy_rstd * sum g * y
//   grad_x          = rstd * (dy - mean_group(dy) - y * mean_group(dy * y)),
//                     dy = weight * da
// The full-size passes only produce per-(sample, channel) sums over space; the
// rest is (N, C) arithmetic. sum g * y = rstd * (sum g * x - mu * sum g), the
// same expansion as ATen's GroupNorm backward.
class GroupNormProxyActGradOpx : public ProxyNormOpxBase {
public:
  GroupNormProxyActGradOpx(popart::Op *op, popart::popx::Devicex *devicex)
      : ProxyNormOpxBase(op, devicex) {
    verifyOp<GroupNormProxyActGradOp>(op, GroupNormProxyActGradId);
  }

  void grow(poplar::program::Sequence &prog) const final {
    using B = GroupNormProxyActGradOp;
    auto &op = getOp<B>();
    const poplar::Tensor &gradOut = getInTensor(B::gradOutIn());
    const poplar::Tensor &x = getInTensor(B::xIn());
    const Dims d = dimsOf(x, op.groups());

    poplar::Tensor mean;
    poplar::Tensor rstd;
    std::tie(mean, rstd) =
        groupStatistics(x, d, op.epsilon(),
                        op.getIr().getSessionOptions().enableStableNorm, prog);

    const poplar::Tensor weight = toFloat(getInTensor(B::weightIn()), prog, "weight");
    const poplar::Tensor bias = toFloat(getInTensor(B::biasIn()), prog, "bias");
    const poplar::Tensor proxyMean =
        toFloat(getInTensor(B::proxyMeanIn()), prog, "proxyMean");
    const poplar::Tensor proxyRstd =
        toFloat(getInTensor(B::proxyRstdIn()), prog, "proxyRstd");

    poplar::Tensor scale;
    poplar::Tensor shift;
    std::tie(scale, shift) = foldedAffine(d, weight, bias, mean, rstd, prog);
    const poplar::Tensor a = preActivation(x, d, scale, shift, prog);

    const poplar::Tensor x3 = x.reshape({d.n, d.c, d.s});
    const poplar::Tensor dout3 = gradOut.reshape({d.n, d.c, d.s});
    const pe::Any dout = asFloat(pe::_2, dout3);

    // Per-(sample, channel) sums over space, (N, C). Each full-size temporary
    // dies at its reduction; only a and then g outlive one.
    const poplar::Tensor sumDout = sumOver(dout3, 2, prog, "sumGradOut");
    const poplar::Tensor sumDoutZ = sumOver(
        popops::map(graph(), pe::Mul(actExpr(op.act(), pe::_1), dout),
                    {a, dout3}, prog, debugContext("gradOutTimesZ")),
        2, prog, "sumGradOutTimesZ");
    poplar::Tensor g = popops::map(graph(), actGradTimes(op.act(), pe::_1, dout),
                                   {a, dout3}, prog, debugContext("actGrad"));
    const poplar::Tensor sumG = sumOver(g, 2, prog, "sumG");
    const poplar::Tensor sumGX = sumOver(
        popops::map(graph(), pe::Mul(pe::_1, asFloat(pe::_2, x3)), {g, x3},
                    prog, debugContext("gTimesX")),
        2, prog, "sumGTimesX");

    // (N, G, Cg) views of the (N, C) sums; (N, G, 1) views of the statistics.
    const poplar::Tensor mean3 = mean.reshape({d.n, d.g, 1});
    const poplar::Tensor rstd3 = rstd.reshape({d.n, d.g, 1});
    const poplar::Tensor sumG3 = sumG.reshape({d.n, d.g, d.cg});
    const poplar::Tensor sumGY3 = popops::map(
        graph(), pe::_1 * (pe::_2 - pe::_3 * pe::_4),
        {rstd3, sumGX.reshape({d.n, d.g, d.cg}), mean3, sumG3}, prog,
        debugContext("sumGTimesY"));

    // dy = weight * proxy_rstd * g: group sums of dy and dy * y, (N, G).
    const poplar::Tensor wpr3 =
        popops::map(graph(), pe::_1 * pe::_2, {weight, proxyRstd}, prog,
                    debugContext("weightTimesProxyRstd"))
            .reshape({1, d.g, d.cg});
    const poplar::Tensor sumDy = sumOver(
        popops::map(graph(), pe::_1 * pe::_2, {wpr3, sumG3}, prog,
                    debugContext("dy")),
        2, prog, "sumDy");
    const poplar::Tensor sumDyY = sumOver(
        popops::map(graph(), pe::_1 * pe::_2, {wpr3, sumGY3}, prog,
                    debugContext("dyTimesY")),
        2, prog, "sumDyTimesY");

    // grad_x = coefG * g + coefX * x + offset, with
    //   coefG  = rstd * weight * proxy_rstd                  (N, G, Cg)
    //   coefX  = -rstd^2 * mean_group(dy * y)                (N, G)
    //   offset = rstd * (rstd * mu * mean_group(dy * y) - mean_group(dy))
    const float invK = 1.0f / static_cast<float>(d.groupSize());
    const poplar::Tensor coefG =
        popops::map(graph(), pe::_1 * pe::_2, {rstd3, wpr3}, prog,
                    debugContext("coefG"))
            .reshape({d.n, d.g, d.cg, 1});
    const poplar::Tensor coefX =
        popops::map(graph(), -(pe::_1 * pe::_1 * pe::_2) * invK,
                    {rstd, sumDyY}, prog, debugContext("coefX"))
            .reshape({d.n, d.g, 1, 1});
    const poplar::Tensor offset =
        popops::map(graph(), pe::_1 * (pe::_1 * pe::_2 * pe::_3 - pe::_4) * invK,
                    {rstd, mean, sumDyY, sumDy}, prog, debugContext("offset"))
            .reshape({d.n, d.g, 1, 1});
    const poplar::Tensor x4 = x.reshape({d.n, d.g, d.cg, d.s});
    // g is a temporary of this Opx, so grad_x overwrites it.
    popops::mapInPlace(
        graph(), pe::_1 * pe::_2 + pe::Mul(asFloat(pe::_3, x4), pe::_4) + pe::_5,
        {g.reshape({d.n, d.g, d.cg, d.s}), coefG, x4, coefX, offset}, prog,
        debugContext("gradX"));

    // Sums over samples of the four (N, C) sums in one reduction: rows are
    // dout, dout * z, g, g * y.
    const poplar::Tensor perChannel = popops::reduce(
        graph(),
        poplar::concat(std::vector<poplar::Tensor>{
                           sumDout.expand({0}), sumDoutZ.expand({0}),
                           sumG.expand({0}),
                           sumGY3.reshape({d.n, d.c}).expand({0})},
                       0),
        poplar::FLOAT, {1}, popops::Operation::ADD, prog,
        debugContext("sumOverSamples"));
    const poplar::Tensor gradProxyMean =
        popops::map(graph(), -(pe::_1 * pe::_2), {proxyRstd, perChannel[0]},
                    prog, debugContext("gradProxyMean"));
    const poplar::Tensor gradProxyRstd = popops::map(
        graph(), pe::_1 - pe::_2 * pe::_3,
        {perChannel[1], proxyMean, perChannel[0]}, prog,
        debugContext("gradProxyRstd"));
    const poplar::Tensor gradBias =
        popops::map(graph(), pe::_1 * pe::_2, {proxyRstd, perChannel[2]}, prog,
                    debugContext("gradBias"));
    const poplar::Tensor gradWeight =
        popops::map(graph(), pe::_1 * pe::_2, {proxyRstd, perChannel[3]}, prog,
                    debugContext("gradWeight"));

    setOutTensor(B::gradXOut(),
                 castTo(g.reshape(x.shape()), x.elementType(), prog, "castGradX"));
    setOutTensor(B::gradWeightOut(),
                 castTo(gradWeight, getInTensor(B::weightIn()).elementType(), prog,
                        "castGradWeight"));
    setOutTensor(B::gradBiasOut(),
                 castTo(gradBias, getInTensor(B::biasIn()).elementType(), prog,
                        "castGradBias"));
    setOutTensor(B::gradProxyMeanOut(),
                 castTo(gradProxyMean,
                        getInTensor(B::proxyMeanIn()).elementType(), prog,
                        "castGradProxyMean"));
    setOutTensor(B::gradProxyRstdOut(),
                 castTo(gradProxyRstd,
                        getInTensor(B::proxyRstdIn()).elementType(), prog,
                        "castGradProxyRstd"));
  }
};

namespace {
popart::popx::OpxCreator<GroupNormProxyActOpx>
    groupNormProxyActOpxCreator(GroupNormProxyActId);
popart::popx::OpxCreator<GroupNormProxyActGradOpx>
    groupNormProxyActGradOpxCreator(GroupNormProxyActGradId);
} // namespace

} // namespace proxynorm_ipu
