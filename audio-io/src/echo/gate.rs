//! Is the speech the microphone hears the user, or the assistant's own voice coming back?
//!
//! While the assistant is audible, the canceller removes most of its echo: on echo alone the
//! output is some 20-30 dB under the microphone signal. The user's voice is not in the
//! reference, so the canceller cannot remove it, and a window where the user speaks comes out
//! much less attenuated.
//!
//! The attenuation of a window is measured against the loudest microphone window of the last
//! quarter second ([`PEAK_WINDOWS`]), not against the window itself: as a word of the echo dies
//! away the microphone gets quiet faster than the residual (the late reverberation beyond the
//! filter, and the filter's error on the loud part, linger), and a per-window ratio would then
//! look like a voice the canceller cannot explain. The Silero VAD calls even a -45 dBFS residual
//! of speech "speech", so the level decides, not the VAD.
//!
//! A window is evidence of the user when the VAD calls it speech and its attenuation is under
//! `user_attenuation_db` (12 dB): a user as loud as the echo leaves the output within a few dB
//! of the microphone. Speech while the assistant cannot be heard is the user by definition. The
//! verdict is a vote over the last few windows, so that one odd window does not decide alone.
//!
//! That only works while echo alone is attenuated well beyond the threshold, so the gate tracks
//! the attenuation of the windows it takes for echo (its "ERLE", a running mean in dB) and
//! lets nothing through while the assistant is audible until that has reached `min_erle_db`
//! (20 dB): the first second or two of the first reply, a room (or volume) the canceller
//! cannot follow, and the moments after a new reply began while its timing is re-measured. The
//! assistant is then never interrupted by itself, at the price of times in which the user
//! cannot interrupt either.

/// Gate settings.
#[derive(Debug, Clone, PartialEq)]
pub struct GateConfig {
    /// A window attenuated less than this by the canceller (dB, against the recent peak) is
    /// the user's speech. Larger catches quieter users and lets more echo through.
    pub user_attenuation_db: f32,
    /// The canceller must reach this mean attenuation on echo before the gate lets anything
    /// through while the assistant is audible (dB).
    pub min_erle_db: f32,
    /// Windows (32 ms each in the listener) in the vote.
    pub vote_windows: usize,
    /// Windows of evidence among the last `vote_windows` that make the user.
    pub vote_needed: usize,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            user_attenuation_db: 12.0,
            min_erle_db: 20.0,
            vote_windows: 8,
            vote_needed: 4,
        }
    }
}

/// Mean power under which a window is treated as silence (-70 dBFS).
const SILENT_POWER: f32 = 1e-7;
/// Windows over which the microphone's peak power is held (8 × 32 ms in the listener): longer
/// than the filter, so that the reverberation of a loud syllable is measured against it.
pub const PEAK_WINDOWS: usize = 8;

/// How one window was judged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GateWindow {
    /// The window counts as the user's speech.
    pub user: bool,
    /// Attenuation of this window by the canceller, dB: the recent peak microphone power over
    /// this window's output power. `None` when it was not measured (assistant not audible, or
    /// silence).
    pub attenuation_db: Option<f32>,
}

/// The barge-in gate. See the module documentation.
#[derive(Debug, Clone)]
pub struct EchoGate {
    config: GateConfig,
    erle_db: f32,
    /// Evidence of the last windows, newest in bit 0.
    votes: u64,
    /// Microphone power of the last audible windows, for the peak hold.
    recent: [f32; PEAK_WINDOWS],
    recent_at: usize,
}

impl EchoGate {
    pub fn new(config: GateConfig) -> Self {
        let mut config = config;
        config.vote_windows = config.vote_windows.clamp(1, 64);
        config.vote_needed = config.vote_needed.clamp(1, config.vote_windows);
        Self {
            config,
            erle_db: 0.0,
            votes: 0,
            recent: [0.0; PEAK_WINDOWS],
            recent_at: 0,
        }
    }

    pub fn config(&self) -> &GateConfig {
        &self.config
    }

    /// The attenuation the canceller reaches on echo alone (dB, against the recent peak), as
    /// tracked from the windows judged to be echo.
    pub fn erle_db(&self) -> f32 {
        self.erle_db
    }

    /// Whether the canceller is good enough for the gate to tell the user from the echo.
    pub fn ready(&self) -> bool {
        self.erle_db >= self.config.min_erle_db
    }

    fn vote(&mut self, user: bool) {
        self.votes = (self.votes << 1) | u64::from(user);
    }

    /// One window while the assistant may be audible: what the microphone heard and what the
    /// canceller made of it, and whether the VAD called it speech.
    pub fn observe(&mut self, mic: &[f32], cleaned: &[f32], speech: bool) -> GateWindow {
        let power = |v: &[f32]| {
            v.iter()
                .filter(|s| s.is_finite())
                .map(|s| s * s)
                .sum::<f32>()
                / v.len().max(1) as f32
        };
        self.observe_power(power(mic), power(cleaned), speech)
    }

