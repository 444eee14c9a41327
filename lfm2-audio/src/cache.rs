//! Per-position caches: preallocated tensors that grow by doubling and truncate by length.
//!
//! Attention keys and values, and the short-convolution inputs, are all indexed by position, so
//! one type serves them all. Truncating to `p` positions only changes the length: what stays is
//! exactly what was computed for those positions.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// A tensor whose axis `axis` is indexed by position, with room to grow.
#[derive(Debug, Clone)]
pub struct PositionCache {
    data: Tensor,
    axis: usize,
    /// Positions held, starting at `base`.
    len: usize,
    /// Absolute position of the first row held (positions before it were forgotten).
    base: usize,
}

impl PositionCache {
    /// An empty cache of per-position rows shaped `shape` with the position axis at `axis`
    /// (the size given there is ignored), with room for `capacity` positions.
    pub fn new(shape: &[usize], axis: usize, capacity: usize) -> Result<Self> {
        let mut dims = shape.to_vec();
        dims[axis] = capacity.max(1);
        let data = Tensor::zeros(dims, DType::F32, &Device::Cpu)?;
        Ok(Self {
            data,
            axis,
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

    /// Drops the positions before `pos` (they can no longer be read), keeping the numbering.
    /// Bounds the memory of a stream that only ever looks back a fixed distance.
    pub fn forget_before(&mut self, pos: usize) -> Result<()> {
        let drop = pos.saturating_sub(self.base).min(self.len);
        if drop == 0 {
            return Ok(());
        }
        let keep = self.len - drop;
        if keep > 0 {
            // A fresh contiguous buffer: slice_set refuses a strided source, and one that shares
            // the destination's storage (a contiguous slice is only a view).
            let rest = self.data.narrow(self.axis, drop, keep)?;
            let rest = if rest.is_contiguous() {
                rest.copy()?
            } else {
                rest.contiguous()?
            };
            self.data.slice_set(&rest, self.axis, 0)?;
        }
        self.base += drop;
        self.len = keep;
        Ok(())
    }

    pub fn capacity(&self) -> usize {
        self.data.dim(self.axis).unwrap_or(0)
    }

    /// Appends the positions of `rows` (same shape except along the position axis).
    pub fn append(&mut self, rows: &Tensor) -> Result<()> {
        let n = rows.dim(self.axis)?;
        let needed = self.len + n;
        if needed > self.capacity() {
            let new_cap = needed.max(2 * self.capacity());
            let mut dims = self.data.dims().to_vec();
            dims[self.axis] = new_cap;
            let grown = Tensor::zeros(dims, DType::F32, &Device::Cpu)?;
            if self.len > 0 {
                grown.slice_set(
                    &self.data.narrow(self.axis, 0, self.len)?.contiguous()?,
                    self.axis,
                    0,
                )?;
            }
            self.data = grown;
        }
        let rows = rows.contiguous()?;
        self.data.slice_set(&rows, self.axis, self.len)?;
        self.len = needed;
        Ok(())
    }

    /// The positions held (`first()..len()`).
    pub fn view(&self) -> Result<Tensor> {
        Ok(self.data.narrow(self.axis, 0, self.len)?)
    }

    /// Positions `start..start + n` (absolute; they must still be held).
    pub fn range(&self, start: usize, n: usize) -> Result<Tensor> {
        if start < self.base || start + n > self.len() {
            return Err(crate::error::Error::Invalid(format!(
                "positions {start}..{} are not held (held: {}..{})",
                start + n,
                self.base,
                self.len()
            )));
        }
        Ok(self.data.narrow(self.axis, start - self.base, n)?)
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
