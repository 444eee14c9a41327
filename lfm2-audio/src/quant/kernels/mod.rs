//! The integer dot-product kernels, one implementation per instruction set, and the on-the-fly
//! quantization of activations they consume. All paths compute exactly the same integer block
//! sums; they differ only in the order in which the scaled f32 partial sums are added.

use super::kquants::{self, Act, QK_K};
use super::layout::{self, ACT_BIAS, ACT_D, ACT_GROUP, ACT_Q, BLOCK, GROUP_BLOCKS};
use super::Format;
use half::f16;

#[cfg(target_arch = "x86_64")]
mod kx86;
mod scalar;
// The AVX-512 intrinsics and the `avxvnni` target feature are stable since Rust 1.89, newer
// than the workspace's declared rust-version (1.85): building this module needs 1.89 or later.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::incompatible_msrv)]
mod x86;

/// An implementation of the quantized dot products.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Portable Rust, any CPU.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C: `vpmaddubsw`/`vpmaddwd` on 256-bit vectors.
    Avx2,
    /// x86-64 AVX-VNNI (VEX-encoded `vpdpbusd` on 256-bit vectors) + AVX2.
    AvxVnni,
    /// x86-64 AVX-512 F/BW + VNNI: `vpdpbusd` on 512-bit vectors.
    Avx512Vnni,
}

impl Kernel {
    /// Every kernel, best first.
    pub const ALL: [Kernel; 4] = [
        Kernel::Avx512Vnni,
        Kernel::AvxVnni,
        Kernel::Avx2,
        Kernel::Scalar,
    ];

    /// The fastest kernel this CPU supports.
    pub fn best() -> Kernel {
        Self::ALL
            .into_iter()
            .find(|k| k.is_supported())
            .unwrap_or(Kernel::Scalar)
    }

    /// The kernels this CPU can run, best first.
    pub fn supported() -> Vec<Kernel> {
        Self::ALL.into_iter().filter(|k| k.is_supported()).collect()
    }

    /// Whether this CPU has the instructions the kernel needs (checked at run time).
    pub fn is_supported(self) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => x86::has_avx2(),
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => x86::has_avx2() && std::arch::is_x86_feature_detected!("avxvnni"),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => x86::has_avx512vnni(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// A short name for tables and logs.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::AvxVnni => "avx-vnni",
            Kernel::Avx512Vnni => "avx512-vnni",
        }
    }
}

impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A read-only view of a quantized matrix in the interleaved layout (see `layout`).
#[derive(Clone, Copy)]
pub(crate) struct WeightView {
    pub quants: *const u8,
    pub scales: *const f16,
    /// Interleaved groups per row.
    pub groups: usize,
    /// Bytes of quants per row (`groups * 512` or `groups * 256`).
    pub row_bytes: usize,
    /// Scales per row (`groups * 16`).
    pub row_scales: usize,
    pub q4: bool,
    pub format: Format,
    pub reread: super::Reread,
}

/// The quantized activations of `t` tokens, `stride` bytes apart.
#[derive(Clone, Copy)]
pub(crate) struct ActView {
    pub ptr: *const u8,
    pub stride: usize,
}

/// Where results go: `y[j * stride + r]` for token `j`, row `r`.
#[derive(Clone, Copy)]
pub(crate) struct OutView {
    pub ptr: *mut f32,
    pub stride: usize,
}

// SAFETY: the views are plain pointers into buffers the calling method borrows for the whole
// parallel section (weights and activations read-only). Workers write the output only for the
// rows they were handed, which never overlap, so sharing the views between threads is sound.
unsafe impl Send for WeightView {}
unsafe impl Sync for WeightView {}
unsafe impl Send for ActView {}
unsafe impl Sync for ActView {}
unsafe impl Send for OutView {}
unsafe impl Sync for OutView {}

/// The zero-point correction multiplier a kernel needs for a format: Q4_0 nibbles are unsigned
/// with zero point 8; Q8_0 is stored +128 for vpdpbusd, while the AVX2 kernel undoes the offset
/// and multiplies signed values with the sign trick, so it needs no correction.
pub(crate) fn bias_mult(kernel: Kernel, q4: bool) -> i32 {
    match (q4, kernel) {
        (true, _) => 8,
        (false, Kernel::Avx2) => 0,
        (false, _) => 128,
    }
}

