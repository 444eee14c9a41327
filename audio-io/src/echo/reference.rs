//! What the speaker played, on a timeline the microphone side can read.
//!
//! The playback side pushes the audio it hands to [`crate::Playback::write`] together with the
//! playback's `played()` counter. The timeline resamples it to 16 kHz and places every sample
//! at the wall-clock time the playback callback consumed it, counted in 16 kHz samples since the
//! reference was created (its "wall index"). The capture side then asks for the reference over
//! any wall-index range; what was never played reads as silence.
//!
//! Placing samples: `played()` only moves while audio plays, so the samples of one continuous
//! stretch of playing ("segment") follow each other at the nominal rate. A segment starts when
//! audio is pushed while the playback has played everything pushed before (it was idle or ran
//! dry); its first sample is then consumed at the next device period, so it is anchored at the
//! time of that push. Later pushes check the anchor against the counter: if the counter says the
//! playback fell more than [`STALL`] behind (an underrun inserted silence), the rest is
//! re-anchored. The anchor is only good to about a device period (10-20 ms); the canceller
//! measures the exact delay by cross-correlation, once per segment, and the segment count
//! ([`EchoReference::generation`]) tells it when to.
//!
//! Locking: a short mutex, taken by the thread that writes the playback and by the capture pump,
//! never by a device callback.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use lfm2_audio::format::INPUT_SAMPLE_RATE;

use crate::{AudioError, StreamResampler};

/// The playback stalled when one reading of its counter is this many 16 kHz samples (60 ms)
/// behind where continuous playing would have brought it: what plays from there on is placed
/// that much later.
const STALL: f64 = 960.0;
/// When [`SHIFT_RUN`] readings in a row (about a second of pushes) are all at least this far
/// (10 ms) behind the best reading so far, the timing is suspect. Readings are late by anything
/// up to a device period, so single readings cannot show small stalls; the least late of a run
/// can. But the counter shows when the playback callback took the samples, not when they were
/// heard: a callback held back by a full buffer downstream is late without any gap in the
/// sound. So a small lateness only starts a new generation (the canceller measures the delay
/// again), without moving the samples.
const SHIFT_MIN: f64 = 160.0;
const SHIFT_RUN: usize = 12;
/// A new segment whose anchor lands within this many samples (5 ms) of where the previous
/// segment's timing puts it is a continuation, not a new segment.
const CONTINUOUS: f64 = 80.0;
/// History kept behind the newest push (4 s).
const KEEP_BEHIND: i64 = 4 * INPUT_SAMPLE_RATE as i64;
/// At most this much reference is kept (60 s), whatever the playback side does.
const MAX_KEPT: usize = 60 * INPUT_SAMPLE_RATE as usize;

/// A stretch of reference samples that play back to back: position `q0` (16 kHz samples since
/// the reference began) plays at wall index `wall0`.
#[derive(Debug, Clone, Copy)]
struct Piece {
    q0: u64,
    wall0: i64,
}

/// The segment being pushed: source position `p0` (the playback's `played()` units) is 16 kHz
/// position `q0`, consumed at wall index `wall0`.
///
/// Timing checks: a reading of the counter at wall index `w` gives the "lateness"
/// `w - (wall0 + samples played since p0)`. The counter moves once per device period, so
/// readings are late by anything up to a period; the least late reading (`floor`) is the
/// segment's true timing, and a run of readings all later than that means the playback
/// stalled (an underrun inserted silence) by at least the least late of them.
#[derive(Debug, Clone, Copy)]
struct Segment {
    p0: u64,
    q0: u64,
    wall0: f64,
    floor: Option<f64>,
    /// Counter at the last reading that was not late.
    good: u64,
    /// Readings in a row that were late, and the least late of them.
    late_run: usize,
    late_min: f64,
}

impl Segment {
    fn new(p0: u64, q0: u64, wall0: f64) -> Self {
        Self {
            p0,
            q0,
            wall0,
            floor: None,
            good: p0,
            late_run: 0,
            late_min: f64::MAX,
        }
    }
}

struct Timeline {
    source_rate: u32,
    resampler: StreamResampler,
    resampled: Vec<f32>,
    /// Source samples pushed, in the playback's `played()` count.
    written: Option<u64>,
    samples: VecDeque<f32>,
    /// Position of `samples[0]`.
    first_q: u64,
    pieces: VecDeque<Piece>,
    segment: Option<Segment>,
    generation: u64,
    /// Times samples were placed anew (a new stretch, a stall): those re-anchorings, unlike
    /// a re-measurement asked for after some lateness, void what the timing said before.
    moves: u64,
    /// 16 kHz samples by which stalls moved what was pushed later than first placed, in all:
    /// for that long the timeline said the speaker was playing while it was not.
    stalled: f64,
}