    /// [`observe`](Self::observe) from mean powers.
    pub fn observe_power(&mut self, mic: f32, cleaned: f32, speech: bool) -> GateWindow {
        if !(mic.is_finite() && cleaned.is_finite()) {
            self.vote(false);
            return GateWindow {
                user: false,
                attenuation_db: None,
            };
        }
        self.recent[self.recent_at] = mic;
        self.recent_at = (self.recent_at + 1) % PEAK_WINDOWS;
        let peak = self.recent.iter().fold(0.0f32, |m, &v| m.max(v));
        if peak < SILENT_POWER {
            self.vote(false);
            return GateWindow {
                user: false,
                attenuation_db: None,
            };
        }
        let attenuation = (10.0 * (peak / cleaned.max(1e-12)).log10()).clamp(-20.0, 60.0);
        let user = speech
            && self.ready()
            && cleaned >= SILENT_POWER
            && attenuation < self.config.user_attenuation_db;
        // The tracker follows the windows taken for echo (a time constant of about 20
        // windows), and barely moves on windows taken for the user, so that a long
        // interruption does not teach it that the canceller is bad.
        let rate = if user { 0.002 } else { 0.05 };
        self.erle_db += rate * (attenuation.max(0.0) - self.erle_db);
        self.vote(user);
        GateWindow {
            user,
            attenuation_db: Some(attenuation),
        }
    }

    /// One window in which the assistant cannot be heard: speech in it is the user's.
    pub fn observe_quiet(&mut self, speech: bool) -> GateWindow {
        self.recent = [0.0; PEAK_WINDOWS];
        self.vote(speech);
        GateWindow {
            user: speech,
            attenuation_db: None,
        }
    }

    /// One window in which the assistant is audible but the canceller cannot be trusted yet
    /// (its timing is being measured): not the user.
    pub fn observe_unsure(&mut self) -> GateWindow {
        self.vote(false);
        GateWindow {
            user: false,
            attenuation_db: None,
        }
    }

    /// The verdict: at least `vote_needed` of the last `vote_windows` windows were the user.
    pub fn is_user_speech(&self) -> bool {
        let mask = if self.config.vote_windows >= 64 {
            u64::MAX
        } else {
            (1u64 << self.config.vote_windows) - 1
        };
        (self.votes & mask).count_ones() as usize >= self.config.vote_needed
    }

    /// How many windows back the oldest evidence in the current vote lies (0: the latest
    /// window), while the verdict is "user": where the user's speech began, to a window.
    pub fn user_speech_onset(&self) -> Option<usize> {
        if !self.is_user_speech() {
            return None;
        }
        let window = self.config.vote_windows.min(64);
        (0..window).rev().find(|&k| self.votes >> k & 1 == 1)
    }

    /// Forgets what the canceller was shown to achieve: after the echo moved, the gate waits
    /// to see it work again before it tells the user from the echo.
    pub fn reset_erle(&mut self) {
        self.erle_db = 0.0;
        self.votes = 0;
    }

    /// Forgets the votes (not the ERLE).
    pub fn reset_votes(&mut self) {
        self.votes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_is_rejected_and_a_voice_over_it_is_accepted() {
        let mut gate = EchoGate::new(GateConfig::default());
        // Echo alone, cancelled by 25 dB give or take 5: the gate learns the ERLE and never
        // says user, even though the VAD calls it speech.
        for i in 0..100 {
            let jitter = [-5.0, 0.0, 5.0][i % 3];
            let w = gate.observe_power(1e-2, 10f32.powf((-45.0 + jitter) / 10.0), true);
            assert!(!w.user);
            assert!(!gate.is_user_speech());
        }
        assert!((gate.erle_db() - 25.0).abs() < 3.0, "{}", gate.erle_db());
        // The user at the echo's level: the output is as loud as half the microphone.
        for _ in 0..3 {
            gate.observe_power(2e-2, 1e-2, true);
        }
        assert!(!gate.is_user_speech(), "three windows are not yet a vote");
        gate.observe_power(2e-2, 1e-2, true);
        assert!(gate.is_user_speech());
        assert_eq!(gate.user_speech_onset(), Some(3));
        // The same windows without VAD speech are not the user.
        gate.reset_votes();
        for _ in 0..8 {
            gate.observe_power(2e-2, 1e-2, false);
        }
        assert!(!gate.is_user_speech());
    }

    #[test]
    fn an_unconverged_canceller_lets_nothing_through() {
        let mut gate = EchoGate::new(GateConfig::default());
        for _ in 0..20 {
            gate.observe_power(1e-2, 0.5e-2, true);
        }
        assert!(!gate.ready());
        assert!(!gate.is_user_speech());
        // Speech with the assistant silent is the user.
        for _ in 0..4 {
            gate.observe_quiet(true);
        }
        assert!(gate.is_user_speech());
        // Bad input is neither.
        gate.reset_votes();
        let w = gate.observe(&[f32::NAN; 4], &[1.0; 4], true);
        assert!(!w.user);
        let w = gate.observe(&[], &[], true);
        assert!(!w.user);
    }
}
