//! AVX2 dot products of Q4_K / Q6_K rows with Q8_K tokens (see `quant::kquants`). Each
//! super-block's integer sums are exact; they are reduced to scalars and finished with the same
//! f32 operations as the portable kernel, so the results are bit-identical to it.

use super::x86::prefetch_ahead;
use super::{ActView, OutView, WeightView};
use crate::quant::kquants::{q4k_finish, q6k_finish, Act, Q4K_BYTES, Q6K_BYTES, QK_K};
use crate::quant::layout::{tile_offset, TILE_ROWS};
use crate::quant::Format;
use core::arch::x86_64::*;

/// Horizontal sum of 8 i32 lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// A `vpshufb` mask that fills the low 128-bit lane with i16 element `a` and the high one with
/// element `b` of a 128-bit lane of 8 i16 (broadcast to both lanes).
#[inline]
#[target_feature(enable = "avx2")]
fn pick16(a: usize, b: usize) -> __m256i {
    let (a, b) = ((2 * a) as i8, (2 * b) as i8);
    _mm256_setr_epi8(
        a,
        a + 1,
        a,
        a + 1,
        a,
        a + 1,
        a,
        a + 1,
        a,
        a + 1,
        a,
        a + 1,
        a,
        a + 1,
        a,
        a + 1,
        b,
        b + 1,
        b,
        b + 1,
        b,
        b + 1,
        b,
        b + 1,
        b,
        b + 1,
        b,
        b + 1,
        b,
        b + 1,
        b,
        b + 1,
    )
}

/// The 8 six-bit scales and the 8 six-bit mins of a Q4_K super-block, unpacked as ggml does with
/// 32-bit masks: bytes 0-7 the scales, 8-15 the mins.
///
/// # Safety
/// `blk` points at a whole Q4_K super-block.
#[inline(always)]
unsafe fn q4k_scale_words(blk: *const u8) -> [u32; 4] {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let mut u = [0u32; 4];
    // SAFETY: bytes 4..16 of the super-block, per the contract.
    unsafe { std::ptr::copy_nonoverlapping(blk.add(4), u.as_mut_ptr().cast::<u8>(), 12) };
    u[3] = ((u[2] >> 4) & KMASK2) | (((u[1] >> 6) & KMASK3) << 4);
    let aux = u[1] & KMASK1;
    u[1] = (u[2] & KMASK2) | (((u[0] >> 6) & KMASK3) << 4);
    u[2] = aux;
    u[0] &= KMASK1;
    u
}