/// Quantizes one token `x` into `out` (`groups * ACT_GROUP` bytes, `x.len() <= groups * 512`):
/// per block of 32, `d = amax / 127` and `q = round_half_even(x / d)` (every kernel rounds the
/// same way, so they all see the same integers). Blocks past the end of `x` are zero.
pub(crate) fn quantize_act(kernel: Kernel, x: &[f32], mult: i32, out: &mut [u8]) {
    debug_assert_eq!(x.len() % BLOCK, 0);
    debug_assert!(x.len().div_ceil(BLOCK * GROUP_BLOCKS) * ACT_GROUP <= out.len());
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => {
            // SAFETY: a `Kernel::Avx512Vnni` only reaches here after `is_supported` (checked when
            // the thread pool was built), and the lengths were checked by the caller.
            unsafe { x86::quantize_act_avx512(x, mult, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 | Kernel::AvxVnni => {
            // SAFETY: as above, both kernels require AVX2.
            unsafe { x86::quantize_act_avx2(x, mult, out) }
        }
        _ => scalar::quantize_act(x, mult, out),
    }
}

/// Quantizes one token to GGML's Q8_K blocks (`kquants::quantize_act`, whose bytes every path
/// reproduces exactly) into `out` (`kquants::act_stride(x.len())` bytes).
pub(crate) fn quantize_act_k(kernel: Kernel, x: &[f32], out: &mut [u8]) {
    debug_assert_eq!(x.len() % QK_K, 0);
    debug_assert!(out.len() >= kquants::act_stride(x.len()));
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Scalar {
        // SAFETY: every non-scalar kernel implies AVX2 (checked when the pool was built); the
        // lengths are as required.
        return unsafe { kx86::quantize_act(x, out) };
    }
    let _ = kernel;
    kquants::quantize_act(x, out);
}

/// Writes one quantized block into lane `i` of an activation group.
#[inline(always)]
pub(crate) fn put_act_block(group: &mut [u8], i: usize, q: &[u8; BLOCK], d: f32, bias: i32) {
    for k in 0..BLOCK / 4 {
        let o = ACT_Q + k * 64 + i * 4;
        group[o..o + 4].copy_from_slice(&q[k * 4..k * 4 + 4]);
    }
    group[ACT_D + 4 * i..ACT_D + 4 * i + 4].copy_from_slice(&d.to_ne_bytes());
    group[ACT_BIAS + 4 * i..ACT_BIAS + 4 * i + 4].copy_from_slice(&bias.to_ne_bytes());
}

/// Zeroes the lanes `from..16` of an activation group (padding past the end of the row).
pub(crate) fn zero_act_lanes(group: &mut [u8], from: usize) {
    for i in from..GROUP_BLOCKS {
        put_act_block(group, i, &[0; BLOCK], 0.0, 0);
    }
}

/// Computes `y[j][r] = W[r] . x[j]` for rows `r0..r1` and tokens `0..t`.
///
/// # Safety
/// The views must describe live buffers: `w` with at least `r1` rows, `x` with `t` tokens
/// quantized for this matrix and kernel, `y` with room for `t` tokens of `r1` rows, and no other
/// thread may write rows `r0..r1` of `y` meanwhile. The kernel must be supported by this CPU.
pub(crate) unsafe fn compute(
    kernel: Kernel,
    w: &WeightView,
    x: &ActView,
    t: usize,
    r0: usize,
    r1: usize,
    y: OutView,
) {
    if w.format.is_k() {
        // SAFETY: forwarded from this function's contract.
        return unsafe { compute_k(kernel, w, x, t, r0, r1, y) };
    }
    match kernel {
        // SAFETY (all arms): forwarded from this function's contract.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => unsafe { x86::avx512::compute(w, x, t, r0, r1, y) },
        #[cfg(target_arch = "x86_64")]
        Kernel::AvxVnni => unsafe { x86::avxvnni::compute(w, x, t, r0, r1, y) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { x86::avx2::compute(w, x, t, r0, r1, y) },
        _ => unsafe { scalar::compute(w, x, t, r0, r1, y) },
    }
}

/// Tokens per tile in the K-quant products: a tile's activations (up to 64 x 8.6 KiB) stay in
/// L2 while each row's weights, read once per tile, stay in L1.
const K_TOKEN_TILE: usize = 32;

/// [`compute`] for the K-quant formats: rows in GGML's super-block layout, tokens in Q8_K.
/// Every kernel that has AVX2 uses the AVX2 products (`kx86::compute`); they give the same bits
/// as the portable ones.
///
/// # Safety
/// As for [`compute`]; `w.groups` is the number of super-blocks per row and `x` holds tokens
/// quantized by `kquants::quantize_act`.
unsafe fn compute_k(
    kernel: Kernel,
    w: &WeightView,
    x: &ActView,
    t: usize,
    r0: usize,
    r1: usize,
    y: OutView,
) {
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Scalar {
        // SAFETY: a non-scalar kernel was checked to be supported, and every one of them
        // implies AVX2 + FMA + F16C; the rest is forwarded from this function's contract.
        return unsafe { kx86::compute(w, x, t, r0, r1, y, K_TOKEN_TILE) };
    }
    let _ = kernel;
    let nb = w.groups;
    let cols = nb * QK_K;
    let q4k = w.format == Format::Q4_K;
    let bb = w.format.block_bytes();
    let mut j0 = 0;
    while j0 < t {
        let j1 = t.min(j0 + K_TOKEN_TILE);
        for r in r0..r1 {
            let row = || {
                (0..nb).map(move |b| {
                    // SAFETY: row r exists (r < r1 <= rows, stored in whole tiles), so each of
                    // its super-blocks lies inside the matrix.
                    unsafe {
                        std::slice::from_raw_parts(
                            w.quants.add(layout::tile_offset(r, b, w.row_bytes, bb)),
                            bb,
                        )
                    }
                })
            };
            for j in j0..j1 {
                // SAFETY: token j exists and was quantized for `cols` values.
                let act = unsafe { Act::at(x.ptr.add(j * x.stride), cols) };
                let v = if q4k {
                    kquants::dot_q4k(row(), &act)
                } else {
                    kquants::dot_q6k(row(), &act)
                };
                // SAFETY: this thread owns row r of the output for every token.
                unsafe { *y.ptr.add(j * y.stride + r) = v };
            }
        }
        j0 = j1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let u = (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32;
            u / (1u64 << 24) as f32 * 2.0 - 1.0
        }
    }

    /// Every kernel's Q8_K activation bytes (levels, scales, sums) equal the portable ones, on
    /// random tokens and on super-blocks built to hit the edge cases.
    #[test]
    fn q8_k_activations_are_identical_on_every_kernel() {
        let mut rng = Rng(0x0DDB_A11C_AFE0_0001);
        let mut blocks: Vec<Vec<f32>> = Vec::new();
        for scale in [1.0, 1e-3, 1e4, 3.0e38, 1e-41] {
            blocks.push((0..QK_K).map(|_| rng.next() * scale).collect());
        }
        blocks.push(vec![0.0; QK_K]);
        let mut neg = vec![0.5f32; QK_K];
        neg[77] = -2.0; // the largest magnitude is negative
        blocks.push(neg);
        let mut tie = vec![0.25f32; QK_K];
        tie[10] = -3.0; // two of the same magnitude: the first one's sign wins
        tie[200] = 3.0;
        blocks.push(tie);
        let mut tie2 = tie_flip(&blocks[blocks.len() - 1]);
        tie2[255] = 1.0;
        blocks.push(tie2);
        let mut signed_zero = vec![-0.0f32; QK_K];
        signed_zero[3] = 0.0;
        blocks.push(signed_zero);
        let mut huge = vec![1.0f32; QK_K];
        huge[5] = f32::MAX;
        huge[6] = -f32::MAX;
        blocks.push(huge);
        let mut inf = (0..QK_K).map(|_| rng.next()).collect::<Vec<_>>();
        inf[100] = f32::NEG_INFINITY;
        blocks.push(inf);
        let mut nan = (0..QK_K).map(|_| rng.next()).collect::<Vec<_>>();
        nan[0] = f32::NAN;
        nan[131] = f32::NAN;
        blocks.push(nan);
        // A NaN right after the maximum in the same vector lane, and one in the last lane.
        let mut nan2 = (0..QK_K).map(|_| rng.next()).collect::<Vec<_>>();
        nan2[7] = 5.0;
        nan2[15] = f32::NAN;
        nan2[255] = f32::NAN;
        blocks.push(nan2);
        // Levels that land on halves: the scale is 1 (max -127), so x / d is x + 0.5.
        let mut halves: Vec<f32> = (0..QK_K).map(|i| (i % 200) as f32 - 99.5).collect();
        halves[0] = -127.0;
        blocks.push(halves);
        let mut tiny = vec![1e-45f32; QK_K];
        tiny[9] = -1e-45;
        blocks.push(tiny);
        let x: Vec<f32> = blocks.concat();
        // Tokens of 1 and of several super-blocks, at every offset.
        for n in [1, 2, blocks.len()] {
            for start in 0..=blocks.len() - n {
                let xs = &x[start * QK_K..(start + n) * QK_K];
                let stride = kquants::act_stride(xs.len());
                let mut want = vec![0xA5u8; stride];
                kquants::quantize_act(xs, &mut want);
                for kernel in Kernel::supported() {
                    let mut got = vec![0x5Au8; stride];
                    quantize_act_k(kernel, xs, &mut got);
                    let used = xs.len() + 36 * n;
                    assert!(
                        got[..used] == want[..used],
                        "{kernel}: super-blocks {start}..{} differ",
                        start + n
                    );
                }
            }
        }
    }

    fn tie_flip(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&a| -a).collect()
    }
}
