//! The assistant's speaker: paced playback of replies that also feeds the echo canceller.
//!
//! The rule every writer to the speaker must follow: each chunk written to the [`Playback`] is
//! pushed to the [`EchoReference`] with the playback's `played()` counter at that moment, the
//! counter is shown to the reference while nothing is written, and a barge-in that drops queued
//! audio clears the reference too. [`Player`] does that, so a front end that plays through it
//! cannot get it wrong.
//!
//! Audio waits in a queue and goes to the device at most [`Player::LEAD`] ahead of what has been
//! heard, so that writing never blocks the caller and a barge-in has little to throw away.
//!
//! Pacing: the model delivers a reply in bursts (in interleaved generation, twelve frames of
//! speech, then six text steps without any). A reply that started to play with its first frame
//! would run dry in every pause the burst before it did not cover. So the start of a reply is
//! held back by the delay its predecessors needed to play without a hole ([`ReplyPacing`]), and a
//! reply that runs dry anyway (generation slower than real time) pauses once until a second of
//! speech is buffered, rather than stuttering. Both are reported as [`Notice`]s for the log.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use lfm2_audio::format::{OUTPUT_SAMPLE_RATE, SAMPLES_PER_FRAME};

use crate::{DevicePlayback, DeviceSelector, EchoReference, MemoryPlayback, Playback, StreamStats};

/// Samples per second of the audio a [`Player`] takes (the codec's 24 kHz).
const RATE: f64 = OUTPUT_SAMPLE_RATE as f64;

/// A [`Playback`] the player can also pause when idle and whose device rate it can read.
pub trait Speaker: Playback {
    /// Pauses the device while there is nothing to play (listening costs less); true if paused.
    fn suspend(&mut self) -> bool {
        false
    }

    /// The rate the device plays at (the unit of [`StreamStats::xrun_frames`]).
    fn device_rate(&self) -> u32 {
        self.source_rate()
    }
}

impl Speaker for DevicePlayback {
    fn suspend(&mut self) -> bool {
        DevicePlayback::suspend(self)
    }

    fn device_rate(&self) -> u32 {
        self.device_format().map_or(48_000, |f| f.sample_rate)
    }
}

impl Speaker for MemoryPlayback {}

/// Something about how playback went, for the log.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// The reply ran dry while more is coming: playback waits for this many seconds of speech.
    RanDry { buffering: f64 },
    /// Playback goes on after running dry.
    Resumes,
    /// Writing to the device failed.
    Failed(String),
}

impl std::fmt::Display for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Notice::RanDry { buffering } => write!(
                f,
                "playback ran dry: generation is behind real time; buffering {buffering:.1} s"
            ),
            Notice::Resumes => write!(
                f,
                "playback resumes: generation had fallen behind real time"
            ),
            Notice::Failed(e) => write!(f, "playback: {e}"),
        }
    }
}

/// The start delay of replies, learnt from the replies so far. Free of I/O: every time is passed
/// in.
#[derive(Debug, Clone)]
pub struct ReplyPacing {
    /// Seconds a reply waits after its first audio arrived before it starts to play.
    lead: f64,
    /// The reply being received: when its first audio came, its samples so far, and the delay
    /// it would have needed to play through without a hole (the largest `arrival - first -
    /// audio before it / rate`).
    first: Option<Instant>,
    last: Option<Instant>,
    received: u64,
    needed: f64,
    /// Not writing to the device: the reply waits for its lead (or, after running dry, for
    /// [`ReplyPacing::REBUFFER`] of speech).
    holding: bool,
    rebuffering: Option<Instant>,
    /// Pauses of the current reply to let generation catch up, and their total time.
    pauses: u32,
    paused: Duration,
    /// The device's counters when the reply began (underruns are reported per reply).
    stats: StreamStats,
}

impl Default for ReplyPacing {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplyPacing {
    /// The lead of the first reply, before anything was measured.
    pub const FIRST_LEAD: f64 = 0.12;
    /// Added to what the replies so far needed (scheduling jitter, a device period).
    pub const MARGIN: f64 = 0.06;
    pub const MAX_LEAD: f64 = 3.0;
    /// Speech buffered before a reply that ran dry goes on.
    pub const REBUFFER: u64 = OUTPUT_SAMPLE_RATE as u64;