/// Dot product of a Q4_K row (`nb` super-blocks at `row`, `step` bytes apart: rows are stored
/// in tiles, see `layout`) with token `x`.
///
/// # Safety
/// The CPU must support AVX2 and F16C; `row` must point at `nb` super-blocks of 144 readable
/// bytes, `step` apart, and `x` hold at least `nb` super-blocks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4k(row: *const u8, step: usize, nb: usize, x: &Act) -> f32 {
    let m4 = _mm256_set1_epi8(0xF);
    let picks: [__m256i; 8] = std::array::from_fn(|j| pick16(j, j));
    let mut acc = 0f32;
    // SAFETY: every load below stays inside super-block b of the row (bytes 0..144) or of the
    // token (256 values, 16 sums), per the contract.
    unsafe {
        for b in 0..nb {
            let blk = row.add(b * step);
            let u = q4k_scale_words(blk);
            let scm = _mm_loadu_si128(u.as_ptr().cast());
            let sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(scm));
            let mins16 = _mm_cvtepu8_epi16(_mm_unpackhi_epi64(scm, scm));
            // mins . (sums of the 8 sub-blocks of 32)
            let bs = _mm256_loadu_si256(x.bsums.as_ptr().add(32 * b).cast());
            let bs = _mm256_hadd_epi16(bs, bs); // [p0 p1 p2 p3 p0 p1 p2 p3 | p4..p7 p4..p7]
            let bs = _mm256_permute4x64_epi64::<0b11_01_10_00>(bs);
            let summ = _mm_madd_epi16(mins16, _mm256_castsi256_si128(bs));
            let summ = _mm_add_epi32(summ, _mm_shuffle_epi32::<0b01_00_11_10>(summ));
            let summ = _mm_add_epi32(summ, _mm_shuffle_epi32::<0b10_11_00_01>(summ));
            let summ = _mm_cvtsi128_si32(summ);

            let xq = x.qs.as_ptr().add(b * QK_K);
            let qs = blk.add(16);
            let mut s = _mm256_setzero_si256();
            for c in 0..4 {
                let q = _mm256_loadu_si256(qs.add(32 * c).cast());
                let lo = _mm256_and_si256(q, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                let xl = _mm256_loadu_si256(xq.add(64 * c).cast());
                let xh = _mm256_loadu_si256(xq.add(64 * c + 32).cast());
                let pl = _mm256_maddubs_epi16(lo, xl);
                let ph = _mm256_maddubs_epi16(hi, xh);
                let (kl, kh) = (picks[2 * c], picks[2 * c + 1]);
                s = _mm256_add_epi32(s, _mm256_madd_epi16(pl, _mm256_shuffle_epi8(sc16, kl)));
                s = _mm256_add_epi32(s, _mm256_madd_epi16(ph, _mm256_shuffle_epi8(sc16, kh)));
            }
            let blk_s = std::slice::from_raw_parts(blk, Q4K_BYTES);
            acc = q4k_finish(acc, blk_s, x.d(b), hsum_i32(s), summ);
        }
    }
    acc
}

/// Dot product of a Q6_K row (`nb` super-blocks at `row`, `step` bytes apart) with token `x`.
///
/// # Safety
/// As for [`dot_q4k`], with super-blocks of 210 bytes.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q6k(row: *const u8, step: usize, nb: usize, x: &Act) -> f32 {
    let m4 = _mm256_set1_epi8(0xF);
    let m3 = _mm256_set1_epi8(3);
    let picks = [pick16(0, 1), pick16(2, 3), pick16(4, 5), pick16(6, 7)];
    let mut acc = 0f32;
    // SAFETY: as in `dot_q4k`, within super-block b of the row (210 bytes) and of the token.
    unsafe {
        for b in 0..nb {
            let blk = row.add(b * step);
            let sc = blk.add(192);
            let xq = x.qs.as_ptr().add(b * QK_K);
            // 32 * sum_s sc_s * bsum_s, subtracted from the level products (levels are q + 32).
            let sc_all = _mm256_cvtepi8_epi16(_mm_loadu_si128(sc.cast()));
            let bs = _mm256_loadu_si256(x.bsums.as_ptr().add(32 * b).cast());
            let off = _mm256_slli_epi32::<5>(_mm256_madd_epi16(sc_all, bs));
            let mut s = _mm256_sub_epi32(_mm256_setzero_si256(), off);
            for h in 0..2 {
                let ql1 = _mm256_loadu_si256(blk.add(64 * h).cast());
                let ql2 = _mm256_loadu_si256(blk.add(64 * h + 32).cast());
                let qh = _mm256_loadu_si256(blk.add(128 + 32 * h).cast());
                let high = |shift: i32| -> __m256i {
                    let v = match shift {
                        0 => qh,
                        2 => _mm256_srli_epi16::<2>(qh),
                        4 => _mm256_srli_epi16::<4>(qh),
                        _ => _mm256_srli_epi16::<6>(qh),
                    };
                    _mm256_slli_epi16::<4>(_mm256_and_si256(v, m3))
                };
                let q = [
                    _mm256_or_si256(_mm256_and_si256(ql1, m4), high(0)),
                    _mm256_or_si256(_mm256_and_si256(ql2, m4), high(2)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4), high(4)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql2), m4), high(6)),
                ];
                let sch = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_loadl_epi64(
                    sc.add(8 * h).cast(),
                )));
                for (k, &qk) in q.iter().enumerate() {
                    let xv = _mm256_loadu_si256(xq.add(128 * h + 32 * k).cast());
                    let p = _mm256_maddubs_epi16(qk, xv);
                    let scv = _mm256_shuffle_epi8(sch, picks[k]);
                    s = _mm256_add_epi32(s, _mm256_madd_epi16(p, scv));
                }
            }
            let blk_s = std::slice::from_raw_parts(blk, Q6K_BYTES);
            acc = q6k_finish(acc, blk_s, x.d(b), hsum_i32(s));
        }
    }
    acc
}

