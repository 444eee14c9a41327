//! x86-64 kernels: AVX-512 VNNI (512-bit `vpdpbusd`), AVX-VNNI (256-bit `vpdpbusd`) and AVX2
//! (`vpmaddubsw` + `vpmaddwd`). Each is compiled with `#[target_feature]` and chosen at run time,
//! so the crate itself builds for baseline x86-64.
//!
//! The micro-kernels compute an R-rows x T-tokens tile over whole interleaved groups (see
//! `layout`): per group and per (row, token) the integer accumulator starts at the activation's
//! correction term, collects 8 (Q8_0) vector products so that lane i ends up with block i's exact
//! integer dot product, and is then converted, scaled by `d_w * d_x` per lane and added into an
//! f32 accumulator, which is summed across lanes once at the end.

use super::{put_act_block, zero_act_lanes, ActView, OutView, WeightView};
use crate::quant::layout::{
    tile_offset, ACT_BIAS, ACT_D, ACT_GROUP, BLOCK, GROUP, GROUP_BLOCKS, TILE_ROWS,
};
use crate::quant::Reread;
use core::arch::x86_64::*;
use std::arch::is_x86_feature_detected as has;

pub(super) fn has_avx2() -> bool {
    has!("avx2") && has!("fma") && has!("f16c")
}

pub(super) fn has_avx512vnni() -> bool {
    has_avx2() && has!("avx512f") && has!("avx512bw") && has!("avx512vnni")
}

/// Rows per micro-tile when decoding one token: four independent weight streams keep enough
/// loads in flight to saturate memory, and the shared activation vector is loaded once for all.
const MV_ROWS: usize = 4;

// ---------------------------------------------------------------------------------------------
// Activation quantization.

/// # Safety
/// The CPU must support AVX-512 F/BW and AVX2; `out` must hold `x.len().div_ceil(512)` groups.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn quantize_act_avx512(x: &[f32], mult: i32, out: &mut [u8]) {
    for (g, group) in out.chunks_exact_mut(ACT_GROUP).enumerate() {
        let start = (g * GROUP).min(x.len());
        let vals = &x[start..x.len().min(start + GROUP)];
        let mut lanes = 0;
        for (i, block) in vals.chunks_exact(BLOCK).enumerate() {
            // SAFETY: `block` holds 32 f32, read as two unaligned 16-lane vectors; the stores go
            // to a local array of 32 bytes.
            let (q, d, sum) = unsafe {
                let a = _mm512_loadu_ps(block.as_ptr());
                let b = _mm512_loadu_ps(block.as_ptr().add(16));
                let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
                let d = amax / 127.0;
                let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
                // cvtps rounds to nearest-even (the default MXCSR mode), like the scalar path.
                let qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, id));
                let qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, id));
                let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
                let mut q = [0u8; BLOCK];
                _mm_storeu_si128(q.as_mut_ptr().cast(), _mm512_cvtsepi32_epi8(qa));
                _mm_storeu_si128(q.as_mut_ptr().add(16).cast(), _mm512_cvtsepi32_epi8(qb));
                (q, d, sum)
            };
            put_act_block(group, i, &q, d, -mult * sum);
            lanes = i + 1;
        }
        zero_act_lanes(group, lanes);
    }
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C; `out` must hold `x.len().div_ceil(512)` groups.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_act_avx2(x: &[f32], mult: i32, out: &mut [u8]) {
    for (g, group) in out.chunks_exact_mut(ACT_GROUP).enumerate() {
        let start = (g * GROUP).min(x.len());
        let vals = &x[start..x.len().min(start + GROUP)];
        let mut lanes = 0;
        for (i, block) in vals.chunks_exact(BLOCK).enumerate() {
            // SAFETY: `block` holds 32 f32 (four 8-lane loads); the store goes to a local array.
            let (q, d, sum) = unsafe {
                let p = block.as_ptr();
                let v = [
                    _mm256_loadu_ps(p),
                    _mm256_loadu_ps(p.add(8)),
                    _mm256_loadu_ps(p.add(16)),
                    _mm256_loadu_ps(p.add(24)),
                ];
                let sign = _mm256_set1_ps(-0.0);
                let abs = |v| _mm256_andnot_ps(sign, v);
                let m = _mm256_max_ps(
                    _mm256_max_ps(abs(v[0]), abs(v[1])),
                    _mm256_max_ps(abs(v[2]), abs(v[3])),
                );
                let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
                let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
                let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
                let d = amax / 127.0;
                let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
                let q = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, id)));
                let s =
                    _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
                let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
                let s = _mm_hadd_epi32(s, s);
                let sum = _mm_cvtsi128_si32(_mm_hadd_epi32(s, s));
                // The two saturating packs interleave 128-bit lanes; the permute restores order.
                let packed = _mm256_packs_epi16(
                    _mm256_packs_epi32(q[0], q[1]),
                    _mm256_packs_epi32(q[2], q[3]),
                );
                let packed =
                    _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                let mut out = [0u8; BLOCK];
                _mm256_storeu_si256(out.as_mut_ptr().cast(), packed);
                (out, d, sum)
            };
            put_act_block(group, i, &q, d, -mult * sum);
            lanes = i + 1;
        }
        zero_act_lanes(group, lanes);
    }
}