    pub fn new() -> Self {
        Self {
            lead: Self::FIRST_LEAD,
            first: None,
            last: None,
            received: 0,
            needed: 0.0,
            holding: false,
            rebuffering: None,
            pauses: 0,
            paused: Duration::ZERO,
            stats: StreamStats::default(),
        }
    }

    /// The learnt start delay, in seconds.
    pub fn lead(&self) -> f64 {
        self.lead
    }

    /// A reply begins (the device's counters are `stats`): its audio is held back by the lead.
    pub fn begin(&mut self, stats: StreamStats) {
        *self = Self {
            lead: self.lead,
            holding: true,
            stats,
            ..Self::new()
        };
    }

    /// `n` samples of the reply arrived at `now` (or were made then, for audio held back: the
    /// times of a reply's audio must not go backwards).
    pub fn arrived(&mut self, n: usize, now: Instant) {
        let first = *self.first.get_or_insert(now);
        let due = self.received as f64 / RATE;
        self.needed = self
            .needed
            .max(now.duration_since(first).as_secs_f64() - due);
        self.last = Some(now);
        self.received += n as u64;
    }

    /// Generated speech per second of generating, once there is enough to tell.
    pub fn rate(&self) -> Option<f64> {
        let span = self.last?.duration_since(self.first?).as_secs_f64();
        (span > 1.0).then(|| self.received as f64 / RATE / span)
    }

    /// Whether the hold on the reply is over at `now`, with `pending` samples queued; `done`:
    /// everything was generated. The second value says playback resumes after running dry.
    pub fn release(&mut self, pending: usize, done: bool, now: Instant) -> (bool, bool) {
        if !self.holding {
            return (true, false);
        }
        let ready = match (self.rebuffering, self.first) {
            _ if done => true,
            (Some(since), _) => {
                let go = pending as u64 >= Self::REBUFFER;
                if go {
                    self.pauses += 1;
                    self.paused += now.duration_since(since);
                }
                go
            }
            (None, Some(first)) => {
                now.duration_since(first).as_secs_f64() >= self.lead
                    || pending as f64 >= (self.lead + 1.0) * RATE
            }
            (None, None) => false,
        };
        let mut resumes = false;
        if ready {
            resumes = self.rebuffering.take().is_some();
            self.holding = false;
        }
        (ready, resumes)
    }

    /// The reply ran dry at `now` while more is coming: hold until a good stretch is buffered.
    fn ran_dry(&mut self, now: Instant) {
        self.holding = true;
        self.rebuffering = Some(now);
    }

    /// Playback was cut: nothing is held any more.
    fn unhold(&mut self) {
        self.holding = false;
        self.rebuffering = None;
    }

    /// The reply is over (played out, or cut; the device's counters are `stats`, its rate
    /// `device_rate`): learns the lead for the next one and returns what to log about how it
    /// played.
    pub fn end(&mut self, stats: StreamStats, device_rate: u32) -> String {
        self.unhold();
        let mut notes = Vec::new();
        // Underruns of our queue (nothing to play while the reply went on), and those the
        // driver reported (the device was not fed in time: a loaded machine).
        let underruns = stats.xruns.saturating_sub(self.stats.xruns);
        let driver = stats.device_xruns.saturating_sub(self.stats.device_xruns);
        let silent = stats.xrun_frames.saturating_sub(self.stats.xrun_frames) as f64
            / f64::from(device_rate.max(1));
        notes.push(match (underruns, driver) {
            (0, 0) => "no underrun".to_string(),
            (0, d) => format!("no underrun of the queue, {d} of the driver"),
            (u, d) => format!(
                "{u} underruns ({:.0} ms of silence), {d} of the driver",
                silent * 1e3
            ),
        });
        if self.pauses > 0 {
            notes.push(format!(
                "{} pauses ({:.0} ms) to let generation catch up",
                self.pauses,
                self.paused.as_secs_f64() * 1e3
            ));
        }
        if let Some(rate) = self.rate() {
            notes.push(format!("generated at {rate:.2}x real time"));
            if rate < 1.0 {
                notes.push("generation is slower than real time: later replies start later".into());
            }
        }
        if self.first.is_some() {
            // Rise at once to what this reply needed; come down slowly.
            let want = (self.needed + Self::MARGIN).min(Self::MAX_LEAD);
            self.lead = if want > self.lead {
                want
            } else {
                0.8 * self.lead + 0.2 * want
            };
            notes.push(format!("next lead {:.0} ms", self.lead * 1e3));
        }
        self.first = None;
        notes.join(", ")
    }
}

/// The speaker of a front end: a queue in front of a [`Speaker`], paced per reply, feeding the
/// echo reference with everything it writes.
pub struct Player<P: Speaker = DevicePlayback> {
    playback: P,
    reference: Option<EchoReference>,
    pending: VecDeque<f32>,
    /// Samples written since the device opened, less those a barge-in dropped: `written -
    /// played()` is what the device still has to play.
    written: u64,
    finished: bool,
    pace: ReplyPacing,
    /// Since when the device has had nothing to play.
    idle_since: Option<Instant>,
}

impl Player<DevicePlayback> {
    /// Opens the output device `sel` (24 kHz audio in).
    pub fn open(
        sel: &DeviceSelector,
        reference: Option<EchoReference>,
    ) -> Result<Self, crate::AudioError> {
        Ok(Self::new(
            DevicePlayback::open(sel, OUTPUT_SAMPLE_RATE)?,
            reference,
        ))
    }
}

impl<P: Speaker> Player<P> {
    /// 0.4 s at 24 kHz.
    pub const LEAD: u64 = OUTPUT_SAMPLE_RATE as u64 * 2 / 5;
    /// Idle time after which the device is paused.
    const SUSPEND_AFTER: Duration = Duration::from_millis(500);
    /// What the device's resampler may hold back (20 ms): a backlog this small is none.
    const HELD: u64 = 480;