// ---------------------------------------------------------------------------------------------
// Micro-tiles: R rows x T tokens (R * T = 4) per pass over the super-blocks.

/// The 4 lanes' horizontal sums of four 8 x i32 vectors: lane `i` is the sum of `v[i]`.
#[inline]
#[target_feature(enable = "avx2")]
fn hsum4_i32(v: [__m256i; 4]) -> __m128i {
    // [v0 01, v0 23, v1 01, v1 23 | v0 45, ...] then [v0 0-3, v1 0-3, v2 0-3, v3 0-3 | 4-7 ...].
    let s = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s))
}

/// The 4 lanes' horizontal sums of four 4 x i32 vectors.
#[inline]
#[target_feature(enable = "avx2")]
fn hsum4_i32x4(v: [__m128i; 4]) -> __m128i {
    _mm_hadd_epi32(_mm_hadd_epi32(v[0], v[1]), _mm_hadd_epi32(v[2], v[3]))
}

/// The f16 scales at byte `o` of super-block `b` of the rows of each lane (lane `i` is row
/// `i / T`), converted: `([first of each lane], [second of each lane])`, where the second is
/// read (the f16 at `o + 2`) only if `PAIR`, else zero.
///
/// # Safety
/// Rows `0..R` at `wq`, `row_step` apart, must hold super-block `b` at `b * blk_step`, and the
/// f16 values read must lie inside it.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lane_f16<const R: usize, const T: usize, const PAIR: bool>(
    wq: *const u8,
    row_step: usize,
    b: usize,
    blk_step: usize,
    o: usize,
) -> (__m128, __m128) {
    let mut h = [0u16; 8];
    for l in 0..4 {
        let p = wq.wrapping_add((l / T) * row_step + b * blk_step + o);
        // SAFETY: per this function's contract.
        unsafe {
            h[2 * l] = std::ptr::read_unaligned(p.cast());
            if PAIR {
                h[2 * l + 1] = std::ptr::read_unaligned(p.add(2).cast());
            }
        }
    }
    // SAFETY: a local array of 16 bytes.
    let v = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(h.as_ptr().cast()) });
    let v = _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
    (_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v))
}

/// The activation scales of super-block `b` of each lane's token (lane `i` is token `i % T`).
/// (SSE only, so that it can be inlined everywhere: as a call it cost 4 % of a decode profile.)
#[inline(always)]
fn lane_dx<const T: usize>(acts: &[Act; T], b: usize) -> __m128 {
    let d: [f32; 4] = std::array::from_fn(|l| acts[l % T].d(b));
    // SAFETY: a local array of 4 f32; SSE is part of the x86-64 baseline.
    unsafe { _mm_loadu_ps(d.as_ptr()) }
}

