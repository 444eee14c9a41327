//! Memory layouts shared by the quantizer, the matrix and the kernels.
//!
//! Weights are kept in memory in a *group-interleaved* form of GGML's blocks (the bytes and
//! scales are the same numbers, only their order differs). A row is cut into groups of 16
//! blocks (512 values); inside a group the 4-byte pieces of the 16 blocks are interleaved so that
//! one 64-byte vector holds bytes `4k..4k+4` of every block:
//!
//! ```text
//! Q8_0 group (512 bytes): vector k = 0..8, lane i = 0..16 (4 bytes) = block i, values 4k..4k+4,
//!                         stored as u8 = q + 128 (the unsigned operand of vpdpbusd)
//! Q4_0 group (256 bytes): vector p = 0..4, lane i = GGML bytes 4p..4p+4 of block i: the low
//!                         nibbles are values 4p..4p+4, the high nibbles values 16+4p..16+4p+4
//! scales:                 16 f16 per group, in a separate array
//! ```
//!
//! With this order a vpdpbusd over vector k adds, in 32-bit lane i, four products of block i: after
//! the 8 vectors of a group every lane holds the complete integer dot product of one block, and
//! the block scales are applied with one convert and one fused multiply-add per 16 blocks instead
//! of per block. Rows are padded with zero blocks to whole groups (no model shape needs it).
//!
//! Rows are stored in *tiles* of [`TILE_ROWS`]: tile by tile, and inside a tile group by group,
//! the tile's rows one after the other ([`tile_offset`]); the scales follow the same order. A
//! decode product reads the rows of a tile together, group by group, so its whole read is one
//! sequential stream, which the hardware prefetcher follows. In plain row order the rows of a
//! tile would be that many short streams (a 2048-value Q4_0 row is 1 KiB), too short for the
//! prefetcher to pick up: on a Zen 3 core that read ran at about 60 % of the sequential one. The
//! last tile is padded with zero rows. The K-quants (Q4_K, Q6_K) keep GGML's super-blocks as they
//! are, tiled the same way with one super-block as the group.
//!
//! The quantized activation of one token uses the same interleaving, 640 bytes per group:
//! `[0, 512)` the i8 values, `[512, 576)` 16 f32 block scales, `[576, 640)` 16 i32 correction
//! terms `-c * sum(q)` (the zero-point of the unsigned weight operand: c = 128 for Q8_0 and 8 for
//! Q4_0, or 0 where a kernel multiplies signed weights directly).

/// Values per block.
pub const BLOCK: usize = super::blocks::BLOCK;
/// Blocks per interleaved group.
pub const GROUP_BLOCKS: usize = 16;
/// Values per interleaved group.
pub const GROUP: usize = BLOCK * GROUP_BLOCKS;

/// Byte offset of the i8 values inside an activation group.
pub const ACT_Q: usize = 0;
/// Byte offset of the 16 f32 block scales inside an activation group.
pub const ACT_D: usize = 512;
/// Byte offset of the 16 i32 correction terms inside an activation group.
pub const ACT_BIAS: usize = 576;
/// Bytes per activation group.
pub const ACT_GROUP: usize = 640;

/// Rows per tile (see the module's documentation). Every micro-tile of rows a kernel computes at
/// once lies inside one tile.
pub const TILE_ROWS: usize = 4;

/// Offset of group `g` of row `r` in a matrix stored in tiles, whose rows hold `per_row`
/// elements (bytes of quants, or scales) in groups of `per_group`: the tile's rows are
/// `per_group` apart, its groups `TILE_ROWS * per_group`.
#[inline]
pub fn tile_offset(r: usize, g: usize, per_row: usize, per_group: usize) -> usize {
    (r / TILE_ROWS) * TILE_ROWS * per_row + g * TILE_ROWS * per_group + (r % TILE_ROWS) * per_group
}

/// Offset inside a Q8_0 group of value `e` (0..32) of block lane `i`.
#[inline]
pub fn q8_offset(i: usize, e: usize) -> usize {
    (e / 4) * 64 + i * 4 + e % 4
}

/// Offset inside a Q4_0 group of GGML's packed byte `m` (0..16) of block lane `i`.
#[inline]
pub fn q4_offset(i: usize, m: usize) -> usize {
    (m / 4) * 64 + i * 4 + m % 4
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A zero-initialised byte buffer whose start is 64-byte aligned, so that every group and every
/// activation token starts on a cache line and vector loads never split one.
pub struct AlignedBuf {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> Self {
        AlignedBuf {
            lines: vec![Line([0; 64]); len.div_ceil(64)],
            len,
        }
    }

    /// Makes the buffer at least `len` bytes long, reallocating only when it has to grow, and
    /// returns it as a slice of exactly `len` bytes. Contents are unspecified afterwards.
    pub fn ensure(&mut self, len: usize) -> &mut [u8] {
        if self.lines.len() * 64 < len {
            self.lines = vec![Line([0; 64]); len.div_ceil(64)];
        }
        self.len = len;
        self.as_mut_slice()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `Line` is a plain 64-byte array with no padding, the vector holds at least
        // `len` bytes of initialised memory, and the borrow of `self` keeps it alive.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<u8>(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and the exclusive borrow of `self` makes the slice unique.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        AlignedBuf {
            lines: self.lines.clone(),
            len: self.len,
        }
    }
}
