"""Triton kernels for the MVEB loss: each replaces a chain of batched PyTorch launches.

- normalize_align: one pass over the V online rows and 2 target rows of a sample: unit
  rows z, t, the norms and the align row dots <z_vb, target_vb>.
- radix_pass: exact k-th smallest entry of each view's S by a 4-pass, 8-bit radix select
  on histograms (a few reads of S instead of a full sort of B*B entries).
- kernel_matrix: the selected value -> tau, then A = exp((S - 1) / tau) + eta' I and its
  row sums r, in one read of S.
- operator: M = P diag(r) / tau and the row sums of M * S (the entropy and the row dots
  the backward needs), in one read of P and S.
- sweep_step: one block step of the in-place inversion of the SPD K + eta' I (a
  Gauss-Jordan sweep, Schur complements by tl.dot), with a failure flag per view.
- finish: the loss, align and entropy scalars and the gradient's row dots (1 program).
- grad_online: d loss / d online for a unit upstream gradient, in one elementwise pass over
  y = M z, the alignment target, the scale and the normalization's backward (it runs in the
  forward; the backward scales it).
All work in fp32; inputs may be fp32, bf16 or fp16.
"""

from __future__ import annotations

import triton
import triton.language as tl

RADIX_BITS = 8
RADIX_PASSES = 32 // RADIX_BITS


@triton.jit
def _view_weights(v):
    """(w1, w2): view 1 aligns with t_2, view 2 with t_1, the locals with their mean."""
    w1 = tl.where(v == 0, 0.0, tl.where(v == 1, 1.0, 0.5))
    return w1, 1.0 - w1


@triton.jit
def normalize_align_kernel(
    online_ptr, targets_ptr, z_ptr, t_ptr, norms_ptr, rowdot_ptr, V, B, D, BLOCK_D: tl.constexpr
):
    b = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    t1 = tl.load(targets_ptr + b * D + cols, mask=mask, other=0.0).to(tl.float32)
    t2 = tl.load(targets_ptr + (B + b) * D + cols, mask=mask, other=0.0).to(tl.float32)
    t1 = t1 / tl.maximum(tl.sqrt(tl.sum(t1 * t1, axis=0)), 1e-12)
    t2 = t2 / tl.maximum(tl.sqrt(tl.sum(t2 * t2, axis=0)), 1e-12)
    tl.store(t_ptr + b * D + cols, t1, mask=mask)
    tl.store(t_ptr + (B + b) * D + cols, t2, mask=mask)
    for v in range(V):
        row = (v * B + b).to(tl.int64) * D
        o = tl.load(online_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
        norm = tl.maximum(tl.sqrt(tl.sum(o * o, axis=0)), 1e-12)
        z = o / norm
        tl.store(z_ptr + row + cols, z, mask=mask)
        tl.store(norms_ptr + v * B + b, norm)
        w1, w2 = _view_weights(v)
        tl.store(rowdot_ptr + v * B + b, tl.sum(z * (w1 * t1 + w2 * t2), axis=0))


@triton.jit
def _sortable_key(x):
    """fp32 -> uint32 whose unsigned order is the float order."""
    u = x.to(tl.uint32, bitcast=True)
    flip = tl.where((u >> 31) == 1, 0xFFFFFFFF, 0x80000000).to(tl.uint32)
    return u ^ flip


@triton.jit
def _selected_prefix(hist_ptr, v, V, k, PASSES: tl.constexpr):
    """Digits chosen by the first PASSES passes, and the rank still wanted inside them."""
    bins = tl.arange(0, 1 << 8)
    prefix = tl.zeros((), dtype=tl.uint32)
    rank = tl.zeros((), dtype=tl.int32) + k
    for p in tl.static_range(PASSES):
        h = tl.load(hist_ptr + (p * V + v) * (1 << 8) + bins)
        below = tl.cumsum(h, axis=0) < rank
        digit = tl.sum(below.to(tl.int32), axis=0)
        rank -= tl.sum(tl.where(below, h, 0), axis=0)
        prefix = (prefix << 8) | digit.to(tl.uint32)
    return prefix, rank


@triton.jit
def radix_pass_kernel(s_ptr, hist_ptr, V, N, k, PASS: tl.constexpr, BLOCK: tl.constexpr):
    v = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    x = tl.load(s_ptr + v.to(tl.int64) * N + offs, mask=inside, other=0.0)
    key = _sortable_key(x)
    if PASS > 0:
        prefix, _ = _selected_prefix(hist_ptr, v, V, k, PASS)
        inside = inside & ((key >> (32 - 8 * PASS)) == prefix)
    digit = ((key >> (24 - 8 * PASS)) & 0xFF).to(tl.int32)
    h = tl.histogram(digit, 1 << 8, mask=inside)
    tl.atomic_add(hist_ptr + (PASS * V + v) * (1 << 8) + tl.arange(0, 1 << 8), h, sem="relaxed")


@triton.jit
def kernel_matrix_kernel(
    s_ptr, hist_ptr, a_ptr, r_ptr, tau_ptr, V, B, k, eta, min_tau,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PASSES: tl.constexpr,
):
    v = tl.program_id(0)
    key, _ = _selected_prefix(hist_ptr, v, V, k, PASSES)
    bits = key ^ tl.where((key >> 31) == 1, 0x80000000, 0xFFFFFFFF).to(tl.uint32)
    tau = tl.maximum(1.0 - bits.to(tl.float32, bitcast=True), min_tau)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    base = v.to(tl.int64) * B * B
    rsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, B, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < B) & (cols[None, :] < B)
        offs = base + rows[:, None] * B + cols[None, :]
        kv = tl.exp((tl.load(s_ptr + offs, mask=mask, other=1.0) - 1.0) / tau)
        kv = tl.where(mask, kv, 0.0)
        rsum += tl.sum(kv, axis=1)
        kv += tl.where(rows[:, None] == cols[None, :], eta * tl.exp(-1.0 / tau), 0.0)
        tl.store(a_ptr + offs, kv, mask=mask)
    tl.store(r_ptr + v * B + rows, rsum, mask=rows < B)
    tl.store(tau_ptr + v, tau)