/// Rows `0..R` of a tile at `wq` (Q4_K, `nb` super-blocks each, stored in tiles) times tokens
/// `acts[0..T]`, `R * T == 4`: `out[r * T + t]`. Each (row, token) pair's super-block sums are
/// the exact integers of [`dot_q4k`] and are finished with the same f32 operations in the same
/// order, four pairs at a time in the lanes of one vector, so the results are the same bits.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; the rows must hold `nb` super-blocks and the tokens
/// at least `nb` super-blocks each.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // indices address the 2-D tiles of sums
unsafe fn tile_q4k<const R: usize, const T: usize>(
    wq: *const u8,
    nb: usize,
    acts: &[Act; T],
) -> [f32; 4] {
    debug_assert_eq!(R * T, 4);
    // A tile's rows are one super-block apart, its super-blocks `TILE_ROWS` of them.
    let step = TILE_ROWS * Q4K_BYTES;
    let m4 = _mm256_set1_epi8(0xF);
    let picks: [__m256i; 8] = std::array::from_fn(|j| pick16(j, j));
    let mut acc = _mm_setzero_ps();
    // SAFETY: every load stays inside super-block b of rows 0..R or of tokens 0..T.
    unsafe {
        for b in 0..nb {
            if T == 1 {
                prefetch_ahead::<_MM_HINT_T0>(wq.add(b * step), step, R * Q4K_BYTES);
            }
            // Sums of the 8 sub-blocks of 32 of each token.
            let bs8: [__m128i; T] = std::array::from_fn(|t| {
                let bs = _mm256_loadu_si256(acts[t].bsums.as_ptr().add(32 * b).cast());
                let bs = _mm256_hadd_epi16(bs, bs);
                _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b11_01_10_00>(bs))
            });
            let mut s = [_mm256_setzero_si256(); 4];
            let mut m = [_mm_setzero_si128(); 4];
            for r in 0..R {
                let blk = wq.add(r * Q4K_BYTES + b * step);
                let u = q4k_scale_words(blk);
                let scm = _mm_loadu_si128(u.as_ptr().cast());
                let sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(scm));
                let mins16 = _mm_cvtepu8_epi16(_mm_unpackhi_epi64(scm, scm));
                for t in 0..T {
                    m[r * T + t] = _mm_madd_epi16(mins16, bs8[t]);
                }
                let qs = blk.add(16);
                for c in 0..4 {
                    let q = _mm256_loadu_si256(qs.add(32 * c).cast());
                    let lo = _mm256_and_si256(q, m4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                    let scl = _mm256_shuffle_epi8(sc16, picks[2 * c]);
                    let sch = _mm256_shuffle_epi8(sc16, picks[2 * c + 1]);
                    for t in 0..T {
                        let xq = acts[t].qs.as_ptr().add(b * QK_K + 64 * c);
                        let xl = _mm256_loadu_si256(xq.cast());
                        let xh = _mm256_loadu_si256(xq.add(32).cast());
                        let pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xl), scl);
                        let ph = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xh), sch);
                        let k = r * T + t;
                        s[k] = _mm256_add_epi32(s[k], _mm256_add_epi32(pl, ph));
                    }
                }
            }
            let sumi = _mm_cvtepi32_ps(hsum4_i32(s));
            let summ = _mm_cvtepi32_ps(hsum4_i32x4(m));
            let (d, dmin) = lane_f16::<R, T, true>(wq, Q4K_BYTES, b, step, 0);
            let dx = lane_dx::<T>(acts, b);
            // acc + ((dx * d) * sumi - (dx * dmin) * summ), as `q4k_finish`.
            let a = _mm_mul_ps(_mm_mul_ps(dx, d), sumi);
            let c = _mm_mul_ps(_mm_mul_ps(dx, dmin), summ);
            acc = _mm_add_ps(acc, _mm_sub_ps(a, c));
        }
    }
    let mut out = [0f32; 4];
    // SAFETY: a local array of 4 f32.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), acc) };
    out
}

