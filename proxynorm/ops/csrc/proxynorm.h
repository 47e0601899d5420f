// Fused GroupNorm + affine + activation + Proxy Norm for CPU: what the kernel file
// (compiled once per instruction set) and the operator file (schemas, checks, dispatch)
// share.
#pragma once

#include <ATen/core/Tensor.h>

namespace proxynorm {

enum class Act : int64_t { kIdentity, kRelu, kSilu, kGelu };

// out = (act(weight * (x - mean) * rstd + bias) - proxy_mean) * proxy_rstd, with mean and
// rstd per (sample, group). x and out are contiguous (N, C, S); per-channel vectors and
// the (N, G) statistics are in the accumulation type (float for float/bfloat16 x).
using ForwardFn = void (*)(const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& bias, const at::Tensor& proxy_mean,
                           const at::Tensor& proxy_rstd, int64_t groups, Act act, double eps,
                           at::Tensor& out, at::Tensor& mean, at::Tensor& rstd);

// Recomputes the elementwise chain from x and the saved statistics; writes every gradient.
using BackwardFn = void (*)(const at::Tensor& grad_out, const at::Tensor& x,
                            const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& proxy_mean, const at::Tensor& proxy_rstd,
                            const at::Tensor& mean, const at::Tensor& rstd, int64_t groups,
                            Act act, at::Tensor& grad_x, at::Tensor& grad_weight,
                            at::Tensor& grad_bias, at::Tensor& grad_proxy_mean,
                            at::Tensor& grad_proxy_rstd);

// The proxy's per-channel mean and rstd = 1 / sqrt(population variance + proxy_eps), from
// the four (C,) parameters and the n quantiles, all float or all double.
using ProxyStatsFn = void (*)(const at::Tensor& weight, const at::Tensor& bias,
                              const at::Tensor& proxy_weight, const at::Tensor& proxy_bias,
                              const at::Tensor& quantiles, Act act, double proxy_eps,
                              at::Tensor& mean, at::Tensor& rstd);

// Recomputes the proxy from the parameters; writes the four parameter gradients.
using ProxyStatsBackwardFn = void (*)(const at::Tensor& grad_mean, const at::Tensor& grad_rstd,
                                      const at::Tensor& weight, const at::Tensor& bias,
                                      const at::Tensor& proxy_weight,
                                      const at::Tensor& proxy_bias,
                                      const at::Tensor& quantiles, const at::Tensor& mean,
                                      const at::Tensor& rstd, Act act,
                                      at::Tensor& grad_weight, at::Tensor& grad_bias,
                                      at::Tensor& grad_proxy_weight,
                                      at::Tensor& grad_proxy_bias);

struct Kernels {
  ForwardFn forward;
  BackwardFn backward;
  ProxyStatsFn proxy_stats;
  ProxyStatsBackwardFn proxy_stats_backward;
};

// One per instruction set the kernel file is compiled for (CPU_CAPABILITY, as in ATen).
Kernels kernels_DEFAULT();
Kernels kernels_AVX2();
Kernels kernels_AVX512();

}  // namespace proxynorm
