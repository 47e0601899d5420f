// The fused CPU kernels, compiled once per instruction set: the build passes
// -DCPU_CAPABILITY=<DEFAULT|AVX2|AVX512> with the matching -m flags, as ATen does for its
// own kernels, and proxynorm.cpp runs the copy ATen itself chose at start-up. Everything
// but the entry point has internal linkage, so the copies never collide.
//
// Work is split by (sample, channel) rows of S spatial positions: every pass is parallel
// over the N*C rows (so LayerNorm, G = 1, parallelises as well as GroupNorm) and
// vectorised along the row. Group statistics are combined from row moments. A costly
// activation (SiLU, GELU) is evaluated once per value and pass, over whole vectors even
// when rows are short (see kShortRow), and its slope is kept from the backward's first
// pass for the last one (see kStoreSlope).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "proxynorm.h"

#define PROXYNORM_CONCAT_(a, b) a##b
#define PROXYNORM_CONCAT(a, b) PROXYNORM_CONCAT_(a, b)

namespace proxynorm {
namespace {

using at::vec::Vectorized;

// Each activation's value and slope on vectors of the accumulation type. kCostly: it
// costs a transcendental function per value, worth whole vectors and never a second time.
struct Identity {
  static constexpr bool kCostly = false;
  template <typename V> static V value(const V& a) { return a; }
  template <typename V> static V slope(const V&) { return V(1); }
  template <typename V> static void value_and_slope(const V& a, V& z, V& d) {
    z = a;
    d = V(1);
  }
};

struct Relu {
  static constexpr bool kCostly = false;
  template <typename V> static V value(const V& a) { return at::vec::clamp_min(a, V(0)); }
  template <typename V> static V slope(const V& a) { return V::blendv(V(0), V(1), a > V(0)); }
  template <typename V> static void value_and_slope(const V& a, V& z, V& d) {
    z = value(a);
    d = slope(a);
  }
};

struct Silu {  // a * s(a) with s the sigmoid; slope s(a) * (1 + a * (1 - s(a)))
  static constexpr bool kCostly = true;
  template <typename V> static V sigmoid(const V& a) { return V(1) / (V(1) + a.neg().exp()); }
  template <typename V> static V value(const V& a) { return a * sigmoid(a); }
  template <typename V> static V slope(const V& a) {
    const V s = sigmoid(a);
    return s * (V(1) + a * (V(1) - s));
  }
  template <typename V> static void value_and_slope(const V& a, V& z, V& d) {
    const V s = sigmoid(a);
    z = a * s;
    d = s * (V(1) + a * (V(1) - s));
  }
};

struct Gelu {  // exact GELU, a * Phi(a); slope Phi(a) + a * phi(a)
  static constexpr bool kCostly = true;
  template <typename V> static V cdf(const V& a) {
    return V(0.5) * (V(1) + (a * V(M_SQRT1_2)).erf());
  }
  template <typename V> static V pdf(const V& a) {
    return (a * a * V(-0.5)).exp() * V(0.3989422804014327);  // 1 / sqrt(2 pi)
  }
  template <typename V> static V value(const V& a) { return a * cdf(a); }
  template <typename V> static V slope(const V& a) { return cdf(a) + a * pdf(a); }
  template <typename V> static void value_and_slope(const V& a, V& z, V& d) {
    const V p = cdf(a);
    z = a * p;
    d = p + a * pdf(a);
  }
};

template <typename F>
void with_act(Act act, const F& f) {
  switch (act) {
    case Act::kIdentity: return f(Identity{});
    case Act::kRelu: return f(Relu{});
    case Act::kSilu: return f(Silu{});
    case Act::kGelu: return f(Gelu{});
  }
}

// The count of a full vector, known at compile time; a tail's count is an int64_t.
struct Full {};

// Loads and stores a vector of the accumulation type from/to the tensor's type; the
// partial forms move the first `count` lanes, and a partial load zeroes the others.
template <typename T>
struct Io {
  using V = Vectorized<at::opmath_type<T>>;
  static V load(const T* p, Full) { return V::loadu(p); }
  static V load(const T* p, int64_t count) { return V::loadu(p, count); }
  static void store(T* p, const V& v, Full) { v.store(p); }
  static void store(T* p, const V& v, int64_t count) { v.store(p, count); }
};

template <>
struct Io<c10::BFloat16> {
  using V = Vectorized<float>;
  static V load(const c10::BFloat16* p, Full) {
    V v;
    at::vec::load_to_float(p, v);
    return v;
  }
  static V load(const c10::BFloat16* p, int64_t count) {
    c10::BFloat16 padded[V::size()] = {};
    std::copy(p, p + count, padded);
    return load(padded, Full{});
  }
  static void store(c10::BFloat16* p, const V& v, Full) { store(p, v, V::size()); }
  static void store(c10::BFloat16* p, const V& v, int64_t count) {
    at::vec::convert_float_bfloat16(v, v).store(p, count);
  }
};

// Calls f(i, count) on each vector of n values: the full ones (count Full{}), then once on
// the tail. Rows are a channel's spatial positions, often short (7x7), so the tail goes
// through the same vector code rather than a scalar twin, with partial (masked) loads and
// stores.
template <typename V, typename F>
inline void vector_loop(int64_t n, const F& f) {
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) f(i, Full{});
  if (i < n) f(i, n - i);
}

// Runs f on each vector of a row of n values of x (and of g, with kWithGrad; the tail is
// zero-padded), storing its result to out with kWrites.
template <bool kWithGrad, bool kWrites, typename In, typename Out, typename F>
inline void row_loop(int64_t n, const In* x, const In* g, Out* out, const F& f) {
  using V = typename Io<In>::V;
  vector_loop<V>(n, [&](int64_t i, auto count) {
    const V r = f(Io<In>::load(x + i, count), kWithGrad ? Io<In>::load(g + i, count) : V(0));
    if constexpr (kWrites) Io<Out>::store(out + i, r, count);
  });
}

// With 16 float lanes (AVX-512) a 7x7 row is 3 vectors and a 1-lane tail that would cost a
// whole vector of exp. So for a costly activation, rows of up to kShortRow values are taken
// in chunks of whole rows (consecutive rows are contiguous) of at most kChunkValues values:
// their pre-activations go to a buffer that stays in L1, the activation runs over the
// buffer flat, with one tail per chunk, and the per-row work reads the results back. Longer
// rows waste at most one vector in 16 and evaluate the activation in place: there the
// buffer passes cost about what they save (measured at 14x14 and 28x28; 7x7 gains 10-15%).
constexpr int64_t kShortRow = 256;
constexpr int64_t kChunkValues = 1024;

template <typename A>
inline bool chunked(int64_t row) {
  return A::kCostly && row <= kShortRow;
}

// Calls f(r0, r1) on consecutive chunks [r0, r1) of [begin, end), each of at most
// kChunkValues values (rows of `row` <= kChunkValues values).
template <typename F>
inline void for_each_chunk(int64_t begin, int64_t end, int64_t row, const F& f) {
  const int64_t rows = std::max<int64_t>(1, kChunkValues / row);
  for (int64_t r0 = begin; r0 < end; r0 += rows) f(r0, std::min(end, r0 + rows));
}

// a <- act(a) over n values; with kSlopes also d <- act'(a).
template <typename A, bool kSlopes, typename acc_t>
inline void activate(int64_t n, acc_t* a, acc_t* d) {
  using V = Vectorized<acc_t>;
  vector_loop<V>(n, [&](int64_t i, auto count) {
    const V av = Io<acc_t>::load(a + i, count);
    if constexpr (kSlopes) {
      V z, dv;
      A::value_and_slope(av, z, dv);
      Io<acc_t>::store(a + i, z, count);
      Io<acc_t>::store(d + i, dv, count);
    } else {
      Io<acc_t>::store(a + i, A::value(av), count);
    }
  });
}

// Rows per task: enough work per thread that tiny inputs are not split (ATen's grain).
constexpr int64_t kGrainElements = 32768;
inline int64_t grain(int64_t row) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(row, 1));
}

