//! GGML's K-quant super-block formats Q4_K and Q6_K: the codecs (following ggml-quants.c's
//! `quantize_row_q4_K_ref` / `quantize_row_q6_K_ref` operation for operation, so that the bytes
//! are the ones llama.cpp writes into a GGUF file), the 8-bit activation blocks their products
//! use (GGML's Q8_K), and the portable dot products that are the reference for the SIMD ones.
//!
//! A super-block holds 256 values:
//!
//! ```text
//! Q4_K (144 bytes): f16 d, f16 dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32,
//!                   128 bytes of nibbles; value = d * sc * q - dmin * m   (4.5 bits per weight)
//! Q6_K (210 bytes): 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 i8 scales of
//!                   sub-blocks of 16, f16 d; value = d * sc * (q - 32)     (6.5625 bits)
//! Q8_K (activation): f32 d, 256 i8, 16 i16 sums of 16 values: value = d * q
//! ```
//!
//! The activation is quantized per super-block with one scale, as GGML does (`d = max / -127`
//! with the sign of the element of largest magnitude), so that a super-block's whole dot product
//! is one exact integer sum: `sum_j sc_j * (q . x)_j` and the mins' `sum_j m_j * bsum_j`. Each
//! kernel computes these integers exactly and then adds `dx * d * sumi - dx * dmin * summ` per
//! super-block in the same order, so every kernel gives the same bits as the scalar one.

use half::f16;

/// Values per super-block (`QK_K`).
pub const QK_K: usize = 256;
/// Bytes of a Q4_K super-block.
pub const Q4K_BYTES: usize = 144;
/// Bytes of a Q6_K super-block.
pub const Q6K_BYTES: usize = 210;

