//! Portable kernels: the reference for the SIMD paths and the fallback on CPUs without them.

use super::{put_act_block, zero_act_lanes, ActView, OutView, WeightView};
use crate::quant::layout::{tile_offset, ACT_BIAS, ACT_D, ACT_GROUP, BLOCK, GROUP, GROUP_BLOCKS};

pub(super) fn quantize_act(x: &[f32], mult: i32, out: &mut [u8]) {
    for (g, group) in out.chunks_exact_mut(ACT_GROUP).enumerate() {
        let start = g * GROUP;
        if start >= x.len() {
            zero_act_lanes(group, 0);
            continue;
        }
        let vals = &x[start..x.len().min(start + GROUP)];
        let mut lanes = 0;
        for (i, block) in vals.chunks_exact(BLOCK).enumerate() {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut q = [0u8; BLOCK];
            let mut sum = 0i32;
            for (q, &v) in q.iter_mut().zip(block) {
                let v = (v * id).round_ties_even() as i8;
                sum += v as i32;
                *q = v as u8;
            }
            put_act_block(group, i, &q, d, -mult * sum);
            lanes = i + 1;
        }
        zero_act_lanes(group, lanes);
    }
}

fn read_f32(b: &[u8], o: usize) -> f32 {
    f32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn read_i32(b: &[u8], o: usize) -> i32 {
    i32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// The dot product of one row with one quantized token.
///
/// # Safety
/// `w` must have at least `r + 1` rows and `x` at least `j + 1` tokens of `w.groups` groups.
unsafe fn dot(w: &WeightView, x: &ActView, r: usize, j: usize) -> f32 {
    let gq = if w.q4 { GROUP / 2 } else { GROUP };
    // SAFETY: per this function's contract, the token lies inside a live buffer.
    let xa = unsafe { std::slice::from_raw_parts(x.ptr.add(j * x.stride), w.groups * ACT_GROUP) };
    let mut acc = 0f32;
    for g in 0..w.groups {
        // SAFETY: group g of row r lies inside the matrix (its tile is stored whole).
        let (wg, ws) = unsafe {
            (
                std::slice::from_raw_parts(w.quants.add(tile_offset(r, g, w.row_bytes, gq)), gq),
                std::slice::from_raw_parts(
                    w.scales.add(tile_offset(r, g, w.row_scales, GROUP_BLOCKS)),
                    GROUP_BLOCKS,
                ),
            )
        };
        let xg = &xa[g * ACT_GROUP..(g + 1) * ACT_GROUP];
        for i in 0..GROUP_BLOCKS {
            let mut s = read_i32(xg, ACT_BIAS + 4 * i);
            for k in 0..8 {
                for b in 0..4 {
                    let xq = xg[k * 64 + i * 4 + b] as i8 as i32;
                    let wq = if w.q4 {
                        let byte = wg[(k % 4) * 64 + i * 4 + b];
                        if k < 4 {
                            byte & 0x0F
                        } else {
                            byte >> 4
                        }
                    } else {
                        wg[k * 64 + i * 4 + b]
                    };
                    s += wq as i32 * xq;
                }
            }
            let scale = ws[i].to_f32() * read_f32(xg, ACT_D + 4 * i);
            acc += s as f32 * scale;
        }
    }
    acc
}

/// # Safety
/// See `kernels::compute`.
pub(super) unsafe fn compute(
    w: &WeightView,
    x: &ActView,
    t: usize,
    r0: usize,
    r1: usize,
    y: OutView,
) {
    for j in 0..t {
        for r in r0..r1 {
            // SAFETY: forwarded from `kernels::compute`: the row and token exist and this thread
            // owns row `r` of the output.
            unsafe { *y.ptr.add(j * y.stride + r) = dot(w, x, r, j) };
        }
    }
}