    /// A player on `playback` (24 kHz), feeding `reference` if there is one.
    pub fn new(playback: P, reference: Option<EchoReference>) -> Self {
        Self {
            playback,
            reference,
            pending: VecDeque::new(),
            written: 0,
            finished: true,
            pace: ReplyPacing::new(),
            idle_since: None,
        }
    }

    /// Starts feeding `reference` with what is written from now on.
    pub fn set_reference(&mut self, reference: EchoReference) {
        self.reference = Some(reference);
    }

    /// Queues audio to play (not part of a paced reply: a chime, a spoken line).
    pub fn queue(&mut self, samples: &[f32]) {
        self.pending.extend(samples);
        self.finished = false;
    }

    /// Where the next sample queued will be in the count of [`Player::played`].
    pub fn queued_end(&self) -> u64 {
        self.written + self.pending.len() as u64
    }

    /// A reply begins: its audio is held back by the learnt lead.
    pub fn begin_reply(&mut self) {
        self.pace.begin(self.playback.stats());
    }

    /// Audio of the current reply arrived from the engine.
    pub fn reply_audio(&mut self, samples: &[f32]) {
        self.reply_audio_made_at(samples, Instant::now());
    }

    /// Audio of the current reply that the engine made at `made` (earlier than now when it was
    /// held back: a reply started speculatively during a pause, given out when the end of the
    /// silence confirmed it). The pacing counts from when the audio was made, so a reply whose
    /// first audio waited out its lead during the silence plays at once.
    pub fn reply_audio_made_at(&mut self, samples: &[f32], made: Instant) {
        self.pace.arrived(samples.len(), made);
        self.queue(samples);
    }

    /// The current reply is over (played out, or cut): learns the lead for the next one and
    /// returns what to log about how it played.
    pub fn end_reply(&mut self) -> String {
        let stats = self.playback.stats();
        self.pace.end(stats, self.playback.device_rate())
    }

    /// Samples the device has played since it opened.
    pub fn played(&self) -> u64 {
        self.playback.played()
    }

    /// The device's counters.
    pub fn stats(&self) -> StreamStats {
        self.playback.stats()
    }

