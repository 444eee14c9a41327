//! Single-query attention in AVX2 + FMA intrinsics: the scores of 8 cached keys at a time for
//! each query head of a kv group, a vectorized exponential for the softmax, and the weighted sum
//! of the values over tiles of keys that stay in L1 while every head of the group reads them.
//!
//! It computes what the portable body of [`super::attend`] computes; the order of the additions
//! differs (8 partial sums per dot product, a tree at the end), and the exponential is a
//! polynomial within 2 ulp of `expf`, so the two agree to float rounding.

use std::arch::x86_64::*;

/// Keys per tile of the weighted sum: 64 rows of up to 64 values (16 KiB) stay in L1 while the
/// heads of a group pass over them.
const TILE: usize = 64;

/// Whether [`attend_group`] takes this head width (a multiple of 8 values).
pub(super) fn supports(head_dim: usize) -> bool {
    head_dim > 0 && head_dim.is_multiple_of(8)
}

/// [`super::attend`] for the query heads of one kv head, `head_dim % 8 == 0`: see
/// `attend_group` there.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `k` and `v` hold `n` rows of `hd` values, `qg` and `og`
/// whole heads, `scores` at least `heads · n` values for those heads.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn attend_group(
    qg: &[f32],
    k: &[f32],
    v: &[f32],
    hd: usize,
    scale: f32,
    scores: &mut [f32],
    og: &mut [f32],
) {
    let n = k.len() / hd;
    let scores = &mut scores[..og.len() / hd * n];
    scores_of(qg, k, hd, n, scale, scores);
    for row in scores.chunks_exact_mut(n) {
        softmax(row);
    }
    og.fill(0.0);
    weighted_sum(scores, v, hd, n, og);
}

/// `scores[i, j] = q_i · k_j · scale` for the heads `q_i` of one group.
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_of(qg: &[f32], k: &[f32], hd: usize, n: usize, scale: f32, scores: &mut [f32]) {
    let group = qg.len() / hd;
    let chunks = hd / 8;
    let vscale = _mm256_set1_ps(scale);
    let full = n / 8 * 8;
    for j0 in (0..full).step_by(8) {
        let kb = k.as_ptr().add(j0 * hd);
        for i in 0..group {
            let qh = qg.as_ptr().add(i * hd);
            let mut acc = [_mm256_setzero_ps(); 8];
            for c in 0..chunks {
                let qc = _mm256_loadu_ps(qh.add(8 * c));
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kb.add(r * hd + 8 * c)), *a);
                }
            }
            let s = _mm256_mul_ps(sum8x8(&acc), vscale);
            _mm256_storeu_ps(scores.as_mut_ptr().add(i * n + j0), s);
        }
    }
    for j in full..n {
        let kj = k.as_ptr().add(j * hd);
        for i in 0..group {
            let qh = qg.as_ptr().add(i * hd);
            let mut a = _mm256_setzero_ps();
            for c in 0..chunks {
                a = _mm256_fmadd_ps(
                    _mm256_loadu_ps(qh.add(8 * c)),
                    _mm256_loadu_ps(kj.add(8 * c)),
                    a,
                );
            }
            scores[i * n + j] = hsum(a) * scale;
        }
    }
}

/// `[Σ a_0, Σ a_1, …, Σ a_7]`: the lane sums of 8 vectors.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum8x8(a: &[__m256; 8]) -> __m256 {
    let t0 = _mm256_hadd_ps(a[0], a[1]);
    let t1 = _mm256_hadd_ps(a[2], a[3]);
    let t2 = _mm256_hadd_ps(a[4], a[5]);
    let t3 = _mm256_hadd_ps(a[6], a[7]);
    let u0 = _mm256_hadd_ps(t0, t1);
    let u1 = _mm256_hadd_ps(t2, t3);
    let lo = _mm256_permute2f128_ps(u0, u1, 0x20);
    let hi = _mm256_permute2f128_ps(u0, u1, 0x31);
    _mm256_add_ps(lo, hi)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(a: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// Softmax in place: `e^(x − max) / Σ`.
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax(x: &mut [f32]) {
    let n = x.len();
    let full = n / 8 * 8;
    let p = x.as_mut_ptr();
    let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
    for j in (0..full).step_by(8) {
        vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(p.add(j)));
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), vmax);
    let max = lanes
        .iter()
        .chain(&x[full..])
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let vmax = _mm256_set1_ps(max);
    let mut vsum = _mm256_setzero_ps();
    for j in (0..full).step_by(8) {
        let e = exp(_mm256_sub_ps(_mm256_loadu_ps(p.add(j)), vmax));
        _mm256_storeu_ps(p.add(j), e);
        vsum = _mm256_add_ps(vsum, e);
    }
    // The tail through the same exponential, padded with -inf (which gives 0).
    let tail = n - full;
    if tail > 0 {
        let mut pad = [f32::NEG_INFINITY; 8];
        pad[..tail].copy_from_slice(&x[full..]);
        let e = exp(_mm256_sub_ps(_mm256_loadu_ps(pad.as_ptr()), vmax));
        _mm256_storeu_ps(pad.as_mut_ptr(), e);
        x[full..].copy_from_slice(&pad[..tail]);
        vsum = _mm256_add_ps(vsum, e);
    }
    let inv = _mm256_set1_ps(1.0 / hsum(vsum));
    for j in (0..full).step_by(8) {
        _mm256_storeu_ps(p.add(j), _mm256_mul_ps(_mm256_loadu_ps(p.add(j)), inv));
    }
    let inv = 1.0 / hsum(vsum);
    for v in &mut x[full..] {
        *v *= inv;
    }
}