impl Timeline {
    fn end_q(&self) -> u64 {
        self.first_q + self.samples.len() as u64
    }

    /// 16 kHz samples in `source` source samples.
    fn to_q(&self, source: u64) -> f64 {
        source as f64 * f64::from(INPUT_SAMPLE_RATE) / f64::from(self.source_rate)
    }

    fn append_resampled(&mut self) {
        self.samples.extend(self.resampled.drain(..));
    }

    /// Ends the current segment: the resampler's tail joins it.
    fn close_segment(&mut self) {
        self.resampler.flush(&mut self.resampled);
        self.append_resampled();
        self.segment = None;
    }

    fn start_segment(&mut self, played: u64, wall: f64) {
        self.close_segment();
        let q0 = self.end_q();
        // A writer that keeps the playback just barely fed re-enters here on every push;
        // when the new anchor agrees with the old timing the stretch is simply continued.
        let continued = self.pieces.back().is_some_and(|piece| {
            let predicted = piece.wall0 as f64 + (q0 as f64 - piece.q0 as f64);
            (predicted - wall).abs() < CONTINUOUS
        });
        let wall = if continued {
            let piece = self
                .pieces
                .back()
                .copied()
                .unwrap_or(Piece { q0, wall0: 0 });
            piece.wall0 as f64 + (q0 as f64 - piece.q0 as f64)
        } else {
            self.pieces.push_back(Piece {
                q0,
                wall0: wall.round() as i64,
            });
            self.generation += 1;
            self.moves += 1;
            wall
        };
        self.segment = Some(Segment::new(played, q0, wall));
        self.written = Some(played);
    }

    /// Checks the current segment's timing against the playback counter.
    fn observe(&mut self, played: u64, wall: f64) {
        let Some(mut seg) = self.segment else { return };
        if played <= seg.p0 {
            return;
        }
        let late = wall - (seg.wall0 + self.to_q(played - seg.p0));
        let floor = seg.floor.unwrap_or(0.0);
        if late > floor + STALL {
            // Stalled for a long time: what is played from now on is that much later.
            self.shift(seg, played, late - floor);
            return;
        }
        if late <= floor + SHIFT_MIN {
            seg.floor = Some(seg.floor.map_or(late, |f| f.min(late)));
            seg.good = played;
            seg.late_run = 0;
            seg.late_min = f64::MAX;
        } else {
            seg.late_run += 1;
            seg.late_min = seg.late_min.min(late);
            if seg.late_run >= SHIFT_RUN {
                // The timing moved by some 10 ms or more: have it measured again, and take the
                // new lateness as normal.
                self.generation += 1;
                seg.floor = Some(seg.late_min);
                seg.good = played;
                seg.late_run = 0;
                seg.late_min = f64::MAX;
            }
        }
        self.segment = Some(seg);
    }

    /// From counter value `at` on, the segment plays `by` samples later than it was placed.
    fn shift(&mut self, seg: Segment, at: u64, by: f64) {
        let q = seg.q0 + self.to_q(at - seg.p0).round() as u64;
        let wall = seg.wall0 + self.to_q(at - seg.p0) + by;
        match self.pieces.back_mut() {
            Some(piece) if piece.q0 == q => piece.wall0 = wall.round() as i64,
            _ => self.pieces.push_back(Piece {
                q0: q,
                wall0: wall.round() as i64,
            }),
        }
        self.generation += 1;
        self.moves += 1;
        self.stalled += by.max(0.0);
        self.segment = Some(Segment {
            floor: seg.floor,
            ..Segment::new(at, q, wall)
        });
    }

    fn push(&mut self, samples: &[f32], played: u64, wall: f64) {
        let written = self.written.unwrap_or(played);
        // Everything pushed so far has played (up to what the playback's resampler may still
        // hold, 10 ms): this audio starts a new stretch. A counter ahead of what was pushed
        // means pushes were missed; start afresh from the counter.
        let held = u64::from(self.source_rate / 100);
        if self.segment.is_none() || played + held >= written {
            // What the playback still holds plays first, then this.
            let written = written.max(played);
            let start = wall + self.to_q(written - played);
            self.start_segment(written, start);
        } else {
            self.observe(played, wall);
        }
        let clean: Vec<f32> = samples
            .iter()
            .map(|s| if s.is_finite() { *s } else { 0.0 })
            .collect();
        self.resampler.process(&clean, &mut self.resampled);
        self.append_resampled();
        self.written = Some(self.written.unwrap_or(played) + samples.len() as u64);
        self.trim(wall);
    }

