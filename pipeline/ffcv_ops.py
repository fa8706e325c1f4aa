"""Numba kernels for the FFCV multi-crop pipeline: all V views of one decoded image.

`augment_sample` is the whole per-sample recipe: for each view a RandomResizedCrop
(torchvision semantics), a PIL-style antialiased bicubic resize with the flip folded into
the resize weights, colour jitter in torchvision's random order, grayscale, gaussian blur
and solarize, all on one float32 buffer per view, rounded to uint8 once at the end.

Randomness is a counter-based stream (splitmix64) keyed by (seed, epoch, sample index,
view), so a sample's views do not depend on which thread, batch or rank processes it:
that is what makes resumed and rank-sharded epochs reproduce an uninterrupted run.

Every kernel is `cache=True`, so only the first process on a machine pays their compile.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .recipe import MultiCropRecipe

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_TO_UNIT = 1.0 / 9007199254740992.0  # 2**-53

# Columns of the per-view table and of the shared parameter vector built by `recipe_tables`.
V_SIZE, V_SCALE_LO, V_SCALE_HI, V_BLUR_P, V_SOLARIZE_P = range(5)
(G_RATIO_LO, G_RATIO_HI, G_FLIP_P, G_JITTER_P, G_BRIGHTNESS, G_CONTRAST, G_SATURATION, G_HUE,
 G_GRAYSCALE_P, G_SIGMA_LO, G_SIGMA_HI, G_THRESHOLD) = range(12)

_JIT = dict(cache=True, nogil=True, fastmath=True, error_model="numpy")


def recipe_tables(recipe: MultiCropRecipe) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(views [V, 5] float64, offsets [V + 1] int64 into the flat uint8 sample, shared [12])."""
    views = recipe.views()
    table = np.array([[v.size, v.scale[0], v.scale[1], v.blur_p, v.solarize_p] for v in views], np.float64)
    offsets = np.zeros(len(views) + 1, np.int64)
    offsets[1:] = np.cumsum([v.size * v.size * 3 for v in views])
    shared = np.array([
        recipe.ratio[0], recipe.ratio[1], recipe.flip_p, recipe.jitter_p, recipe.brightness,
        recipe.contrast, recipe.saturation, recipe.hue, recipe.grayscale_p, recipe.blur_sigma[0],
        recipe.blur_sigma[1], recipe.solarize_threshold,
    ], np.float64)
    return table, offsets, shared


# ---------------------------------------------------------------- random numbers

@njit(**_JIT)
def _mix(z):
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@njit(**_JIT)
def stream_key(seed, epoch, index, view):
    """The starting state of the random stream of one view of one sample in one epoch."""
    s = _mix(np.uint64(seed))
    s = _mix(s ^ np.uint64(epoch))
    s = _mix(s ^ np.uint64(index))
    return _mix(s ^ np.uint64(view))


@njit(**_JIT)
def _uniform(state, lo, hi):
    # The cast keeps uint64 arithmetic when a caller hands back the state as a Python int.
    state = np.uint64(state) + _GOLDEN
    u = np.float64(_mix(state) >> np.uint64(11)) * _TO_UNIT
    return state, lo + (hi - lo) * u


# ---------------------------------------------------------------- crop and resize

@njit(**_JIT)
def random_crop(state, height, width, scale_lo, scale_hi, ratio_lo, ratio_hi):
    """torchvision RandomResizedCrop.get_params: (state, top, left, h, w)."""
    area = height * width
    log_lo = np.log(ratio_lo)
    log_hi = np.log(ratio_hi)
    for _ in range(10):
        state, frac = _uniform(state, scale_lo, scale_hi)
        state, log_r = _uniform(state, log_lo, log_hi)
        aspect = np.exp(log_r)
        w = int(np.round(np.sqrt(area * frac * aspect)))
        h = int(np.round(np.sqrt(area * frac / aspect)))
        if 0 < w <= width and 0 < h <= height:
            state, ui = _uniform(state, 0.0, 1.0)
            state, uj = _uniform(state, 0.0, 1.0)
            top = min(int(ui * (height - h + 1)), height - h)
            left = min(int(uj * (width - w + 1)), width - w)
            return state, top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio_lo:
        w = width
        h = int(np.round(w / ratio_lo))
    elif in_ratio > ratio_hi:
        h = height
        w = int(np.round(h * ratio_hi))
    else:
        w = width
        h = height
    return state, (height - h) // 2, (width - w) // 2, h, w