    /// Moves queued audio to the device; once the queue is empty and `done`, lets the device
    /// play out what it holds. Returns what is worth logging.
    pub fn pump(&mut self, done: bool) -> Vec<Notice> {
        let mut notices = Vec::new();
        let played = self.played();
        // A device that played past what it was given (a barge-in dropped the rest).
        self.written = self.written.max(played);
        if !self.pace.holding
            && !done
            && self.pace.first.is_some()
            && self.written <= played + Self::HELD
            && self.pending.is_empty()
            && self.pace.rebuffering.is_none()
        {
            // The reply ran dry while more is coming: wait for a good stretch rather than
            // playing every frame as it comes.
            self.pace.ran_dry(Instant::now());
            notices.push(Notice::RanDry {
                buffering: ReplyPacing::REBUFFER as f64 / RATE,
            });
        }
        let (ready, resumes) = self.pace.release(self.pending.len(), done, Instant::now());
        if resumes {
            notices.push(Notice::Resumes);
        }
        if !ready {
            if let Some(r) = &self.reference {
                r.observe(played);
            }
            return notices;
        }
        while !self.pending.is_empty() && self.written.saturating_sub(self.played()) < Self::LEAD {
            let n = self.pending.len().min(SAMPLES_PER_FRAME);
            let chunk: Vec<f32> = self.pending.drain(..n).collect();
            if let Err(e) = self.playback.write(&chunk) {
                notices.push(Notice::Failed(e.to_string()));
            }
            if let Some(r) = &self.reference {
                r.push(&chunk, self.played());
            }
            self.written += n as u64;
        }
        if done && self.pending.is_empty() && !self.finished {
            self.finished = true;
            if let Err(e) = self.playback.finish() {
                notices.push(Notice::Failed(e.to_string()));
            }
            if let Some(r) = &self.reference {
                r.finish();
            }
        } else if let Some(r) = &self.reference {
            r.observe(self.played());
        }
        // A speaker with nothing to play for a while is paused: listening costs less.
        if self.pending.is_empty() && self.finished && self.playback.wait_idle(Duration::ZERO) {
            let since = *self.idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= Self::SUSPEND_AFTER {
                self.playback.suspend();
            }
        } else {
            self.idle_since = None;
        }
        notices
    }

    /// Whether everything queued has been played.
    pub fn idle(&mut self) -> bool {
        self.pending.is_empty()
            && (self.finished || self.written == 0)
            && self.playback.wait_idle(Duration::ZERO)
    }

    /// Drops everything queued and not yet played (barge-in).
    pub fn clear(&mut self) {
        self.pending.clear();
        self.playback.clear();
        // What was dropped will never be played: the device's backlog is nothing again. (Not
        // taking it off kept the lead full of audio that never plays: mute after a barge-in.)
        let played = self.played();
        self.written = played;
        self.finished = true;
        self.pace.unhold();
        if let Some(r) = &self.reference {
            r.clear(played);
        }
    }

