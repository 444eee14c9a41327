//! Splitting a long recording into clips the encoder takes whole, at silences, with bounded
//! memory: samples accumulate up to `max_len`; then the clip is cut at the quietest 100 ms in its
//! last `search` samples, and the rest starts the next clip.

/// Splits a stream of samples into clips.
#[derive(Debug, Clone)]
pub struct Segmenter {
    max_len: usize,
    search: usize,
    frame: usize,
    buf: Vec<f32>,
    /// Absolute index of `buf[0]` in the stream.
    start: u64,
}

/// One clip and where it starts in the stream (in samples).
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub start: u64,
    pub samples: Vec<f32>,
}

impl Segmenter {
    /// Clips of at most `max_len` samples, cut in the last `search` samples at the quietest
    /// `frame`-sample window. `search` and `frame` are clamped to sensible sizes.
    pub fn new(max_len: usize, search: usize, frame: usize) -> Self {
        let max_len = max_len.max(2);
        let search = search.clamp(1, max_len - 1);
        let frame = frame.clamp(1, search);
        Self {
            max_len,
            search,
            frame,
            buf: Vec::with_capacity(max_len),
            start: 0,
        }
    }

    /// 16 kHz clips of at most 30 s, cut at the quietest 100 ms of their last 10 s.
    pub fn for_speech_16k() -> Self {
        Self::new(30 * 16_000, 10 * 16_000, 1_600)
    }

    /// Adds samples; returns the clips that are complete.
    pub fn push(&mut self, mut samples: &[f32]) -> Vec<Segment> {
        let mut out = Vec::new();
        while !samples.is_empty() {
            let room = self.max_len - self.buf.len();
            let take = room.min(samples.len());
            self.buf.extend_from_slice(&samples[..take]);
            samples = &samples[take..];
            if self.buf.len() == self.max_len {
                let cut = self.quietest_cut();
                let rest = self.buf.split_off(cut);
                let clip = std::mem::replace(&mut self.buf, rest);
                out.push(Segment {
                    start: self.start,
                    samples: clip,
                });
                self.start += cut as u64;
            }
        }
        out
    }

    /// Ends the stream: the remaining samples, if any.
    pub fn finish(&mut self) -> Option<Segment> {
        if self.buf.is_empty() {
            return None;
        }
        let clip = std::mem::take(&mut self.buf);
        let seg = Segment {
            start: self.start,
            samples: clip,
        };
        self.start += seg.samples.len() as u64;
        Some(seg)
    }

    /// Cut position: the middle of the frame with the least energy among the last `search`
    /// samples (the latest on ties, to keep clips long).
    fn quietest_cut(&self) -> usize {
        let from = self.max_len - self.search;
        let mut best = (f64::INFINITY, self.max_len);
        let mut pos = from;
        while pos + self.frame <= self.max_len {
            let energy: f64 = self.buf[pos..pos + self.frame]
                .iter()
                .map(|&x| (x as f64) * (x as f64))
                .sum();
            if energy <= best.0 {
                best = (energy, pos + self.frame / 2);
            }
            pos += self.frame / 2;
        }
        best.1.clamp(1, self.max_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_at_the_silence_and_loses_nothing() {
        // 3 "words" of noise-like tone with a silent gap at 2500..2800.
        let mut x: Vec<f32> = (0..6000)
            .map(|i| ((i * 37 % 101) as f32 / 101.0 - 0.5) * 0.8)
            .collect();
        x[2500..2800].iter_mut().for_each(|s| *s = 0.0);
        let mut seg = Segmenter::new(3000, 1000, 100);
        let mut clips = Vec::new();
        for chunk in x.chunks(777) {
            clips.extend(seg.push(chunk));
        }
        clips.extend(seg.finish());
        assert!(
            clips[0].samples.len() > 2500 && clips[0].samples.len() <= 2800,
            "{}",
            clips[0].samples.len()
        );
        let joined: Vec<f32> = clips.iter().flat_map(|c| c.samples.clone()).collect();
        assert_eq!(joined, x);
        let mut at = 0;
        for c in &clips {
            assert_eq!(c.start, at);
            assert!(c.samples.len() <= 3000);
            at += c.samples.len() as u64;
        }
    }

    #[test]
    fn short_input_is_one_clip() {
        let mut seg = Segmenter::for_speech_16k();
        assert!(seg.push(&[0.1; 1000]).is_empty());
        assert_eq!(seg.finish().unwrap().samples.len(), 1000);
        assert!(seg.finish().is_none());
    }
}
