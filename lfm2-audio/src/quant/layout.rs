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

/// Buffers at least this large get a mapping of their own, backed by 2 MiB pages where the
/// system gives them (Linux transparent huge pages, asked for with `MADV_HUGEPAGE` before the
/// first write). A decode step reads hundreds of MB of weights once each: with 4 KiB pages the
/// core walks the page tables every 64 cache lines, a walk that is dearer still in a virtual
/// machine. On a Zen 4 guest the 4-bit text step ran 16 % faster (alternating runs), the 8-bit
/// one the same (docs/PERFORMANCE.md, "Weights in huge pages").
pub const MAPPED_MIN: usize = HUGE_PAGE;
/// The size of a transparent huge page on x86-64 and most 64-bit Arm kernels.
const HUGE_PAGE: usize = 2 << 20;

enum Storage {
    Heap(Vec<Line>),
    /// An anonymous mapping (zero-filled by the kernel); the buffer starts `offset` bytes into
    /// it, on a huge-page boundary.
    Mapped {
        map: memmap2::MmapMut,
        offset: usize,
    },
}

/// A zero-initialised byte buffer whose start is 64-byte aligned, so that every group and every
/// activation token starts on a cache line and vector loads never split one. Large buffers
/// (weights) are mapped in huge pages where the system allows ([`MAPPED_MIN`]).
pub struct AlignedBuf {
    storage: Storage,
    len: usize,
}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> Self {
        if len >= MAPPED_MIN {
            if let Some(storage) = Self::map(len) {
                return AlignedBuf { storage, len };
            }
        }
        AlignedBuf {
            storage: Storage::Heap(vec![Line([0; 64]); len.div_ceil(64)]),
            len,
        }
    }

    /// An anonymous mapping for `len` bytes starting on a huge-page boundary, its whole huge
    /// pages advised as such before anything touches them (advised later, the kernel would keep
    /// the 4 KiB pages already faulted in). The partial page at the end is left to small pages,
    /// so no buffer holds more memory than its length rounds up to. None if mapping fails.
    fn map(len: usize) -> Option<Storage> {
        let map = memmap2::MmapOptions::new()
            .len(len.checked_add(HUGE_PAGE)?)
            .map_anon()
            .ok()?;
        let offset = (HUGE_PAGE - map.as_ptr() as usize % HUGE_PAGE) % HUGE_PAGE;
        // Only a hint: where transparent huge pages are off, the buffer has small pages.
        #[cfg(target_os = "linux")]
        let _ = map.advise_range(
            memmap2::Advice::HugePage,
            offset,
            len / HUGE_PAGE * HUGE_PAGE,
        );
        Some(Storage::Mapped { map, offset })
    }

    fn capacity(&self) -> usize {
        match &self.storage {
            Storage::Heap(lines) => lines.len() * 64,
            Storage::Mapped { map, offset } => map.len() - offset,
        }
    }

    /// Makes the buffer at least `len` bytes long, reallocating only when it has to grow, and
    /// returns it as a slice of exactly `len` bytes. Contents are unspecified afterwards.
    pub fn ensure(&mut self, len: usize) -> &mut [u8] {
        if self.capacity() < len {
            *self = Self::zeroed(len);
        }
        self.len = len;
        self.as_mut_slice()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn as_slice(&self) -> &[u8] {
        match &self.storage {
            // SAFETY: `Line` is a plain 64-byte array with no padding, the vector holds at
            // least `len` bytes of initialised memory, and the borrow of `self` keeps it alive.
            Storage::Heap(lines) => unsafe {
                std::slice::from_raw_parts(lines.as_ptr().cast::<u8>(), self.len)
            },
            Storage::Mapped { map, offset } => &map[*offset..*offset + self.len],
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.storage {
            // SAFETY: as in `as_slice`, and the exclusive borrow of `self` makes the slice
            // unique.
            Storage::Heap(lines) => unsafe {
                std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast::<u8>(), self.len)
            },
            Storage::Mapped { map, offset } => &mut map[*offset..*offset + self.len],
        }
    }

    /// Whether the buffer has a mapping of its own (see [`MAPPED_MIN`]).
    #[cfg(test)]
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped { .. })
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        let mut copy = AlignedBuf::zeroed(self.len);
        copy.as_mut_slice().copy_from_slice(self.as_slice());
        copy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_buffers_live_on_the_heap_and_large_ones_in_a_mapping_of_their_own() {
        let small = AlignedBuf::zeroed(MAPPED_MIN - 1);
        assert!(!small.is_mapped());
        assert_eq!(small.as_slice().as_ptr() as usize % 64, 0);

        // Three whole huge pages and a bit: the buffer starts on a huge-page boundary.
        let len = 3 * HUGE_PAGE + 4096 + 100;
        let mut big = AlignedBuf::zeroed(len);
        assert!(big.is_mapped());
        assert_eq!(big.len(), len);
        assert_eq!(big.as_slice().len(), len);
        assert_eq!(big.as_slice().as_ptr() as usize % HUGE_PAGE, 0);
        assert!(big.as_slice().iter().all(|&b| b == 0), "zeroed");
        for (i, b) in big.as_mut_slice().iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let copy = big.clone();
        assert!(copy.is_mapped());
        assert_eq!(copy.as_slice(), big.as_slice());

        // Growing past the capacity reallocates; shrinking keeps the storage.
        let mut act = AlignedBuf::zeroed(0);
        assert_eq!(act.ensure(100).len(), 100);
        assert!(!act.is_mapped());
        assert_eq!(act.ensure(len).len(), len);
        assert!(act.is_mapped());
        let at = act.as_slice().as_ptr();
        assert_eq!(act.ensure(10).len(), 10);
        assert_eq!(act.as_slice().as_ptr(), at);
    }
}
