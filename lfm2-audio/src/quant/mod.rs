//! Quantized weight matrices and the int8 kernels that multiply them.
//!
//! # Why
//!
//! Decoding one token reads every backbone weight once (1.04 B parameters), so batch-1 decode is
//! bound by memory bandwidth and the bytes per weight set the token rate: 4.2 GB per token in
//! f32, 1.1 GB in Q8_0, 0.59 GB in Q4_0, against roughly 20 to 30 GB/s of DRAM bandwidth on the
//! reference machine. Prefill multiplies the same weights by hundreds of tokens at once and is
//! compute bound; it runs on 8-bit integer dot products (`vpdpbusd`), which do four times the
//! work of f32 FMAs per instruction.
//!
//! # Formats
//!
//! [`Format::Q8_0`] and [`Format::Q4_0`] are GGML's block formats: blocks of 32 values with an
//! f16 scale `d`; Q8_0 stores 32 i8 (`value = d * q`, 8.5 bits per weight), Q4_0 stores 16
//! bytes of nibbles (`value = d * (q - 8)`, low nibbles are values 0..16 and high nibbles
//! 16..32, 4.5 bits per weight). [`QMatrix::quantize`] reproduces ggml-quants.c's reference
//! quantizers operation for operation (Q8_0: `d = amax / 127`, `q = round(x / d)` with halves
//! away from zero; Q4_0: `d = max / -8` with the sign of the element of largest magnitude, `q =
//! min(15, trunc(x / d + 8.5))`), so [`QMatrix::to_ggml`] is byte-identical to the blocks
//! llama.cpp writes into a GGUF file and [`QMatrix::from_ggml`] takes such blocks directly.
//! [`QMatrix::to_bytes`] / [`QMatrix::from_bytes`] wrap the GGML blocks in a 32-byte header
//! for an on-disk cache; a truncated or inconsistent buffer is an error, never a panic.
//!
//! [`Format::Q4_K`] and [`Format::Q6_K`] are GGML's K-quant super-blocks of 256 values (see
//! `kquants.rs`), byte-identical to ggml's reference quantizers as well and kept in memory in
//! GGML's own layout. Their products quantize the activation to GGML's Q8_K (one scale per 256
//! values) and compute each super-block's sums exactly in integers; the AVX2 and portable
//! kernels give the same bits.
//!
//! In memory the same numbers are kept in an order the kernels read directly: each row is cut
//! into groups of 16 blocks, the 4-byte pieces of the 16 blocks are interleaved so that 32-bit
//! lane `i` of every 64-byte vector belongs to block `i`, and the scales sit in a separate array
//! (see `layout.rs`). The size is the same as GGML's (rows are padded to whole groups of 512
//! columns, which no model shape needs).
//!
//! # Kernels
//!
//! The activation is quantized on the fly, per block of 32, to i8 with an f32 scale (`d =
//! amax / 127`, round half to even) plus the block sum times the weight's zero point (128 for
//! Q8_0, stored as `q + 128`; 8 for Q4_0), interleaved like the weights. A `vpdpbusd`
//! (u8 weights x i8 activations, no sign trick needed since both formats are stored unsigned)
//! over the 8 vectors of a group, started from the zero-point term, leaves every lane holding
//! the exact integer dot product of one block; one convert and one fused multiply-add by
//! `d_w * d_x` per 16 blocks finish the group. The integer sums are exact and identical on every
//! path; the paths differ only in the order of the f32 additions.
//!
//! - [`Kernel::Avx512Vnni`]: 512-bit `vpdpbusd`. Decode works on 4 rows at a time and
//!   prefetches the next 4 rows (rows are 1 to 8 KiB, too short for the hardware prefetcher to
//!   ramp up on each). Prefill uses 4-row x 3-token register tiles, tokens in L2-sized tiles
//!   and the reduction in slices of 2048 columns, so that the tile's weights stay in L1.
//! - [`Kernel::AvxVnni`]: the same on 256-bit vectors (VEX `vpdpbusd`), 2 x 2 tiles.
//! - [`Kernel::Avx2`]: `vpmaddubsw` + `vpmaddwd`; Q8_0 uses the sign trick (|w| x sign(w) x)
//!   because u8 255 x i8 127 pairs would saturate `vpmaddubsw`'s i16 sums. Q4_0 decode adds the
//!   8 `vpmaddubsw` results of a block in i16 (at most 8 x 3810, no saturation) and widens them
//!   with one `vpmaddwd` per block lane and half-group instead of one per vector.
//! - [`Kernel::Scalar`]: portable Rust, the reference and the fallback (aarch64 included).
//!
//! [`Kernel::best`] picks the fastest one the CPU has (`is_x86_feature_detected!`, so the crate
//! builds for any x86-64); [`Threads::with_kernel`] forces one, which the tests do for each.
//!
//! # Threads
//!
//! [`Threads`] is a persistent pool: the caller is participant 0, workers spin for
//! [`DEFAULT_SPIN`] after each job (yielding the core every few hundred polls, so that a waiting
//! worker gives way to runnable threads) and then park. Work is shared by claiming chunks of rows
//! from an atomic counter, and a job is closed when the caller runs out of chunks, so a worker
//! that was descheduled never delays the call unless it is inside a chunk. A decode claim takes a
//! share of what is left of the job (64 KiB to 2 MiB of weights), so the claims near its end are
//! short; a caller that is done with its share spins 100 µs for the workers still inside and
//! then blocks, so that when another process holds a worker's core the caller's core goes idle
//! and the scheduler runs the worker there (instead of the caller spinning while the worker
//! waits for a time slice): a busy machine slows decoding in proportion. An empty
//! fork/join costs about 0.5 µs; the pool owns the scratch buffer of quantized activations, so a
//! call allocates nothing once the largest shape has been seen. Matrices under 128 KB run on the
//! calling thread. [`QMatrix::matvec_many`] multiplies one input by several matrices (q, k and v;
//! the feed-forward's two input maps) with one quantization of the input and one fork/join.
//!
//! # Accuracy
//!
//! Against f32 products of the dequantized weights the only error is the activation's 8-bit
//! quantization (`sum |w| * d_x / 2` at most; the tests check this bound and, tighter, equality
//! with the exact product of the quantized operands up to f32 rounding). Against the original
//! weights, on Gaussian-like test matrices with outliers, the error is about 1 % of the natural
//! scale `sqrt(sum (w x)^2)` for Q8_0 and 13 % for Q4_0.
//!
//! # Measured
//!
//! `cargo bench -p lfm2-audio --bench quant`, best kernel (AVX-512 VNNI), on the reference
//! machine: 2 cores of an AMD EPYC (it reports CPU family 26, i.e. Zen 5), shared with other
//! jobs. Each figure is a median of 7 runs; the load from the other jobs changes between runs
//! of the benchmark, so ranges over three runs are given. "Cold" means the weights rotate
//! through copies larger than the L3 cache, as in decoding.
//!
//! | | Q8_0 | Q4_0 |
//! |---|---|---|
//! | decode (matvec), cold, 1 thread | 21-33 GB/s | 22-31 GB/s |
//! | decode, cold, 2 threads, machine quiet | 41-42 GB/s | 32-37 GB/s |
//! | decode, cold, 2 threads, machine loaded | 20-29 GB/s | 15-27 GB/s |
//! | decode, hot in L3, 1 thread | 89-95 GB/s | 65-78 GB/s |
//! | prefill (matmul, 512 tokens), 1 thread | 400-565 GOPS | 440-545 GOPS |
//! | prefill, 2 threads | 480-1150 GOPS | 500-1110 GOPS |
//! | speed-up over candle 0.11's `QMatMul`, decode | 1.1-1.5x | 3.3-9.5x |
//! | speed-up over candle, prefill | 1.4-1.7x | 22-30x |
//!
//! A plain sequential read of memory measured in the same runs gives 16-29 GB/s with one thread
//! and 22-39 GB/s with two; decode reaches 90-110 % of it for Q8_0 and 80-100 % for Q4_0 when
//! the cores are not taken by other jobs (Q4_0 needs twice the instructions per byte, which
//! shows when the cores are shared). The candle speed-ups come from runs alternating with
//! candle in one process, so both see the same load. 1150 GOPS is the equivalent of about 550
//! backbone tokens/s of prefill (`GOPS * 1e9 / (2 * 1.04e9)`); decode at 30-40 GB/s reads the
//! backbone (1.1 GB in Q8_0, 0.59 GB in Q4_0) 27-36 or 50-65 times per second. An empty
//! fork/join of the pool costs 0.15-0.8 µs, waking a parked worker about 8-10 µs.