// Row r = n C + c of an (N, C, S) tensor: its channel c and its (sample, group) ng, stepped
// row by row without the two integer divisions per row that short rows would feel.
class RowIndex {
 public:
  RowIndex(int64_t row, int64_t C, int64_t D)
      : r(row), c(row % C), ng(row / D), d_(row % D), C_(C), D_(D) {}
  RowIndex& operator++() {
    ++r;
    if (++c == C_) c = 0;
    if (++d_ == D_) d_ = 0, ++ng;
    return *this;
  }
  int64_t r, c, ng;

 private:
  int64_t d_, C_, D_;  // d_: c's place in its group of D_ channels
};

struct Shape {
  int64_t N, C, S, G, D;
  Shape(const at::Tensor& x, int64_t groups)
      : N(x.size(0)), C(x.size(1)), S(x.numel() / (x.size(0) * x.size(1))), G(groups),
        D(x.size(1) / groups) {}
  RowIndex row(int64_t r) const { return RowIndex(r, C, D); }
};

// The pre-activations a = (x - mu) scale + shift of the whole rows [r0, r1) into `a`, row
// after row, for `activate` to run over at full vector width; row(i) gives each row's
// mu, scale and shift.
template <typename T, typename RowFn, typename acc_t>
inline void write_preactivations(const Shape& s, const T* x, int64_t r0, int64_t r1,
                                 const RowFn& row, acc_t* a) {
  using V = Vectorized<acc_t>;
  for (RowIndex i = s.row(r0); i.r < r1; ++i) {
    const auto p = row(i);
    row_loop<false, true>(s.S, x + i.r * s.S, x, a + (i.r - r0) * s.S,
                          [&](const V& xv, const V&) {
      return at::vec::fmadd(xv - p.mu, p.scale, p.shift);
    });
  }
}

