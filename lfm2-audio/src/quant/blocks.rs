//! GGML's block codecs for Q8_0 and Q4_0, one block of 32 values at a time.
//!
//! These follow `quantize_row_q8_0_ref` / `quantize_row_q4_0_ref` of ggml-quants.c operation for
//! operation (same amax scan, same `1/d` reciprocal, same rounding), so a row quantized here is
//! byte-identical to the one llama.cpp writes into a GGUF file.

use half::f16;

/// Values per block (`QK8_0` = `QK4_0` = 32).
pub const BLOCK: usize = 32;

/// One Q8_0 block: `value = d * q`, `d = amax / 127`, `q = round(x / d)` (half away from zero).
pub(crate) fn quantize_q8_0(x: &[f32; BLOCK]) -> (f16, [i8; BLOCK]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i8; BLOCK];
    for (q, &v) in q.iter_mut().zip(x) {
        // `roundf` in C rounds halves away from zero, as `f32::round` does; the cast saturates.
        *q = (v * id).round() as i8;
    }
    (f16::from_f32(d), q)
}

/// One Q4_0 block: `value = d * (q - 8)`, `d = max / -8` where `max` is the element of largest
/// magnitude with its sign (the first one on ties). Returns GGML's 16 packed bytes: byte `j` holds
/// element `j` in its low nibble and element `j + 16` in its high nibble.
pub(crate) fn quantize_q4_0(x: &[f32; BLOCK]) -> (f16, [u8; BLOCK / 2]) {
    let mut amax = 0f32;
    let mut max = 0f32;
    for &v in x {
        // Strict `<` keeps the first element of largest magnitude, like the reference.
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let nib = |v: f32| -> u8 {
        // The reference truncates `x/d + 8.5` towards zero (an `(int8_t)` cast), which is
        // round-half-up for the non-negative values that occur, then clamps to 15.
        ((v * id + 8.5) as i8).clamp(0, 15) as u8
    };
    let mut qs = [0u8; BLOCK / 2];
    for (j, b) in qs.iter_mut().enumerate() {
        *b = nib(x[j]) | (nib(x[j + BLOCK / 2]) << 4);
    }
    (f16::from_f32(d), qs)
}