mod blocks;
mod kernels;
mod kquants;
mod layout;
mod roofline;
mod threads;

pub use blocks::BLOCK;
pub use kernels::Kernel;
pub use kquants::QK_K;
pub use roofline::{read_bandwidth, ReadProbe};
pub use threads::{Threads, DEFAULT_SPIN, MAX_THREADS};

use crate::{Error, Result};
use half::f16;
use kernels::{ActView, OutView, WeightView};
use layout::{AlignedBuf, ACT_GROUP, GROUP, GROUP_BLOCKS, TILE_ROWS};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A quantization format (GGML block layouts, named as GGML names them).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// 32 values per block: f16 scale `d`, 32 x i8 `q`; value = `d * q`. 34 bytes per block.
    Q8_0,
    /// 32 values per block: f16 scale `d`, 16 bytes of nibbles (low nibbles are values 0..16,
    /// high nibbles 16..32); value = `d * (q - 8)`. 18 bytes per block.
    Q4_0,
    /// 256 values per super-block: f16 `d` and `dmin`, 6-bit scales and mins of 8 sub-blocks
    /// of 32, 128 bytes of nibbles; value = `d * sc * q - dmin * m`. 144 bytes (4.5 bits).
    Q4_K,
    /// 256 values per super-block: 6-bit levels (low nibbles and high 2-bit pairs), i8 scales
    /// of 16 sub-blocks of 16, f16 `d`; value = `d * sc * (q - 32)`. 210 bytes (6.56 bits).
    Q6_K,
}

impl Format {
    /// Bytes of one GGML block (scale included).
    pub fn block_bytes(self) -> usize {
        match self {
            Format::Q8_0 => 2 + BLOCK,
            Format::Q4_0 => 2 + BLOCK / 2,
            Format::Q4_K => kquants::Q4K_BYTES,
            Format::Q6_K => kquants::Q6K_BYTES,
        }
    }

    /// Values per block: 32, or 256 for the K-quant super-blocks. A row's length must be a
    /// multiple of it.
    pub fn block_values(self) -> usize {
        if self.is_k() {
            QK_K
        } else {
            BLOCK
        }
    }

