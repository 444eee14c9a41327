//! Fused products of one input with several quantized matrices (`QMatrix::matvec_many`, used by
//! the decode step for q/k/v and the feed-forward's two input maps), and the memory roofline.

use lfm2_audio::quant::{read_bandwidth, Format, Kernel, QMatrix, Reread, Threads};

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            ((s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

#[test]
fn matvec_many_equals_separate_products() {
    for kernel in Kernel::supported() {
        for n in [1, 2, 3] {
            let pool = Threads::with_kernel(n, kernel).unwrap();
            for format in [Format::Q8_0, Format::Q4_0] {
                // Large enough to be split over the pool, rows not multiples of the tiles.
                let shapes = [(1030, 1056), (258, 1056), (7, 1056)];
                let ms: Vec<QMatrix> = shapes
                    .iter()
                    .enumerate()
                    .map(|(i, &(r, c))| {
                        QMatrix::quantize(&values(r * c, i as u64 + 1), r, c, format).unwrap()
                    })
                    .collect();
                let x = values(1056, 99);
                let mut want: Vec<Vec<f32>> = Vec::new();
                for m in &ms {
                    let mut y = vec![0f32; m.rows()];
                    m.matvec(&x, &mut y, &pool).unwrap();
                    want.push(y);
                }
                let mut got: Vec<Vec<f32>> = ms.iter().map(|m| vec![f32::NAN; m.rows()]).collect();
                let refs: Vec<&QMatrix> = ms.iter().collect();
                let mut outs: Vec<&mut [f32]> = got.iter_mut().map(|v| v.as_mut_slice()).collect();
                QMatrix::matvec_many(&refs, &x, &mut outs, &pool).unwrap();
                // The same kernel sums the same blocks in the same order: identical results.
                assert_eq!(got, want, "{kernel} {format} with {n} threads");
            }
        }
    }
}

/// The pool hands out runs of tiles, a share of what is left each time, bounded by a least and
/// a most number of bytes, never past a matrix's end, over at most 8 matrices a job: every row
/// of every matrix must be computed exactly once, whatever the split (checked against the same
/// kernel on one thread, which runs each product whole).
#[test]
fn split_products_equal_whole_ones() {
    for kernel in Kernel::supported() {
        let one = Threads::with_kernel(1, kernel).unwrap();
        for n in [2, 3] {
            let pool = Threads::with_kernel(n, kernel).unwrap();
            for format in [Format::Q8_0, Format::Q4_0] {
                // Ten matrices (two jobs), one of 4.3 MB at Q8_0 (more than the largest claim),
                // odd row counts, one matrix smaller than a tile.
                let shapes = [4100, 3, 517, 64, 1029, 5, 900, 260, 33, 2050];
                let cols = 1024;
                let ms: Vec<QMatrix> = shapes
                    .iter()
                    .enumerate()
                    .map(|(i, &r)| {
                        QMatrix::quantize(&values(r * cols, 40 + i as u64), r, cols, format)
                            .unwrap()
                    })
                    .collect();
                let x = values(cols, 7);
                let refs: Vec<&QMatrix> = ms.iter().collect();
                let run = |pool: &Threads| {
                    let mut got: Vec<Vec<f32>> =
                        ms.iter().map(|m| vec![f32::NAN; m.rows()]).collect();
                    let mut outs: Vec<&mut [f32]> =
                        got.iter_mut().map(|v| v.as_mut_slice()).collect();
                    QMatrix::matvec_many(&refs, &x, &mut outs, pool).unwrap();
                    got
                };
                let want = run(&one);
                assert!(want.iter().flatten().all(|v| v.is_finite()));
                assert_eq!(run(&pool), want, "{kernel} {format} with {n} threads");
                for (m, want) in ms.iter().zip(&want) {
                    let mut y = vec![f32::NAN; m.rows()];
                    m.matvec(&x, &mut y, &pool).unwrap();
                    assert_eq!(&y, want, "{kernel} {format}, {} rows alone", m.rows());
                }
            }
        }
    }
}

/// A matrix marked as read again soon prefetches further ahead (on the AVX-512 kernel); the
/// products it gives, alone or fused, one thread or two, stay those of the unmarked matrix.
#[test]
fn reread_hint_keeps_the_products() {
    for kernel in Kernel::supported() {
        for n in [1, 2] {
            let pool = Threads::with_kernel(n, kernel).unwrap();
            for format in [Format::Q4_0, Format::Q8_0] {
                // Rows past several prefetch distances and not a multiple of the tiles.
                let (r, c) = (1027, 2816);
                let once = QMatrix::quantize(&values(r * c, 5), r, c, format).unwrap();
                let mut often = once.clone();
                often.set_reread(Reread::Often);
                assert_eq!(often.reread(), Reread::Often);
                let other = QMatrix::quantize(&values(64 * c, 6), 64, c, format).unwrap();
                let x = values(c, 7);
                let mut want = vec![0f32; r];
                once.matvec(&x, &mut want, &pool).unwrap();
                let mut got = vec![f32::NAN; r];
                often.matvec(&x, &mut got, &pool).unwrap();
                assert_eq!(got, want, "{kernel:?} {n} threads {format:?}");
                let (mut fused, mut side) = (vec![f32::NAN; r], vec![f32::NAN; 64]);
                QMatrix::matvec_many(&[&often, &other], &x, &mut [&mut fused, &mut side], &pool)
                    .unwrap();
                assert_eq!(fused, want, "{kernel:?} {n} threads {format:?}, fused");
            }
        }
    }
}

#[test]
fn matvec_many_rejects_mixed_shapes() {
    let pool = Threads::new(2).unwrap();
    let a = QMatrix::quantize(&values(64 * 64, 1), 64, 64, Format::Q8_0).unwrap();
    let b = QMatrix::quantize(&values(64 * 128, 2), 64, 128, Format::Q8_0).unwrap();
    let c = QMatrix::quantize(&values(64 * 64, 3), 64, 64, Format::Q4_0).unwrap();
    let x = values(64, 4);
    let (mut y1, mut y2) = (vec![0f32; 64], vec![0f32; 64]);
    for pair in [[&a, &b], [&a, &c]] {
        let err = QMatrix::matvec_many(&pair, &x, &mut [&mut y1, &mut y2], &pool);
        assert!(err.is_err());
    }
    // Wrong output length, wrong number of outputs.
    assert!(QMatrix::matvec_many(&[&a], &x, &mut [&mut y1[..3]], &pool).is_err());
    assert!(QMatrix::matvec_many(&[&a, &a], &x, &mut [&mut y1], &pool).is_err());
    assert!(QMatrix::matvec_many(&[], &x, &mut [], &pool).is_ok());
}

#[test]
fn read_bandwidth_is_measured() {
    let pool = Threads::new(2).unwrap();
    let gbs = read_bandwidth(&pool, 8 << 20, 2);
    assert!(gbs.is_finite() && gbs > 0.1, "{gbs} GB/s");
}