template <typename T, typename A>
void forward_kernel(const at::Tensor& x_t, const at::Tensor& weight, const at::Tensor& bias,
                    const at::Tensor& proxy_mean, const at::Tensor& proxy_rstd,
                    int64_t groups, double eps, at::Tensor& out_t, at::Tensor& mean_t,
                    at::Tensor& rstd_t) {
  using acc_t = at::opmath_type<T>;
  using V = Vectorized<acc_t>;
  const Shape s(x_t, groups);
  const T* x = x_t.const_data_ptr<T>();
  T* out = out_t.mutable_data_ptr<T>();
  const acc_t* w = weight.const_data_ptr<acc_t>();
  const acc_t* b = bias.const_data_ptr<acc_t>();
  const acc_t* pm = proxy_mean.const_data_ptr<acc_t>();
  const acc_t* ps = proxy_rstd.const_data_ptr<acc_t>();
  acc_t* mean = mean_t.mutable_data_ptr<acc_t>();
  acc_t* rstd = rstd_t.mutable_data_ptr<acc_t>();

  // 1. Moments of every (sample, channel) row, in two passes over the row while it sits
  //    in cache: its mean, then the centred sum of squares (as exact as a Welford
  //    cascade, and much cheaper for the short rows of late stages). The lane mask keeps
  //    the zero-padded tail out of the second sum.
  const auto plus = [](const V& a, const V& b) { return a + b; };
  const std::vector<T> ones(s.S, T(1));
  std::vector<acc_t> row_mean(s.N * s.C), row_var(s.N * s.C);
  at::parallel_for(0, s.N * s.C, grain(s.S), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * s.S;
      V sum(0), sum_sq(0);
      row_loop<false, false>(s.S, xr, xr, out, [&](const V& xv, const V&) {
        sum = sum + xv;
        return sum;
      });
      const acc_t m = at::vec::vec_reduce_all<acc_t>(plus, sum) / acc_t(s.S);
      row_loop<true, false>(s.S, xr, ones.data(), out, [&](const V& xv, const V& mask) {
        const V d = (xv - V(m)) * mask;
        sum_sq = at::vec::fmadd(d, d, sum_sq);
        return sum_sq;
      });
      row_mean[r] = m;
      row_var[r] = at::vec::vec_reduce_all<acc_t>(plus, sum_sq) / acc_t(s.S);
    }
  });
  // 2. Group moments from D rows of equal count: the mean of the row variances plus the
  //    variance of the row means (no E[x^2] - E[x]^2 cancellation).
  for (int64_t ng = 0; ng < s.N * s.G; ++ng) {
    const acc_t* m = row_mean.data() + ng * s.D;
    const acc_t* v = row_var.data() + ng * s.D;
    acc_t mu = 0, var = 0;
    for (int64_t d = 0; d < s.D; ++d) mu += m[d];
    mu /= s.D;
    for (int64_t d = 0; d < s.D; ++d) var += v[d] + (m[d] - mu) * (m[d] - mu);
    var /= s.D;
    mean[ng] = mu;
    rstd[ng] = acc_t(1) / std::sqrt(std::max(var, acc_t(0)) + acc_t(eps));
  }
  // 3. out = (act(a) - proxy_mean) * proxy_rstd, with a = w (x - mu) rstd + b.
  struct Row {
    V mu, scale, shift, pmean, prstd;
  };
  const auto row = [&](const RowIndex& i) {
    return Row{V(mean[i.ng]), V(w[i.c] * rstd[i.ng]), V(b[i.c]), V(pm[i.c]), V(ps[i.c])};
  };
  at::parallel_for(0, s.N * s.C, grain(s.S), [&](int64_t begin, int64_t end) {
    if (!chunked<A>(s.S)) {
      for (RowIndex i = s.row(begin); i.r < end; ++i) {
        const Row p = row(i);
        row_loop<false, true>(s.S, x + i.r * s.S, x, out + i.r * s.S, [&](const V& xv, const V&) {
          return (A::value(at::vec::fmadd(xv - p.mu, p.scale, p.shift)) - p.pmean) * p.prstd;
        });
      }
      return;
    }
    std::vector<acc_t> a(kChunkValues);
    for_each_chunk(begin, end, s.S, [&](int64_t r0, int64_t r1) {
      write_preactivations(s, x, r0, r1, row, a.data());
      activate<A, false>((r1 - r0) * s.S, a.data(), static_cast<acc_t*>(nullptr));
      for (RowIndex i = s.row(r0); i.r < r1; ++i) {
        const Row p = row(i);
        const acc_t* z = a.data() + (i.r - r0) * s.S;
        row_loop<false, true>(s.S, z, z, out + i.r * s.S, [&](const V& zv, const V&) {
          return (zv - p.pmean) * p.prstd;
        });
      }
    });
  });
}