// ---------------------------------------------------------------------------------------------
// Shared tiling driver.

/// Tokens per cache tile in the batched kernels: enough that the tile's activations (over one
/// slice of `K_SLICE` groups) stay in L2 while the rows of a chunk stream past them, a multiple
/// of 6 (the token widths of the micro-kernels) and at least one micro-tile.
fn token_tile(slice_bytes: usize) -> usize {
    ((192 * 1024 / slice_bytes.max(1)) / 6 * 6).clamp(6, 120)
}

/// Up to this many tokens (decode is one) a product streams whole rows instead of slicing the
/// reduction dimension: the weights are read once either way, and at so few tokens the stream,
/// not the arithmetic, sets the pace.
const STREAM_TOKENS: usize = 4;

/// Groups (of 512 columns) per slice of the reduction dimension in the batched kernels. A slice
/// of 4 rows' weights (8 KiB of Q8_0) then stays in L1 while every token of a cache tile passes
/// over it; with whole 8192-column rows (32 KiB) the micro-kernel would stream from L2 instead.
const K_SLICE: usize = 4;

/// Generates a module with the row/token/slice tiling for one kernel: `compute` walks rows
/// `r0..r1` x tokens `0..t` (token cache tiles, then slices of `K_SLICE` groups, then R x T
/// micro-tiles of `$tile`, a generic `unsafe fn<const R, const T, const Q4>`). A macro rather
/// than generic code so that everything sits in functions compiled with the kernel's target
/// features, which lets the micro-kernels inline.
macro_rules! driver {
    ($module:ident, $features:literal, $tile:ident, $rows:literal, $toks:literal) => {
        pub(super) mod $module {
            use super::*;

            /// # Safety
            /// See `kernels::compute`; the CPU must support the kernel's features.
            #[target_feature(enable = $features)]
            pub(in crate::quant::kernels) unsafe fn compute(
                w: &WeightView,
                x: &ActView,
                t: usize,
                r0: usize,
                r1: usize,
                y: OutView,
            ) {
                // SAFETY: forwarded contract. The format becomes a constant so that each kernel
                // is compiled without a per-vector branch on it.
                unsafe {
                    if w.q4 {
                        generic::<true>(w, x, t, r0, r1, y)
                    } else {
                        generic::<false>(w, x, t, r0, r1, y)
                    }
                }
            }

            /// # Safety
            /// As for `compute`.
            #[target_feature(enable = $features)]
            unsafe fn generic<const Q4: bool>(
                w: &WeightView,
                x: &ActView,
                t: usize,
                r0: usize,
                r1: usize,
                y: OutView,
            ) {
                // SAFETY (every call below): the tiles stay inside rows r0..r1, tokens 0..t and
                // groups 0..w.groups, which the caller guarantees are valid and owned by this
                // thread.
                unsafe {
                    if t <= STREAM_TOKENS {
                        // Decode, or a few tokens (a reply's header, a text turn): bandwidth
                        // bound, so whole rows are streamed, several at a time, each row tile
                        // against the tokens in pairs while it sits in L1.
                        let mut r = r0;
                        while r < r1 {
                            let rows = if r + MV_ROWS <= r1 { MV_ROWS } else { 1 };
                            let mut j = 0;
                            while j < t {
                                match (rows, t - j) {
                                    (MV_ROWS, 2..) => {
                                        let v = $tile::<MV_ROWS, 2, Q4>(w, x, r, j, 0, w.groups);
                                        store::<MV_ROWS, 2>(v, y, r, j, false);
                                        j += 2;
                                    }
                                    (MV_ROWS, _) => {
                                        let v = $tile::<MV_ROWS, 1, Q4>(w, x, r, j, 0, w.groups);
                                        store::<MV_ROWS, 1>(v, y, r, j, false);
                                        j += 1;
                                    }
                                    _ => {
                                        let v = $tile::<1, 1, Q4>(w, x, r, j, 0, w.groups);
                                        store::<1, 1>(v, y, r, j, false);
                                        j += 1;
                                    }
                                }
                            }
                            r += rows;
                        }
                        return;
                    }
                    let tt = token_tile(K_SLICE.min(w.groups) * ACT_GROUP);
                    let mut j0 = 0;
                    while j0 < t {
                        let j1 = t.min(j0 + tt);
                        let mut g0 = 0;
                        while g0 < w.groups {
                            let g1 = w.groups.min(g0 + K_SLICE);
                            let add = g0 > 0;
                            let mut r = r0;
                            while r + $rows <= r1 {
                                rows::<$rows, Q4>(w, x, r, j0, j1, g0, g1, y, add);
                                r += $rows;
                            }
                            while r < r1 {
                                rows::<1, Q4>(w, x, r, j0, j1, g0, g1, y, add);
                                r += 1;
                            }
                            g0 = g1;
                        }
                        j0 = j1;
                    }
                }
            }

            /// Rows `r..r+R` against tokens `j0..j1` over groups `g0..g1`.
            ///
            /// # Safety
            /// As for `compute`.
            #[inline]
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn rows<const R: usize, const Q4: bool>(
                w: &WeightView,
                x: &ActView,
                r: usize,
                j0: usize,
                j1: usize,
                g0: usize,
                g1: usize,
                y: OutView,
                add: bool,
            ) {
                // SAFETY: as in `generic`.
                unsafe {
                    let mut j = j0;
                    while j + $toks <= j1 {
                        let v = $tile::<R, $toks, Q4>(w, x, r, j, g0, g1);
                        store::<R, $toks>(v, y, r, j, add);
                        j += $toks;
                    }
                    while j < j1 {
                        let v = $tile::<R, 1, Q4>(w, x, r, j, g0, g1);
                        store::<R, 1>(v, y, r, j, add);
                        j += 1;
                    }
                }
            }
        }
    };
}

