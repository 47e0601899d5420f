"""The Triton kernels of the fused GPU op (proxynorm/ops/gpu.py), the twins of
proxynorm/ops/csrc/proxynorm_kernel.cpp.

Imported on first use, never at start-up: importing Triton is slow and fails where it is
absent. Whether the kernels compile for the GPU or run in Triton's interpreter on CPU
tensors is decided as they are decorated, by TRITON_INTERPRET=1 (see proxynorm/ops/gpu.py).

x is contiguous (N, C, S), S the spatial positions, so a (sample, group) is one run of
group_size = D * S values, D = C / G channels; or, with CHANNELS_LAST, (N, S, C) in memory,
addressed as such (no transposing copy). The group statistics are taken over chunks
of BLOCK values of one group, so that a small micro-batch of LayerNorm (G = 1) still fills
the GPU; the passes over every value walk 2-D tiles of (sample, channel) rows and
positions, whose per-row scale and shift are computed once per row, so that each value
costs an FMA, the activation and an FMA. A layer's training step is 8 launches: the proxy
statistics (1), chunk moments, group moments, the output (3); backward: per-row sums, their
sums into the gradients of the vectors and grad_x's coefficients, grad_x (3), the proxy
statistics' backward (1). Everything accumulates in float32, in a fixed order (no atomics).
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
                         groups, channels_per_group, CHANNELS_LAST: tl.constexpr,
                         BLOCK: tl.constexpr):
    """1. The mean of each chunk and its sum of squares about that mean: centred in the
    chunk, so a large common offset of x never cancels."""
    chunk = tl.program_id(0)
    ng, start = chunk_start(chunk, chunks_per_group, BLOCK)
    offsets = start + tl.arange(0, BLOCK)
    mask = offsets < group_size
    if CHANNELS_LAST:  # a group's values, position by position: D of every C
        at = ((ng // groups).to(tl.int64) * group_size * groups
              + (offsets // channels_per_group) * (groups * channels_per_group)
              + (ng % groups) * channels_per_group + offsets % channels_per_group)
    else:
        at = ng.to(tl.int64) * group_size + offsets
    x = tl.load(x_ptr + at, mask=mask, other=0.0)
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
def row_tile(rows, channels, spatial, columns, CHANNELS_LAST: tl.constexpr,
             BLOCK_ROWS: tl.constexpr, BLOCK_S: tl.constexpr):
    """This program's tile of BLOCK_ROWS (sample, channel) rows and BLOCK_S positions: the
    rows, the tile's column, the masks and the values' addresses in x (64-bit: they can pass
    2^31). Tiles are on grid axis 0 (2^31 - 1 programs; axes 1 and 2 stop at 65,535)."""
    tile = tl.program_id(0)
    row = (tile // columns) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    column = tile % columns
    position = column.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    row_mask = row < rows
    mask = row_mask[:, None] & (position < spatial)[None, :]
    if CHANNELS_LAST:  # (N, S, C) in memory: a row's values are C apart
        first = (row // channels).to(tl.int64) * spatial * channels + row % channels
        at = first[:, None] + position[None, :] * channels
    else:
        at = row.to(tl.int64)[:, None] * spatial + position[None, :]
    return row, column, row_mask, mask, at


@triton.jit
def row_affine(row, row_mask, weight_ptr, bias_ptr, mean_ptr, rstd_ptr, channels,
               channels_per_group):
    """Per row: its channel c, its (sample, group) ng, the group mean, and the scale and
    shift with which the pre-activation is one FMA, a = x scale + shift = w (x - mean) rstd
    + b. Computed once per row, so no value of the tile divides or gathers."""
    c = row % channels
    ng = row // channels_per_group  # row = n C + c, C = G D
    mean = tl.load(mean_ptr + ng, mask=row_mask, other=0.0)
    scale = (tl.load(weight_ptr + c, mask=row_mask, other=0.0)
             * tl.load(rstd_ptr + ng, mask=row_mask, other=0.0))
    shift = tl.load(bias_ptr + c, mask=row_mask, other=0.0) - mean * scale
    return c, ng, mean, scale, shift


@triton.jit
def forward_kernel(x_ptr, weight_ptr, bias_ptr, proxy_mean_ptr, proxy_rstd_ptr, mean_ptr,
                   rstd_ptr, out_ptr, rows, channels, channels_per_group, spatial, columns,
                   ACT: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                   BLOCK_S: tl.constexpr):
    """3. out = act(x scale + shift) proxy_rstd - proxy_mean proxy_rstd: FMA, activation,
    FMA per value, over row tiles."""
    row, column, row_mask, mask, at = row_tile(rows, channels, spatial, columns, CHANNELS_LAST,
                                               BLOCK_ROWS, BLOCK_S)
    c, ng, mean, scale, shift = row_affine(row, row_mask, weight_ptr, bias_ptr, mean_ptr,
                                           rstd_ptr, channels, channels_per_group)
    proxy_rstd = tl.load(proxy_rstd_ptr + c, mask=row_mask, other=0.0)
    proxy_shift = -tl.load(proxy_mean_ptr + c, mask=row_mask, other=0.0) * proxy_rstd
    x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
    out = (act_value(x * scale[:, None] + shift[:, None], ACT) * proxy_rstd[:, None]
           + proxy_shift[:, None])
    tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def row_sums_kernel(grad_out_ptr, x_ptr, weight_ptr, bias_ptr, mean_ptr, rstd_ptr, sums_ptr,
                    rows, channels, channels_per_group, spatial, columns, ACT: tl.constexpr,
                    CHANNELS_LAST: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                    BLOCK_S: tl.constexpr):
    """Backward 1. Over a row tile, with g the output gradient, a the pre-activation and
    xc = x - mean: the sums of g, g act(a), g act'(a) and g act'(a) xc per row, into
    sums[k, tile column, row] (summed over tile columns by backward_sums_kernel: no atomics,
    so the result is deterministic)."""
    row, column, row_mask, mask, at = row_tile(rows, channels, spatial, columns, CHANNELS_LAST,
                                               BLOCK_ROWS, BLOCK_S)
    c, ng, mean, scale, shift = row_affine(row, row_mask, weight_ptr, bias_ptr, mean_ptr,
                                           rstd_ptr, channels, channels_per_group)
    x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_out_ptr + at, mask=mask, other=0.0).to(tl.float32)  # 0 off the tile
    a = x * scale[:, None] + shift[:, None]
    gd = g * act_slope(a, ACT)
    out = sums_ptr + column * rows + row
    stride = columns * rows
    tl.store(out, tl.sum(g, axis=1), mask=row_mask)
    tl.store(out + stride, tl.sum(g * act_value(a, ACT), axis=1), mask=row_mask)
    tl.store(out + 2 * stride, tl.sum(gd, axis=1), mask=row_mask)
    tl.store(out + 3 * stride, tl.sum(gd * (x - mean[:, None]), axis=1), mask=row_mask)


@triton.jit
def backward_sums_kernel(sums_ptr, weight_ptr, proxy_mean_ptr, proxy_rstd_ptr, rstd_ptr,
                         grad_weight_ptr, grad_bias_ptr, grad_proxy_mean_ptr,
                         grad_proxy_rstd_ptr, coef_x_ptr, coef_1_ptr, samples, channels,
                         groups, channels_per_group, columns, group_size, channel_programs,
                         BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Backward 2, the per-row sums added up in a fixed order (deterministic), in one launch
    of two kinds of programs. The first channel_programs programs each take BLOCK_C
    channels and sum over samples and tile columns into the four vectors' gradients;
    each later one takes a (sample, group) ng and sums over its channels into grad_x's
    coefficients: grad_x = g act'(a) rstd w proxy_rstd + (x - mean) coef_x + coef_1."""
    pid = tl.program_id(0)
    rows = samples * channels
    stride = columns * rows
    if pid < channel_programs:
        c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = c < channels
        acc_g = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        acc_gz = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        acc_gd = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        acc_gdx = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        for n0 in range(0, samples, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            mask = (n < samples)[:, None] & c_mask[None, :]
            row = n[:, None] * channels + c[None, :]
            s_g = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
            s_gz = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
            s_gd = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
            s_gdx = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
            for column in range(columns):
                at = sums_ptr + column * rows + row
                s_g += tl.load(at, mask=mask, other=0.0)
                s_gz += tl.load(at + stride, mask=mask, other=0.0)
                s_gd += tl.load(at + 2 * stride, mask=mask, other=0.0)
                s_gdx += tl.load(at + 3 * stride, mask=mask, other=0.0)
            rstd = tl.load(rstd_ptr + n[:, None] * groups + c[None, :] // channels_per_group,
                           mask=mask, other=0.0)
            acc_g += s_g
            acc_gz += s_gz
            acc_gd += s_gd
            acc_gdx += rstd * s_gdx
        proxy_rstd = tl.load(proxy_rstd_ptr + c, mask=c_mask, other=0.0)
        sum_g = tl.sum(acc_g, axis=0)
        tl.store(grad_weight_ptr + c, proxy_rstd * tl.sum(acc_gdx, axis=0), mask=c_mask)
        tl.store(grad_bias_ptr + c, proxy_rstd * tl.sum(acc_gd, axis=0), mask=c_mask)
        tl.store(grad_proxy_mean_ptr + c, -proxy_rstd * sum_g, mask=c_mask)
        tl.store(grad_proxy_rstd_ptr + c, tl.sum(acc_gz, axis=0)
                 - tl.load(proxy_mean_ptr + c, mask=c_mask, other=0.0) * sum_g, mask=c_mask)
    else:
        ng = pid - channel_programs
        first_row = (ng // groups) * channels + (ng % groups) * channels_per_group
        sum_dy = tl.zeros([BLOCK_C], tl.float32)
        sum_dy_xc = tl.zeros([BLOCK_C], tl.float32)
        for d0 in range(0, channels_per_group, BLOCK_C):
            d = d0 + tl.arange(0, BLOCK_C)
            d_mask = d < channels_per_group
            c = (ng % groups) * channels_per_group + d
            s_gd = tl.zeros([BLOCK_C], tl.float32)
            s_gdx = tl.zeros([BLOCK_C], tl.float32)
            for column in range(columns):
                at = sums_ptr + column * rows + first_row + d
                s_gd += tl.load(at + 2 * stride, mask=d_mask, other=0.0)
                s_gdx += tl.load(at + 3 * stride, mask=d_mask, other=0.0)
            dy_scale = (tl.load(weight_ptr + c, mask=d_mask, other=0.0)
                        * tl.load(proxy_rstd_ptr + c, mask=d_mask, other=0.0))
            sum_dy += dy_scale * s_gd
            sum_dy_xc += dy_scale * s_gdx
        rstd = tl.load(rstd_ptr + ng)
        tl.store(coef_x_ptr + ng, -rstd * rstd * (rstd * tl.sum(sum_dy_xc, axis=0) / group_size))
        tl.store(coef_1_ptr + ng, -rstd * tl.sum(sum_dy, axis=0) / group_size)


@triton.jit
def grad_x_kernel(grad_out_ptr, x_ptr, weight_ptr, bias_ptr, proxy_rstd_ptr, mean_ptr,
                  rstd_ptr, coef_x_ptr, coef_1_ptr, grad_x_ptr, rows, channels,
                  channels_per_group, spatial, columns, ACT: tl.constexpr,
                  CHANNELS_LAST: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                  BLOCK_S: tl.constexpr):
    """Backward 3. grad_x = g act'(a) k + x coef_x + (coef_1 - mean coef_x) over row tiles,
    k = rstd w proxy_rstd, recomputing a from x as the forward does."""
    row, column, row_mask, mask, at = row_tile(rows, channels, spatial, columns, CHANNELS_LAST,
                                               BLOCK_ROWS, BLOCK_S)
    c, ng, mean, scale, shift = row_affine(row, row_mask, weight_ptr, bias_ptr, mean_ptr,
                                           rstd_ptr, channels, channels_per_group)
    k = scale * tl.load(proxy_rstd_ptr + c, mask=row_mask, other=0.0)
    coef_x = tl.load(coef_x_ptr + ng, mask=row_mask, other=0.0)
    coef_1 = tl.load(coef_1_ptr + ng, mask=row_mask, other=0.0) - mean * coef_x
    x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_out_ptr + at, mask=mask, other=0.0).to(tl.float32)
    slope = act_slope(x * scale[:, None] + shift[:, None], ACT)
    grad_x = g * slope * k[:, None] + (x * coef_x[:, None] + coef_1[:, None])
    tl.store(grad_x_ptr + at, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def proxy_values(weight_ptr, bias_ptr, proxy_weight_ptr, proxy_bias_ptr, quantiles_ptr,
                 channels, num_samples, ACT: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_Q: tl.constexpr):
    """A tile of BLOCK_C channels' proxies, proxynorm/proxy.py's expression: Ytilde =
    proxy_bias + (1 + proxy_weight) u, a = weight Ytilde + bias, and act(a) (0 off the
    tile), with the quantiles u, the weights and the mask."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < channels
    i = tl.arange(0, BLOCK_Q)
    u = tl.load(quantiles_ptr + i, mask=i < num_samples, other=0.0)
    weight = tl.load(weight_ptr + c, mask=c_mask, other=0.0)
    proxy_weight = tl.load(proxy_weight_ptr + c, mask=c_mask, other=0.0)
    y = (tl.load(proxy_bias_ptr + c, mask=c_mask, other=0.0)[:, None]
         + (1.0 + proxy_weight[:, None]) * u[None, :])
    a = weight[:, None] * y + tl.load(bias_ptr + c, mask=c_mask, other=0.0)[:, None]
    mask = c_mask[:, None] & (i < num_samples)[None, :]
    return c, c_mask, mask, u, weight, y, a, tl.where(mask, act_value(a, ACT), 0.0)


@triton.jit
def proxy_moments(proxy, mask, num_samples, proxy_eps):
    """Per channel: the proxy's mean, its centred values, rstd = 1 / sqrt(var + proxy_eps),
    var the population variance (divided by n), taken about the mean."""
    mean = tl.sum(proxy, axis=1) / num_samples
    centred = tl.where(mask, proxy - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / num_samples
    return mean, centred, tl.div_rn(1.0, tl.sqrt_rn(var + proxy_eps))


@triton.jit
def proxy_stats_kernel(weight_ptr, bias_ptr, proxy_weight_ptr, proxy_bias_ptr, quantiles_ptr,
                       mean_ptr, rstd_ptr, channels, num_samples, proxy_eps,
                       ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr):
    """The proxy statistics of BLOCK_C channels: mean and rstd."""
    c, c_mask, mask, u, weight, y, a, proxy = proxy_values(
        weight_ptr, bias_ptr, proxy_weight_ptr, proxy_bias_ptr, quantiles_ptr, channels,
        num_samples, ACT, BLOCK_C, BLOCK_Q)
    mean, centred, rstd = proxy_moments(proxy, mask, num_samples, proxy_eps)
    tl.store(mean_ptr + c, mean, mask=c_mask)
    tl.store(rstd_ptr + c, rstd, mask=c_mask)


@triton.jit
def proxy_stats_backward_kernel(grad_mean_ptr, grad_rstd_ptr, weight_ptr, bias_ptr,
                                proxy_weight_ptr, proxy_bias_ptr, quantiles_ptr,
                                grad_weight_ptr, grad_bias_ptr, grad_proxy_weight_ptr,
                                grad_proxy_bias_ptr, channels, num_samples, proxy_eps,
                                ACT: tl.constexpr, BLOCK_C: tl.constexpr,
                                BLOCK_Q: tl.constexpr):
    """The proxy statistics' backward, recomputing the proxy: d mean / d proxy_i = 1 / n,
    d rstd / d proxy_i = -rstd^3 (proxy_i - mean) / n, then through act and the affine."""
    c, c_mask, mask, u, weight, y, a, proxy = proxy_values(
        weight_ptr, bias_ptr, proxy_weight_ptr, proxy_bias_ptr, quantiles_ptr, channels,
        num_samples, ACT, BLOCK_C, BLOCK_Q)
    mean, centred, rstd = proxy_moments(proxy, mask, num_samples, proxy_eps)
    grad_mean = tl.load(grad_mean_ptr + c, mask=c_mask, other=0.0)
    grad_var = -0.5 * tl.load(grad_rstd_ptr + c, mask=c_mask, other=0.0) * rstd * rstd * rstd
    grad_proxy = (grad_mean[:, None] + 2.0 * grad_var[:, None] * centred) / num_samples
    grad_a = tl.where(mask, grad_proxy * act_slope(a, ACT), 0.0)
    sum_grad_a = tl.sum(grad_a, axis=1)
    tl.store(grad_weight_ptr + c, tl.sum(grad_a * y, axis=1), mask=c_mask)
    tl.store(grad_bias_ptr + c, sum_grad_a, mask=c_mask)
    tl.store(grad_proxy_weight_ptr + c, weight * tl.sum(grad_a * u[None, :], axis=1),
             mask=c_mask)
    tl.store(grad_proxy_bias_ptr + c, weight * sum_grad_a, mask=c_mask)
