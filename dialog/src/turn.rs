//! Turn-taking as an explicit state machine: events from the voice activity detector, the engine
//! and the player go in, actions for them come out. It owns no threads and no audio, so every
//! transition is tested on its own.
//!
//! ```text
//!   Idle ──start──▶ Listening ──speech started──▶ UserSpeaking ──speech ended──▶ Responding
//!                      ▲                              ▲                              │
//!                      └──────── reply finished ──────┼──────────────────────────────┘
//!                                                     └──── speech started (barge-in)
//! ```
//! Barge-in: user speech while responding stops playback and generation at once and truncates the
//! assistant's turn to what was played. Speech that starts right after the end of a turn, before
//! the reply has begun, is taken as the same user continuing: the turn is extended, not answered
//! twice.

use std::time::Duration;

/// Where the conversation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnState {
    /// Not listening (before start, or paused).
    Idle,
    /// Waiting for the user to speak.
    Listening,
    /// The user is speaking.
    UserSpeaking,
    /// The assistant is generating and/or speaking its reply.
    Responding,
}

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Start,
    Stop,
    /// The VAD heard speech start (stream time).
    SpeechStarted {
        at: Duration,
    },
    /// The VAD heard speech end; `audio` is the utterance (16 kHz, with pre-roll).
    SpeechEnded {
        at: Duration,
        audio: Vec<f32>,
    },
    /// The engine produced the first item of the reply.
    ReplyStarted,
    /// The reply is generated and fully played.
    ReplyFinished,
}

/// What to do about it.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Answer this user utterance (a new user turn).
    Respond { audio: Vec<f32> },
    /// The user went on speaking before the reply began: drop the reply in preparation and answer
    /// the whole utterance, this audio appended to the previous one.
    ExtendUtterance { audio: Vec<f32> },
    /// Stop playback now (barge-in).
    StopPlayback,
    /// Stop generating and truncate the assistant's turn to what was played.
    CancelAndTruncateReply,
}

/// The turn state machine.
#[derive(Debug, Clone)]
pub struct TurnManager {
    state: TurnState,
    /// Whether the reply to the last utterance has produced anything yet.
    reply_started: bool,
    /// The user resumed speaking before the reply began: the utterance in progress continues
    /// the previous one.
    extending: bool,
    /// Half-duplex: never interrupt the assistant (user speech while responding is ignored).
    half_duplex: bool,
}

impl TurnManager {
    pub fn new(half_duplex: bool) -> Self {
        Self {
            state: TurnState::Idle,
            reply_started: false,
            extending: false,
            half_duplex,
        }
    }

    pub fn state(&self) -> TurnState {
        self.state
    }

    /// The utterance in progress continues the previous one (its reply was dropped).
    pub fn extending(&self) -> bool {
        self.extending
    }