template <typename T, typename A>
void backward_kernel(const at::Tensor& grad_out_t, const at::Tensor& x_t,
                     const at::Tensor& weight, const at::Tensor& bias,
                     const at::Tensor& proxy_mean, const at::Tensor& proxy_rstd,
                     const at::Tensor& mean_t, const at::Tensor& rstd_t, int64_t groups,
                     at::Tensor& grad_x_t, at::Tensor& grad_weight_t,
                     at::Tensor& grad_bias_t, at::Tensor& grad_proxy_mean_t,
                     at::Tensor& grad_proxy_rstd_t) {
  using acc_t = at::opmath_type<T>;
  using V = Vectorized<acc_t>;
  const auto plus = [](const V& a, const V& b) { return a + b; };
  const Shape s(x_t, groups);
  const T* x = x_t.const_data_ptr<T>();
  const T* go = grad_out_t.const_data_ptr<T>();
  T* gx = grad_x_t.mutable_data_ptr<T>();
  const acc_t* w = weight.const_data_ptr<acc_t>();
  const acc_t* b = bias.const_data_ptr<acc_t>();
  const acc_t* pm = proxy_mean.const_data_ptr<acc_t>();
  const acc_t* ps = proxy_rstd.const_data_ptr<acc_t>();
  const acc_t* mean = mean_t.const_data_ptr<acc_t>();
  const acc_t* rstd = rstd_t.const_data_ptr<acc_t>();

  // 1. Per row, with g the output gradient, a the pre-activation and xc = x - mean:
  //    sums of g, g * act(a), g * act'(a) and g * act'(a) * xc. With kStoreSlope,
  //    g * act'(a) also goes to grad_x's buffer, where pass 3 reads it back instead of
  //    evaluating the activation a third time; it is kept in x's type, so only where that
  //    is the accumulation type (a bfloat16 copy would round it).
  constexpr bool kStoreSlope = A::kCostly && std::is_same_v<T, acc_t>;
  enum { kG, kGz, kGd, kGdx, kNumSums };
  std::vector<acc_t> sums(s.N * s.C * kNumSums);
  struct Row {
    V mu, scale, shift;
  };
  const auto row = [&](const RowIndex& i) {
    return Row{V(mean[i.ng]), V(w[i.c] * rstd[i.ng]), V(b[i.c])};
  };
  struct RowSums {
    V g{0}, gz{0}, gd{0}, gdx{0};
    void add(const V& gv, const V& z, const V& gdv, const V& xc) {
      g = g + gv;
      gz = at::vec::fmadd(gv, z, gz);
      gd = gd + gdv;
      gdx = at::vec::fmadd(gdv, xc, gdx);
    }
  };
  const auto store_sums = [&](int64_t r, const RowSums& sum) {
    acc_t* out = sums.data() + r * kNumSums;
    out[kG] = at::vec::vec_reduce_all<acc_t>(plus, sum.g);
    out[kGz] = at::vec::vec_reduce_all<acc_t>(plus, sum.gz);
    out[kGd] = at::vec::vec_reduce_all<acc_t>(plus, sum.gd);
    out[kGdx] = at::vec::vec_reduce_all<acc_t>(plus, sum.gdx);
  };
  at::parallel_for(0, s.N * s.C, grain(s.S), [&](int64_t begin, int64_t end) {
    if (!chunked<A>(s.S)) {
      for (RowIndex i = s.row(begin); i.r < end; ++i) {
        const Row p = row(i);
        const int64_t r = i.r;
        RowSums sum;
        row_loop<true, kStoreSlope>(s.S, x + r * s.S, go + r * s.S, gx + r * s.S,
                                    [&](const V& xv, const V& gv) {
          const V xc = xv - p.mu;
          V z, d;
          A::value_and_slope(at::vec::fmadd(xc, p.scale, p.shift), z, d);
          const V gd = gv * d;
          sum.add(gv, z, gd, xc);
          return gd;
        });
        store_sums(r, sum);
      }
      return;
    }
    std::vector<acc_t> a(kChunkValues), d(kChunkValues);  // a, then act(a); act'(a)
    for_each_chunk(begin, end, s.S, [&](int64_t r0, int64_t r1) {
      write_preactivations(s, x, r0, r1, row, a.data());
      activate<A, true>((r1 - r0) * s.S, a.data(), d.data());
      for (RowIndex i = s.row(r0); i.r < r1; ++i) {
        const Row p = row(i);
        const int64_t r = i.r;
        const T *xr = x + r * s.S, *gr = go + r * s.S;
        const acc_t *zr = a.data() + (r - r0) * s.S, *dr = d.data() + (r - r0) * s.S;
        T* gxr = gx + r * s.S;
        RowSums sum;
        vector_loop<V>(s.S, [&](int64_t j, auto count) {
          const V gv = Io<T>::load(gr + j, count);
          const V gd = gv * Io<acc_t>::load(dr + j, count);
          sum.add(gv, Io<acc_t>::load(zr + j, count), gd, Io<T>::load(xr + j, count) - p.mu);
          if constexpr (kStoreSlope) Io<T>::store(gxr + j, gd, count);
        });
        store_sums(r, sum);
      }
    });
  });

  // 2. Per channel: the parameter gradients. Per (sample, group): the coefficients of
  //    grad_x = rstd * (dy - mean(dy) - y * mean(dy * y)), dy = g act'(a) w proxy_rstd.
  acc_t* gw = grad_weight_t.mutable_data_ptr<acc_t>();
  acc_t* gb = grad_bias_t.mutable_data_ptr<acc_t>();
  acc_t* gpm = grad_proxy_mean_t.mutable_data_ptr<acc_t>();
  acc_t* gps = grad_proxy_rstd_t.mutable_data_ptr<acc_t>();
  std::fill(gw, gw + s.C, acc_t(0));
  std::fill(gb, gb + s.C, acc_t(0));
  std::fill(gpm, gpm + s.C, acc_t(0));
  std::fill(gps, gps + s.C, acc_t(0));
  std::vector<acc_t> coef_x(s.N * s.G), coef_1(s.N * s.G);
  const acc_t count = acc_t(s.D * s.S);
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t g = 0; g < s.G; ++g) {
      const int64_t ng = n * s.G + g;
      acc_t sum_dy = 0, sum_dy_xc = 0;
      for (int64_t c = g * s.D; c < (g + 1) * s.D; ++c) {
        const acc_t* r = sums.data() + (n * s.C + c) * kNumSums;
        gw[c] += rstd[ng] * r[kGdx];
        gb[c] += r[kGd];
        gpm[c] += r[kG];
        gps[c] += r[kGz] - pm[c] * r[kG];
        sum_dy += w[c] * ps[c] * r[kGd];
        sum_dy_xc += w[c] * ps[c] * r[kGdx];
      }
      const acc_t rs = rstd[ng], mean_dy_y = rs * sum_dy_xc / count;
      coef_x[ng] = -rs * rs * mean_dy_y;
      coef_1[ng] = -rs * sum_dy / count;
    }
  }
  for (int64_t c = 0; c < s.C; ++c) {
    gw[c] *= ps[c];
    gb[c] *= ps[c];
    gpm[c] *= -ps[c];
  }

  // 3. grad_x = g act'(a) (rstd w proxy_rstd) + xc coef_x + coef_1, with g act'(a) from
  //    pass 1 (kStoreSlope) or recomputed from x.
  at::parallel_for(0, s.N * s.C, grain(s.S), [&](int64_t begin, int64_t end) {
    for (RowIndex i = s.row(begin); i.r < end; ++i) {
      const Row p = row(i);
      const V k(rstd[i.ng] * w[i.c] * ps[i.c]), cx(coef_x[i.ng]), c1(coef_1[i.ng]);
      const T* xr = x + i.r * s.S;
      T* gxr = gx + i.r * s.S;
      if constexpr (kStoreSlope) {
        row_loop<true, true>(s.S, xr, gxr, gxr, [&](const V& xv, const V& gd) {
          return at::vec::fmadd(gd, k, at::vec::fmadd(xv - p.mu, cx, c1));
        });
      } else {
        row_loop<true, true>(s.S, xr, go + i.r * s.S, gxr, [&](const V& xv, const V& gv) {
          const V xc = xv - p.mu;
          const V d = A::slope(at::vec::fmadd(xc, p.scale, p.shift));
          return at::vec::fmadd(gv * d, k, at::vec::fmadd(xc, cx, c1));
        });
      }
    }
  });
}