@triton.jit
def operator_kernel(p_ptr, s_ptr, r_ptr, tau_ptr, m_ptr, ms_ptr, B, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    v = tl.program_id(0)
    inv_tau = 1.0 / tl.load(tau_ptr + v)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    base = v.to(tl.int64) * B * B
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, B, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < B) & (cols[None, :] < B)
        offs = base + rows[:, None] * B + cols[None, :]
        scale = tl.load(r_ptr + v * B + cols, mask=cols < B, other=0.0) * inv_tau
        m = tl.load(p_ptr + offs, mask=mask, other=0.0) * scale[None, :]
        tl.store(m_ptr + offs, m, mask=mask)
        acc += tl.sum(m * tl.load(s_ptr + offs, mask=mask, other=0.0), axis=1)
    tl.store(ms_ptr + v * B + rows, acc, mask=rows < B)


@triton.jit
def finish_kernel(rowdot_ptr, ms_ptr, dots_ptr, loss_ptr, align_ptr, entropy_ptr, V, B, lam, BLOCK: tl.constexpr):
    """One program: the loss scalars from the [V, B] row sums, and dots = rowdot + lam ms."""
    align = tl.zeros((BLOCK,), dtype=tl.float32)
    ent = tl.zeros((BLOCK,), dtype=tl.float32)
    for i0 in range(0, V * B, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        mask = offs < V * B
        rd = tl.load(rowdot_ptr + offs, mask=mask, other=0.0)
        ms = tl.load(ms_ptr + offs, mask=mask, other=0.0)
        tl.store(dots_ptr + offs, rd + lam * ms, mask=mask)
        align += rd
        ent += ms
    align_sum = tl.sum(align, axis=0) / B
    entropy = tl.sum(ent, axis=0) / (V * B)
    tl.store(align_ptr, align_sum)
    tl.store(entropy_ptr, entropy)
    tl.store(loss_ptr, -(align_sum / V + lam * entropy))


@triton.jit
def grad_online_kernel(y_ptr, z_ptr, t_ptr, dots_ptr, norms_ptr, out_ptr, V, B, D, lam, BLOCK_D: tl.constexpr):
    """One program per online row: d loss / d online for a unit upstream gradient (the
    alignment target, the scale and the normalization's backward around y = M z)."""
    row = tl.program_id(0)
    v = row // B
    b = row % B
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    offs = row.to(tl.int64) * D + cols
    w1, w2 = _view_weights(v)
    target = (w1 * tl.load(t_ptr + b * D + cols, mask=mask, other=0.0)
              + w2 * tl.load(t_ptr + (B + b) * D + cols, mask=mask, other=0.0))
    scale = -1.0 / (V * B)
    dz = scale * (target + lam * tl.load(y_ptr + offs, mask=mask, other=0.0))
    z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    grad = (dz - z * (scale * tl.load(dots_ptr + row))) / tl.load(norms_ptr + row)
    tl.store(out_ptr + offs, grad.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _padded_tile(a_ptr, base, B, r0, c0, T: tl.constexpr):
    """A tile of A padded to whole tiles with the identity (its inverse stays the identity)."""
    rows = r0 + tl.arange(0, T)
    cols = c0 + tl.arange(0, T)
    inside = (rows[:, None] < B) & (cols[None, :] < B)
    eye = tl.where(rows[:, None] == cols[None, :], 1.0, 0.0)
    return tl.where(inside, tl.load(a_ptr + base + rows[:, None] * B + cols[None, :], mask=inside, other=0.0), eye)


@triton.jit
def _sweep_tile(d, T: tl.constexpr):
    """(-D^{-1}, failed) for a SPD tile by T one-index sweeps; failed when a pivot is not > 0."""
    idx = tl.arange(0, T)
    failed = tl.zeros((), dtype=tl.int32)
    for p in range(T):
        on_row = idx[:, None] == p
        on_col = idx[None, :] == p
        col = tl.sum(tl.where(on_col, d, 0.0), axis=1)
        row = tl.sum(tl.where(on_row, d, 0.0), axis=0)
        pivot = tl.sum(tl.where(idx == p, col, 0.0), axis=0)
        failed = tl.maximum(failed, tl.where(pivot > 0, 0, 1))
        rest = d - col[:, None] * row[None, :] / pivot
        d = tl.where(on_row & on_col, -1.0 / pivot,
                     tl.where(on_row, row[None, :] / pivot, tl.where(on_col, col[:, None] / pivot, rest)))
    return d, failed


@triton.jit(do_not_specialize=["K"])
def sweep_step_kernel(a_in, a_out, info_ptr, B, K, sign, T: tl.constexpr):
    """One block step of the symmetric sweep (block Gauss-Jordan without pivoting, stable for
    SPD): after sweeping every diagonal block, A has become -A^{-1}. Reads a_in, writes
    a_out (ping-pong, so tiles of one step never race); sign = -1 on the last step."""
    v = tl.program_id(0)
    bi = tl.program_id(1)
    bj = tl.program_id(2)
    base = v.to(tl.int64) * B * B
    k0 = K * T
    neg_dinv, failed = _sweep_tile(_padded_tile(a_in, base, B, k0, k0, T), T)
    if bi == K:
        if bj == K:
            out = neg_dinv
        else:
            out = -tl.dot(neg_dinv, _padded_tile(a_in, base, B, k0, bj * T, T), input_precision="ieee")
    else:
        left = tl.dot(_padded_tile(a_in, base, B, bi * T, k0, T), neg_dinv, input_precision="ieee")
        if bj == K:
            out = -left
        else:
            a_kj = _padded_tile(a_in, base, B, k0, bj * T, T)
            out = tl.dot(left, a_kj, _padded_tile(a_in, base, B, bi * T, bj * T, T), input_precision="ieee")
    rows = bi * T + tl.arange(0, T)
    cols = bj * T + tl.arange(0, T)
    tl.store(a_out + base + rows[:, None] * B + cols[None, :], out * sign, mask=(rows[:, None] < B) & (cols[None, :] < B))
    tl.store(info_ptr + v, failed, mask=(bi == K) & (bj == K) & (failed > 0))