    /// Whether this is one of the K-quant super-block formats (Q4_K, Q6_K).
    pub fn is_k(self) -> bool {
        matches!(self, Format::Q4_K | Format::Q6_K)
    }

    /// GGML's `ggml_type` number (as written in GGUF files).
    pub fn ggml_type(self) -> u32 {
        match self {
            Format::Q8_0 => 8,
            Format::Q4_0 => 2,
            Format::Q4_K => 12,
            Format::Q6_K => 14,
        }
    }

    /// The format of a GGML type number, if supported.
    pub fn from_ggml_type(t: u32) -> Option<Format> {
        match t {
            8 => Some(Format::Q8_0),
            2 => Some(Format::Q4_0),
            12 => Some(Format::Q4_K),
            14 => Some(Format::Q6_K),
            _ => None,
        }
    }

    /// Bits per weight, scales included (8.5, 4.5, 4.5 and 6.5625).
    pub fn bits_per_weight(self) -> f64 {
        self.block_bytes() as f64 * 8.0 / self.block_values() as f64
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Q8_0 => "Q8_0",
            Format::Q4_0 => "Q4_0",
            Format::Q4_K => "Q4_K",
            Format::Q6_K => "Q6_K",
        }
    }

    /// Quant bytes per interleaved group of 16 blocks (K-quants: per super-block, kept in
    /// GGML's own layout).
    fn group_bytes(self) -> usize {
        match self {
            Format::Q8_0 => GROUP,
            Format::Q4_0 => GROUP / 2,
            Format::Q4_K | Format::Q6_K => self.block_bytes(),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Magic bytes of the serialized form.
const MAGIC: &[u8; 4] = b"LFQM";
const VERSION: u32 = 1;
/// Bytes of the serialized header.
pub const HEADER_BYTES: usize = 32;

/// Weights too small to be worth waking the other threads for (bytes of quants).
const SERIAL_BYTES: usize = 128 * 1024;

/// A quantized weight matrix `W [rows (out), cols (in)]`: `y = W x`.
///
/// Holds exactly the numbers of GGML's Q8_0/Q4_0 blocks (one row = `cols / 32` blocks), kept in
/// memory in an interleaved order that the kernels read directly; [`QMatrix::to_ggml`] and
/// [`QMatrix::from_ggml`] convert to and from GGML's own byte layout.
#[derive(Clone)]
pub struct QMatrix {
    rows: usize,
    cols: usize,
    format: Format,
    /// Interleaved groups per row (`ceil(cols / 512)`).
    groups: usize,
    /// `groups * format.group_bytes()` bytes per row, rows in tiles (`layout::tile_offset`, the
    /// last tile padded), 64-byte aligned.
    quants: AlignedBuf,
    /// `groups * 16` block scales per row (f16), in the same tiles (none for the K-quants);
    /// allocated as the quants are, so that the decode products read both from huge pages.
    scales: AlignedBuf,
    /// How decode reads the weights from memory (see [`Reread`]).
    reread: Reread,
}

/// How often a matrix is read again soon after, which decides how far ahead decode asks for its
/// lines (only the AVX-512 Q4_0 kernel tells the two apart, the one where it was measured).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reread {
    /// Once a step, between reads of everything else: the lines come from memory.
    #[default]
    Once,
    /// Several times within a short span, with a working set near the size of the last-level
    /// cache, as the depthformer's layers are (8 steps an audio frame): many lines come from
    /// that cache, and asking for them further ahead keeps the core busy.
    Often,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QMatrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("format", &self.format)
            .finish()
    }
}

fn invalid(msg: String) -> Error {
    Error::Invalid(format!("quantized matrix: {msg}"))
}

/// Checks a shape and returns the number of weights.
fn check_shape(rows: usize, cols: usize, format: Format) -> Result<usize> {
    if rows == 0 || cols == 0 {
        return Err(invalid(format!("empty shape {rows}x{cols}")));
    }
    let block = format.block_values();
    if !cols.is_multiple_of(block) {
        return Err(invalid(format!(
            "cols = {cols} is not a multiple of the {format} block size {block}"
        )));
    }
    let n = rows
        .checked_mul(cols)
        .filter(|&n| n <= isize::MAX as usize / 4)
        .ok_or_else(|| invalid(format!("shape {rows}x{cols} is too large")))?;
    Ok(n)
}

impl QMatrix {
    /// An all-zero matrix in the interleaved layout (every quant the zero point).
    fn zeroed(rows: usize, cols: usize, format: Format) -> Result<Self> {
        check_shape(rows, cols, format)?;
        // K-quants keep GGML's super-blocks as they are: a "group" is one super-block.
        let groups = if format.is_k() {
            cols / QK_K
        } else {
            cols.div_ceil(GROUP)
        };
        // Padding to whole groups can make the layout larger than the values (16x for a single
        // block per row), so check again.
        // Stored in whole tiles of rows (`layout::tile_offset`).
        let stored_rows = rows.next_multiple_of(TILE_ROWS);
        let bytes = stored_rows
            .checked_mul(groups * format.group_bytes())
            .filter(|&b| b <= isize::MAX as usize / 2)
            .ok_or_else(|| invalid(format!("shape {rows}x{cols} is too large")))?;
        let mut quants = AlignedBuf::zeroed(bytes);
        if format == Format::Q8_0 {
            // Q8_0 is stored +128; padding blocks must hold the value 0 too.
            quants.as_mut_slice().fill(0x80);
        }
        Ok(QMatrix {
            rows,
            cols,
            format,
            groups,
            quants,
            reread: Reread::Once,
            // f16 zero is all zero bits.
            scales: AlignedBuf::zeroed(if format.is_k() {
                0
            } else {
                stored_rows * groups * GROUP_BLOCKS * std::mem::size_of::<f16>()
            }),
        })
    }

