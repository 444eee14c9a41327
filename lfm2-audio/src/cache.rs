//! Per-position caches: preallocated buffers that grow by doubling and truncate by length.
//!
//! Attention keys and values, and the short-convolution inputs, are all indexed by position, so
//! one type serves them all. Truncating to `p` positions only changes the length: what stays is
//! exactly what was computed for those positions.
//!
//! The values live in a plain `Vec<f32>` laid out `[outer, capacity, inner]` (the dimensions
//! before the position axis, the positions, the dimensions after it), so that the decode step
//! appends one position and reads a head's positions as one slice without any tensor; the
//! batched paths get tensors through [`PositionCache::append`] and [`PositionCache::range`].

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::ops::with_f32_slice;

/// A buffer of per-position rows (shape `shape`, positions along `axis`) with room to grow.
#[derive(Debug, Clone)]
pub struct PositionCache {
    data: Vec<f32>,
    /// Shape of the held positions; `shape[axis]` is not used.
    shape: Vec<usize>,
    axis: usize,
    /// Product of the dimensions before the position axis.
    outer: usize,
    /// Product of the dimensions after it: values per position per outer index.
    inner: usize,
    capacity: usize,
    /// Positions held, starting at `base`.
    len: usize,
    /// Absolute position of the first row held (positions before it were forgotten).
    base: usize,
}

impl PositionCache {
    /// An empty cache of per-position rows shaped `shape` with the position axis at `axis`
    /// (the size given there is ignored), with room for `capacity` positions.
    pub fn new(shape: &[usize], axis: usize, capacity: usize) -> Result<Self> {
        if axis >= shape.len() {
            return Err(Error::Invalid(format!(
                "position axis {axis} of a {}-dimensional cache",
                shape.len()
            )));
        }
        let outer = shape[..axis].iter().product::<usize>();
        let inner = shape[axis + 1..].iter().product::<usize>();
        let capacity = capacity.max(1);
        Ok(Self {
            data: vec![0.0; outer * capacity * inner],
            shape: shape.to_vec(),
            axis,
            outer,
            inner,
            capacity,
            len: 0,
            base: 0,
        })
    }