    /// Drops what was queued but not played (after the playback was cleared), keeping `grace`
    /// 16 kHz samples past `played` that the device may still have taken.
    fn clear(&mut self, played: u64, grace: u64) {
        self.resampler.reset();
        self.resampled.clear();
        if let Some(seg) = self.segment.take() {
            let cut = seg.q0 + self.to_q(played.saturating_sub(seg.p0)).round() as u64 + grace;
            if cut < self.end_q() {
                let keep = cut.saturating_sub(self.first_q) as usize;
                self.samples.truncate(keep);
            }
        }
        self.written = Some(played);
    }

    fn trim(&mut self, wall: f64) {
        let cutoff = wall.round() as i64 - KEEP_BEHIND;
        // The first position that plays at or after the cutoff.
        let mut cut_q = self.first_q;
        for (i, piece) in self.pieces.iter().enumerate() {
            let end_q = self.pieces.get(i + 1).map_or(self.end_q(), |next| next.q0);
            // A piece may start past what has been pushed yet (a stall found ahead).
            let len = end_q.saturating_sub(piece.q0);
            let end_wall = piece.wall0 + len as i64;
            if end_wall <= cutoff {
                cut_q = cut_q.max(end_q);
            } else {
                let inside = (cutoff - piece.wall0).max(0) as u64;
                cut_q = cut_q.max(piece.q0 + inside.min(len));
                break;
            }
        }
        cut_q = cut_q.max(self.end_q().saturating_sub(MAX_KEPT as u64));
        let drop = (cut_q.saturating_sub(self.first_q) as usize).min(self.samples.len());
        self.samples.drain(..drop);
        self.first_q += drop as u64;
        // Pieces that end before the kept samples begin are gone; the one straddling stays.
        while self.pieces.len() > 1 && self.pieces[1].q0 <= self.first_q {
            self.pieces.pop_front();
        }
    }

    /// Copies the reference for wall indices `start..start + out.len()` (silence where nothing
    /// played). Later pieces win where the estimates overlap.
    fn fetch(&self, start: i64, out: &mut [f32]) {
        out.fill(0.0);
        let end = start + out.len() as i64;
        for (i, piece) in self.pieces.iter().enumerate() {
            let end_q = self.pieces.get(i + 1).map_or(self.end_q(), |next| next.q0);
            let len = end_q.saturating_sub(piece.q0) as i64;
            let (lo, hi) = (piece.wall0.max(start), (piece.wall0 + len).min(end));
            for w in lo..hi {
                let q = piece.q0 + (w - piece.wall0) as u64;
                if q >= self.first_q {
                    if let Some(v) = self.samples.get((q - self.first_q) as usize) {
                        out[(w - start) as usize] = *v;
                    }
                }
            }
        }
    }

    /// Mean power of the reference over wall indices `start..end` (0 where nothing played).
    fn power(&self, start: i64, end: i64) -> f32 {
        if end <= start {
            return 0.0;
        }
        let mut sum = 0.0f64;
        for (i, piece) in self.pieces.iter().enumerate() {
            let end_q = self.pieces.get(i + 1).map_or(self.end_q(), |next| next.q0);
            let len = end_q.saturating_sub(piece.q0) as i64;
            let (lo, hi) = (piece.wall0.max(start), (piece.wall0 + len).min(end));
            for w in lo..hi {
                let q = piece.q0 + (w - piece.wall0) as u64;
                if q >= self.first_q {
                    if let Some(v) = self.samples.get((q - self.first_q) as usize) {
                        sum += f64::from(v * v);
                    }
                }
            }
        }
        (sum / (end - start) as f64) as f32
    }
}

/// The shared record of what the speaker played. Cloning gives another handle on the same
/// record: one for the thread that writes the playback, one for the echo canceller.
///
/// Call [`push`](Self::push) right after each [`crate::Playback::write`] with the same samples
/// and the playback's `played()` counter, [`finish`](Self::finish) after `Playback::finish`,
/// and [`clear`](Self::clear) after `Playback::clear` (barge-in).
#[derive(Clone)]
pub struct EchoReference {
    shared: Arc<Shared>,
}