@njit(**_JIT)
def _bicubic(x):
    # PIL's bicubic kernel (a = -0.5), so our resize matches torchvision's PIL path.
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@njit(**_JIT)
def _resize_weights(length, out_size):
    """PIL's antialiased bicubic taps from a span of `length` pixels to `out_size`."""
    scale = length / out_size
    fscale = max(scale, 1.0)
    support = 2.0 * fscale
    taps = int(np.ceil(support)) * 2 + 1
    first = np.empty(out_size, np.int64)
    count = np.empty(out_size, np.int64)
    weights = np.zeros((out_size, taps), np.float32)
    for o in range(out_size):
        center = (o + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), length)
        total = 0.0
        for k in range(hi - lo):
            wk = _bicubic((lo + k - center + 0.5) / fscale)
            weights[o, k] = wk
            total += wk
        if total != 0.0:
            for k in range(hi - lo):
                weights[o, k] /= total
        first[o] = lo
        count[o] = hi - lo
    return first, count, weights


@njit(**_JIT)
def resized_crop(img, top, left, h, w, size, flip):
    """Crop img[top:top+h, left:left+w] (uint8 HWC), resize to size x size, mirror if flip.

    Returns float32 [size, size * 3] (HWC rows), clamped to [0, 255].
    """
    xf, xc, xw = _resize_weights(w, size)
    yf, yc, yw = _resize_weights(h, size)
    row = size * 3
    tmp = np.empty((h, row), np.float32)
    for y in range(h):
        src = img[top + y]
        for x in range(size):
            xs = size - 1 - x if flip else x
            r = np.float32(0.0)
            g = np.float32(0.0)
            b = np.float32(0.0)
            f = left + xf[xs]
            for k in range(xc[xs]):
                wk = xw[xs, k]
                r += wk * src[f + k, 0]
                g += wk * src[f + k, 1]
                b += wk * src[f + k, 2]
            tmp[y, 3 * x] = r
            tmp[y, 3 * x + 1] = g
            tmp[y, 3 * x + 2] = b
    out = np.zeros((size, row), np.float32)
    for y in range(size):
        for k in range(yc[y]):
            wk = yw[y, k]
            srow = tmp[yf[y] + k]
            for i in range(row):
                out[y, i] += wk * srow[i]
        for i in range(row):
            out[y, i] = min(max(out[y, i], 0.0), 255.0)
    return out


# ---------------------------------------------------------------- colour (buffers: [H, W * 3] float32, 0..255)

@njit(**_JIT)
def _gray(r, g, b):
    return np.float32(0.2989) * r + np.float32(0.587) * g + np.float32(0.114) * b


@njit(**_JIT)
def _clamp(v):
    return min(max(v, np.float32(0.0)), np.float32(255.0))


@njit(**_JIT)
def adjust_brightness(buf, factor):
    f = np.float32(factor)
    flat = buf.reshape(-1)
    for i in range(flat.size):
        flat[i] = _clamp(flat[i] * f)


@njit(**_JIT)
def adjust_contrast(buf, factor):
    flat = buf.reshape(-1)
    n = flat.size // 3
    total = 0.0
    for p in range(n):
        total += _gray(flat[3 * p], flat[3 * p + 1], flat[3 * p + 2])
    mean = np.float32(total / n)
    f = np.float32(factor)
    off = (np.float32(1.0) - f) * mean
    for i in range(flat.size):
        flat[i] = _clamp(f * flat[i] + off)