/// Writes (or, for the second and later slices of the reduction, adds) a tile of results.
///
/// # Safety
/// Rows `r..r+R` and tokens `j..j+T` must lie inside `y`, owned by the calling thread.
#[inline(always)]
unsafe fn store<const R: usize, const T: usize>(
    v: [[f32; T]; R],
    y: OutView,
    r: usize,
    j: usize,
    add: bool,
) {
    for (dr, row) in v.iter().enumerate() {
        for (dj, &val) in row.iter().enumerate() {
            // SAFETY: per this function's contract.
            unsafe {
                let p = y.ptr.add((j + dj) * y.stride + r + dr);
                *p = if add { *p + val } else { val };
            }
        }
    }
}

/// Where the first group of the micro-tile of rows `r..r+R` starts (its quants, `gq` bytes a
/// group, and its scales); in that tile, row `i` of group `g` is `(g * TILE_ROWS + i)` groups on.
///
/// # Safety
/// Rows `r..r+R` must exist in `w`.
#[inline(always)]
unsafe fn tile_start<const R: usize>(
    w: &WeightView,
    r: usize,
    gq: usize,
) -> (*const u8, *const half::f16) {
    debug_assert!(
        r % TILE_ROWS + R <= TILE_ROWS,
        "a micro-tile inside one tile"
    );
    // SAFETY: per this function's contract, row r's first group lies inside the matrix.
    unsafe {
        (
            w.quants.add(tile_offset(r, 0, w.row_bytes, gq)),
            w.scales.add(tile_offset(r, 0, w.row_scales, GROUP_BLOCKS)),
        )
    }
}

