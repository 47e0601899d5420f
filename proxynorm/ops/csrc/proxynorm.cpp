// torch.ops.proxynorm: the schemas, the input checks, the choice of kernel copy and the
// autograd of the two forward ops. Autograd is C++ rather than Python's register_autograd
// because a Python autograd node per call costs more than the kernels at a small
// micro-batch; the fake (meta) kernels are registered from Python (proxynorm/ops/cpu.py).
#include <ATen/Functions.h>
#include <ATen/Version.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <string>
#include <string_view>
#include <tuple>

#include "proxynorm.h"

namespace proxynorm {
namespace {

const Kernels& kernels() {
  // The instruction set ATen picked for its own kernels (ATEN_CPU_CAPABILITY honoured).
  static const Kernels chosen = [] {
    const std::string capability = at::get_cpu_capability();
#ifdef PROXYNORM_X86
    if (capability == "AVX512") return kernels_AVX512();
    if (capability == "AVX2") return kernels_AVX2();
#endif
    return kernels_DEFAULT();
  }();
  return chosen;
}

Act parse_act(std::string_view name) {
  if (name == "identity") return Act::kIdentity;
  if (name == "relu") return Act::kRelu;
  if (name == "silu") return Act::kSilu;
  if (name == "gelu") return Act::kGelu;
  TORCH_CHECK(false, "proxynorm: unknown activation '", name,
              "'; valid names: identity, relu, silu, gelu");
}

at::ScalarType accumulation_type(const at::Tensor& x) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16,
              "proxynorm: x must be float32, float64 or bfloat16, got ", t);
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_input(const at::Tensor& x, int64_t groups) {
  TORCH_CHECK(x.device().is_cpu(), "proxynorm: x must be on the CPU, got ", x.device());
  TORCH_CHECK(x.dim() >= 2, "proxynorm: x must be (N, C, *spatial), got ", x.sizes());
  TORCH_CHECK(groups > 0 && x.size(1) % groups == 0, "proxynorm: ", x.size(1),
              " channels are not divisible by ", groups, " groups");
}

at::Tensor channel_vector(const at::Tensor& v, const char* name, int64_t channels,
                          at::ScalarType dtype) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == channels && v.scalar_type() == dtype,
              "proxynorm: ", name, " must be a (", channels, ",) ", dtype, " tensor, got ",
              v.scalar_type(), " ", v.sizes());
  return v.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_proxy_act(
    const at::Tensor& x_in, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& proxy_mean, const at::Tensor& proxy_rstd, std::string_view act,
    double eps) {
  check_input(x_in, groups);
  const auto acc = accumulation_type(x_in);
  const int64_t C = x_in.size(1);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor mean = at::empty({x.size(0), groups}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({x.size(0), groups}, x.options().dtype(acc));
  if (x.numel() > 0) {
    kernels().forward(x, channel_vector(weight, "weight", C, acc),
                      channel_vector(bias, "bias", C, acc),
                      channel_vector(proxy_mean, "proxy_mean", C, acc),
                      channel_vector(proxy_rstd, "proxy_rstd", C, acc), groups,
                      parse_act(act), eps, out, mean, rstd);
  }
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
group_norm_proxy_act_backward(const at::Tensor& grad_out, const at::Tensor& x_in,
                              const at::Tensor& weight, const at::Tensor& bias,
                              const at::Tensor& proxy_mean, const at::Tensor& proxy_rstd,
                              const at::Tensor& mean, const at::Tensor& rstd, int64_t groups,
                              std::string_view act) {
  check_input(x_in, groups);
  const auto acc = accumulation_type(x_in);
  const int64_t C = x_in.size(1);
  TORCH_CHECK(grad_out.sizes() == x_in.sizes(), "proxynorm: grad_out has shape ",
              grad_out.sizes(), ", x has ", x_in.sizes());
  TORCH_CHECK(mean.sizes() == rstd.sizes() && mean.dim() == 2 && mean.size(0) == x_in.size(0) &&
                  mean.size(1) == groups && mean.scalar_type() == acc &&
                  rstd.scalar_type() == acc,
              "proxynorm: mean and rstd must be the forward's (N, groups) statistics");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor g = grad_out.to(x.scalar_type()).contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  const auto channel = x.options().dtype(acc);
  at::Tensor grad_weight = at::zeros({C}, channel), grad_bias = at::zeros({C}, channel);
  at::Tensor grad_proxy_mean = at::zeros({C}, channel), grad_proxy_rstd = at::zeros({C}, channel);
  if (x.numel() > 0) {
    kernels().backward(g, x, channel_vector(weight, "weight", C, acc),
                       channel_vector(bias, "bias", C, acc),
                       channel_vector(proxy_mean, "proxy_mean", C, acc),
                       channel_vector(proxy_rstd, "proxy_rstd", C, acc), mean.contiguous(),
                       rstd.contiguous(), groups, parse_act(act), grad_x, grad_weight,
                       grad_bias, grad_proxy_mean, grad_proxy_rstd);
  }
  return {grad_x, grad_weight, grad_bias, grad_proxy_mean, grad_proxy_rstd};
}

void check_proxy_parameters(const at::Tensor& weight, const at::Tensor& quantiles) {
  TORCH_CHECK(weight.device().is_cpu(), "proxynorm: weight must be on the CPU, got ",
              weight.device());
  const auto t = weight.scalar_type();
  TORCH_CHECK(weight.dim() == 1 && (t == at::kFloat || t == at::kDouble),
              "proxynorm: weight must be a (C,) float32 or float64 tensor, got ", t, " ",
              weight.sizes());
  TORCH_CHECK(quantiles.dim() == 1 && quantiles.numel() > 0 && quantiles.scalar_type() == t,
              "proxynorm: quantiles must be a non-empty (n,) ", t, " tensor, got ",
              quantiles.scalar_type(), " ", quantiles.sizes());
}

std::tuple<at::Tensor, at::Tensor> proxy_stats(const at::Tensor& weight,
                                               const at::Tensor& bias,
                                               const at::Tensor& proxy_weight,
                                               const at::Tensor& proxy_bias,
                                               const at::Tensor& quantiles,
                                               std::string_view act, double proxy_eps) {
  check_proxy_parameters(weight, quantiles);
  const int64_t C = weight.size(0);
  const auto t = weight.scalar_type();
  at::Tensor mean = at::empty({C}, weight.options()), rstd = at::empty({C}, weight.options());
  kernels().proxy_stats(weight.contiguous(), channel_vector(bias, "bias", C, t),
                        channel_vector(proxy_weight, "proxy_weight", C, t),
                        channel_vector(proxy_bias, "proxy_bias", C, t),
                        quantiles.contiguous(), parse_act(act), proxy_eps, mean, rstd);
  return {mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> proxy_stats_backward(
    const at::Tensor& grad_mean, const at::Tensor& grad_rstd, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& proxy_weight, const at::Tensor& proxy_bias,
    const at::Tensor& quantiles, const at::Tensor& mean, const at::Tensor& rstd,
    std::string_view act) {
  check_proxy_parameters(weight, quantiles);
  const int64_t C = weight.size(0);
  const auto t = weight.scalar_type();
  at::Tensor grad_weight = at::empty({C}, weight.options());
  at::Tensor grad_bias = at::empty({C}, weight.options());
  at::Tensor grad_proxy_weight = at::empty({C}, weight.options());
  at::Tensor grad_proxy_bias = at::empty({C}, weight.options());
  kernels().proxy_stats_backward(
      channel_vector(grad_mean.to(t), "grad_mean", C, t),
      channel_vector(grad_rstd.to(t), "grad_rstd", C, t), weight.contiguous(),
      channel_vector(bias, "bias", C, t), channel_vector(proxy_weight, "proxy_weight", C, t),
      channel_vector(proxy_bias, "proxy_bias", C, t), quantiles.contiguous(),
      channel_vector(mean, "mean", C, t), channel_vector(rstd, "rstd", C, t), parse_act(act),
      grad_weight, grad_bias, grad_proxy_weight, grad_proxy_bias);
  return {grad_weight, grad_bias, grad_proxy_weight, grad_proxy_bias};
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// As Python's @once_differentiable: the backward ops have no derivative of their own, so
// a second backward through them raises when it is asked for instead of dropping terms.
variable_list once_differentiable(variable_list grads, const char* op) {
  if (!at::GradMode::is_enabled()) return grads;
  for (auto& g : grads) {
    if (g.defined()) g = g.detach().requires_grad_();
  }
  return std::make_shared<torch::autograd::DelayedError>(
             std::string("proxynorm::") + op + " is differentiable only once", grads.size())
      ->apply(std::move(grads));
}

// The backward recomputes the elementwise chain, so it keeps x, the (C,) vectors and the
// (N, groups) statistics, never a full-size intermediate.
struct GroupNormProxyActFunction : torch::autograd::Function<GroupNormProxyActFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, int64_t groups,
                               const at::Tensor& weight, const at::Tensor& bias,
                               const at::Tensor& proxy_mean, const at::Tensor& proxy_rstd,
                               std::string_view act, double eps) {
    static const auto op =
        find_op<decltype(group_norm_proxy_act)>("proxynorm::group_norm_proxy_act");
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // the CPU or the fake kernel
    auto [out, mean, rstd] = op.call(x, groups, weight, bias, proxy_mean, proxy_rstd, act, eps);
    ctx->save_for_backward({x, weight, bias, proxy_mean, proxy_rstd, mean, rstd});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["act"] = std::string(act);
    ctx->mark_non_differentiable({mean, rstd});
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<decltype(group_norm_proxy_act_backward)>(
        "proxynorm::group_norm_proxy_act_backward");
    const variable_list s = ctx->get_saved_variables();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_x, grad_weight, grad_bias, grad_proxy_mean, grad_proxy_rstd] =
        op.call(grads[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6],
                ctx->saved_data["groups"].toInt(), ctx->saved_data["act"].toStringView());
    return once_differentiable({grad_x, {}, grad_weight, grad_bias, grad_proxy_mean,
                                grad_proxy_rstd, {}, {}},
                               "group_norm_proxy_act");
  }
};

// The backward recomputes the (C, n) proxy, so it keeps only (C,) vectors and the quantiles.
struct ProxyStatsFunction : torch::autograd::Function<ProxyStatsFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& weight,
                               const at::Tensor& bias, const at::Tensor& proxy_weight,
                               const at::Tensor& proxy_bias, const at::Tensor& quantiles,
                               std::string_view act, double proxy_eps) {
    static const auto op = find_op<decltype(proxy_stats)>("proxynorm::proxy_stats");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [mean, rstd] = op.call(weight, bias, proxy_weight, proxy_bias, quantiles, act,
                                proxy_eps);
    ctx->save_for_backward({weight, bias, proxy_weight, proxy_bias, quantiles, mean, rstd});
    ctx->saved_data["act"] = std::string(act);
    return {mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<decltype(proxy_stats_backward)>(
        "proxynorm::proxy_stats_backward");
    const variable_list s = ctx->get_saved_variables();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_weight, grad_bias, grad_proxy_weight, grad_proxy_bias] =
        op.call(grads[0], grads[1], s[0], s[1], s[2], s[3], s[4], s[5], s[6],
                ctx->saved_data["act"].toStringView());
    return once_differentiable({grad_weight, grad_bias, grad_proxy_weight, grad_proxy_bias,
                                {}, {}, {}},
                               "proxy_stats");
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_proxy_act_autograd(
    const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& proxy_mean, const at::Tensor& proxy_rstd, std::string_view act,
    double eps) {
  const auto outputs = GroupNormProxyActFunction::apply(x, groups, weight, bias, proxy_mean,
                                                        proxy_rstd, act, eps);
  return {outputs[0], outputs[1], outputs[2]};
}

std::tuple<at::Tensor, at::Tensor> proxy_stats_autograd(
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& proxy_weight,
    const at::Tensor& proxy_bias, const at::Tensor& quantiles, std::string_view act,
    double proxy_eps) {
  const auto outputs = ProxyStatsFunction::apply(weight, bias, proxy_weight, proxy_bias,
                                                 quantiles, act, proxy_eps);
  return {outputs[0], outputs[1]};
}

}  // namespace
}  // namespace proxynorm