    /// Quantizes a row-major f32 matrix `w` (`rows * cols` values) exactly as GGML's reference
    /// quantizers do. `cols` must be a multiple of 32. Rows are quantized in parallel.
    pub fn quantize(w: &[f32], rows: usize, cols: usize, format: Format) -> Result<Self> {
        let n = check_shape(rows, cols, format)?;
        if w.len() != n {
            return Err(invalid(format!(
                "{} values given for a {rows}x{cols} matrix",
                w.len()
            )));
        }
        let mut m = Self::zeroed(rows, cols, format)?;
        if format.is_k() {
            let bb = format.block_bytes();
            m.fill_rows(|r, qr, _| {
                let wr = &w[r * cols..(r + 1) * cols];
                for (x, out) in wr.chunks_exact(QK_K).zip(qr.chunks_exact_mut(bb)) {
                    if format == Format::Q4_K {
                        kquants::quantize_q4_k(x, out);
                    } else {
                        kquants::quantize_q6_k(x, out);
                    }
                }
            });
            return Ok(m);
        }
        m.fill_rows(|r, qr, sr| {
            let wr = &w[r * cols..(r + 1) * cols];
            for (b, x) in wr.chunks_exact(BLOCK).enumerate() {
                let mut xb = [0f32; BLOCK];
                xb.copy_from_slice(x);
                match format {
                    Format::Q8_0 => {
                        let (d, q) = blocks::quantize_q8_0(&xb);
                        put_q8(qr, sr, b, d, &q);
                    }
                    Format::Q4_0 => {
                        let (d, q) = blocks::quantize_q4_0(&xb);
                        put_q4(qr, sr, b, d, &q);
                    }
                    Format::Q4_K | Format::Q6_K => unreachable!("handled above"),
                }
            }
        });
        Ok(m)
    }

    /// Calls `f(row, row_quants, row_scales)` for every row, rows split over the available
    /// cores (quantizing or converting a 1.2 B-parameter model is seconds of work). `f` sees
    /// each row on its own, in row order; the row is then placed into its tile group by group
    /// (a K-quant "group" is one super-block, and it has no separate scales).
    fn fill_rows(&mut self, f: impl Fn(usize, &mut [u8], &mut [f16]) + Sync) {
        let (rows, row_bytes, row_scales) = (self.rows, self.row_bytes(), self.row_scales());
        let (gq, fill) = (
            self.format.group_bytes(),
            if self.format == Format::Q8_0 { 0x80 } else { 0 },
        );
        let threads = Threads::available().min(rows.div_ceil(64)).max(1);
        // Whole tiles per thread, so that each thread's rows are one contiguous range.
        let per = rows.div_ceil(threads).next_multiple_of(TILE_ROWS);
        let f = &f;
        std::thread::scope(|scope| {
            let quants = self.quants.as_mut_slice().chunks_mut(per * row_bytes);
            // K-quant matrices have no separate scales (row_scales = 0).
            let mut scales: &mut [f16] = bytemuck::cast_slice_mut(self.scales.as_mut_slice());
            for (c, q) in quants.enumerate() {
                let n = q.len() / row_bytes;
                let (s, rest) = std::mem::take(&mut scales).split_at_mut(n * row_scales);
                scales = rest;
                scope.spawn(move || {
                    let first = c * per;
                    let count = n.min(rows.saturating_sub(first));
                    let (mut qr, mut sr) = (vec![0u8; row_bytes], vec![f16::ZERO; row_scales]);
                    for i in 0..count {
                        qr.fill(fill);
                        sr.fill(f16::ZERO);
                        f(first + i, &mut qr, &mut sr);
                        for (g, qg) in qr.chunks_exact(gq).enumerate() {
                            let at = layout::tile_offset(i, g, row_bytes, gq);
                            q[at..at + gq].copy_from_slice(qg);
                        }
                        for (g, sg) in sr.chunks_exact(GROUP_BLOCKS).enumerate() {
                            let at = layout::tile_offset(i, g, row_scales, GROUP_BLOCKS);
                            s[at..at + GROUP_BLOCKS].copy_from_slice(sg);
                        }
                    }
                });
            }
        });
    }

    /// Builds a matrix from GGML blocks (`rows * cols / 32` blocks of [`Format::block_bytes`],
    /// row-major, as in a GGUF tensor).
    pub fn from_ggml(rows: usize, cols: usize, format: Format, data: &[u8]) -> Result<Self> {
        let n = check_shape(rows, cols, format)?;
        let bb = format.block_bytes();
        let expected = n / format.block_values() * bb;
        if data.len() != expected {
            return Err(invalid(format!(
                "{} bytes of {format} blocks given, a {rows}x{cols} matrix needs {expected}",
                data.len()
            )));
        }
        let mut m = Self::zeroed(rows, cols, format)?;
        if format.is_k() {
            let row_in = m.row_bytes();
            m.fill_rows(|r, qr, _| qr.copy_from_slice(&data[r * row_in..(r + 1) * row_in]));
            return Ok(m);
        }
        let row_in = cols / BLOCK * bb;
        m.fill_rows(|r, qr, sr| {
            let src = &data[r * row_in..(r + 1) * row_in];
            for (b, blk) in src.chunks_exact(bb).enumerate() {
                let d = f16::from_le_bytes([blk[0], blk[1]]);
                match format {
                    Format::Q8_0 => {
                        let mut q = [0i8; BLOCK];
                        for (q, &v) in q.iter_mut().zip(&blk[2..]) {
                            *q = v as i8;
                        }
                        put_q8(qr, sr, b, d, &q);
                    }
                    Format::Q4_0 => {
                        let mut q = [0u8; BLOCK / 2];
                        q.copy_from_slice(&blk[2..]);
                        put_q4(qr, sr, b, d, &q);
                    }
                    Format::Q4_K | Format::Q6_K => unreachable!("copied above"),
                }
            }
        });
        Ok(m)
    }