/// ggml's `GROUP_MAX_EPS`: a sub-block whose scale is below this is all zero.
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `nearest_int`: round to nearest, ties to even, through the float adder (valid for
/// `|v| <= 4194303`, which the quantizers guarantee).
#[inline]
fn nearest_int(v: f32) -> i32 {
    let val = v + 12_582_912.0;
    (val.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// ggml's `make_qkx2_quants` (without MAD): a scale and a min for `x` with levels `0..=nmax`,
/// searched over `nstep + 1` candidate scales with weighted least squares. Returns
/// `(scale, -min)` and leaves the levels in `l`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..n].fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let lf = q as f32;
            let w = weights[i];
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qx_quants` with `rmse_type = 1` and no importance weights: a signed scale for
/// `x` with levels `-nmax..nmax-1`, stored `+ nmax` in `l`.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let n = x.len();
    let mut max = 0f32;
    let mut amax = 0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l[..n].fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let mut iscale = -nmaxf / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for i in 0..n {
        let q = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        l[i] = (q + nmax) as i8;
        let w = x[i] * x[i];
        let lf = q as f32;
        sumlx += w * x[i] * lf;
        suml2 += w * lf * lf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmaxf + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let lf = nearest_int(iscale * v).clamp(-nmax, nmax - 1) as f32;
            let w = v * v;
            sumlx += w * v * lf;
            suml2 += w * lf * lf;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for i in 0..n {
                let q = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
                l[i] = (q + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// The 6-bit scale and min of sub-block `j` from a Q4_K block's 12 scale bytes.
#[inline]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// One Q4_K super-block, as `quantize_row_q4_K_ref` makes it.
pub(crate) fn quantize_q4_k(x: &[f32], out: &mut [u8]) {
    debug_assert_eq!(x.len(), QK_K);
    debug_assert_eq!(out.len(), Q4K_BYTES);
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 32];
    let mut weights = [0f32; 32];
    let mut mins = [0f32; 8];
    let mut scales = [0f32; 8];
    let mut max_scale = 0f32;
    let mut max_min = 0f32;
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(
            15,
            xs,
            &weights,
            &mut l[32 * j..32 * j + 32],
            &mut laux,
            -1.0,
            0.1,
            20,
        );
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut sc = [0u8; 12];
    for j in 0..8 {
        // C converts the int to uint8_t (modulo 256) before the clamp.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, &sc);
        let dj = d.to_f32() * s as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for i in 0..32 {
            l[32 * j + i] = nearest_int((x[32 * j + i] + dm) / dj).clamp(0, 15) as u8;
        }
    }
    out[0..2].copy_from_slice(&d.to_le_bytes());
    out[2..4].copy_from_slice(&dmin.to_le_bytes());
    out[4..16].copy_from_slice(&sc);
    let qs = &mut out[16..];
    for (c, chunk) in l.chunks_exact(64).enumerate() {
        for i in 0..32 {
            qs[32 * c + i] = chunk[i] | (chunk[i + 32] << 4);
        }
    }
}

/// One Q6_K super-block, as `quantize_row_q6_K_ref` makes it.
pub(crate) fn quantize_q6_k(x: &[f32], out: &mut [u8]) {
    debug_assert_eq!(x.len(), QK_K);
    debug_assert_eq!(out.len(), Q6K_BYTES);
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let mut max_scale = 0f32;
    let mut max_abs_scale = 0f32;
    for ib in 0..16 {
        let s = make_qx_quants(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
        scales[ib] = s;
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    out.fill(0);
    if max_abs_scale < GROUP_MAX_EPS {
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = f16::from_f32(1.0 / iscale);
    let mut sc = [0i8; 16];
    for (s, &v) in sc.iter_mut().zip(&scales) {
        *s = nearest_int(iscale * v).min(127) as i8;
    }
    for j in 0..16 {
        let dj = d.to_f32() * sc[j] as f32;
        if dj == 0.0 {
            continue;
        }
        for i in 0..16 {
            l[16 * j + i] = (nearest_int(x[16 * j + i] / dj).clamp(-32, 31) + 32) as i8;
        }
    }
    let (ql, rest) = out.split_at_mut(128);
    let (qh, rest) = rest.split_at_mut(64);
    for h in 0..2 {
        let lh = &l[128 * h..128 * h + 128];
        for i in 0..32 {
            let q = |k: usize| lh[i + 32 * k] as u8;
            ql[64 * h + i] = (q(0) & 0xF) | ((q(2) & 0xF) << 4);
            ql[64 * h + i + 32] = (q(1) & 0xF) | ((q(3) & 0xF) << 4);
            qh[32 * h + i] =
                (q(0) >> 4) | ((q(1) >> 4) << 2) | ((q(2) >> 4) << 4) | ((q(3) >> 4) << 6);
        }
    }
    for (o, &s) in rest[..16].iter_mut().zip(&sc) {
        *o = s as u8;
    }
    rest[16..18].copy_from_slice(&d.to_le_bytes());
}

/// The 256 values of a Q4_K super-block.
pub(crate) fn dequantize_q4_k(b: &[u8], out: &mut [f32]) {
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    let dmin = f16::from_le_bytes([b[2], b[3]]).to_f32();
    let sc = &b[4..16];
    let qs = &b[16..Q4K_BYTES];
    for c in 0..4 {
        let (s1, m1) = scale_min_k4(2 * c, sc);
        let (s2, m2) = scale_min_k4(2 * c + 1, sc);
        let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
        for i in 0..32 {
            let q = qs[32 * c + i];
            out[64 * c + i] = d1 * (q & 0xF) as f32 - m1;
            out[64 * c + 32 + i] = d2 * (q >> 4) as f32 - m2;
        }
    }
}

/// The 6-bit level (0..64) of value `v` (0..256) of a Q6_K super-block.
#[inline]
pub(crate) fn q6_level(b: &[u8], v: usize) -> u8 {
    let (h, r) = (v / 128, v % 128);
    let (k, i) = (r / 32, r % 32);
    let lo = b[64 * h + i + 32 * (k & 1)];
    let lo = if k < 2 { lo & 0xF } else { lo >> 4 };
    let hi = (b[128 + 32 * h + i] >> (2 * k)) & 3;
    lo | (hi << 4)
}

/// The 256 values of a Q6_K super-block.
pub(crate) fn dequantize_q6_k(b: &[u8], out: &mut [f32]) {
    let d = f16::from_le_bytes([b[208], b[209]]).to_f32();
    for (v, o) in out.iter_mut().enumerate().take(QK_K) {
        let sc = b[192 + v / 16] as i8;
        *o = d * sc as f32 * (q6_level(b, v) as i32 - 32) as f32;
    }
}

// ---------------------------------------------------------------------------------------------
// Activations (Q8_K) and the portable dot products.

/// Bytes of one quantized activation token of `cols` values: the i8 values, then one f32 scale
/// and 16 i16 block sums per super-block, rounded up to whole cache lines.
pub(crate) fn act_stride(cols: usize) -> usize {
    let nb = cols / QK_K;
    (cols + nb * 4 + nb * 32).next_multiple_of(64)
}

/// Quantizes one token as ggml's `quantize_row_q8_K_ref`: per super-block `d = max / -127`
/// (`max` the element of largest magnitude, with its sign), `q = min(127, nearest(x / d))`.
pub(crate) fn quantize_act(x: &[f32], out: &mut [u8]) {
    let cols = x.len();
    let nb = cols / QK_K;
    let (qs, rest) = out.split_at_mut(cols);
    let (ds, rest) = rest.split_at_mut(nb * 4);
    let bsums = &mut rest[..nb * 32];
    for (b, xb) in x.chunks_exact(QK_K).enumerate() {
        let qb = &mut qs[b * QK_K..(b + 1) * QK_K];
        let mut max = 0f32;
        let mut amax = 0f32;
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        let d = if amax == 0.0 {
            qb.fill(0);
            0.0
        } else {
            let iscale = -127.0 / max;
            for (q, &v) in qb.iter_mut().zip(xb) {
                *q = nearest_int(iscale * v).min(127) as i8 as u8;
            }
            1.0 / iscale
        };
        ds[4 * b..4 * b + 4].copy_from_slice(&d.to_ne_bytes());
        for (j, s) in qb.chunks_exact(16).enumerate() {
            let sum: i32 = s.iter().map(|&q| q as i8 as i32).sum();
            let o = 32 * b + 2 * j;
            bsums[o..o + 2].copy_from_slice(&(sum as i16).to_ne_bytes());
        }
    }
}

/// A quantized activation token, as the dot products read it.
pub(crate) struct Act<'a> {
    pub qs: &'a [i8],
    pub d: &'a [u8],
    pub bsums: &'a [u8],
}

impl<'a> Act<'a> {
    /// The token starting at `p` for rows of `cols` values.
    ///
    /// # Safety
    /// `p` must point at `act_stride(cols)` readable bytes written by [`quantize_act`].
    pub unsafe fn at(p: *const u8, cols: usize) -> Self {
        let nb = cols / QK_K;
        // SAFETY: per this function's contract.
        unsafe {
            Act {
                qs: std::slice::from_raw_parts(p.cast::<i8>(), cols),
                d: std::slice::from_raw_parts(p.add(cols), nb * 4),
                bsums: std::slice::from_raw_parts(p.add(cols + nb * 4), nb * 32),
            }
        }
    }

    #[inline]
    pub fn d(&self, b: usize) -> f32 {
        let o = 4 * b;
        f32::from_ne_bytes([self.d[o], self.d[o + 1], self.d[o + 2], self.d[o + 3]])
    }

    #[inline]
    pub fn bsum(&self, b: usize, j: usize) -> i32 {
        let o = 32 * b + 2 * j;
        i16::from_ne_bytes([self.bsums[o], self.bsums[o + 1]]) as i32
    }
}

/// The Q4_K mins term of super-block `b`: `sum_j m_j * (sum of the activation's sub-block j)`,
/// and the sub-block scales.
#[inline]
pub(crate) fn q4k_scales(blk: &[u8], x: &Act, b: usize) -> ([u8; 8], i32) {
    let mut sc = [0u8; 8];
    let mut summ = 0i32;
    for (j, s) in sc.iter_mut().enumerate() {
        let (a, m) = scale_min_k4(j, &blk[4..16]);
        *s = a;
        summ += m as i32 * (x.bsum(b, 2 * j) + x.bsum(b, 2 * j + 1));
    }
    (sc, summ)
}

/// Adds one super-block's integer sums into the row's f32 sum (the same operations on every
/// path, so that all kernels agree bit for bit).
#[inline(always)]
pub(crate) fn q4k_finish(acc: f32, blk: &[u8], dx: f32, sumi: i32, summ: i32) -> f32 {
    let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
    let dmin = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
    acc + ((dx * d) * sumi as f32 - (dx * dmin) * summ as f32)
}

/// `32 * sum_s sc_s * bsum_s`: the Q6_K offset term of super-block `b`.
#[inline]
pub(crate) fn q6k_offset(blk: &[u8], x: &Act, b: usize) -> i32 {
    let mut s = 0i32;
    for j in 0..16 {
        s += (blk[192 + j] as i8 as i32) * x.bsum(b, j);
    }
    32 * s
}

#[inline(always)]
pub(crate) fn q6k_finish(acc: f32, blk: &[u8], dx: f32, sumi: i32) -> f32 {
    let d = f16::from_le_bytes([blk[208], blk[209]]).to_f32();
    acc + (dx * d) * sumi as f32
}

/// Dot product of a Q4_K row (its super-blocks in order) with a Q8_K token.
pub(crate) fn dot_q4k<'a>(row: impl Iterator<Item = &'a [u8]>, x: &Act) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in row.enumerate() {
        let (sc, summ) = q4k_scales(blk, x, b);
        let xq = &x.qs[b * QK_K..(b + 1) * QK_K];
        let qs = &blk[16..];
        let mut sumi = 0i32;
        for c in 0..4 {
            let (mut lo, mut hi) = (0i32, 0i32);
            for i in 0..32 {
                let q = qs[32 * c + i];
                lo += (q & 0xF) as i32 * xq[64 * c + i] as i32;
                hi += (q >> 4) as i32 * xq[64 * c + 32 + i] as i32;
            }
            sumi += sc[2 * c] as i32 * lo + sc[2 * c + 1] as i32 * hi;
        }
        acc = q4k_finish(acc, blk, x.d(b), sumi, summ);
    }
    acc
}

/// Dot product of a Q6_K row (its super-blocks in order) with a Q8_K token.
pub(crate) fn dot_q6k<'a>(row: impl Iterator<Item = &'a [u8]>, x: &Act) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in row.enumerate() {
        let xq = &x.qs[b * QK_K..(b + 1) * QK_K];
        let mut sumi = 0i32;
        for s in 0..16 {
            let mut p = 0i32;
            for (v, &xv) in xq.iter().enumerate().skip(16 * s).take(16) {
                p += q6_level(blk, v) as i32 * xv as i32;
            }
            sumi += (blk[192 + s] as i8 as i32) * p;
        }
        sumi -= q6k_offset(blk, x, b);
        acc = q6k_finish(acc, blk, x.d(b), sumi);
    }
    acc
}