/// Decode reads the weights as one sequential stream (a tile's rows group by group, tile after
/// tile: see `layout`). The hardware prefetcher follows it, and each group step also requests
/// the bytes `PF_STEPS` group steps further on explicitly, which keeps more cache misses in
/// flight than the prefetcher alone (`step`: the bytes of one group step of a tile, `bytes`:
/// those of the micro-tile). The K-quant kernels use it too, a super-block being their group.
///
/// `HINT` is the cache level the lines are asked into (`_MM_HINT_T0`: L1, `_MM_HINT_T1`: L2),
/// chosen per kernel by measurement: on Zen 4 the AVX-512 kernel, which consumes a line in
/// fewer instructions, read weights 20-60 % faster from memory with its prefetches aimed at L2,
/// while the AVX2 ones (the K-quant kernels among them) were faster with L1, as on Zen 3.
#[inline(always)]
pub(super) fn prefetch_ahead<const HINT: i32>(wg: *const u8, step: usize, bytes: usize) {
    prefetch_lines::<HINT>(wg.wrapping_add(PF_STEPS * step), bytes);
}

/// Asks for the cache lines of `bytes` bytes from `at` into the cache level `HINT`.
#[inline(always)]
fn prefetch_lines<const HINT: i32>(at: *const u8, bytes: usize) {
    for line in (0..bytes).step_by(64) {
        // SAFETY: prefetching is only a hint and never faults, even past the end of the
        // matrix (the address is computed with wrapping arithmetic, never dereferenced).
        unsafe { _mm_prefetch::<HINT>(at.wrapping_add(line).cast()) };
    }
}

/// How many group steps ahead decode prefetches (2 to 4 KiB of Q4_0 / Q8_0 with 4-row tiles).
const PF_STEPS: usize = 2;

/// The near one of the two distances (in group steps: 4 KiB with 4-row tiles) at which the
/// AVX-512 Q4_0 decode prefetches a matrix marked [`Reread::Often`]. On Zen 4, with the
/// depthformer's 38 MB of layers read 8 times a frame beside a 32 MiB L3, one distance of 8 to
/// 16 steps beat 2, and 4 with 16 beat 8 alone.
const PF_STEPS_REREAD_NEAR: usize = 4;

/// The far one of those two distances (16 KiB with 4-row tiles).
const PF_STEPS_REREAD_FAR: usize = 16;

/// The second, further distance (in group steps, 12 KiB with 4-row tiles) at which the AVX-512
/// Q8_0 decode also asks for its lines into L2.
const PF_STEPS_FAR_Q8: usize = 6;

// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI.