TORCH_LIBRARY(proxynorm, m) {
  m.def(
      "group_norm_proxy_act(Tensor x, int groups, Tensor weight, Tensor bias, "
      "Tensor proxy_mean, Tensor proxy_rstd, str act, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "group_norm_proxy_act_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor bias, "
      "Tensor proxy_mean, Tensor proxy_rstd, Tensor mean, Tensor rstd, int groups, str act) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "proxy_stats(Tensor weight, Tensor bias, Tensor proxy_weight, Tensor proxy_bias, "
      "Tensor quantiles, str act, float proxy_eps) -> (Tensor, Tensor)");
  m.def(
      "proxy_stats_backward(Tensor grad_mean, Tensor grad_rstd, Tensor weight, Tensor bias, "
      "Tensor proxy_weight, Tensor proxy_bias, Tensor quantiles, Tensor mean, Tensor rstd, "
      "str act) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(proxynorm, CPU, m) {
  m.impl("group_norm_proxy_act", &proxynorm::group_norm_proxy_act);
  m.impl("group_norm_proxy_act_backward", &proxynorm::group_norm_proxy_act_backward);
  m.impl("proxy_stats", &proxynorm::proxy_stats);
  m.impl("proxy_stats_backward", &proxynorm::proxy_stats_backward);
}

TORCH_LIBRARY_IMPL(proxynorm, Autograd, m) {
  m.impl("group_norm_proxy_act", &proxynorm::group_norm_proxy_act_autograd);
  m.impl("proxy_stats", &proxynorm::proxy_stats_autograd);
}