    /// Lets the device play out what it holds and closes the stream.
    pub fn close(mut self) {
        self.finished = false;
        let _ = self.playback.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::Pacing;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn a_reply_waits_for_its_lead_then_plays() {
        let t0 = Instant::now();
        let mut p = ReplyPacing::new();
        p.begin(StreamStats::default());
        assert_eq!(p.release(0, false, t0), (false, false), "nothing arrived");
        p.arrived(1920, t0);
        assert_eq!(p.release(1920, false, at(t0, 50)), (false, false));
        assert_eq!(p.release(1920, false, at(t0, 120)), (true, false));
        // Everything generated: no reason to hold.
        p.begin(StreamStats::default());
        assert_eq!(p.release(0, true, t0), (true, false));
    }

    #[test]
    fn the_lead_rises_to_what_a_reply_needed_and_comes_down_slowly() {
        let t0 = Instant::now();
        let mut p = ReplyPacing::new();
        p.begin(StreamStats::default());
        // One second of speech in the first 100 ms, then the next frame 1.5 s after the first:
        // it would have needed a 0.5 s head start to play without a hole.
        p.arrived(24_000, t0);
        p.arrived(1920, at(t0, 1500));
        let notes = p.end(StreamStats::default(), 48_000);
        assert!((p.lead() - 0.56).abs() < 1e-9, "{}", p.lead());
        assert!(notes.contains("no underrun"), "{notes}");
        assert!(notes.contains("next lead 560 ms"), "{notes}");
        // A reply that needed nothing brings it down by a fifth of the way.
        p.begin(StreamStats::default());
        p.arrived(1920, t0);
        p.end(StreamStats::default(), 48_000);
        assert!((p.lead() - (0.8 * 0.56 + 0.2 * 0.06)).abs() < 1e-9);
    }

    #[test]
    fn underruns_and_rate_are_reported_per_reply() {
        let t0 = Instant::now();
        let mut p = ReplyPacing::new();
        let before = StreamStats {
            xruns: 2,
            ..StreamStats::default()
        };
        p.begin(before);
        p.arrived(12_000, t0);
        p.arrived(12_000, at(t0, 2000));
        let after = StreamStats {
            xruns: 3,
            xrun_frames: 4800,
            device_xruns: 1,
            ..StreamStats::default()
        };
        let notes = p.end(after, 48_000);
        assert!(
            notes.contains("1 underruns (100 ms of silence), 1 of the driver"),
            "{notes}"
        );
        // 1 s of speech over 2 s.
        assert!(notes.contains("generated at 0.50x real time"), "{notes}");
        assert!(notes.contains("slower than real time"), "{notes}");
    }

    #[test]
    fn a_reply_that_ran_dry_waits_for_a_second_of_speech() {
        let t0 = Instant::now();
        let mut p = ReplyPacing::new();
        p.begin(StreamStats::default());
        p.arrived(1920, t0);
        assert!(p.release(1920, false, at(t0, 200)).0);
        p.ran_dry(at(t0, 300));
        assert_eq!(p.release(12_000, false, at(t0, 500)), (false, false));
        assert_eq!(p.release(24_000, false, at(t0, 900)), (true, true));
        let notes = p.end(StreamStats::default(), 48_000);
        assert!(
            notes.contains("1 pauses (600 ms) to let generation catch up"),
            "{notes}"
        );
    }

    fn memory_player(reference: Option<EchoReference>) -> Player<MemoryPlayback> {
        let playback = MemoryPlayback::new(24_000, Pacing::AsFastAsPossible).unwrap();
        Player::new(playback, reference)
    }

    #[test]
    fn what_is_written_is_played_and_pushed_to_the_echo_reference() {
        let reference = EchoReference::new(OUTPUT_SAMPLE_RATE).unwrap();
        let mut player = memory_player(Some(reference.clone()));
        let generation = reference.generation();
        player.queue(&vec![0.1; 5000]);
        assert_eq!(player.queued_end(), 5000);
        assert!(player.pump(true).is_empty());
        assert_eq!(player.played(), 5000);
        assert!(player.idle());
        assert!(
            reference.generation() > generation,
            "the reference saw the audio start a new stretch of playing"
        );
    }

    #[test]
    fn a_reply_is_held_back_until_it_is_done_or_its_lead_passed() {
        let mut player = memory_player(None);
        player.begin_reply();
        player.reply_audio(&[0.2; 1920]);
        player.pump(false);
        assert_eq!(player.played(), 0, "held by the lead");
        player.pump(true);
        assert_eq!(player.played(), 1920, "everything generated: it plays");
        assert!(player.end_reply().contains("next lead"));
    }

    #[test]
    fn held_back_audio_is_paced_from_when_it_was_made() {
        // A reply started during a pause: its first frames were made 300 and 260 ms before the
        // end of the silence gave them out. Their lead (120 ms) has passed: they play at once.
        let mut player = memory_player(None);
        let now = Instant::now();
        player.begin_reply();
        player.reply_audio_made_at(&[0.2; 1920], now - Duration::from_millis(300));
        player.reply_audio_made_at(&[0.2; 1920], now - Duration::from_millis(260));
        player.pump(false);
        assert_eq!(player.played(), 3840, "nothing held");
        // The same audio given out as it arrives now waits for the lead.
        let mut player = memory_player(None);
        player.begin_reply();
        player.reply_audio(&[0.2; 1920]);
        player.reply_audio(&[0.2; 1920]);
        player.pump(false);
        assert_eq!(player.played(), 0, "held by the lead");
    }

    #[test]
    fn the_lead_learnt_from_held_back_audio_counts_when_it_was_made() {
        // Frames made every 40 ms (80 ms of speech each) and given out in one go 200 ms after
        // the first: the reply needed no head start, and the lead comes down, not up to the
        // 200 ms the hand-over took.
        let t0 = Instant::now();
        let mut p = ReplyPacing::new();
        p.begin(StreamStats::default());
        for k in 0..6 {
            p.arrived(1920, at(t0, 40 * k));
        }
        assert_eq!(p.release(6 * 1920, false, at(t0, 200)), (true, false));
        p.arrived(1920, at(t0, 260));
        let notes = p.end(StreamStats::default(), 48_000);
        let want = 0.8 * ReplyPacing::FIRST_LEAD + 0.2 * ReplyPacing::MARGIN;
        assert!((p.lead() - want).abs() < 1e-9, "{} ({notes})", p.lead());
    }

    #[test]
    fn clear_drops_the_queue_and_the_backlog() {
        let mut player = memory_player(None);
        player.queue(&[0.3; 100]);
        player.clear();
        assert_eq!(player.queued_end(), player.played());
        assert!(player.idle());
        player.pump(true);
        assert_eq!(player.played(), 0, "nothing cleared is played");
    }
}