    /// The matrix as GGML blocks (row-major, `rows * cols / 32` blocks), byte-identical to what
    /// llama.cpp stores for the same tensor and type.
    pub fn to_ggml(&self) -> Vec<u8> {
        if self.format.is_k() {
            let mut out = Vec::with_capacity(self.ggml_bytes());
            for r in 0..self.rows {
                for b in 0..self.groups {
                    out.extend_from_slice(self.k_block(r, b));
                }
            }
            return out;
        }
        let bb = self.format.block_bytes();
        let nb = self.cols / BLOCK;
        let mut out = Vec::with_capacity(self.rows * nb * bb);
        for r in 0..self.rows {
            for b in 0..nb {
                let (d, qs) = self.ggml_block(r, b);
                out.extend_from_slice(&d.to_le_bytes());
                out.extend_from_slice(&qs[..bb - 2]);
            }
        }
        out
    }

    /// Super-block `b` of row `r` of a K-quant matrix (GGML's bytes).
    fn k_block(&self, r: usize, b: usize) -> &[u8] {
        let bb = self.format.block_bytes();
        let at = layout::tile_offset(r, b, self.row_bytes(), bb);
        &self.quants.as_slice()[at..at + bb]
    }

    /// GGML's bytes of block `b` of row `r`: the scale and the quant bytes (32 for Q8_0, the 16
    /// packed bytes followed by 16 zeros for Q4_0).
    fn ggml_block(&self, r: usize, b: usize) -> (f16, [u8; BLOCK]) {
        let (g, i, gq) = (
            b / GROUP_BLOCKS,
            b % GROUP_BLOCKS,
            self.format.group_bytes(),
        );
        let base = layout::tile_offset(r, g, self.row_bytes(), gq);
        let q = &self.quants.as_slice()[base..base + gq];
        let mut out = [0u8; BLOCK];
        match self.format {
            Format::Q8_0 => {
                for (e, o) in out.iter_mut().enumerate() {
                    *o = q[layout::q8_offset(i, e)] ^ 0x80;
                }
            }
            Format::Q4_0 => {
                for (m, o) in out[..BLOCK / 2].iter_mut().enumerate() {
                    *o = q[layout::q4_offset(i, m)];
                }
            }
            Format::Q4_K | Format::Q6_K => unreachable!("K-quants are stored as GGML blocks"),
        }
        let scales = layout::tile_offset(r, g, self.row_scales(), GROUP_BLOCKS);
        (self.scales()[scales + i], out)
    }