/// As [`tile_q4k`] for Q6_K rows (the exact sums of [`dot_q6k`], finished as `q6k_finish`).
///
/// # Safety
/// As for [`tile_q4k`].
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // indices address the 2-D tiles of sums
unsafe fn tile_q6k<const R: usize, const T: usize>(
    wq: *const u8,
    nb: usize,
    acts: &[Act; T],
) -> [f32; 4] {
    debug_assert_eq!(R * T, 4);
    // A tile's rows are one super-block apart, its super-blocks `TILE_ROWS` of them.
    let step = TILE_ROWS * Q6K_BYTES;
    let m4 = _mm256_set1_epi8(0xF);
    let m3 = _mm256_set1_epi8(3);
    let picks = [pick16(0, 1), pick16(2, 3), pick16(4, 5), pick16(6, 7)];
    let mut acc = _mm_setzero_ps();
    // SAFETY: every load stays inside super-block b of rows 0..R or of tokens 0..T.
    unsafe {
        for b in 0..nb {
            if T == 1 {
                prefetch_ahead::<_MM_HINT_T0>(wq.add(b * step), step, R * Q6K_BYTES);
            }
            let bs: [__m256i; T] = std::array::from_fn(|t| {
                _mm256_loadu_si256(acts[t].bsums.as_ptr().add(32 * b).cast())
            });
            let mut s = [_mm256_setzero_si256(); 4];
            for r in 0..R {
                let blk = wq.add(r * Q6K_BYTES + b * step);
                let sc = blk.add(192);
                // 32 * sum_s sc_s * bsum_s, subtracted from the level products (levels are q + 32).
                let sc_all = _mm256_cvtepi8_epi16(_mm_loadu_si128(sc.cast()));
                for t in 0..T {
                    let off = _mm256_slli_epi32::<5>(_mm256_madd_epi16(sc_all, bs[t]));
                    s[r * T + t] = _mm256_sub_epi32(_mm256_setzero_si256(), off);
                }
                for h in 0..2 {
                    let ql1 = _mm256_loadu_si256(blk.add(64 * h).cast());
                    let ql2 = _mm256_loadu_si256(blk.add(64 * h + 32).cast());
                    let qh = _mm256_loadu_si256(blk.add(128 + 32 * h).cast());
                    let hi = |v: __m256i| _mm256_slli_epi16::<4>(_mm256_and_si256(v, m3));
                    let q = [
                        _mm256_or_si256(_mm256_and_si256(ql1, m4), hi(qh)),
                        _mm256_or_si256(_mm256_and_si256(ql2, m4), hi(_mm256_srli_epi16::<2>(qh))),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                            hi(_mm256_srli_epi16::<4>(qh)),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(ql2), m4),
                            hi(_mm256_srli_epi16::<6>(qh)),
                        ),
                    ];
                    let sch = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_loadl_epi64(
                        sc.add(8 * h).cast(),
                    )));
                    for (k, &qk) in q.iter().enumerate() {
                        let scv = _mm256_shuffle_epi8(sch, picks[k]);
                        for t in 0..T {
                            let xv = acts[t].qs.as_ptr().add(b * QK_K + 128 * h + 32 * k);
                            let p = _mm256_maddubs_epi16(qk, _mm256_loadu_si256(xv.cast()));
                            let i = r * T + t;
                            s[i] = _mm256_add_epi32(s[i], _mm256_madd_epi16(p, scv));
                        }
                    }
                }
            }
            let sumi = _mm_cvtepi32_ps(hsum4_i32(s));
            let (d, _) = lane_f16::<R, T, false>(wq, Q6K_BYTES, b, step, 208);
            let dx = lane_dx::<T>(acts, b);
            // acc + (dx * d) * sumi, as `q6k_finish`.
            acc = _mm_add_ps(acc, _mm_mul_ps(_mm_mul_ps(dx, d), sumi));
        }
    }
    let mut out = [0f32; 4];
    // SAFETY: a local array of 4 f32.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), acc) };
    out
}

