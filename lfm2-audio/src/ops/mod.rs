//! The operations of one decode position on plain f32 slices: RMSNorm, SwiGLU gating, softmax,
//! rotary embeddings and single-query attention over a cache; and [`with_f32_slice`], which
//! lends a tensor's data to them without a copy.
//!
//! The decode loops (the depthformer's eight steps per frame, the backbone's step) work on
//! vectors of a few thousand values. Through tensors every operation there allocates its result
//! and some hand their one row to a thread pool, which costs more than the arithmetic; these
//! functions write into buffers the caller keeps from step to step. They compute what the
//! tensor path computes, in the same order where it is cheap to do so (RMSNorm, SiLU), so the
//! two agree to float rounding.

#[cfg(target_arch = "x86_64")]
mod attend_x86;

use candle_core::{CpuStorage, Storage, Tensor};

use crate::error::{Error, Result};

/// Runs `f` on the f32 data of a contiguous CPU tensor, without copying it.
pub fn with_f32_slice<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = x.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) => f(&data[start..end]),
        _ => Err(Error::Invalid(
            "expected a contiguous f32 CPU tensor".into(),
        )),
    }
}

/// `out = w ⊙ x / √(mean(x²) + eps)` (candle's `rms_norm`: the f32 sum of squares in order, then
/// `x / m · w`).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert!(x.len() == weight.len() && out.len() == x.len());
    let m = rms(x, eps);
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v / m * w;
    }
}

/// [`rms_norm`] of every `weight.len()`-wide piece of `x`, in place (per-head q/k norms).
pub fn rms_norm_heads(x: &mut [f32], weight: &[f32], eps: f32) {
    for head in x.chunks_exact_mut(weight.len()) {
        let m = rms(head, eps);
        for (v, &w) in head.iter_mut().zip(weight) {
            *v = *v / m * w;
        }
    }
}

fn rms(x: &[f32], eps: f32) -> f32 {
    let sum2: f32 = x.iter().map(|v| v * v).sum();
    (sum2 / x.len() as f32 + eps).sqrt()
}

/// `gate = silu(gate) ⊙ up`, with `silu(v) = v / (1 + e^−v)`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / ((-*g).exp() + 1.0) * u;
    }
}

/// `x += y`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Softmax in place: `e^(x − max) / Σ`.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// Dot product with 8 running sums (vectorizes; the order differs from a plain loop only in
/// rounding).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Rotary embedding in the interleaved (GPT-J, complex-number) convention, in place on every
/// head of `x`: pairs `(x[2i], x[2i+1])` rotate by the angle whose cosine and sine are `cos[i]`,
/// `sin[i]` (one table row, `head_dim / 2` values).
pub fn rope_interleaved(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let hd = 2 * cos.len();
    for head in x.chunks_exact_mut(hd) {
        for (i, pair) in head.chunks_exact_mut(2).enumerate() {
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * cos[i] - b * sin[i];
            pair[1] = a * sin[i] + b * cos[i];
        }
    }
}

/// Rotary embedding in the rotate-half (GPT-NeoX) convention, in place on every head of `x`:
/// element `i` pairs with element `i + head_dim/2`.
pub fn rope_half(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for head in x.chunks_exact_mut(2 * half) {
        let (lo, hi) = head.split_at_mut(half);
        for i in 0..half {
            let (a, b) = (lo[i], hi[i]);
            lo[i] = a * cos[i] - b * sin[i];
            hi[i] = b * cos[i] + a * sin[i];
        }
    }
}

/// Attention of one query position over `n` cached positions, grouped-query style.
///
/// `q` is `[heads, head_dim]`; `keys(g)` and `values(g)` give kv head `g`'s cache as `[n,
/// head_dim]` rows; query head `h` reads kv head `h / (heads / kv_heads)`. Writes `softmax(q kᵀ
/// · scale) v` for every head into `out` (`[heads, head_dim]`); `scores` needs `n · heads /
/// kv_heads` values. The query heads of a group go through their kv head's rows together, so
/// each cached row is read once per step however long the context.
///
/// Over a long context this is real arithmetic (32 heads × 64 values × positions, twice, per
/// layer), so on x86-64 it runs in a copy compiled for AVX2 and FMA when the CPU has them (the
/// crate's baseline target is SSE2 only).
#[allow(clippy::too_many_arguments)]
pub fn attend<'a>(
    q: &[f32],
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    n: usize,
    keys: impl Fn(usize) -> &'a [f32],
    values: impl Fn(usize) -> &'a [f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let width = heads / kv_heads * head_dim;
    let scores = &mut scores[..heads / kv_heads * n];
    for g in 0..kv_heads {
        attend_group(
            &q[g * width..(g + 1) * width],
            &keys(g)[..n * head_dim],
            &values(g)[..n * head_dim],
            head_dim,
            scale,
            scores,
            &mut out[g * width..(g + 1) * width],
        );
    }
}