    /// Positions seen (the end position; forgotten ones included).
    pub fn len(&self) -> usize {
        self.base + self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first position still held.
    pub fn first(&self) -> usize {
        self.base
    }

    /// Values of one position for one outer index (`head_dim` for keys, `hidden` for conv rows).
    pub fn inner(&self) -> usize {
        self.inner
    }

    /// Drops the positions before `pos` (they can no longer be read), keeping the numbering.
    /// Bounds the memory of a stream that only ever looks back a fixed distance.
    pub fn forget_before(&mut self, pos: usize) -> Result<()> {
        let drop = pos.saturating_sub(self.base).min(self.len);
        if drop == 0 {
            return Ok(());
        }
        let keep = self.len - drop;
        for o in 0..self.outer {
            let row = o * self.capacity * self.inner;
            self.data
                .copy_within(row + drop * self.inner..row + self.len * self.inner, row);
        }
        self.base += drop;
        self.len = keep;
        Ok(())
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Makes room for `needed` held positions, doubling the capacity.
    fn reserve(&mut self, needed: usize) {
        if needed <= self.capacity {
            return;
        }
        let cap = needed.max(2 * self.capacity);
        let mut grown = vec![0f32; self.outer * cap * self.inner];
        let n = self.len * self.inner;
        for o in 0..self.outer {
            let (from, to) = (o * self.capacity * self.inner, o * cap * self.inner);
            grown[to..to + n].copy_from_slice(&self.data[from..from + n]);
        }
        self.data = grown;
        self.capacity = cap;
    }

    /// Appends the positions of `rows` (same shape except along the position axis).
    pub fn append(&mut self, rows: &Tensor) -> Result<()> {
        let dims = rows.dims();
        let same = dims.len() == self.shape.len()
            && dims
                .iter()
                .zip(&self.shape)
                .enumerate()
                .all(|(i, (a, b))| i == self.axis || a == b);
        if !same {
            return Err(Error::Invalid(format!(
                "cannot append rows of shape {dims:?} to a cache of shape {:?} (positions on axis {})",
                self.shape, self.axis
            )));
        }
        let n = dims[self.axis];
        self.reserve(self.len + n);
        let rows = rows.contiguous()?;
        with_f32_slice(&rows, |src| {
            let m = n * self.inner;
            for o in 0..self.outer {
                let at = (o * self.capacity + self.len) * self.inner;
                self.data[at..at + m].copy_from_slice(&src[o * m..(o + 1) * m]);
            }
            Ok(())
        })?;
        self.len += n;
        Ok(())
    }

    /// Appends one position given as `[outer, inner]` values.
    pub fn push(&mut self, row: &[f32]) -> Result<()> {
        if row.len() != self.outer * self.inner {
            return Err(Error::Invalid(format!(
                "a position of {} values for a cache of {} per position",
                row.len(),
                self.outer * self.inner
            )));
        }
        self.reserve(self.len + 1);
        for (o, part) in row.chunks_exact(self.inner).enumerate() {
            let at = (o * self.capacity + self.len) * self.inner;
            self.data[at..at + self.inner].copy_from_slice(part);
        }
        self.len += 1;
        Ok(())
    }

    /// Positions `start..start + n` of outer index `o` as one slice of `n · inner` values
    /// (absolute positions; they must still be held).
    pub fn rows(&self, o: usize, start: usize, n: usize) -> Result<&[f32]> {
        self.check(start, n)?;
        let at = (o * self.capacity + start - self.base) * self.inner;
        Ok(&self.data[at..at + n * self.inner])
    }

    fn check(&self, start: usize, n: usize) -> Result<()> {
        if start < self.base || start + n > self.len() {
            return Err(Error::Invalid(format!(
                "positions {start}..{} are not held (held: {}..{})",
                start + n,
                self.base,
                self.len()
            )));
        }
        Ok(())
    }

    /// The positions held (`first()..len()`), as a new tensor.
    pub fn view(&self) -> Result<Tensor> {
        self.range(self.base, self.len)
    }

    /// Positions `start..start + n` (absolute; they must still be held), as a new tensor.
    pub fn range(&self, start: usize, n: usize) -> Result<Tensor> {
        self.check(start, n)?;
        let mut out = Vec::with_capacity(self.outer * n * self.inner);
        for o in 0..self.outer {
            out.extend_from_slice(self.rows(o, start, n)?);
        }
        let mut dims = self.shape.clone();
        dims[self.axis] = n;
        Ok(Tensor::from_vec(out, dims, &Device::Cpu)?)
    }

    /// Keeps the positions before `len` (no-op if there are fewer). Forgotten positions cannot
    /// come back: truncating before the first one held empties the cache and restarts it at 0.
    pub fn truncate(&mut self, len: usize) {
        self.len = len.saturating_sub(self.base).min(self.len);
        if len < self.base {
            // Nothing before `base` can be restored; an empty cache restarts the numbering.
            self.base = 0;
            self.len = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_keeps_order_and_truncates() -> Result<()> {
        let mut c = PositionCache::new(&[2, 0, 3], 1, 1)?;
        for i in 0..5 {
            let v = (0..6).map(|j| (i * 10 + j) as f32).collect::<Vec<_>>();
            c.append(&Tensor::from_vec(v, (2, 1, 3), &Device::Cpu)?)?;
        }
        assert_eq!(c.len(), 5);
        assert!(c.capacity() >= 5);
        let v = c.view()?.to_vec3::<f32>()?;
        // Head 0, position 3 holds the first three values appended at step 3.
        assert_eq!(v[0][3], vec![30.0, 31.0, 32.0]);
        assert_eq!(v[1][4], vec![43.0, 44.0, 45.0]);
        c.truncate(2);
        assert_eq!(c.view()?.dims(), &[2, 2, 3]);
        c.append(&Tensor::full(7f32, (2, 2, 3), &Device::Cpu)?)?;
        let v = c.view()?.to_vec3::<f32>()?;
        assert_eq!(v[0][1], vec![10.0, 11.0, 12.0]);
        assert_eq!(v[1][3], vec![7.0, 7.0, 7.0]);
        Ok(())
    }

    #[test]
    fn single_positions_land_where_tensors_do() -> Result<()> {
        // Keys are [heads, positions, dim]: one pushed position is one row in each head.
        let mut pushed = PositionCache::new(&[2, 0, 3], 1, 1)?;
        let mut appended = PositionCache::new(&[2, 0, 3], 1, 1)?;
        for i in 0..5 {
            let v: Vec<f32> = (0..6).map(|j| (i * 10 + j) as f32).collect();
            pushed.push(&v)?;
            appended.append(&Tensor::from_vec(v, (2, 1, 3), &Device::Cpu)?)?;
        }
        assert_eq!(
            pushed.view()?.to_vec3::<f32>()?,
            appended.view()?.to_vec3::<f32>()?
        );
        // Head 1, positions 3..5: the last three values of steps 3 and 4.
        assert_eq!(pushed.rows(1, 3, 2)?, &[33.0, 34.0, 35.0, 43.0, 44.0, 45.0]);
        pushed.forget_before(4)?;
        assert_eq!(pushed.rows(0, 4, 1)?, &[40.0, 41.0, 42.0]);
        assert!(pushed.rows(0, 3, 1).is_err());
        assert!(pushed.push(&[0.0; 5]).is_err());
        Ok(())
    }

    #[test]
    fn forgetting_works_on_any_axis() -> Result<()> {
        // Keys and values are [heads, positions, dim]: the position axis is not the first.
        let mut c = PositionCache::new(&[2, 0, 3], 1, 2)?;
        for i in 0..5 {
            c.append(&Tensor::full(i as f32, (2, 1, 3), &Device::Cpu)?)?;
        }
        c.forget_before(3)?;
        assert_eq!(
            c.range(3, 2)?.to_vec3::<f32>()?[1],
            vec![vec![3.0; 3], vec![4.0; 3]]
        );
        c.append(&Tensor::full(5f32, (2, 1, 3), &Device::Cpu)?)?;
        assert_eq!(c.range(5, 1)?.to_vec3::<f32>()?[0], vec![vec![5.0; 3]]);
        Ok(())
    }

    #[test]
    fn forgetting_keeps_the_numbering() -> Result<()> {
        let mut c = PositionCache::new(&[0, 2], 0, 4)?;
        for i in 0..6 {
            c.append(&Tensor::full(i as f32, (1, 2), &Device::Cpu)?)?;
        }
        c.forget_before(4)?;
        assert_eq!((c.first(), c.len()), (4, 6));
        assert_eq!(
            c.range(4, 2)?.to_vec2::<f32>()?,
            vec![vec![4.0, 4.0], vec![5.0, 5.0]]
        );
        assert!(c.range(3, 1).is_err());
        c.append(&Tensor::full(6f32, (1, 2), &Device::Cpu)?)?;
        assert_eq!(c.range(6, 1)?.to_vec2::<f32>()?, vec![vec![6.0, 6.0]]);
        c.truncate(0);
        assert_eq!(c.len(), 0);
        Ok(())
    }
}
