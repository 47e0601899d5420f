"""The Triton kernels of the fused GPU op (proxynorm/ops/gpu.py), the twins of
proxynorm/ops/csrc/proxynorm_kernel.cpp.

Imported on first use, never at start-up: importing Triton is slow and fails where it is
absent. Whether the kernels compile for the GPU or run in Triton's interpreter on CPU
tensors is decided as they are decorated, by TRITON_INTERPRET=1 (see proxynorm/ops/gpu.py).

x is contiguous (N, C, S), S the spatial positions, so a (sample, group) is one run of
group_size = D * S values, D = C / G channels. Work is split into chunks of BLOCK values of
one group (and the backward's sums into tiles of (sample, channel) rows), so that a small
micro-batch of LayerNorm (G = 1) still fills the GPU. Everything accumulates in float32.
"""
import triton
import triton.language as tl


# Each activation's value and slope; ACT is the name, a compile-time constant.
@triton.jit
def act_value(a, ACT: tl.constexpr):
    if ACT == "relu":
        return tl.maximum(a, 0.0)
    elif ACT == "silu":
        return a * tl.sigmoid(a)
    elif ACT == "gelu":  # exact GELU, a * Phi(a)
        return a * 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
    else:
        return a


@triton.jit
def act_slope(a, ACT: tl.constexpr):
    if ACT == "relu":
        return tl.where(a > 0.0, 1.0, 0.0)
    elif ACT == "silu":  # s(a) * (1 + a * (1 - s(a))), s the sigmoid
        s = tl.sigmoid(a)
        return s * (1.0 + a * (1.0 - s))
    elif ACT == "gelu":  # Phi(a) + a * phi(a)
        cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        return cdf + a * tl.exp(-0.5 * a * a) * 0.3989422804014327  # 1 / sqrt(2 pi)
    else:
        return tl.full(a.shape, 1.0, tl.float32)


@triton.jit
def chunk_start(chunk, chunks_per_group, BLOCK: tl.constexpr):
    """The (sample, group) of a chunk and the chunk's first value within it, in 64 bits:
    one group (LayerNorm over a large 3-D input) can hold more than 2^31 values."""
    return chunk // chunks_per_group, (chunk % chunks_per_group).to(tl.int64) * BLOCK


@triton.jit
def chunk_moments_kernel(x_ptr, chunk_mean_ptr, chunk_m2_ptr, group_size, chunks_per_group,
                         BLOCK: tl.constexpr):
    """1. The mean of each chunk and its sum of squares about that mean: centred in the
    chunk, so a large common offset of x never cancels."""
    chunk = tl.program_id(0)
    ng, start = chunk_start(chunk, chunks_per_group, BLOCK)
    offsets = start + tl.arange(0, BLOCK)
    mask = offsets < group_size
    x = tl.load(x_ptr + ng.to(tl.int64) * group_size + offsets, mask=mask, other=0.0)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=0) / tl.minimum(group_size - start, BLOCK).to(tl.float32)
    xc = tl.where(mask, x - mean, 0.0)
    tl.store(chunk_mean_ptr + chunk, mean)
    tl.store(chunk_m2_ptr + chunk, tl.sum(xc * xc, axis=0))