@njit(**_JIT)
def adjust_saturation(buf, factor):
    flat = buf.reshape(-1)
    f = np.float32(factor)
    for p in range(flat.size // 3):
        g = (np.float32(1.0) - f) * _gray(flat[3 * p], flat[3 * p + 1], flat[3 * p + 2])
        for c in range(3):
            flat[3 * p + c] = _clamp(f * flat[3 * p + c] + g)


@njit(**_JIT)
def _shift_hue(r, g, b, shift6):
    """torchvision's rgb -> hsv -> (h + shift) mod 1 -> rgb, with h in sixths (shift6 = 6 shift).

    In hsv2rgb, v = max, v (1 - s) = min and the two ramps are min + (max - min) f and
    max - (max - min) f, so no s, division by max or clamp is needed.
    """
    maxc = max(r, max(g, b))
    minc = min(r, min(g, b))
    cr = maxc - minc
    if cr == 0:
        return r, g, b
    inv = np.float32(1.0) / cr
    if maxc == r:
        h6 = (g - b) * inv
    elif maxc == g:
        h6 = np.float32(2.0) + (b - r) * inv
    else:
        h6 = np.float32(4.0) + (r - g) * inv
    h6 += shift6
    while h6 < 0:
        h6 += np.float32(6.0)
    while h6 >= 6:
        h6 -= np.float32(6.0)
    i = int(h6)
    f = h6 - i
    up = minc + cr * f
    down = maxc - cr * f
    if i == 0:
        return maxc, up, minc
    if i == 1:
        return down, maxc, minc
    if i == 2:
        return minc, maxc, up
    if i == 3:
        return minc, down, maxc
    if i == 4:
        return up, minc, maxc
    return maxc, minc, down


@njit(**_JIT)
def adjust_hue(buf, shift):
    flat = buf.reshape(-1)
    shift6 = np.float32(6.0 * shift)
    for p in range(flat.size // 3):
        r, g, b = _shift_hue(flat[3 * p], flat[3 * p + 1], flat[3 * p + 2], shift6)
        flat[3 * p] = r
        flat[3 * p + 1] = g
        flat[3 * p + 2] = b


@njit(**_JIT)
def to_grayscale(buf):
    flat = buf.reshape(-1)
    for p in range(flat.size // 3):
        g = _gray(flat[3 * p], flat[3 * p + 1], flat[3 * p + 2])
        flat[3 * p] = g
        flat[3 * p + 1] = g
        flat[3 * p + 2] = g


# ---------------------------------------------------------------- filters

@njit(**_JIT)
def gaussian_blur(buf, sigma):
    """Separable gaussian, radius ceil(3 sigma), edges replicated; in place on [H, W * 3]."""
    height, row = buf.shape
    width = row // 3
    radius = max(1, int(np.ceil(3.0 * sigma)))
    kernel = np.empty(2 * radius + 1, np.float32)
    total = 0.0
    for k in range(2 * radius + 1):
        d = k - radius
        kernel[k] = np.exp(-0.5 * d * d / (sigma * sigma))
        total += kernel[k]
    for k in range(2 * radius + 1):
        kernel[k] /= total
    # Each row is padded by replicating its edge pixels, so the taps loop runs without
    # bounds checks and vectorizes.
    taps = 2 * radius + 1
    padded = np.empty((width + 2 * radius) * 3, np.float32)
    tmp = np.zeros((height, row), np.float32)
    for y in range(height):
        src = buf[y]
        padded[3 * radius: 3 * radius + row] = src
        for x in range(radius):
            for c in range(3):
                padded[3 * x + c] = src[c]
                padded[3 * (radius + width + x) + c] = src[row - 3 + c]
        dst = tmp[y]
        for k in range(taps):
            wk = kernel[k]
            seg = padded[3 * k: 3 * k + row]
            for i in range(row):
                dst[i] += wk * seg[i]
    buf[:] = 0.0
    for y in range(height):
        dst = buf[y]
        for k in range(2 * radius + 1):
            srow = tmp[min(max(y + k - radius, 0), height - 1)]
            wk = kernel[k]
            for i in range(row):
                dst[i] += wk * srow[i]


@njit(**_JIT)
def solarize(buf, threshold):
    flat = buf.reshape(-1)
    t = np.float32(threshold)
    for i in range(flat.size):
        if flat[i] >= t:
            flat[i] = np.float32(255.0) - flat[i]


# ---------------------------------------------------------------- the per-sample recipe

@njit(**_JIT)
def _color_jitter(state, buf, shared):
    b = shared[G_BRIGHTNESS]
    c = shared[G_CONTRAST]
    s = shared[G_SATURATION]
    hue = shared[G_HUE]
    state, fb = _uniform(state, max(0.0, 1.0 - b), 1.0 + b)
    state, fc = _uniform(state, max(0.0, 1.0 - c), 1.0 + c)
    state, fs = _uniform(state, max(0.0, 1.0 - s), 1.0 + s)
    state, fh = _uniform(state, -hue, hue)
    order = np.arange(4)
    for i in range(3, 0, -1):  # Fisher-Yates: torchvision applies the four in random order
        state, u = _uniform(state, 0.0, 1.0)
        j = min(int(u * (i + 1)), i)
        order[i], order[j] = order[j], order[i]
    for op in order:
        if op == 0 and b > 0:
            adjust_brightness(buf, fb)
        elif op == 1 and c > 0:
            adjust_contrast(buf, fc)
        elif op == 2 and s > 0:
            adjust_saturation(buf, fs)
        elif op == 3 and hue > 0:
            adjust_hue(buf, fh)
    return state


@njit(**_JIT)
def _write_uint8(buf, out):
    flat = buf.reshape(-1)
    for i in range(flat.size):
        out[i] = np.uint8(min(max(flat[i] + 0.5, 0.0), 255.0))


@njit(**_JIT)
def augment_sample(img, out, views, offsets, shared, seed, epoch, index):
    """All views of one decoded image (uint8 [H, W, 3]) into `out` (flat uint8, HWC per view)."""
    height, width = img.shape[0], img.shape[1]
    for v in range(views.shape[0]):
        state = stream_key(seed, epoch, index, v)
        size = int(views[v, V_SIZE])
        state, top, left, h, w = random_crop(state, height, width, views[v, V_SCALE_LO], views[v, V_SCALE_HI],
                                             shared[G_RATIO_LO], shared[G_RATIO_HI])
        state, u_flip = _uniform(state, 0.0, 1.0)
        buf = resized_crop(img, top, left, h, w, size, u_flip < shared[G_FLIP_P])
        state, u = _uniform(state, 0.0, 1.0)
        if u < shared[G_JITTER_P]:
            state = _color_jitter(state, buf, shared)
        state, u = _uniform(state, 0.0, 1.0)
        if u < shared[G_GRAYSCALE_P]:
            to_grayscale(buf)
        state, u = _uniform(state, 0.0, 1.0)
        state, sigma = _uniform(state, shared[G_SIGMA_LO], shared[G_SIGMA_HI])
        if u < views[v, V_BLUR_P]:
            gaussian_blur(buf, sigma)
        state, u = _uniform(state, 0.0, 1.0)
        if u < views[v, V_SOLARIZE_P]:
            solarize(buf, shared[G_THRESHOLD])
        _write_uint8(buf, out[offsets[v]:offsets[v + 1]])


@njit(parallel=True, **_JIT)
def augment_batch(pixels, shapes, out, views, offsets, shared, seed, epoch, indices):
    """augment_sample over a batch in parallel: pixels [B, >= H*W*3] decoded images of
    shapes [B, 2] (height, width), out [B, offsets[-1]], indices [B] the samples' ids.

    The parallel loop lives here rather than in the FFCV decoder so that it is compiled
    once per machine (cache=True) instead of once per loader. The caller sets the chunk
    size (a numba call that cannot be cached).
    """
    for i in prange(out.shape[0]):
        h = shapes[i, 0]
        w = shapes[i, 1]
        img = pixels[i, : h * w * 3].reshape(h, w, 3)
        augment_sample(img, out[i], views, offsets, shared, seed, epoch, indices[i])


@njit(parallel=True, **_JIT)
def normalize_views(raw, start, n_views, size, lut, out):
    """Copy n_views views of size x size out of FFCV's reused rows raw [B, bytes] (from byte
    `start`) into out [n_views, B, size * size * 3] float32, view-major, through the
    per-channel lookup table lut [3, 256] = (value - mean) / std: one pass, not torch's three."""
    batch = raw.shape[0]
    plane = size * size * 3
    for job in prange(n_views * batch):
        v = job // batch
        b = job % batch
        src = raw[b, start + v * plane: start + (v + 1) * plane]
        dst = out[v, b]
        for p in range(size * size):
            dst[3 * p] = lut[0, src[3 * p]]
            dst[3 * p + 1] = lut[1, src[3 * p + 1]]
            dst[3 * p + 2] = lut[2, src[3 * p + 2]]