/// Context length from which [`attend_pooled`] splits the kv heads over the pool: below it the
/// cache is small enough that handing out the work costs more than it saves.
pub const POOLED_ATTENTION_MIN: usize = 512;

/// [`attend`] with the kv heads shared out among the participants of `pool` (each takes whole
/// kv heads, with their query heads, scores and outputs) once the context has
/// [`POOLED_ATTENTION_MIN`] positions. Over a long context attention reads the whole cache every
/// step, more than one core's share of the memory bandwidth can bring in; each head's result is
/// the same as [`attend`]'s. `scores` needs `n · heads` values here.
#[allow(clippy::too_many_arguments)]
pub fn attend_pooled<'a>(
    pool: &crate::quant::Threads,
    q: &[f32],
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    n: usize,
    keys: impl Fn(usize) -> &'a [f32] + Sync,
    values: impl Fn(usize) -> &'a [f32] + Sync,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    if pool.len() == 1 || kv_heads == 1 || n < POOLED_ATTENTION_MIN {
        return attend(
            q, heads, kv_heads, head_dim, n, keys, values, scale, scores, out,
        );
    }
    let group = heads / kv_heads;
    let work = std::sync::Mutex::new(
        q.chunks_exact(group * head_dim)
            .zip(scores[..heads * n].chunks_exact_mut(group * n))
            .zip(out[..heads * head_dim].chunks_exact_mut(group * head_dim))
            .enumerate(),
    );
    pool.run(|_| loop {
        // A poisoned lock means another participant panicked; what is left is still valid.
        let next = work.lock().unwrap_or_else(|e| e.into_inner()).next();
        let Some((g, ((qg, sg), og))) = next else {
            break;
        };
        attend_group(
            qg,
            &keys(g)[..n * head_dim],
            &values(g)[..n * head_dim],
            head_dim,
            scale,
            sg,
            og,
        );
    });
}

/// The query heads `qg` (`[group, head_dim]`) of one kv head over its `n` cached keys `k` and
/// values `v` (`[n, head_dim]`): `og = softmax(qg kᵀ · scale) v`, with `scores` holding `group ·
/// n` values. On x86-64 with AVX2 and FMA this is [`attend_x86`] for head widths that are
/// multiples of 8, else the portable body compiled for those features.
fn attend_group(
    qg: &[f32],
    k: &[f32],
    v: &[f32],
    hd: usize,
    scale: f32,
    scores: &mut [f32],
    og: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features both copies are compiled for.
        unsafe {
            if attend_x86::supports(hd) {
                attend_x86::attend_group(qg, k, v, hd, scale, scores, og);
            } else {
                attend_group_avx2(qg, k, v, hd, scale, scores, og);
            }
        }
        return;
    }
    attend_group_body(qg, k, v, hd, scale, scores, og);
}

/// [`attend_group_body`] compiled for AVX2 and FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_group_avx2(
    qg: &[f32],
    k: &[f32],
    v: &[f32],
    hd: usize,
    scale: f32,
    scores: &mut [f32],
    og: &mut [f32],
) {
    attend_group_body(qg, k, v, hd, scale, scores, og);
}