/// GGML's Q8_K quantization of one token (see `kquants::quantize_act`), with the same bytes:
/// the largest magnitude is found with vector maxima (which skip NaN as the scalar comparison
/// does), its first occurrence gives the signed maximum, and every value goes through the same
/// f32 multiply and the same float-adder rounding (`nearest_int`), with the same clamp and
/// truncation to i8.
///
/// # Safety
/// The CPU must support AVX2; `x.len()` must be a multiple of 256 and `out` hold
/// `act_stride(x.len())` bytes.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_act(x: &[f32], out: &mut [u8]) {
    let cols = x.len();
    let nb = cols / QK_K;
    debug_assert!(out.len() >= cols + nb * 36);
    let sign = _mm256_set1_ps(-0.0);
    let magic = _mm256_set1_ps(12_582_912.0);
    let mant = _mm256_set1_epi32(0x007f_ffff);
    let half = _mm256_set1_epi32(0x0040_0000);
    let cap = _mm256_set1_epi32(127);
    let low = _mm256_set1_epi32(0xFF);
    let ones8 = _mm256_set1_epi8(1);
    let ones16 = _mm256_set1_epi16(1);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let qs = out.as_mut_ptr();
    // SAFETY: super-block b reads x[256 b..256 b + 256] and writes out[256 b..256 b + 256], its
    // scale at cols + 4 b and its 16 sums at cols + 4 nb + 32 b, all inside the buffers.
    unsafe {
        for b in 0..nb {
            let xb = x.as_ptr().add(b * QK_K);
            let mut am = _mm256_setzero_ps();
            for k in 0..QK_K / 8 {
                let a = _mm256_andnot_ps(sign, _mm256_loadu_ps(xb.add(8 * k)));
                // The second operand is returned when the first is NaN: NaN never enters.
                am = _mm256_max_ps(a, am);
            }
            let m = _mm_max_ps(_mm256_castps256_ps128(am), _mm256_extractf128_ps::<1>(am));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let qb = qs.add(b * QK_K);
            let d = if amax == 0.0 {
                std::ptr::write_bytes(qb, 0, QK_K);
                0.0
            } else {
                // The first element of that magnitude, with its sign.
                let target = _mm256_set1_ps(amax);
                let mut max = amax;
                for k in 0..QK_K / 8 {
                    let v = _mm256_loadu_ps(xb.add(8 * k));
                    let eq = _mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_andnot_ps(sign, v), target);
                    let bits = _mm256_movemask_ps(eq);
                    if bits != 0 {
                        max = *xb.add(8 * k + bits.trailing_zeros() as usize);
                        break;
                    }
                }
                let iscale = -127.0 / max;
                let vs = _mm256_set1_ps(iscale);
                let level = |k: usize| -> __m256i {
                    let p = _mm256_mul_ps(_mm256_loadu_ps(xb.add(8 * k)), vs);
                    let bits = _mm256_castps_si256(_mm256_add_ps(p, magic));
                    let q = _mm256_sub_epi32(_mm256_and_si256(bits, mant), half);
                    // min(127), then the low byte (C's conversion to int8_t).
                    _mm256_and_si256(_mm256_min_epi32(q, cap), low)
                };
                for k in 0..QK_K / 32 {
                    let a = _mm256_packus_epi32(level(4 * k), level(4 * k + 1));
                    let c = _mm256_packus_epi32(level(4 * k + 2), level(4 * k + 3));
                    let p = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(a, c), order);
                    _mm256_storeu_si256(qb.add(32 * k).cast(), p);
                }
                1.0 / iscale
            };
            std::ptr::copy_nonoverlapping(d.to_ne_bytes().as_ptr(), qs.add(cols + 4 * b), 4);
            // Sums of the 16 sub-blocks of 16: per vector of 32 levels, sums of 4, then of 16.
            let mut sums = [0i32; 16];
            for h in 0..2 {
                let quad = |k: usize| -> __m256i {
                    let q = _mm256_loadu_si256(qb.add(128 * h + 32 * k).cast());
                    _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, q), ones16)
                };
                let s01 = _mm256_hadd_epi32(quad(0), quad(1));
                let s23 = _mm256_hadd_epi32(quad(2), quad(3));
                // Low lane: first halves of vectors 0..3; high lane: their second halves.
                let s = _mm256_hadd_epi32(s01, s23);
                let mut v = [0i32; 8];
                _mm256_storeu_si256(v.as_mut_ptr().cast(), s);
                for k in 0..4 {
                    sums[8 * h + 2 * k] = v[k];
                    sums[8 * h + 2 * k + 1] = v[4 + k];
                }
            }
            let bs = qs.add(cols + 4 * nb + 32 * b);
            for (j, &s) in sums.iter().enumerate() {
                std::ptr::copy_nonoverlapping((s as i16).to_ne_bytes().as_ptr(), bs.add(2 * j), 2);
            }
        }
    }
}