    /// Writes row `r` dequantized into `out` (`cols` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        if r >= self.rows {
            return Err(invalid(format!(
                "row {r} out of range (rows = {})",
                self.rows
            )));
        }
        if out.len() != self.cols {
            return Err(invalid(format!(
                "output has {} values, a row has {}",
                out.len(),
                self.cols
            )));
        }
        if self.format.is_k() {
            for (b, o) in out.chunks_exact_mut(QK_K).enumerate() {
                let blk = self.k_block(r, b);
                if self.format == Format::Q4_K {
                    kquants::dequantize_q4_k(blk, o);
                } else {
                    kquants::dequantize_q6_k(blk, o);
                }
            }
            return Ok(());
        }
        for (b, o) in out.chunks_exact_mut(BLOCK).enumerate() {
            let (d, qs) = self.ggml_block(r, b);
            let d = d.to_f32();
            match self.format {
                Format::Q8_0 => {
                    for (o, &q) in o.iter_mut().zip(&qs) {
                        *o = d * (q as i8) as f32;
                    }
                }
                Format::Q4_0 => {
                    for (j, &q) in qs[..BLOCK / 2].iter().enumerate() {
                        o[j] = d * ((q & 0x0F) as i32 - 8) as f32;
                        o[j + BLOCK / 2] = d * ((q >> 4) as i32 - 8) as f32;
                    }
                }
                Format::Q4_K | Format::Q6_K => unreachable!("handled above"),
            }
        }
        Ok(())
    }

    /// The whole matrix dequantized (row-major, `rows * cols` values).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
            // Cannot fail: the row exists and the slice has `cols` values.
            let _ = self.dequantize_row(r, row);
        }
        out
    }

    /// Serializes as a 32-byte header followed by the GGML blocks. Header (little-endian):
    /// magic `LFQM`, u32 version (1), u32 GGML type, u32 reserved (0), u64 rows, u64 cols.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES + self.ggml_bytes());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.format.ggml_type().to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(self.rows as u64).to_le_bytes());
        out.extend_from_slice(&(self.cols as u64).to_le_bytes());
        out.extend_from_slice(&self.to_ggml());
        out
    }

    /// Parses [`QMatrix::to_bytes`] output. The buffer must be exactly one matrix; a truncated,
    /// padded or corrupt buffer is an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < HEADER_BYTES {
            return Err(invalid(format!(
                "truncated header: {} bytes, need {HEADER_BYTES}",
                bytes.len()
            )));
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[o..o + 8]);
            u64::from_le_bytes(b)
        };
        if &bytes[..4] != MAGIC {
            return Err(invalid(
                "bad magic (not a serialized quantized matrix)".into(),
            ));
        }
        let version = u32_at(4);
        if version != VERSION {
            return Err(invalid(format!("unsupported version {version}")));
        }
        let ty = u32_at(8);
        let format = Format::from_ggml_type(ty)
            .ok_or_else(|| invalid(format!("unsupported GGML type {ty}")))?;
        let too_large = || invalid("dimensions do not fit in memory".into());
        let rows = usize::try_from(u64_at(16)).map_err(|_| too_large())?;
        let cols = usize::try_from(u64_at(24)).map_err(|_| too_large())?;
        let n = check_shape(rows, cols, format)?;
        let payload = n / format.block_values() * format.block_bytes();
        let body = &bytes[HEADER_BYTES..];
        if body.len() != payload {
            return Err(invalid(format!(
                "{} bytes of blocks after the header, a {rows}x{cols} {format} matrix has {payload}",
                body.len()
            )));
        }
        Self::from_ggml(rows, cols, format, body)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// How decode reads this matrix from memory ([`Reread::Once`] unless set).
    pub fn reread(&self) -> Reread {
        self.reread
    }

    /// Says how often decode reads this matrix again soon (a hint for its prefetching; the
    /// results are the same either way).
    pub fn set_reread(&mut self, reread: Reread) {
        self.reread = reread;
    }

    /// Size of the weights in GGML's layout: what a product reads from memory.
    pub fn ggml_bytes(&self) -> usize {
        self.rows * self.cols / self.format.block_values() * self.format.block_bytes()
    }

    fn row_bytes(&self) -> usize {
        self.groups * self.format.group_bytes()
    }

    fn row_scales(&self) -> usize {
        if self.format.is_k() {
            0
        } else {
            self.groups * GROUP_BLOCKS
        }
    }

    /// The block scales (empty for the K-quants).
    fn scales(&self) -> &[f16] {
        bytemuck::cast_slice(self.scales.as_slice())
    }

    fn view(&self) -> WeightView {
        WeightView {
            quants: self.quants.as_slice().as_ptr(),
            scales: self.scales().as_ptr(),
            groups: self.groups,
            row_bytes: self.row_bytes(),
            row_scales: self.row_scales(),
            q4: self.format == Format::Q4_0,
            format: self.format,
            reread: self.reread,
        }
    }

    /// Bytes of one quantized activation token for this matrix.
    fn act_stride(&self) -> usize {
        if self.format.is_k() {
            kquants::act_stride(self.cols)
        } else {
            self.groups * ACT_GROUP
        }
    }

    /// Quantizes one token `x` for this matrix and kernel into `out` (`act_stride` bytes): per
    /// block of 32 for Q8_0/Q4_0, GGML's Q8_K super-blocks for the K-quants.
    fn quantize_token(&self, kernel: Kernel, x: &[f32], out: &mut [u8]) {
        if self.format.is_k() {
            kernels::quantize_act_k(kernel, x, out);
        } else {
            kernels::quantize_act(kernel, x, self.bias_mult(kernel), out);
        }
    }

    /// `y = W x` for one token (`x`: `cols` values, `y`: `rows` values). `x` is quantized to
    /// 8 bits per block of 32 on the fly and the products run in integer arithmetic; the rows are
    /// split across the pool's threads.
    pub fn matvec(&self, x: &[f32], y: &mut [f32], threads: &Threads) -> Result<()> {
        if x.len() != self.cols || y.len() != self.rows {
            return Err(invalid(format!(
                "matvec of a {}x{} matrix with x of {} and y of {} values",
                self.rows,
                self.cols,
                x.len(),
                y.len()
            )));
        }
        let kernel = threads.kernel();
        let stride = self.act_stride();
        let mut scratch = threads.lock();
        let act = scratch.act.ensure(stride);
        self.quantize_token(kernel, x, act);
        let act = ActView {
            ptr: act.as_ptr(),
            stride,
        };
        let out = OutView {
            ptr: y.as_mut_ptr(),
            stride: self.rows,
        };
        run_parts(
            threads,
            &act,
            &[(self.view(), out, self.rows)],
            self.quants.len(),
        );
        drop(scratch);
        Ok(())
    }

    /// Several products of the same input: `ys[i] = ms[i] x`, with `x` quantized once and all
    /// the rows handed to the pool in one job (one fork/join instead of one per matrix). The
    /// matrices must have the same number of columns and the same format; each result is the
    /// same as [`QMatrix::matvec`] would give.
    pub fn matvec_many(
        ms: &[&QMatrix],
        x: &[f32],
        ys: &mut [&mut [f32]],
        threads: &Threads,
    ) -> Result<()> {
        let Some(first) = ms.first() else {
            return Ok(());
        };
        if ms.len() != ys.len() {
            return Err(invalid(format!(
                "{} matrices and {} outputs",
                ms.len(),
                ys.len()
            )));
        }
        for (m, y) in ms.iter().zip(ys.iter()) {
            if m.cols != first.cols || m.format != first.format {
                return Err(invalid(format!(
                    "fused products need one shape of input and one format: {}x{} {} with {}x{} {}",
                    first.rows, first.cols, first.format, m.rows, m.cols, m.format
                )));
            }
            if x.len() != m.cols || y.len() != m.rows {
                return Err(invalid(format!(
                    "matvec of a {}x{} matrix with x of {} and y of {} values",
                    m.rows,
                    m.cols,
                    x.len(),
                    y.len()
                )));
            }
        }
        let kernel = threads.kernel();
        let stride = first.act_stride();
        let mut scratch = threads.lock();
        let act = scratch.act.ensure(stride);
        first.quantize_token(kernel, x, act);
        let act = ActView {
            ptr: act.as_ptr(),
            stride,
        };
        let jobs: Vec<(WeightView, OutView, usize)> = ms
            .iter()
            .zip(ys.iter_mut())
            .map(|(m, y)| {
                (
                    m.view(),
                    OutView {
                        ptr: y.as_mut_ptr(),
                        stride: m.rows,
                    },
                    m.rows,
                )
            })
            .collect();
        let bytes: usize = ms.iter().map(|m| m.quants.len()).sum();
        run_parts(threads, &act, &jobs, bytes);
        drop(scratch);
        Ok(())
    }

    /// `y = x W^T` for `t` tokens: `x` is `[t, cols]` and `y` is `[t, rows]`, both row-major.
    /// Tokens are processed in cache tiles so that each weight block is loaded once per tile.
    pub fn matmul(&self, x: &[f32], t: usize, y: &mut [f32], threads: &Threads) -> Result<()> {
        let xn = t.checked_mul(self.cols);
        let yn = t.checked_mul(self.rows);
        if xn != Some(x.len()) || yn != Some(y.len()) {
            return Err(invalid(format!(
                "matmul of a {}x{} matrix with {t} tokens: x has {} values, y has {}",
                self.rows,
                self.cols,
                x.len(),
                y.len()
            )));
        }
        match t {
            0 => return Ok(()),
            1 => return self.matvec(x, y, threads),
            _ => {}
        }
        let kernel = threads.kernel();
        let stride = self.act_stride();
        let total = t
            .checked_mul(stride)
            .ok_or_else(|| invalid(format!("{t} tokens are too many")))?;
        let mut scratch = threads.lock();
        let act = scratch.act.ensure(total);
        // Quantize the tokens in parallel, claiming 4 tokens at a time; each token's
        // `stride`-byte slice of the scratch buffer is written by exactly one participant.
        if threads.len() == 1 || t < 8 {
            for (xj, aj) in x.chunks_exact(self.cols).zip(act.chunks_exact_mut(stride)) {
                self.quantize_token(kernel, xj, aj);
            }
        } else {
            let ap = SyncPtr(act.as_mut_ptr());
            let next = AtomicUsize::new(0);
            threads.dispatch(&|_| loop {
                let j0 = next.fetch_add(4, Ordering::Relaxed);
                if j0 >= t {
                    break;
                }
                for j in j0..t.min(j0 + 4) {
                    // SAFETY: token j's slice lies inside the `total`-byte buffer, only the
                    // participant that claimed j touches it, and the buffer outlives the job.
                    let aj =
                        unsafe { std::slice::from_raw_parts_mut(ap.get().add(j * stride), stride) };
                    self.quantize_token(kernel, &x[j * self.cols..(j + 1) * self.cols], aj);
                }
            });
        }
        let act = ActView {
            ptr: act.as_ptr(),
            stride,
        };
        let out = OutView {
            ptr: y.as_mut_ptr(),
            stride: self.rows,
        };
        // Chunks of rows whose weights stay in L2 (about 256 KiB) while all token tiles pass.
        let chunk = (256 * 1024 / self.row_bytes().max(1)).clamp(4, 256);
        self.run_rows(threads, &act, t, out, chunk);
        drop(scratch);
        Ok(())
    }

    /// Splits the rows into chunks that the participants claim one at a time (an atomic
    /// counter), so that a core slowed down by other work simply takes fewer chunks.
    fn run_rows(&self, threads: &Threads, act: &ActView, t: usize, out: OutView, min_chunk: usize) {
        let kernel = threads.kernel();
        let w = self.view();
        let n = threads.len();
        let serial = n == 1 || self.quants.len() * t.min(64) < SERIAL_BYTES;
        if serial {
            // SAFETY: the views cover the whole matrix, the `t` quantized tokens and `y`
            // (checked by the callers), and this thread is the only one running.
            unsafe { kernels::compute(kernel, &w, act, t, 0, self.rows, out) };
            return;
        }
        // Several chunks per thread for balance; multiples of 4 rows keep the micro-tiles full.
        let chunk = self.rows.div_ceil(n * 4).max(min_chunk).next_multiple_of(4);
        let chunks = self.rows.div_ceil(chunk);
        let next = AtomicUsize::new(0);
        threads.dispatch(&|_| loop {
            let c = next.fetch_add(1, Ordering::Relaxed);
            if c >= chunks {
                break;
            }
            let r0 = c * chunk;
            let r1 = (r0 + chunk).min(self.rows);
            // SAFETY: as above; chunk `c` (rows r0..r1) is claimed by exactly one participant,
            // so no two threads write the same output rows.
            unsafe { kernels::compute(kernel, &w, act, t, r0, r1, out) };
        });
    }

    fn bias_mult(&self, kernel: Kernel) -> i32 {
        kernels::bias_mult(kernel, self.format == Format::Q4_0)
    }
}