// Proxy statistics of one channel per row of the n quantiles u: with the proxy
// yt_i = proxy_bias + (1 + proxy_weight) u_i and z_i = act(weight yt_i + bias),
// mean = sum_i z_i / n and rstd = 1 / sqrt(var + proxy_eps), var = sum_i (z_i - mean)^2 / n,
// from the z_i kept in a buffer (one activation per value). A lane mask of ones keeps the
// zero-padded tail of the row out of the sums.
template <typename T, typename A>
void proxy_stats_kernel(const at::Tensor& weight, const at::Tensor& bias,
                        const at::Tensor& proxy_weight, const at::Tensor& proxy_bias,
                        const at::Tensor& quantiles, double proxy_eps, at::Tensor& mean_t,
                        at::Tensor& rstd_t) {
  using V = Vectorized<T>;
  const auto plus = [](const V& a, const V& b) { return a + b; };
  const int64_t C = weight.numel(), n = quantiles.numel();
  const T* w = weight.const_data_ptr<T>();
  const T* b = bias.const_data_ptr<T>();
  const T* pw = proxy_weight.const_data_ptr<T>();
  const T* pb = proxy_bias.const_data_ptr<T>();
  const T* u = quantiles.const_data_ptr<T>();
  T* mean = mean_t.mutable_data_ptr<T>();
  T* rstd = rstd_t.mutable_data_ptr<T>();
  const std::vector<T> ones(n, T(1));
  at::parallel_for(0, C, grain(n), [&](int64_t begin, int64_t end) {
    std::vector<T> z(n);
    for (int64_t c = begin; c < end; ++c) {
      const V scale(T(1) + pw[c]), shift(pb[c]), wc(w[c]), bc(b[c]);
      V sum(0), sum_sq(0);
      row_loop<true, true>(n, u, ones.data(), z.data(), [&](const V& uv, const V& mask) {
        const V zv = A::value(at::vec::fmadd(wc, at::vec::fmadd(uv, scale, shift), bc));
        sum = at::vec::fmadd(mask, zv, sum);
        return zv;
      });
      const T m = at::vec::vec_reduce_all<T>(plus, sum) / T(n);
      row_loop<true, false>(n, z.data(), ones.data(), static_cast<T*>(nullptr),
                            [&](const V& zv, const V& mask) {
        const V d = (zv - V(m)) * mask;
        sum_sq = at::vec::fmadd(d, d, sum_sq);
        return sum_sq;
      });
      mean[c] = m;
      const T var = at::vec::vec_reduce_all<T>(plus, sum_sq) / T(n);
      rstd[c] = T(1) / std::sqrt(var + T(proxy_eps));
    }
  });
}