struct Shared {
    origin: Instant,
    timeline: Mutex<Timeline>,
}

impl std::fmt::Debug for EchoReference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EchoReference")
            .field("generation", &self.generation())
            .finish()
    }
}

impl EchoReference {
    /// A reference for playback audio at `source_rate` Hz (mono; use
    /// [`lfm2_audio::format::OUTPUT_SAMPLE_RATE`] for the model's voice).
    pub fn new(source_rate: u32) -> Result<Self, AudioError> {
        let resampler = StreamResampler::new(source_rate, INPUT_SAMPLE_RATE)?;
        Ok(Self {
            shared: Arc::new(Shared {
                origin: Instant::now(),
                timeline: Mutex::new(Timeline {
                    source_rate,
                    resampler,
                    resampled: Vec::new(),
                    written: None,
                    samples: VecDeque::with_capacity(8 * INPUT_SAMPLE_RATE as usize),
                    first_q: 0,
                    pieces: VecDeque::new(),
                    segment: None,
                    generation: 0,
                    moves: 0,
                    stalled: 0.0,
                }),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Timeline> {
        // A panic elsewhere while holding the lock leaves a timeline that is still consistent
        // enough to read; echo handling must not take the daemon down with it.
        self.shared
            .timeline
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Wall index (16 kHz samples since this reference was created) of `t`.
    pub fn wall_index(&self, t: Instant) -> f64 {
        match t.checked_duration_since(self.shared.origin) {
            Some(d) => d.as_secs_f64() * f64::from(INPUT_SAMPLE_RATE),
            None => -(self.shared.origin - t).as_secs_f64() * f64::from(INPUT_SAMPLE_RATE),
        }
    }

    /// Records `samples` (at the source rate), just written to the playback, whose `played()`
    /// counter reads `played`.
    pub fn push(&self, samples: &[f32], played: u64) {
        self.push_at(samples, played, Instant::now());
    }

    /// [`push`](Self::push) at a given time (for tests and replay).
    pub fn push_at(&self, samples: &[f32], played: u64, now: Instant) {
        let wall = self.wall_index(now);
        self.lock().push(samples, played, wall);
    }

    /// Optional: checks the timing against the playback counter between pushes (for example
    /// from a loop that waits for the playback to drain), so that a stall is noticed sooner.
    pub fn observe(&self, played: u64) {
        self.observe_at(played, Instant::now());
    }

    /// [`observe`](Self::observe) at a given time.
    pub fn observe_at(&self, played: u64, now: Instant) {
        let wall = self.wall_index(now);
        self.lock().observe(played, wall);
    }

    /// The playback stream ended (`Playback::finish`): the resampler's last samples are added.
    pub fn finish(&self) {
        let mut guard = self.lock();
        let timeline = &mut *guard;
        timeline.resampler.flush(&mut timeline.resampled);
        timeline.append_resampled();
    }

    /// The playback was cleared (barge-in); `played` is its counter afterwards. What was
    /// queued and not played is dropped, except 30 ms the device may already have taken.
    pub fn clear(&self, played: u64) {
        self.lock()
            .clear(played, u64::from(INPUT_SAMPLE_RATE) * 30 / 1000);
    }

    /// Counts the re-anchorings of the timeline (new playing stretches, stalls); the canceller
    /// re-measures the delay when it changes.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Counts the re-anchorings that placed samples anew (new playing stretches, stalls), a
    /// subset of the [`generation`](Self::generation)s.
    pub fn moves(&self) -> u64 {
        self.lock().moves
    }

    /// 16 kHz samples of playing time, in all, that stalls took away from what the timeline had
    /// placed as playing (each stall moved the rest of its segment that much later).
    pub fn stalled(&self) -> f64 {
        self.lock().stalled
    }

    /// The reference for wall indices `start..start + out.len()`, and the generation it
    /// belongs to.
    pub(crate) fn fetch(&self, start: i64, out: &mut [f32]) -> u64 {
        let timeline = self.lock();
        timeline.fetch(start, out);
        timeline.generation
    }

    /// Mean power over wall indices `start..end`.
    pub(crate) fn power(&self, start: i64, end: i64) -> f32 {
        self.lock().power(start, end)
    }

    /// Wall index where the newest stretch of playing began.
    pub(crate) fn segment_start(&self) -> Option<i64> {
        self.lock().pieces.back().map(|p| p.wall0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(reference: &EchoReference, wall: i64) -> Instant {
        reference.shared.origin + Duration::from_secs_f64(wall as f64 / 16_000.0)
    }

    #[test]
    fn samples_land_where_they_played() {
        let reference = EchoReference::new(16_000).unwrap();
        let clip: Vec<f32> = (0..1600).map(|i| (i as f32 * 0.01).sin()).collect();
        // Idle playback: the first push anchors the clip at the push time (wall 1000).
        reference.push_at(&clip[..800], 0, at(&reference, 1000));
        reference.push_at(&clip[800..], 0, at(&reference, 1001));
        assert_eq!(reference.generation(), 1);
        let mut out = vec![0.0; 3000];
        reference.fetch(0, &mut out);
        assert!(out[..1000].iter().all(|&v| v == 0.0));
        assert_eq!(&out[1000..2600], &clip[..]);
        assert!(out[2600..].iter().all(|&v| v == 0.0));

        // It all played; the next push after a pause is a new stretch at its own time.
        reference.push_at(&clip[..400], 1600, at(&reference, 5000));
        assert_eq!(reference.generation(), 2);
        let mut out = vec![0.0; 400];
        reference.fetch(5000, &mut out);
        assert_eq!(&out[..], &clip[..400]);
        assert!(reference.power(3000, 4900) == 0.0);
        assert!(reference.power(5000, 5400) > 0.1);
    }

    #[test]
    fn a_stall_reanchors_and_clear_drops_the_unplayed() {
        let reference = EchoReference::new(16_000).unwrap();
        let tone = vec![0.5f32; 3200];
        reference.push_at(&tone, 0, at(&reference, 0));
        // At wall 3000 only 1000 samples have played: it stalled for 2000 samples.
        reference.push_at(&tone[..10], 1000, at(&reference, 3000));
        assert_eq!(reference.generation(), 2);
        let mut out = vec![0.0; 10];
        reference.fetch(3000, &mut out);
        assert_eq!(out, vec![0.5; 10]);
        assert_eq!(
            reference.power(1000, 3000),
            0.0,
            "nothing played during the stall"
        );

        reference.clear(1100);
        reference.finish();
        // Played up to 1100 (at wall 3100) plus 30 ms of grace (480); nothing after.
        assert!(reference.power(3100 + 480 + 1, 3100 + 4000) == 0.0);
        assert!(reference.power(3000, 3100) > 0.2);
    }

    #[test]
    fn a_run_of_late_readings_asks_for_a_new_measurement() {
        let reference = EchoReference::new(16_000).unwrap();
        let mut played = 0u64;
        // 80 ms chunks. A device with 20 ms periods (320 samples): the counter moves in steps.
        // The writer pushes every 80 ms at various phases of the period; at 3 s the device
        // stalls 15 ms. 2 s are queued at once, then one chunk per chunk played.
        let chunk = vec![0.25f32; 1280];
        for _ in 0..25 {
            reference.push_at(&chunk, 0, at(&reference, 0));
        }
        let mut written = 25 * 1280u64;
        let mut t = 0i64;
        let counter = |t: i64| -> u64 {
            let running = if t < 48_000 { t } else { (t - 240).max(48_000) };
            (running / 320 * 320) as u64
        };
        while t < 80_000 {
            t += 1280 + (t / 1280 % 5) * 37;
            played = counter(t).min(written);
            // The writer keeps 2 s queued.
            while written < played + 32_000 {
                reference.push_at(&chunk, played, at(&reference, t));
                written += 1280;
            }
        }
        assert_eq!(
            reference.generation(),
            2,
            "one new generation for one stall"
        );
        // The samples stay where they were placed: the canceller measures where they went.
        assert_eq!(reference.lock().pieces.len(), 1);
        let _ = played;
    }

    #[test]
    fn old_reference_is_forgotten() {
        let reference = EchoReference::new(24_000).unwrap();
        let chunk = vec![0.1f32; 2400];
        let mut played = 0;
        for i in 0..100 {
            // 100 ms chunks played back to back, 10 s in all.
            reference.push_at(&chunk, played, at(&reference, i * 1600));
            played += 2400;
        }
        let timeline = reference.lock();
        assert!(timeline.samples.len() <= (KEEP_BEHIND + 3200) as usize);
        assert_eq!(timeline.generation, 1);
    }
}