/// The K-quant products `y[j][r] = W[r] . x[j]` for rows `r0..r1` and tokens `0..t` (see
/// `kernels::compute_k`): decode in tiles of 4 rows, prefill in tiles of 1 row x 4 tokens
/// inside cache tiles of `token_tile` tokens; the leftover rows or tokens use the one-row
/// kernels. All give the portable kernels' bits.
///
/// # Safety
/// As for `kernels::compute_k`; the CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn compute(
    w: &WeightView,
    x: &ActView,
    t: usize,
    r0: usize,
    r1: usize,
    y: OutView,
    token_tile: usize,
) {
    // SAFETY: forwarded contract.
    unsafe {
        if w.format == Format::Q4_K {
            compute_format::<true>(w, x, t, r0, r1, y, token_tile)
        } else {
            compute_format::<false>(w, x, t, r0, r1, y, token_tile)
        }
    }
}

/// [`compute`] for one format (`Q4`: Q4_K, else Q6_K).
///
/// # Safety
/// As for [`compute`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn compute_format<const Q4: bool>(
    w: &WeightView,
    x: &ActView,
    t: usize,
    r0: usize,
    r1: usize,
    y: OutView,
    token_tile: usize,
) {
    let nb = w.groups;
    let cols = nb * QK_K;
    // SAFETY (all blocks below): rows r0..r1 exist (stored in whole tiles), tokens 0..t were
    // quantized for `cols` values, and this thread owns rows r0..r1 of the output.
    let act = |j: usize| unsafe { Act::at(x.ptr.add(j * x.stride), cols) };
    let blk = if Q4 { Q4K_BYTES } else { Q6K_BYTES };
    let row = |r: usize| unsafe { w.quants.add(tile_offset(r, 0, w.row_bytes, blk)) };
    let put = |j: usize, r: usize, v: f32| unsafe { *y.ptr.add(j * y.stride + r) = v };
    let one = |r: usize, a: &Act| unsafe {
        if Q4 {
            dot_q4k(row(r), TILE_ROWS * blk, nb, a)
        } else {
            dot_q6k(row(r), TILE_ROWS * blk, nb, a)
        }
    };
    unsafe {
        if t == 1 {
            let a = [act(0)];
            let mut r = r0;
            while r + 4 <= r1 {
                let v = if Q4 {
                    tile_q4k::<4, 1>(row(r), nb, &a)
                } else {
                    tile_q6k::<4, 1>(row(r), nb, &a)
                };
                for (i, &v) in v.iter().enumerate() {
                    put(0, r + i, v);
                }
                r += 4;
            }
            for r in r..r1 {
                put(0, r, one(r, &a[0]));
            }
            return;
        }
        let mut j0 = 0;
        while j0 < t {
            let j1 = t.min(j0 + token_tile);
            for r in r0..r1 {
                let mut j = j0;
                while j + 4 <= j1 {
                    let a = [act(j), act(j + 1), act(j + 2), act(j + 3)];
                    let v = if Q4 {
                        tile_q4k::<1, 4>(row(r), nb, &a)
                    } else {
                        tile_q6k::<1, 4>(row(r), nb, &a)
                    };
                    for (i, &v) in v.iter().enumerate() {
                        put(j + i, r, v);
                    }
                    j += 4;
                }
                for j in j..j1 {
                    put(j, r, one(r, &act(j)));
                }
            }
            j0 = j1;
        }
    }
}