/// Most matrices one decode job takes (more are run as several jobs).
const MAX_PARTS: usize = 8;
/// The smallest claim of a decode job: 64 KiB of weights.
const MIN_CLAIM: usize = 64 * 1024;
/// The largest claim of a decode job: 2 MiB of weights.
const MAX_CLAIM: usize = 2 << 20;

/// Decode products of one quantized token with several matrices (weights, output, rows).
///
/// The participants claim runs of tiles from one counter that walks the matrices' tiles in
/// order, each claim a 1/n share of what is left (guided self-scheduling), at least
/// [`MIN_CLAIM`] and at most [`MAX_CLAIM`] bytes and never past the end of a matrix. With two
/// threads the first claims are long sequential streams (the hardware prefetcher ramps up once
/// per stream, and a matrix is read in a few streams instead of one per 256 KiB) while the
/// claims near the end shrink, so that nobody waits long for the last one, and a participant
/// that joins late, or is slowed by another process on its core, simply takes less. Against
/// fixed 256 KiB chunks, a Zen 4 guest read the 4-bit step's weights 16 % faster on a fast bus
/// (docs/PERFORMANCE.md, "Longer streams per thread").
fn run_parts(
    threads: &Threads,
    act: &ActView,
    parts: &[(WeightView, OutView, usize)],
    bytes: usize,
) {
    let kernel = threads.kernel();
    let n = threads.len();
    if n == 1 || bytes < SERIAL_BYTES {
        for (w, out, rows) in parts {
            // SAFETY: the views cover each whole matrix, the quantized token and its output
            // (checked by the caller), and this thread is the only one running.
            unsafe { kernels::compute(kernel, w, act, 1, 0, *rows, *out) };
        }
        return;
    }
    if parts.len() > MAX_PARTS {
        for some in parts.chunks(MAX_PARTS) {
            let bytes = some.iter().map(|(w, _, rows)| w.row_bytes * rows).sum();
            run_parts(threads, act, some, bytes);
        }
        return;
    }
    // Tile counts as running ends (`ends[p]`: tiles of parts 0..=p), and each part's claim
    // bounds in tiles.
    let mut ends = [0usize; MAX_PARTS];
    let mut bounds = [(0usize, 0usize); MAX_PARTS];
    let mut total = 0;
    for (p, (w, _, rows)) in parts.iter().enumerate() {
        total += rows.div_ceil(TILE_ROWS);
        ends[p] = total;
        let tile = (w.row_bytes * TILE_ROWS).max(1);
        bounds[p] = ((MIN_CLAIM / tile).max(1), (MAX_CLAIM / tile).max(1));
    }
    let next = AtomicUsize::new(0);
    threads.dispatch(&|_| {
        let mut at = next.load(Ordering::Relaxed);
        while at < total {
            let p = ends.iter().position(|&e| at < e).unwrap_or(0);
            let (least, most) = bounds[p];
            let take = ((total - at) / n).clamp(least, most).min(ends[p] - at);
            if let Err(now) =
                next.compare_exchange_weak(at, at + take, Ordering::Relaxed, Ordering::Relaxed)
            {
                at = now;
                continue;
            }
            let first = if p == 0 { 0 } else { ends[p - 1] };
            let (w, out, rows) = &parts[p];
            let r0 = (at - first) * TILE_ROWS;
            let r1 = ((at + take - first) * TILE_ROWS).min(*rows);
            // SAFETY: tiles at..at + take of part p (rows r0..r1) were claimed by this
            // participant alone (the exchange above), so no two threads write the same output
            // rows; the views outlive the job.
            unsafe { kernels::compute(kernel, w, act, 1, r0, r1, *out) };
            at = next.load(Ordering::Relaxed);
        }
    });
}