// The gradient reaching z_i is g_i = (grad_mean + 2 grad_var (z_i - mean)) / n, with
// grad_var = -rstd^3 grad_rstd / 2 (the mean's own term in var cancels:
// sum_i (z_i - mean) = 0); with ga_i = g_i act'(a_i):
// grad_bias = sum ga, grad_weight = sum ga yt, grad_proxy_bias = weight sum ga,
// grad_proxy_weight = weight sum ga u. The (C, n) proxy is recomputed, never stored.
template <typename T, typename A>
void proxy_stats_backward_kernel(const at::Tensor& grad_mean_t, const at::Tensor& grad_rstd_t,
                                 const at::Tensor& weight, const at::Tensor& bias,
                                 const at::Tensor& proxy_weight, const at::Tensor& proxy_bias,
                                 const at::Tensor& quantiles, const at::Tensor& mean_t,
                                 const at::Tensor& rstd_t, at::Tensor& grad_weight_t,
                                 at::Tensor& grad_bias_t, at::Tensor& grad_proxy_weight_t,
                                 at::Tensor& grad_proxy_bias_t) {
  using V = Vectorized<T>;
  const auto plus = [](const V& a, const V& b) { return a + b; };
  const int64_t C = weight.numel(), n = quantiles.numel();
  const T* gm = grad_mean_t.const_data_ptr<T>();
  const T* gr = grad_rstd_t.const_data_ptr<T>();
  const T* w = weight.const_data_ptr<T>();
  const T* b = bias.const_data_ptr<T>();
  const T* pw = proxy_weight.const_data_ptr<T>();
  const T* pb = proxy_bias.const_data_ptr<T>();
  const T* u = quantiles.const_data_ptr<T>();
  const T* mean = mean_t.const_data_ptr<T>();
  const T* rstd = rstd_t.const_data_ptr<T>();
  T* gw = grad_weight_t.mutable_data_ptr<T>();
  T* gb = grad_bias_t.mutable_data_ptr<T>();
  T* gpw = grad_proxy_weight_t.mutable_data_ptr<T>();
  T* gpb = grad_proxy_bias_t.mutable_data_ptr<T>();
  const std::vector<T> ones(n, T(1));
  at::parallel_for(0, C, grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const V scale(T(1) + pw[c]), shift(pb[c]), wc(w[c]), bc(b[c]), m(mean[c]);
      const V g_mean(gm[c] / T(n)), g_var(-rstd[c] * rstd[c] * rstd[c] * gr[c] / T(n));
      V sum_ga(0), sum_ga_yt(0), sum_ga_u(0);
      row_loop<true, false>(n, u, ones.data(), static_cast<T*>(nullptr),
                            [&](const V& uv, const V& mask) {
        const V yt = at::vec::fmadd(uv, scale, shift);
        V z, d;
        A::value_and_slope(at::vec::fmadd(wc, yt, bc), z, d);
        const V ga = at::vec::fmadd(g_var, z - m, g_mean) * d * mask;
        sum_ga = sum_ga + ga;
        sum_ga_yt = at::vec::fmadd(ga, yt, sum_ga_yt);
        sum_ga_u = at::vec::fmadd(ga, uv, sum_ga_u);
        return ga;
      });
      const T s = at::vec::vec_reduce_all<T>(plus, sum_ga);
      gb[c] = s;
      gw[c] = at::vec::vec_reduce_all<T>(plus, sum_ga_yt);
      gpb[c] = w[c] * s;
      gpw[c] = w[c] * at::vec::vec_reduce_all<T>(plus, sum_ga_u);
    }
  });
}

void forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
             const at::Tensor& proxy_mean, const at::Tensor& proxy_rstd, int64_t groups,
             Act act, double eps, at::Tensor& out, at::Tensor& mean, at::Tensor& rstd) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "proxynorm_forward", [&] {
    with_act(act, [&](auto a) {
      forward_kernel<scalar_t, decltype(a)>(x, weight, bias, proxy_mean, proxy_rstd, groups,
                                            eps, out, mean, rstd);
    });
  });
}

void backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
              const at::Tensor& bias, const at::Tensor& proxy_mean,
              const at::Tensor& proxy_rstd, const at::Tensor& mean, const at::Tensor& rstd,
              int64_t groups, Act act, at::Tensor& grad_x, at::Tensor& grad_weight,
              at::Tensor& grad_bias, at::Tensor& grad_proxy_mean,
              at::Tensor& grad_proxy_rstd) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "proxynorm_backward", [&] {
    with_act(act, [&](auto a) {
      backward_kernel<scalar_t, decltype(a)>(grad_out, x, weight, bias, proxy_mean,
                                             proxy_rstd, mean, rstd, groups, grad_x,
                                             grad_weight, grad_bias, grad_proxy_mean,
                                             grad_proxy_rstd);
    });
  });
}

void proxy_stats(const at::Tensor& weight, const at::Tensor& bias,
                 const at::Tensor& proxy_weight, const at::Tensor& proxy_bias,
                 const at::Tensor& quantiles, Act act, double proxy_eps, at::Tensor& mean,
                 at::Tensor& rstd) {
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "proxynorm_proxy_stats", [&] {
    with_act(act, [&](auto a) {
      proxy_stats_kernel<scalar_t, decltype(a)>(weight, bias, proxy_weight, proxy_bias,
                                                quantiles, proxy_eps, mean, rstd);
    });
  });
}

void proxy_stats_backward(const at::Tensor& grad_mean, const at::Tensor& grad_rstd,
                          const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& proxy_weight, const at::Tensor& proxy_bias,
                          const at::Tensor& quantiles, const at::Tensor& mean,
                          const at::Tensor& rstd, Act act, at::Tensor& grad_weight,
                          at::Tensor& grad_bias, at::Tensor& grad_proxy_weight,
                          at::Tensor& grad_proxy_bias) {
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "proxynorm_proxy_stats_backward", [&] {
    with_act(act, [&](auto a) {
      proxy_stats_backward_kernel<scalar_t, decltype(a)>(
          grad_mean, grad_rstd, weight, bias, proxy_weight, proxy_bias, quantiles, mean, rstd,
          grad_weight, grad_bias, grad_proxy_weight, grad_proxy_bias);
    });
  });
}

}  // namespace

Kernels PROXYNORM_CONCAT(kernels_, CPU_CAPABILITY)() {
  return {&forward, &backward, &proxy_stats, &proxy_stats_backward};
}

}  // namespace proxynorm