/// One micro-tile: rows `r..r+R` against tokens `j..j+T`.
///
/// # Safety
/// The rows and tokens must exist in the views; the CPU must support AVX-512 F/BW/VNNI.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // indices address the 2-D register tiles
unsafe fn tile512<const R: usize, const T: usize, const Q4: bool>(
    w: &WeightView,
    x: &ActView,
    r: usize,
    j: usize,
    g0: usize,
    g1: usize,
) -> [[f32; T]; R] {
    // SAFETY: every pointer below stays inside rows r..r+R of the weights (in their tile) and
    // tokens j..j+T of the activations (stride apart), group by group.
    unsafe {
        let gq = if Q4 { GROUP / 2 } else { GROUP };
        let (wq, ws) = tile_start::<R>(w, r, gq);
        let xa = x.ptr.add(j * x.stride);
        let nib = _mm512_set1_epi8(0x0F);
        let mut facc = [[_mm512_setzero_ps(); T]; R];
        // Decode asks for the lines into L2 `near` group steps ahead and, where it pays, a
        // second time `far` steps ahead (0: not), which keeps more misses in flight.
        // - Weights read again within a frame come partly from L3. On Zen 4 the depthformer's
        //   products ran 16-29 % faster frame after frame and about 5 % faster (median) with a
        //   backbone step between frames when asked for 8 steps ahead instead of 2, and 4 and 16
        //   steps together were another 7 % faster (median of 6 runs) than 8 alone. Asked for
        //   8 steps ahead, the backbone's own stream from memory was 8-21 % slower.
        // - Q8_0 from memory: the step's products read 81 -> 90 % of the plain read on a slow
        //   bus and 66 -> 84 % on a fast one with 6 added to 2; Q4_0 gained nothing from it.
        let (near, far) = if T != 1 {
            (PF_STEPS, 0)
        } else if Q4 && w.reread == Reread::Often {
            (PF_STEPS_REREAD_NEAR, PF_STEPS_REREAD_FAR)
        } else if Q4 {
            (PF_STEPS, 0)
        } else {
            (PF_STEPS, PF_STEPS_FAR_Q8)
        };
        for g in g0..g1 {
            let wg = wq.add(g * TILE_ROWS * gq);
            let xg = xa.add(g * ACT_GROUP);
            if T == 1 || (T == 2 && g1 - g0 == w.groups) {
                prefetch_lines::<_MM_HINT_T1>(wg.wrapping_add(near * TILE_ROWS * gq), R * gq);
                if far > 0 {
                    prefetch_lines::<_MM_HINT_T1>(wg.wrapping_add(far * TILE_ROWS * gq), R * gq);
                }
                if !Q4 && T == 1 {
                    // Q8_0 spends one instruction per line it reads, and its loads wait on
                    // L2 unless the lines are also asked into L1 half a group step ahead
                    // (Zen 4: 7-18 % more GB/s; Q4_0 was slower with it; without it the
                    // second L2 distance gained less).
                    prefetch_lines::<_MM_HINT_T0>(wg.wrapping_add(TILE_ROWS * gq / 2), R * gq);
                }
            }
            let xv = |t: usize, k: usize| _mm512_load_si512(xg.add(t * x.stride + k * 64).cast());
            let mut acc = [[_mm512_setzero_si512(); T]; R];
            for t in 0..T {
                let bias = _mm512_load_si512(xg.add(t * x.stride + ACT_BIAS).cast());
                for a in acc.iter_mut() {
                    a[t] = bias;
                }
            }
            if Q4 && T == 1 {
                // Decode: multiply the high nibbles in place, as 16 * q (masking with 0xF0
                // instead of shifting), into a second accumulator that is divided by 16 at the
                // end of the group (exact: every term is a multiple of 16, and 16 * 15 * 127 * 16
                // fits easily in i32). One instruction less per vector, and no reload.
                let hmask = _mm512_set1_epi8(0xF0u8 as i8);
                let mut hi = [_mm512_setzero_si512(); R];
                for p in 0..4 {
                    let (xl, xh) = (xv(0, p), xv(0, p + 4));
                    for i in 0..R {
                        let raw = _mm512_loadu_si512(wg.add(i * gq + p * 64).cast());
                        acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], _mm512_and_si512(raw, nib), xl);
                        hi[i] = _mm512_dpbusd_epi32(hi[i], _mm512_and_si512(raw, hmask), xh);
                    }
                }
                for i in 0..R {
                    acc[i][0] = _mm512_add_epi32(acc[i][0], _mm512_srai_epi32::<4>(hi[i]));
                }
            } else if Q4 {
                for p in 0..4 {
                    // Low nibbles are values 4p.., matching activation vector p; the high
                    // nibbles (reloaded from L1 rather than kept, to save registers) match p + 4.
                    let mut wv = [_mm512_setzero_si512(); R];
                    for (i, v) in wv.iter_mut().enumerate() {
                        let raw = _mm512_loadu_si512(wg.add(i * gq + p * 64).cast());
                        *v = _mm512_and_si512(raw, nib);
                    }
                    for t in 0..T {
                        let xv = xv(t, p);
                        for i in 0..R {
                            acc[i][t] = _mm512_dpbusd_epi32(acc[i][t], wv[i], xv);
                        }
                    }
                    for (i, v) in wv.iter_mut().enumerate() {
                        let raw = _mm512_loadu_si512(wg.add(i * gq + p * 64).cast());
                        *v = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), nib);
                    }
                    for t in 0..T {
                        let xv = xv(t, p + 4);
                        for i in 0..R {
                            acc[i][t] = _mm512_dpbusd_epi32(acc[i][t], wv[i], xv);
                        }
                    }
                }
            } else {
                for k in 0..8 {
                    let mut wv = [_mm512_setzero_si512(); R];
                    for (i, v) in wv.iter_mut().enumerate() {
                        *v = _mm512_loadu_si512(wg.add(i * gq + k * 64).cast());
                    }
                    for t in 0..T {
                        let xv = xv(t, k);
                        for i in 0..R {
                            acc[i][t] = _mm512_dpbusd_epi32(acc[i][t], wv[i], xv);
                        }
                    }
                }
            }
            for i in 0..R {
                let dw =
                    _mm512_cvtph_ps(_mm256_loadu_si256(ws.add((g * TILE_ROWS + i) * 16).cast()));
                for t in 0..T {
                    let dx = _mm512_load_ps(xg.add(t * x.stride + ACT_D).cast());
                    facc[i][t] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(acc[i][t]),
                        _mm512_mul_ps(dw, dx),
                        facc[i][t],
                    );
                }
            }
        }
        let mut out = [[0f32; T]; R];
        for i in 0..R {
            for t in 0..T {
                out[i][t] = _mm512_reduce_add_ps(facc[i][t]);
            }
        }
        out
    }
}