#[inline(always)]
fn attend_group_body(
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
    // scores[i, j] = q_i · k_j · scale
    for (j, kj) in k.chunks_exact(hd).enumerate() {
        for (i, qh) in qg.chunks_exact(hd).enumerate() {
            scores[i * n + j] = dot(qh, kj) * scale;
        }
    }
    for row in scores.chunks_exact_mut(n) {
        softmax(row);
    }
    og.fill(0.0);
    for (j, vj) in v.chunks_exact(hd).enumerate() {
        for (i, oh) in og.chunks_exact_mut(hd).enumerate() {
            let p = scores[i * n + j];
            for (o, &vv) in oh.iter_mut().zip(vj) {
                *o += p * vv;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_matches_its_definition() {
        let x = [1.0f32, -2.0, 3.0, 0.5];
        let w = [1.0f32, 2.0, 0.5, -1.0];
        let mut out = [0f32; 4];
        rms_norm(&x, &w, 1e-5, &mut out);
        let m = ((1.0 + 4.0 + 9.0 + 0.25) / 4.0 + 1e-5f32).sqrt();
        for i in 0..4 {
            assert!((out[i] - x[i] / m * w[i]).abs() < 1e-6);
        }
        let mut heads = [1.0f32, -2.0, 3.0, 0.5];
        rms_norm_heads(&mut heads, &[1.0, 1.0], 0.0);
        let m0 = 2.5f32.sqrt();
        assert!((heads[0] - 1.0 / m0).abs() < 1e-6 && (heads[1] + 2.0 / m0).abs() < 1e-6);
    }

    #[test]
    fn ropes_rotate_the_right_pairs() {
        let (c, s) = (0.6f32, 0.8f32);
        let mut x = [1.0f32, 2.0, 3.0, 4.0];
        rope_interleaved(&mut x, &[c, 1.0], &[s, 0.0]);
        assert_eq!(x, [1.0 * c - 2.0 * s, 1.0 * s + 2.0 * c, 3.0, 4.0]);
        let mut x = [1.0f32, 2.0, 3.0, 4.0];
        rope_half(&mut x, &[c, 1.0], &[s, 0.0]);
        assert_eq!(x, [1.0 * c - 3.0 * s, 2.0, 3.0 * c + 1.0 * s, 4.0]);
    }

    #[test]
    fn attention_weights_values_by_softmaxed_scores() {
        // One kv head shared by two query heads, two positions.
        let q = [1.0f32, 0.0, 0.0, 1.0];
        let k = [1.0f32, 0.0, 0.0, 0.0];
        let v = [1.0f32, 2.0, 3.0, 4.0];
        let mut out = [0f32; 4];
        let mut scores = [0f32; 4];
        attend(&q, 2, 1, 2, 2, |_| &k, |_| &v, 1.0, &mut scores, &mut out);
        let p0 = 1.0f32.exp() / (1.0f32.exp() + 1.0);
        assert!((out[0] - (p0 * 1.0 + (1.0 - p0) * 3.0)).abs() < 1e-6);
        // Head 1 scores 0 against both keys: the mean of the values.
        assert!((out[2] - 2.0).abs() < 1e-6 && (out[3] - 3.0).abs() < 1e-6);
    }

    #[test]
    fn grouped_attention_equals_attention_head_by_head() {
        let (heads, kv, hd, n) = (8, 2, 4, 5);
        let val = |i: usize| ((i * 37 % 23) as f32 - 11.0) / 7.0;
        let q: Vec<f32> = (0..heads * hd).map(val).collect();
        let k: Vec<f32> = (0..kv * n * hd).map(|i| val(i + 3)).collect();
        let v: Vec<f32> = (0..kv * n * hd).map(|i| val(i + 11)).collect();
        let head = |c: &'static [f32], g: usize| &c[g * n * hd..(g + 1) * n * hd];
        let (k, v): (&'static [f32], &'static [f32]) = (k.leak(), v.leak());
        let mut out = vec![0f32; heads * hd];
        let mut scores = vec![0f32; n * heads / kv];
        attend(
            &q,
            heads,
            kv,
            hd,
            n,
            |g| head(k, g),
            |g| head(v, g),
            0.5,
            &mut scores,
            &mut out,
        );
        for h in 0..heads {
            let g = h / (heads / kv);
            let qh = &q[h * hd..(h + 1) * hd];
            let mut p: Vec<f32> = (0..n)
                .map(|j| dot(qh, &head(k, g)[j * hd..(j + 1) * hd]) * 0.5)
                .collect();
            softmax(&mut p);
            for d in 0..hd {
                let want: f32 = (0..n).map(|j| p[j] * head(v, g)[j * hd + d]).sum();
                assert!((out[h * hd + d] - want).abs() < 1e-5, "head {h} dim {d}");
            }
        }
    }

    /// The vectorized attention against the portable body, over head widths, group sizes and
    /// context lengths that exercise every tail (keys not a multiple of 8, values not a multiple
    /// of 64).
    #[test]
    fn vectorized_attention_equals_the_portable_body() {
        let val =
            |i: usize, seed: usize| (((i * 2654435761 + seed * 97) % 1009) as f32 - 504.0) / 250.0;
        for (heads, kv, hd) in [(32, 8, 64), (4, 4, 32), (8, 1, 8), (6, 2, 72), (4, 2, 128)] {
            for n in [1usize, 3, 8, 9, 37, 64, 65, 300] {
                let q: Vec<f32> = (0..heads * hd).map(|i| val(i, 1)).collect();
                let k: Vec<f32> = (0..kv * n * hd).map(|i| val(i, 2)).collect();
                let v: Vec<f32> = (0..kv * n * hd).map(|i| val(i, 3)).collect();
                let head = |c: &[f32], g: usize| c[g * n * hd..(g + 1) * n * hd].to_vec();
                let (kh, vh): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
                    (0..kv).map(|g| (head(&k, g), head(&v, g))).unzip();
                let mut scores = vec![0f32; n * heads / kv];
                let (mut fast, mut slow) = (vec![0f32; heads * hd], vec![0f32; heads * hd]);
                let scale = 1.0 / (hd as f32).sqrt();
                attend(
                    &q,
                    heads,
                    kv,
                    hd,
                    n,
                    |g| &kh[g],
                    |g| &vh[g],
                    scale,
                    &mut scores,
                    &mut fast,
                );
                let width = heads / kv * hd;
                for g in 0..kv {
                    attend_group_body(
                        &q[g * width..(g + 1) * width],
                        &kh[g],
                        &vh[g],
                        hd,
                        scale,
                        &mut scores,
                        &mut slow[g * width..(g + 1) * width],
                    );
                }
                for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
                    assert!(
                        (a - b).abs() <= 2e-6 * (1.0 + b.abs()),
                        "heads {heads}/{kv}, head_dim {hd}, {n} positions, value {i}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// Shared out over a pool, every head gets exactly the numbers of the one-thread call.
    #[test]
    fn pooled_attention_equals_attention() {
        let pool = crate::quant::Threads::new(2).unwrap();
        let (heads, kv, hd) = (32, 8, 64);
        let val =
            |i: usize, seed: usize| (((i * 40503 + seed * 7919) % 997) as f32 - 498.0) / 300.0;
        for n in [POOLED_ATTENTION_MIN - 1, POOLED_ATTENTION_MIN, 777] {
            let q: Vec<f32> = (0..heads * hd).map(|i| val(i, 1)).collect();
            let k: Vec<f32> = (0..kv * n * hd).map(|i| val(i, 2)).collect();
            let v: Vec<f32> = (0..kv * n * hd).map(|i| val(i, 3)).collect();
            let keys = |g: usize| &k[g * n * hd..(g + 1) * n * hd];
            let values = |g: usize| &v[g * n * hd..(g + 1) * n * hd];
            let mut scores = vec![0f32; n * heads];
            let (mut one, mut pooled) = (vec![0f32; heads * hd], vec![1f32; heads * hd]);
            attend(
                &q,
                heads,
                kv,
                hd,
                n,
                keys,
                values,
                0.125,
                &mut scores,
                &mut one,
            );
            attend_pooled(
                &pool,
                &q,
                heads,
                kv,
                hd,
                n,
                keys,
                values,
                0.125,
                &mut scores,
                &mut pooled,
            );
            assert_eq!(one, pooled, "{n} positions");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vectorized_exp_is_within_two_ulp() {
        if !(std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma"))
        {
            return;
        }
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let lanes = [
                x,
                x * 0.5,
                x * 0.25,
                x * 0.125,
                x * 0.01,
                x * 1e-3,
                x * 1e-5,
                0.0,
            ];
            let mut got = [0f32; 8];
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            unsafe {
                use std::arch::x86_64::*;
                let e = attend_x86::exp(_mm256_loadu_ps(lanes.as_ptr()));
                _mm256_storeu_ps(got.as_mut_ptr(), e);
            }
            for (l, g) in lanes.iter().zip(got) {
                let want = (*l as f64).exp();
                let ulp = (want as f32).abs() * f32::EPSILON;
                worst = worst.max((g as f64 - want).abs() / ulp as f64);
            }
            x += 0.013;
        }
        assert!(worst <= 2.0, "worst error {worst:.2} ulp");
        // The edges: far below the normal range, -inf and NaN.
        let lanes = [
            -100.0f32,
            f32::NEG_INFINITY,
            f32::NAN,
            -87.3,
            0.0,
            -0.0,
            -1e-30,
            -88.0,
        ];
        let mut got = [0f32; 8];
        // SAFETY: as above.
        unsafe {
            use std::arch::x86_64::*;
            _mm256_storeu_ps(
                got.as_mut_ptr(),
                attend_x86::exp(_mm256_loadu_ps(lanes.as_ptr())),
            );
        }
        assert_eq!(got[0], 0.0);
        assert_eq!(got[1], 0.0);
        assert!(got[2].is_nan());
        assert!(got[3] > 0.0 && got[4] == 1.0 && got[5] == 1.0 && got[6] == 1.0 && got[7] == 0.0);
    }

    #[test]
    fn dot_handles_remainders() {
        let a: Vec<f32> = (0..19).map(|i| i as f32).collect();
        let b = vec![2.0f32; 19];
        assert_eq!(dot(&a, &b), 2.0 * (0..19).sum::<i32>() as f32);
    }
}
