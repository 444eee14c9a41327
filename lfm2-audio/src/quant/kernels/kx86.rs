//! AVX2 dot products of Q4_K / Q6_K rows with Q8_K tokens (see `quant::kquants`). Each
//! super-block's integer sums are exact; they are reduced to scalars and finished with the same
//! f32 operations as the portable kernel, so the results are bit-identical to it.

use crate::quant::kquants::{q4k_finish, q6k_finish, Act, Q4K_BYTES, Q6K_BYTES, QK_K};
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

/// Dot product of a Q4_K row (`nb` super-blocks at `row`) with token `x`.
///
/// # Safety
/// The CPU must support AVX2 and F16C; `row` must point at `nb * 144` readable bytes and `x`
/// hold at least `nb` super-blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_q4k(row: *const u8, nb: usize, x: &Act) -> f32 {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let m4 = _mm256_set1_epi8(0xF);
    let picks: [__m256i; 8] = std::array::from_fn(|j| pick16(j, j));
    let mut acc = 0f32;
    // SAFETY: every load below stays inside super-block b of the row (bytes 0..144) or of the
    // token (256 values, 16 sums), per the contract.
    unsafe {
        for b in 0..nb {
            let blk = row.add(b * Q4K_BYTES);
            // The 8 six-bit scales and mins, unpacked as ggml does with 32-bit masks.
            let mut u = [0u32; 4];
            std::ptr::copy_nonoverlapping(blk.add(4), u.as_mut_ptr().cast::<u8>(), 12);
            u[3] = ((u[2] >> 4) & KMASK2) | (((u[1] >> 6) & KMASK3) << 4);
            let aux = u[1] & KMASK1;
            u[1] = (u[2] & KMASK2) | (((u[0] >> 6) & KMASK3) << 4);
            u[2] = aux;
            u[0] &= KMASK1;
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

/// Dot product of a Q6_K row (`nb` super-blocks at `row`) with token `x`.
///
/// # Safety
/// As for [`dot_q4k`], with `nb * 210` bytes of row.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_q6k(row: *const u8, nb: usize, x: &Act) -> f32 {
    let m4 = _mm256_set1_epi8(0xF);
    let m3 = _mm256_set1_epi8(3);
    let picks = [pick16(0, 1), pick16(2, 3), pick16(4, 5), pick16(6, 7)];
    let mut acc = 0f32;
    // SAFETY: as in `dot_q4k`, within super-block b of the row (210 bytes) and of the token.
    unsafe {
        for b in 0..nb {
            let blk = row.add(b * Q6K_BYTES);
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