    /// Applies an event; returns the actions to take, in order.
    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        use TurnState::*;
        match (self.state, event) {
            (_, Event::Stop) => {
                let was = self.state;
                self.state = Idle;
                if was == Responding {
                    vec![Action::StopPlayback, Action::CancelAndTruncateReply]
                } else {
                    vec![]
                }
            }
            (Idle, Event::Start) => {
                self.state = Listening;
                vec![]
            }
            (Listening, Event::SpeechStarted { .. }) => {
                self.state = UserSpeaking;
                vec![]
            }
            (UserSpeaking, Event::SpeechEnded { audio, .. }) => {
                self.state = Responding;
                self.reply_started = false;
                if std::mem::take(&mut self.extending) {
                    vec![Action::ExtendUtterance { audio }]
                } else {
                    vec![Action::Respond { audio }]
                }
            }
            (Responding, Event::ReplyStarted) => {
                self.reply_started = true;
                vec![]
            }
            (Responding, Event::SpeechStarted { .. }) if self.half_duplex => vec![],
            (Responding, Event::SpeechStarted { .. }) => {
                self.state = UserSpeaking;
                if self.reply_started {
                    // Barge-in.
                    vec![Action::StopPlayback, Action::CancelAndTruncateReply]
                } else {
                    // Nothing was said yet: the user is still talking. The next SpeechEnded
                    // extends the utterance instead of starting a new turn.
                    self.extending = true;
                    vec![Action::CancelAndTruncateReply]
                }
            }
            (Responding, Event::ReplyFinished) => {
                self.state = Listening;
                self.reply_started = false;
                vec![]
            }
            // Everything else (e.g. a late ReplyFinished after a barge-in, speech end while
            // listening) changes nothing.
            _ => vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn speech_end() -> Event {
        Event::SpeechEnded {
            at: Duration::from_secs(2),
            audio: vec![0.1; 10],
        }
    }

    fn speech_start() -> Event {
        Event::SpeechStarted {
            at: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_plain_turn() {
        let mut t = TurnManager::new(false);
        assert!(t.handle(speech_start()).is_empty(), "idle ignores speech");
        assert_eq!(t.state(), TurnState::Idle);
        t.handle(Event::Start);
        assert_eq!(t.state(), TurnState::Listening);
        t.handle(speech_start());
        assert_eq!(t.state(), TurnState::UserSpeaking);
        assert_eq!(
            t.handle(speech_end()),
            vec![Action::Respond {
                audio: vec![0.1; 10]
            }]
        );
        assert_eq!(t.state(), TurnState::Responding);
        t.handle(Event::ReplyStarted);
        t.handle(Event::ReplyFinished);
        assert_eq!(t.state(), TurnState::Listening);
    }

    #[test]
    fn barge_in_stops_playback_and_truncates() {
        let mut t = TurnManager::new(false);
        t.handle(Event::Start);
        t.handle(speech_start());
        t.handle(speech_end());
        t.handle(Event::ReplyStarted);
        assert_eq!(
            t.handle(speech_start()),
            vec![Action::StopPlayback, Action::CancelAndTruncateReply]
        );
        assert_eq!(t.state(), TurnState::UserSpeaking);
        // The cancelled reply's late completion changes nothing; the new utterance is a new turn.
        assert!(t.handle(Event::ReplyFinished).is_empty());
        assert_eq!(
            t.handle(speech_end()),
            vec![Action::Respond {
                audio: vec![0.1; 10]
            }]
        );
    }

    #[test]
    fn speaking_again_before_the_reply_extends_the_turn() {
        let mut t = TurnManager::new(false);
        t.handle(Event::Start);
        t.handle(speech_start());
        t.handle(speech_end());
        assert_eq!(
            t.handle(speech_start()),
            vec![Action::CancelAndTruncateReply]
        );
        assert_eq!(
            t.handle(speech_end()),
            vec![Action::ExtendUtterance {
                audio: vec![0.1; 10]
            }]
        );
        t.handle(Event::ReplyStarted);
        t.handle(Event::ReplyFinished);
        t.handle(speech_start());
        assert_eq!(
            t.handle(speech_end()),
            vec![Action::Respond {
                audio: vec![0.1; 10]
            }],
            "extension ended"
        );
    }

    #[test]
    fn half_duplex_never_interrupts() {
        let mut t = TurnManager::new(true);
        t.handle(Event::Start);
        t.handle(speech_start());
        t.handle(speech_end());
        t.handle(Event::ReplyStarted);
        assert!(t.handle(speech_start()).is_empty());
        assert_eq!(t.state(), TurnState::Responding);
    }

    #[test]
    fn stop_while_responding_cancels() {
        let mut t = TurnManager::new(false);
        t.handle(Event::Start);
        t.handle(speech_start());
        t.handle(speech_end());
        assert_eq!(
            t.handle(Event::Stop),
            vec![Action::StopPlayback, Action::CancelAndTruncateReply]
        );
        assert_eq!(t.state(), TurnState::Idle);
    }
}