/// `e^x` lane by lane, within 2 ulp of `expf`: `x = n ln 2 + r` with `|r| ≤ ln 2 / 2`, a degree-7
/// Taylor polynomial for `e^r`, and `2^n` put into the exponent bits. Arguments below the
/// smallest normal result (−87.3) give 0, as does −∞; NaN stays NaN.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn exp(x: __m256) -> __m256 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n · LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding it rounds to an integer, which then sits in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    let lowest = _mm256_set1_ps(-87.336_54);
    let under = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
    // MAXPS returns its second operand when either is NaN: the NaN goes through.
    let x = _mm256_max_ps(lowest, x);
    let t = _mm256_fmadd_ps(x, _mm256_set1_ps(LOG2E), _mm256_set1_ps(SHIFTER));
    let nf = _mm256_sub_ps(t, _mm256_set1_ps(SHIFTER));
    let r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(1.0 / 5040.0);
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let n = _mm256_sub_epi32(
        _mm256_castps_si256(t),
        _mm256_castps_si256(_mm256_set1_ps(SHIFTER)),
    );
    let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_add_epi32(n, _mm256_set1_epi32(127)),
        23,
    ));
    _mm256_andnot_ps(under, _mm256_mul_ps(p, pow2))
}

/// `out_i = Σ_j scores[i, j] v_j` for the heads of one group (`out` zeroed by the caller).
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_sum(scores: &[f32], v: &[f32], hd: usize, n: usize, out: &mut [f32]) {
    let group = out.len() / hd;
    for t0 in (0..n).step_by(TILE) {
        let t1 = (t0 + TILE).min(n);
        for i in 0..group {
            let p = &scores[i * n + t0..i * n + t1];
            let o = &mut out[i * hd..(i + 1) * hd];
            let mut d0 = 0;
            while d0 < hd {
                let width = (hd - d0).min(64);
                match width / 8 {
                    8 => block::<8>(p, v, hd, t0, d0, o),
                    7 => block::<7>(p, v, hd, t0, d0, o),
                    6 => block::<6>(p, v, hd, t0, d0, o),
                    5 => block::<5>(p, v, hd, t0, d0, o),
                    4 => block::<4>(p, v, hd, t0, d0, o),
                    3 => block::<3>(p, v, hd, t0, d0, o),
                    2 => block::<2>(p, v, hd, t0, d0, o),
                    _ => block::<1>(p, v, hd, t0, d0, o),
                }
                d0 += width;
            }
        }
    }
}

/// Values `d0..d0 + 8·CH` of one head's output, over the keys `t0..t0 + p.len()`, with the
/// output in registers.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn block<const CH: usize>(
    p: &[f32],
    v: &[f32],
    hd: usize,
    t0: usize,
    d0: usize,
    o: &mut [f32],
) {
    let op = o.as_mut_ptr().add(d0);
    let mut acc = [_mm256_setzero_ps(); CH];
    for (c, a) in acc.iter_mut().enumerate() {
        *a = _mm256_loadu_ps(op.add(8 * c));
    }
    for (j, &pj) in p.iter().enumerate() {
        let w = _mm256_set1_ps(pj);
        let vj = v.as_ptr().add((t0 + j) * hd + d0);
        for (c, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(vj.add(8 * c)), *a);
        }
    }
    for (c, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(op.add(8 * c), *a);
    }
}