/// A raw pointer that may be shared with the pool's workers (see the SAFETY notes at its uses).
#[derive(Clone, Copy)]
struct SyncPtr(*mut u8);
// SAFETY: only used to hand disjoint sub-slices of one buffer to different participants.
unsafe impl Sync for SyncPtr {}
unsafe impl Send for SyncPtr {}
impl SyncPtr {
    fn get(self) -> *mut u8 {
        self.0
    }
}

/// Stores a Q8_0 block into an interleaved row (`qr`: the row's quants, `sr`: its scales).
fn put_q8(qr: &mut [u8], sr: &mut [f16], b: usize, d: f16, q: &[i8; BLOCK]) {
    let base = (b / GROUP_BLOCKS) * GROUP;
    let i = b % GROUP_BLOCKS;
    for (e, &v) in q.iter().enumerate() {
        // The +128 offset makes the weight the unsigned operand of vpdpbusd.
        qr[base + layout::q8_offset(i, e)] = (v as u8) ^ 0x80;
    }
    sr[b] = d;
}

/// Stores a Q4_0 block (GGML's 16 packed bytes) into an interleaved row.
fn put_q4(qr: &mut [u8], sr: &mut [f16], b: usize, d: f16, q: &[u8; BLOCK / 2]) {
    let base = (b / GROUP_BLOCKS) * (GROUP / 2);
    let i = b % GROUP_BLOCKS;
    for (m, &v) in q.iter().enumerate() {
        qr[base + layout::q4_offset(i, m)] = v;
    }
    sr[b] = d;
}