driver!(
    avx512,
    "avx512f,avx512bw,avx512vnni,avx2,fma,f16c",
    tile512,
    4,
    3
);

// ---------------------------------------------------------------------------------------------
// AVX2 and AVX-VNNI (256-bit). A group's 16 lanes are two 8-lane halves, processed one after the
// other with the same f32 accumulators (only the final sum matters).

macro_rules! tile256 {
    ($name:ident, $features:literal, $i16:literal, |$acc:ident, $w:ident, $x:ident, $q4:ident| $dot:expr) => {
        /// One micro-tile: rows `r..r+R` against tokens `j..j+T`.
        ///
        /// # Safety
        /// The rows and tokens must exist in the views; the CPU must support the features.
        #[inline]
        #[target_feature(enable = $features)]
        #[allow(clippy::needless_range_loop)] // indices address the 2-D register tiles
        unsafe fn $name<const R: usize, const T: usize, const Q4: bool>(
            w: &WeightView,
            x: &ActView,
            r: usize,
            j: usize,
            g0: usize,
            g1: usize,
        ) -> [[f32; T]; R] {
            // SAFETY: as in `tile512`: all pointers stay inside the tile's rows and tokens.
            unsafe {
                let gq = if Q4 { GROUP / 2 } else { GROUP };
                let (wq, ws) = tile_start::<R>(w, r, gq);
                let xa = x.ptr.add(j * x.stride);
                let nib = _mm256_set1_epi8(0x0F);
                let $q4 = Q4;
                let mut facc = [[_mm256_setzero_ps(); T]; R];
                for g in g0..g1 {
                    let wg = wq.add(g * TILE_ROWS * gq);
                    let xg = xa.add(g * ACT_GROUP);
                    if T == 1 || (T == 2 && g1 - g0 == w.groups) {
                        prefetch_ahead::<_MM_HINT_T0>(wg, TILE_ROWS * gq, R * gq);
                    }
                    for h in 0..2 {
                        let xv = |t: usize, k: usize| {
                            _mm256_load_si256(xg.add(t * x.stride + k * 64 + h * 32).cast())
                        };
                        let wl = |i: usize, k: usize| {
                            _mm256_loadu_si256(wg.add(i * gq + k * 64 + h * 32).cast())
                        };
                        let mut acc = [[_mm256_setzero_si256(); T]; R];
                        for t in 0..T {
                            let bias =
                                _mm256_load_si256(xg.add(t * x.stride + ACT_BIAS + h * 32).cast());
                            for a in acc.iter_mut() {
                                a[t] = bias;
                            }
                        }
                        if $i16 && Q4 {
                            // 4-bit, vpmaddubsw: a nibble (0..15) times an i8 (|x| <= 127)
                            // pair-summed is at most 3810 in magnitude, so the 8 products of a
                            // block lane add up in i16 without saturating (30480 < 32767); one
                            // vpmaddwd per row, token and half-group then widens them, instead
                            // of one per vector and token. Each packed vector is loaded and
                            // split into its two nibble halves once for all T tokens.
                            let mut s16 = [[_mm256_setzero_si256(); T]; R];
                            for p in 0..4 {
                                let mut xl = [_mm256_setzero_si256(); T];
                                let mut xh = [_mm256_setzero_si256(); T];
                                for t in 0..T {
                                    xl[t] = xv(t, p);
                                    xh[t] = xv(t, p + 4);
                                }
                                for i in 0..R {
                                    let raw = wl(i, p);
                                    let lo = _mm256_and_si256(raw, nib);
                                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), nib);
                                    for t in 0..T {
                                        s16[i][t] = _mm256_add_epi16(
                                            s16[i][t],
                                            _mm256_add_epi16(
                                                _mm256_maddubs_epi16(lo, xl[t]),
                                                _mm256_maddubs_epi16(hi, xh[t]),
                                            ),
                                        );
                                    }
                                }
                                // With several tokens (prefill), pin the R x T sums to
                                // registers at the end of each step. Left alone, LLVM hoists
                                // the loads and products of later steps above this point and
                                // spills the sums to the stack (a 4 x 2 tile needs all 16
                                // vector registers): about 60 more instructions per
                                // half-group. The empty asm emits nothing. Decode (one token)
                                // is left free to load ahead.
                                if T > 1 {
                                    // Plain nested loops: they unroll, which keeps every
                                    // sum in a register (a `flatten` did not, and spilled).
                                    for row in s16.iter_mut() {
                                        for v in row.iter_mut() {
                                            core::arch::asm!(
                                                "/* {0} */",
                                                inout(ymm_reg) * v,
                                                options(nostack, preserves_flags)
                                            );
                                        }
                                    }
                                }
                            }
                            let ones = _mm256_set1_epi16(1);
                            for i in 0..R {
                                for t in 0..T {
                                    acc[i][t] = _mm256_add_epi32(
                                        acc[i][t],
                                        _mm256_madd_epi16(s16[i][t], ones),
                                    );
                                }
                            }
                        } else {
                            for k in 0..8 {
                                let mut wv = [_mm256_setzero_si256(); R];
                                for (i, v) in wv.iter_mut().enumerate() {
                                    *v = if Q4 {
                                        let raw = wl(i, k % 4);
                                        if k < 4 {
                                            _mm256_and_si256(raw, nib)
                                        } else {
                                            _mm256_and_si256(_mm256_srli_epi16::<4>(raw), nib)
                                        }
                                    } else {
                                        wl(i, k)
                                    };
                                }
                                for t in 0..T {
                                    let $x = xv(t, k);
                                    for i in 0..R {
                                        let $acc = acc[i][t];
                                        let $w = wv[i];
                                        acc[i][t] = $dot;
                                    }
                                }
                            }
                        }
                        for i in 0..R {
                            let dw = _mm256_cvtph_ps(_mm_loadu_si128(
                                ws.add((g * TILE_ROWS + i) * 16 + h * 8).cast(),
                            ));
                            for t in 0..T {
                                let dx =
                                    _mm256_load_ps(xg.add(t * x.stride + ACT_D + h * 32).cast());
                                // With several tokens the f32 sums live on the stack
                                // (volatile, so LLVM keeps them there): they change once per
                                // half-group, and the integer sums need the registers.
                                let fp: *mut __m256 = &mut facc[i][t];
                                let f = if T > 1 {
                                    core::ptr::read_volatile(fp)
                                } else {
                                    *fp
                                };
                                let f = _mm256_fmadd_ps(
                                    _mm256_cvtepi32_ps(acc[i][t]),
                                    _mm256_mul_ps(dw, dx),
                                    f,
                                );
                                if T > 1 {
                                    core::ptr::write_volatile(fp, f)
                                } else {
                                    *fp = f
                                }
                            }
                        }
                    }
                }
                let mut out = [[0f32; T]; R];
                for i in 0..R {
                    for t in 0..T {
                        let v = facc[i][t];
                        let s =
                            _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                        out[i][t] = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
                    }
                }
                out
            }
        }
    };
}