@triton.jit
def group_moments_kernel(chunk_mean_ptr, chunk_m2_ptr, mean_ptr, rstd_ptr, group_size,
                         chunks_per_group, eps, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """2. One program per (sample, group): its mean, and its variance as the chunks' sums
    of squares plus the spread of the chunk means (Chan et al.; no E[x^2] - E[x]^2)."""
    ng = tl.program_id(0)
    first = ng * chunks_per_group
    total = tl.zeros([BLOCK], tl.float32)
    for k in range(0, chunks_per_group, BLOCK):
        chunk = k + tl.arange(0, BLOCK)
        mask = chunk < chunks_per_group
        count = tl.where(mask, tl.minimum(group_size - chunk.to(tl.int64) * CHUNK, CHUNK), 0)
        total += count * tl.load(chunk_mean_ptr + first + chunk, mask=mask, other=0.0)
    mean = tl.sum(total, axis=0) / group_size
    m2 = tl.zeros([BLOCK], tl.float32)
    for k in range(0, chunks_per_group, BLOCK):
        chunk = k + tl.arange(0, BLOCK)
        mask = chunk < chunks_per_group
        count = tl.where(mask, tl.minimum(group_size - chunk.to(tl.int64) * CHUNK, CHUNK), 0)
        d = tl.load(chunk_mean_ptr + first + chunk, mask=mask, other=0.0) - mean
        m2 += tl.load(chunk_m2_ptr + first + chunk, mask=mask, other=0.0) + count * d * d
    var = tl.sum(m2, axis=0) / group_size
    tl.store(mean_ptr + ng, mean)
    # correctly rounded, as the CPU op's 1 / std::sqrt (the default GPU forms are approximate)
    tl.store(rstd_ptr + ng, tl.div_rn(1.0, tl.sqrt_rn(var + eps)))


@triton.jit
def group_chunk(groups, channels_per_group, spatial, group_size, chunks_per_group,
                BLOCK: tl.constexpr):
    """This program's chunk of BLOCK values of one (sample, group) ng: ng, the values' mask,
    their channels and their addresses in x (64-bit: they can pass 2^31)."""
    ng, start = chunk_start(tl.program_id(0), chunks_per_group, BLOCK)
    offsets = start + tl.arange(0, BLOCK)
    mask = offsets < group_size
    c = (ng % groups) * channels_per_group + offsets // spatial
    return ng, mask, c, ng.to(tl.int64) * group_size + offsets


@triton.jit
def forward_kernel(x_ptr, weight_ptr, bias_ptr, proxy_mean_ptr, proxy_rstd_ptr, mean_ptr,
                   rstd_ptr, out_ptr, groups, channels_per_group, spatial, group_size,
                   chunks_per_group, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """3. out = (act(w (x - mean) rstd + b) - proxy_mean) * proxy_rstd, chunk by chunk."""
    ng, mask, c, at = group_chunk(groups, channels_per_group, spatial, group_size,
                                  chunks_per_group, BLOCK)
    mean = tl.load(mean_ptr + ng)
    rstd = tl.load(rstd_ptr + ng)
    scale = tl.load(weight_ptr + c, mask=mask, other=0.0) * rstd
    shift = tl.load(bias_ptr + c, mask=mask, other=0.0)
    proxy_mean = tl.load(proxy_mean_ptr + c, mask=mask, other=0.0)
    proxy_rstd = tl.load(proxy_rstd_ptr + c, mask=mask, other=0.0)
    x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
    out = (act_value((x - mean) * scale + shift, ACT) - proxy_mean) * proxy_rstd
    tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def row_sums_kernel(grad_out_ptr, x_ptr, weight_ptr, bias_ptr, mean_ptr, rstd_ptr, sums_ptr,
                    rows, channels, channels_per_group, spatial, columns, ACT: tl.constexpr,
                    BLOCK_ROWS: tl.constexpr, BLOCK_S: tl.constexpr):
    """Backward 1. Over a tile of BLOCK_ROWS (sample, channel) rows and BLOCK_S positions,
    with g the output gradient, a the pre-activation and xc = x - mean: the sums of g,
    g act(a), g act'(a) and g act'(a) xc per row, into sums[k, tile column, row] (summed
    over tile columns by the caller: no atomics, so the result is deterministic)."""
    # tiles on grid axis 0 (2^31 - 1 programs; axis 1 stops at 65,535)
    row = (tl.program_id(0) // columns) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    column = tl.program_id(0) % columns
    position = column * BLOCK_S + tl.arange(0, BLOCK_S)
    row_mask = row < rows
    mask = row_mask[:, None] & (position < spatial)[None, :]
    c = row % channels
    ng = row // channels_per_group
    mean = tl.load(mean_ptr + ng, mask=row_mask, other=0.0)
    scale = (tl.load(weight_ptr + c, mask=row_mask, other=0.0)
             * tl.load(rstd_ptr + ng, mask=row_mask, other=0.0))
    shift = tl.load(bias_ptr + c, mask=row_mask, other=0.0)
    at = row.to(tl.int64)[:, None] * spatial + position[None, :]
    x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_out_ptr + at, mask=mask, other=0.0).to(tl.float32)  # 0 off the tile
    xc = x - mean[:, None]
    a = xc * scale[:, None] + shift[:, None]
    gd = g * act_slope(a, ACT)
    out = sums_ptr + column * rows + row
    stride = columns * rows
    tl.store(out, tl.sum(g, axis=1), mask=row_mask)
    tl.store(out + stride, tl.sum(g * act_value(a, ACT), axis=1), mask=row_mask)
    tl.store(out + 2 * stride, tl.sum(gd, axis=1), mask=row_mask)
    tl.store(out + 3 * stride, tl.sum(gd * xc, axis=1), mask=row_mask)


@triton.jit
def grad_x_kernel(grad_out_ptr, x_ptr, weight_ptr, bias_ptr, proxy_rstd_ptr, mean_ptr,
                  rstd_ptr, coef_x_ptr, coef_1_ptr, grad_x_ptr, groups, channels_per_group,
                  spatial, group_size, chunks_per_group, ACT: tl.constexpr,
                  BLOCK: tl.constexpr):
    """Backward 3. grad_x = g act'(a) (rstd w proxy_rstd) + xc coef_x + coef_1, recomputing
    a from x, chunk by chunk as the forward."""
    ng, mask, c, at = group_chunk(groups, channels_per_group, spatial, group_size,
                                  chunks_per_group, BLOCK)
    mean = tl.load(mean_ptr + ng)
    rstd = tl.load(rstd_ptr + ng)
    coef_x = tl.load(coef_x_ptr + ng)
    coef_1 = tl.load(coef_1_ptr + ng)
    weight = tl.load(weight_ptr + c, mask=mask, other=0.0)
    shift = tl.load(bias_ptr + c, mask=mask, other=0.0)
    k = rstd * weight * tl.load(proxy_rstd_ptr + c, mask=mask, other=0.0)
    x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_out_ptr + at, mask=mask, other=0.0).to(tl.float32)
    xc = x - mean
    grad_x = g * act_slope(xc * (weight * rstd) + shift, ACT) * k + (xc * coef_x + coef_1)
    tl.store(grad_x_ptr + at, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
