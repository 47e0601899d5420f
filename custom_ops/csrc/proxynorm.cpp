// torch.ops.proxynorm: the schemas, the input checks and the choice of kernel copy.
// Autograd and the fake (meta) kernels are registered from Python (custom_ops/cpu.py),
// as in PyTorch's custom operator tutorial.
#include <ATen/Functions.h>
#include <ATen/Version.h>
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
                                               std::string_view act) {
  check_proxy_parameters(weight, quantiles);
  const int64_t C = weight.size(0);
  const auto t = weight.scalar_type();
  at::Tensor mean = at::empty({C}, weight.options()), var = at::empty({C}, weight.options());
  kernels().proxy_stats(weight.contiguous(), channel_vector(bias, "bias", C, t),
                        channel_vector(proxy_weight, "proxy_weight", C, t),
                        channel_vector(proxy_bias, "proxy_bias", C, t),
                        quantiles.contiguous(), parse_act(act), mean, var);
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> proxy_stats_backward(
    const at::Tensor& grad_mean, const at::Tensor& grad_var, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& proxy_weight, const at::Tensor& proxy_bias,
    const at::Tensor& quantiles, const at::Tensor& mean, std::string_view act) {
  check_proxy_parameters(weight, quantiles);
  const int64_t C = weight.size(0);
  const auto t = weight.scalar_type();
  at::Tensor grad_weight = at::empty({C}, weight.options());
  at::Tensor grad_bias = at::empty({C}, weight.options());
  at::Tensor grad_proxy_weight = at::empty({C}, weight.options());
  at::Tensor grad_proxy_bias = at::empty({C}, weight.options());
  kernels().proxy_stats_backward(
      channel_vector(grad_mean.to(t), "grad_mean", C, t),
      channel_vector(grad_var.to(t), "grad_var", C, t), weight.contiguous(),
      channel_vector(bias, "bias", C, t), channel_vector(proxy_weight, "proxy_weight", C, t),
      channel_vector(proxy_bias, "proxy_bias", C, t), quantiles.contiguous(),
      channel_vector(mean, "mean", C, t), parse_act(act), grad_weight, grad_bias,
      grad_proxy_weight, grad_proxy_bias);
  return {grad_weight, grad_bias, grad_proxy_weight, grad_proxy_bias};
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
      "Tensor quantiles, str act) -> (Tensor, Tensor)");
  m.def(
      "proxy_stats_backward(Tensor grad_mean, Tensor grad_var, Tensor weight, Tensor bias, "
      "Tensor proxy_weight, Tensor proxy_bias, Tensor quantiles, Tensor mean, str act) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(proxynorm, CPU, m) {
  m.impl("group_norm_proxy_act", &proxynorm::group_norm_proxy_act);
  m.impl("group_norm_proxy_act_backward", &proxynorm::group_norm_proxy_act_backward);
  m.impl("proxy_stats", &proxynorm::proxy_stats);
  m.impl("proxy_stats_backward", &proxynorm::proxy_stats_backward);
}