tile256!(
    tile_avxvnni,
    "avx2,fma,f16c,avxvnni",
    false,
    |acc, w, x, _q4| _mm256_dpbusd_avx_epi32(acc, w, x)
);

tile256!(tile_avx2, "avx2,fma,f16c", true, |acc, w, x, q4| {
    let ones = _mm256_set1_epi16(1);
    if q4 {
        // Nibbles are 0..15, so the u8 x i8 pair sums of vpmaddubsw cannot saturate.
        _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones))
    } else {
        // Undo the +128 storage offset and use the sign trick (|w| as the unsigned operand, x
        // with w's sign), since 255 * 127 * 2 would saturate vpmaddubsw's i16 sums.
        let s = _mm256_xor_si256(w, _mm256_set1_epi8(-128));
        let p = _mm256_maddubs_epi16(_mm256_sign_epi8(s, s), _mm256_sign_epi8(x, s));
        _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones))
    }
});

driver!(avxvnni, "avx2,fma,f16c,avxvnni", tile_avxvnni, 2, 2);
// 4 rows x 2 tokens: on Zen 3 the 4-bit prefill product ran 25-50 % faster than with 2 x 2
// (the unpacked weights and the activations each serve more products), 2 x 4 and 2 x 3 fell in
// between, and 8-bit gained 10-25 %.
driver!(avx2, "avx2,fma,f16c", tile_avx2, 4, 2);
