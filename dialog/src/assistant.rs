//! The dialog manager of a spoken conversation: one state machine that owns turn-taking, barge-in
//! (what was heard, where to cut), tool rounds and the conversation's items, free of I/O.
//!
//! Inputs go in ([`Input`]: the voice activity detector's events, the engine's [`ConvEvent`]s,
//! and ticks as the speaker plays on), each with where the speaker is ([`SpeakerState`]);
//! [`Effect`]s come out: calls on the engine conversation ([`Call`]), what to do with the
//! speaker, and what happened, for the log. No threads, no clocks: the caller passes the
//! speaker's counters in.
//!
//! Turn-taking itself is [`TurnManager`]'s (listening, the user speaking, responding; barge-in
//! and a continued utterance). This machine turns its actions into items and calls:
//! - a user turn is an item `user-N` and a reply `reply-N`;
//! - a continued utterance (the user resumed before the reply started) deletes the previous
//!   user item and adds one of both pieces, and asks for the reply again;
//! - a barge-in stops the speaker and cuts the reply where the user stopped hearing it: a reply
//!   still being generated is cancelled with the samples heard; one generated in full and still
//!   playing is truncated to them;
//! - speculation (when enabled, kept by [`Speculation`]): when the user pauses, the utterance so
//!   far gets its item and its reply at once (its tool calls wait for the turn); the reply's
//!   events are held back until the end of the silence confirms the turn (the same audio), and
//!   then given out as if they came now. If the user speaks on, the reply is cancelled with
//!   nothing heard and the item deleted, which the engine undoes exactly, and the next pause
//!   starts over on the longer utterance;
//! - a reply that called a tool goes on after the tool's result (the engine runs it and starts
//!   the next round of the same response): the response is over only when a round ends without
//!   a call, or when the rounds run out ([`Rounds`] says which, by the engine's count).

use std::time::Duration;

use crate::conversation::{Call, Content, ConvEvent, Placement, Respond, ToolPolicy};
use crate::rounds::{RoundEnd, Rounds};
use crate::speculation::{Seen, Speculation};
use crate::turn::{Action, Event, TurnManager, TurnState};

/// Where the speaker is, in 24 kHz samples since it opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpeakerState {
    /// Samples played (heard).
    pub played: u64,
    /// Where the next sample queued will be in the count of `played`.
    pub queued: u64,
    /// Everything queued has been played.
    pub idle: bool,
}

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Start listening.
    Start,
    /// The VAD heard speech start (stream time).
    SpeechStarted { at: Duration },
    /// The VAD heard speech end; `audio` is the utterance (16 kHz, with pre-roll).
    SpeechEnded { at: Duration, audio: Vec<f32> },
    /// The user paused: `audio` is the utterance so far, as `SpeechEnded` will give it if the
    /// silence holds.
    SpeechPaused { audio: Vec<f32> },
    /// The user spoke on after a pause, before the silence ended the utterance.
    SpeechResumed,
    /// An event of the engine conversation.
    Engine(ConvEvent),
    /// Time passed and the speaker played on: a reply generated in full and played out is over.
    Tick,
}

/// What to do about it.
#[derive(Debug, PartialEq)]
pub enum Effect {
    /// Make this call on the engine conversation.
    Engine(Call),
    /// A reply begins: hold its audio back by the learnt lead; its words start a line.
    BeginReply { response_id: String },
    /// Words of the reply in progress.
    Text(String),
    /// Speech of the reply in progress (24 kHz), to play.
    Audio(Vec<f32>),
    /// Drop everything queued on the speaker and not yet played (barge-in).
    StopPlayback,
    /// The user spoke over the reply after hearing `heard` samples of it (0: none).
    BargeIn { heard: u64 },
    /// The playback of the reply is over (played out, or `cut`): learn its pacing.
    ReplyPlayed { cut: bool },
    /// A reply is over (generated and played out, or cut); `replies` so far.
    ReplyOver { replies: u64 },
    /// An engine event other than words and speech, as the conversation sees it: when it
    /// happens, or for a speculative reply when the turn is confirmed; never for a dropped
    /// reply. It is news for a log; it asks for nothing.
    Report(ConvEvent),
}

/// The assistant's dialog state.
#[derive(Debug, Clone)]
pub struct Assistant {
    turns: TurnManager,
    /// Start replies on pauses.
    speculate: bool,
    /// The reply started on a pause, and those dropped.
    speculation: Speculation,
    /// Pairs of user item and reply asked for so far (they number the ids).
    asks: u64,
    /// Ask the engine for the words of each user turn (for the log).
    transcribe_user: bool,
    user_turns: u64,
    /// The last user item and its audio (a continued utterance replaces it).
    last_user: Option<(String, Vec<f32>)>,
    /// The last response asked for, the one that started (and its current item), and the one
    /// that was interrupted (its late text and audio are dropped).
    asked: Option<String>,
    current: Option<String>,
    current_item: Option<String>,
    cancelled: Option<String>,
    /// Where the reply in progress began in the speaker's count, while it plays.
    reply_base: Option<u64>,
    /// The reply has been generated in full (it may still be playing).
    reply_done: bool,
    /// The tool rounds of the response in progress: which reply ends it.
    rounds: Rounds,
    replies: u64,
    barge_ins: u64,
}

impl Assistant {
    /// `half_duplex`: the user never interrupts the assistant. `transcribe_user`: ask for the
    /// words of each user turn.
    pub fn new(half_duplex: bool, transcribe_user: bool) -> Self {
        Self {
            turns: TurnManager::new(half_duplex),
            speculate: false,
            speculation: Speculation::new(),
            asks: 0,
            transcribe_user,
            user_turns: 0,
            last_user: None,
            asked: None,
            current: None,
            current_item: None,
            cancelled: None,
            reply_base: None,
            reply_done: false,
            rounds: Rounds::new(ToolPolicy::Run {
                max_rounds: usize::MAX,
            }),
            replies: 0,
            barge_ins: 0,
        }
    }

    /// Who runs the conversation's tools, and how many rounds a response may take: the policy
    /// the conversation was opened with (by default the engine runs them, without a limit).
    pub fn tool_policy(mut self, policy: ToolPolicy) -> Self {
        self.rounds = Rounds::new(policy);
        self
    }

    /// Start each reply when the user pauses (see the module's notes).
    pub fn speculative(mut self, on: bool) -> Self {
        self.speculate = on;
        self
    }

    pub fn state(&self) -> TurnState {
        self.turns.state()
    }

    /// A reply started on a pause is waiting for the end of the silence.
    pub fn speculating(&self) -> bool {
        self.speculation.active()
    }

    /// The response id of the reply started speculatively and not yet confirmed: its events
    /// are held back until the end of the silence confirms the turn.
    pub fn speculative_response(&self) -> Option<&str> {
        self.speculation.response_id()
    }

    /// Whether an engine event belongs to a reply dropped on the way (a speculative reply the
    /// user spoke over): nothing of it is played or reported.
    #[cfg(test)]
    fn is_dropped(&self, ev: &ConvEvent) -> bool {
        self.speculation.is_dropped(ev)
    }

    /// Replies over so far (answered, or cut).
    pub fn replies(&self) -> u64 {
        self.replies
    }

    pub fn user_turns(&self) -> u64 {
        self.user_turns
    }

    pub fn barge_ins(&self) -> u64 {
        self.barge_ins
    }

    /// Whether the reply in progress has been generated in full (it may still be playing).
    pub fn reply_done(&self) -> bool {
        self.reply_done
    }

    /// Where the reply being played began in the speaker's count.
    pub fn reply_base(&self) -> Option<u64> {
        self.reply_base
    }

    /// Applies an input; returns the effects, in order.
    pub fn handle(&mut self, input: Input, speaker: SpeakerState) -> Vec<Effect> {
        let mut out = Vec::new();
        let actions = match input {
            Input::Start => self.turns.handle(Event::Start),
            Input::SpeechStarted { at } => self.turns.handle(Event::SpeechStarted { at }),
            Input::SpeechEnded { at, audio } => {
                let confirmed = self.speculation.answers(&audio);
                if !confirmed {
                    // Not the utterance it was started on (the start moved): start over.
                    self.abandon(&mut out);
                }
                let actions = self.turns.handle(Event::SpeechEnded { at, audio });
                if confirmed {
                    return self.confirm(actions, speaker, out);
                }
                actions
            }
            Input::SpeechPaused { audio } => {
                self.speculate_on(audio, &mut out);
                Vec::new()
            }
            Input::SpeechResumed => {
                self.abandon(&mut out);
                Vec::new()
            }
            Input::Engine(ev) => match self.speculation.event(ev) {
                Seen::Pass(ev) => self.engine_event(ev, speaker, &mut out),
                Seen::Held => return out,
                Seen::Dropped(calls) => {
                    out.extend(calls.into_iter().map(Effect::Engine));
                    return out;
                }
            },
            Input::Tick => self.tick(speaker, &mut out),
        };
        for action in actions {
            self.act(action, speaker, &mut out);
        }
        out
    }

    /// The session ends: nothing more is generated or kept.
    pub fn stop(&mut self) -> Vec<Effect> {
        self.turns.handle(Event::Stop);
        vec![Effect::Engine(Call::Cancel { heard: Some(0) })]
    }

    /// The user paused: the utterance so far gets its item and reply now, held back.
    fn speculate_on(&mut self, audio: Vec<f32>, out: &mut Vec<Effect>) {
        if !self.speculate
            || self.speculation.active()
            || self.turns.state() != TurnState::UserSpeaking
            || self.turns.extending()
        {
            return;
        }
        let (user_item, response_id) = self.ask(audio.clone(), true, out);
        self.speculation
            .start(audio, user_item, response_id.clone(), response_id);
    }

    /// The user went on: the speculative reply and its item go, leaving no trace.
    fn abandon(&mut self, out: &mut Vec<Effect>) {
        let undo = self.speculation.abandon();
        out.extend(undo.into_iter().map(Effect::Engine));
    }

    /// The end of the silence confirmed the speculative turn: it is the user's turn, and its
    /// reply's events so far come out now.
    fn confirm(
        &mut self,
        actions: Vec<Action>,
        speaker: SpeakerState,
        mut out: Vec<Effect>,
    ) -> Vec<Effect> {
        let Some(s) = self.speculation.confirm() else {
            return out;
        };
        // The engine may run the reply's tool calls now.
        out.push(Effect::Engine(s.call));
        for action in actions {
            match action {
                Action::Respond { audio } => {
                    self.user_turns += 1;
                    self.asked = Some(s.response_id.clone());
                    if self.transcribe_user {
                        out.push(Effect::Engine(Call::TranscribeWhenIdle {
                            item_id: s.user_item.clone(),
                            audio: audio.clone(),
                        }));
                    }
                    self.last_user = Some((s.user_item.clone(), audio));
                }
                other => self.act(other, speaker, &mut out),
            }
        }
        for ev in s.held {
            let actions = self.engine_event(ev, speaker, &mut out);
            for action in actions {
                self.act(action, speaker, &mut out);
            }
        }
        out
    }

    fn engine_event(
        &mut self,
        ev: ConvEvent,
        speaker: SpeakerState,
        out: &mut Vec<Effect>,
    ) -> Vec<Action> {
        if !matches!(ev, ConvEvent::Text { .. } | ConvEvent::Audio { .. }) {
            out.push(Effect::Report(ev.clone()));
        }
        let round_end = self.rounds.event(&ev);
        match ev {
            ConvEvent::ReplyStarted {
                response_id,
                item_id,
                ..
            } => {
                self.current_item = Some(item_id);
                self.current = Some(response_id.clone());
                // Where this reply's first sample will be in the speaker's count.
                self.reply_base = Some(speaker.queued);
                self.reply_done = false;
                out.push(Effect::BeginReply { response_id });
                return self.turns.handle(Event::ReplyStarted);
            }
            ConvEvent::Text { response_id, .. } | ConvEvent::Audio { response_id, .. }
                if Some(&response_id) == self.cancelled.as_ref() => {}
            ConvEvent::Text { piece, .. } => out.push(Effect::Text(piece)),
            ConvEvent::Audio { samples, .. } => out.push(Effect::Audio(samples)),
            ConvEvent::ReplyDone {
                response_id,
                cancelled,
                ..
            } => {
                if let Some(RoundEnd::ToolsRun { .. }) = round_end {
                    // The tool runs, then the model answers in a round of its own: the
                    // response goes on.
                } else if Some(&response_id) == self.current.as_ref() || self.current.is_none() {
                    self.replies += 1;
                    if cancelled {
                        self.reply_base = None;
                        self.reply_done = false;
                    } else {
                        self.reply_done = true;
                    }
                }
            }
            _ => {}
        }
        Vec::new()
    }

    /// The reply is over once it has been generated and played out.
    fn tick(&mut self, speaker: SpeakerState, out: &mut Vec<Effect>) -> Vec<Action> {
        if !self.reply_done || (self.reply_base.is_some() && !speaker.idle) {
            return Vec::new();
        }
        self.reply_done = false;
        if self.reply_base.take().is_some() {
            out.push(Effect::ReplyPlayed { cut: false });
        }
        out.push(Effect::ReplyOver {
            replies: self.replies,
        });
        self.turns.handle(Event::ReplyFinished)
    }

    fn act(&mut self, action: Action, speaker: SpeakerState, out: &mut Vec<Effect>) {
        match action {
            Action::Respond { audio } => self.user_turn(audio, out),
            Action::ExtendUtterance { audio } => {
                // The reply was cancelled before it said anything (and so left nothing); the
                // utterance goes on: one user turn of both pieces.
                let mut whole = Vec::new();
                if let Some((id, before)) = self.last_user.take() {
                    out.push(Effect::Engine(Call::Delete { item_id: id }));
                    whole = before;
                }
                whole.extend_from_slice(&audio);
                self.user_turn(whole, out);
            }
            Action::StopPlayback => out.push(Effect::StopPlayback),
            Action::CancelAndTruncateReply => {
                self.cancelled = self.asked.clone();
                // What was heard: the speaker's count at the barge-in, less where the reply began.
                let heard = self
                    .reply_base
                    .map_or(0, |base| speaker.played.saturating_sub(base));
                self.barge_ins += 1;
                out.push(Effect::BargeIn { heard });
                if self.reply_base.is_some() {
                    out.push(Effect::ReplyPlayed { cut: true });
                }
                match (&self.current_item, self.reply_done) {
                    // Generated already and still playing: cut the item that is in the
                    // conversation to what was heard.
                    (Some(item), true) => out.push(Effect::Engine(Call::Truncate {
                        item_id: item.clone(),
                        audio_samples: heard,
                    })),
                    _ => out.push(Effect::Engine(Call::Cancel { heard: Some(heard) })),
                }
                self.reply_base = None;
            }
        }
    }

    /// An item of `audio` and a reply to it (`speculative`: on a turn not yet certain); their ids.
    fn ask(
        &mut self,
        audio: Vec<f32>,
        speculative: bool,
        out: &mut Vec<Effect>,
    ) -> (String, String) {
        self.asks += 1;
        let n = self.asks;
        let id = format!("user-{n}");
        out.push(Effect::Engine(Call::Add {
            item_id: id.clone(),
            content: Content::UserAudio(audio),
            place: Placement::End,
        }));
        let response_id = format!("reply-{n}");
        let respond = Respond {
            response_id: response_id.clone(),
            item_id: response_id.clone(),
            output: None,
        };
        out.push(Effect::Engine(if speculative {
            Call::Speculate(respond)
        } else {
            Call::Respond(respond)
        }));
        (id, response_id)
    }

    /// A user turn of `audio`: its item, the reply to it, and its words for the log.
    fn user_turn(&mut self, audio: Vec<f32>, out: &mut Vec<Effect>) {
        self.user_turns += 1;
        let (id, response_id) = self.ask(audio.clone(), false, out);
        self.asked = Some(response_id);
        if self.transcribe_user {
            // The engine runs it when nothing else waits: the words are for the log.
            out.push(Effect::Engine(Call::TranscribeWhenIdle {
                item_id: id.clone(),
                audio: audio.clone(),
            }));
        }
        self.last_user = Some((id, audio));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// A speaker that played `played` samples and has `queued - played` still to play.
    fn speaker(played: u64, queued: u64) -> SpeakerState {
        SpeakerState {
            played,
            queued,
            idle: played >= queued,
        }
    }

    fn started(response_id: &str, item_id: &str) -> Input {
        Input::Engine(ConvEvent::ReplyStarted {
            response_id: response_id.into(),
            item_id: item_id.into(),
            latency_ms: 0.0,
        })
    }

    fn audio(response_id: &str, n: usize) -> Input {
        Input::Engine(ConvEvent::Audio {
            response_id: response_id.into(),
            samples: vec![0.5; n],
        })
    }

    fn done(response_id: &str, item_id: &str, cancelled: bool) -> Input {
        Input::Engine(ConvEvent::ReplyDone {
            response_id: response_id.into(),
            item_id: item_id.into(),
            text: String::new(),
            audio_samples: 0,
            cancelled,
        })
    }

    /// The report of an engine event.
    fn report(input: &Input) -> Effect {
        match input {
            Input::Engine(ev) => Effect::Report(ev.clone()),
            _ => unreachable!("an engine event"),
        }
    }

    fn add(item_id: &str, audio: Vec<f32>) -> Effect {
        Effect::Engine(Call::Add {
            item_id: item_id.into(),
            content: Content::UserAudio(audio),
            place: Placement::End,
        })
    }

    fn respond(n: u64) -> Effect {
        Effect::Engine(Call::Respond(Respond {
            response_id: format!("reply-{n}"),
            item_id: format!("reply-{n}"),
            output: None,
        }))
    }

    /// A reply asked for on a pause.
    fn speculate(n: u64) -> Effect {
        Effect::Engine(Call::Speculate(Respond {
            response_id: format!("reply-{n}"),
            item_id: format!("reply-{n}"),
            output: None,
        }))
    }

    fn confirm(n: u64) -> Effect {
        Effect::Engine(Call::Confirm {
            response_id: format!("reply-{n}"),
        })
    }

    /// An assistant that heard one utterance (`user-1`) and asked for `reply-1`.
    fn asked() -> Assistant {
        let mut a = Assistant::new(false, false);
        let s = SpeakerState::default();
        assert!(a.handle(Input::Start, s).is_empty());
        assert!(a.handle(Input::SpeechStarted { at: at(1) }, s).is_empty());
        let out = a.handle(
            Input::SpeechEnded {
                at: at(2),
                audio: vec![0.1; 4],
            },
            s,
        );
        assert_eq!(out, vec![add("user-1", vec![0.1; 4]), respond(1)]);
        assert_eq!(a.state(), TurnState::Responding);
        a
    }

    #[test]
    fn a_turn_is_answered_and_over_once_played_out() {
        let mut a = asked();
        assert_eq!(
            a.handle(started("reply-1", "reply-1"), speaker(100, 100)),
            vec![
                report(&started("reply-1", "reply-1")),
                Effect::BeginReply {
                    response_id: "reply-1".into()
                }
            ]
        );
        assert_eq!(a.reply_base(), Some(100));
        assert_eq!(
            a.handle(audio("reply-1", 3), speaker(100, 100)),
            vec![Effect::Audio(vec![0.5; 3])]
        );
        assert_eq!(
            a.handle(done("reply-1", "reply-1", false), speaker(100, 103)),
            vec![report(&done("reply-1", "reply-1", false))]
        );
        assert!(
            a.handle(Input::Tick, speaker(101, 103)).is_empty(),
            "still playing"
        );
        assert_eq!(
            a.handle(Input::Tick, speaker(103, 103)),
            vec![
                Effect::ReplyPlayed { cut: false },
                Effect::ReplyOver { replies: 1 }
            ]
        );
        assert_eq!(a.state(), TurnState::Listening);
    }

    #[test]
    fn a_barge_in_stops_the_speaker_and_cancels_the_reply_where_it_was_heard() {
        let mut a = asked();
        a.handle(started("reply-1", "reply-1"), speaker(1000, 1000));
        a.handle(audio("reply-1", 24_000), speaker(1000, 1000));
        // 0.2 s of the reply had been heard when the user spoke over it.
        let out = a.handle(Input::SpeechStarted { at: at(3) }, speaker(5800, 25_000));
        assert_eq!(
            out,
            vec![
                Effect::StopPlayback,
                Effect::BargeIn { heard: 4800 },
                Effect::ReplyPlayed { cut: true },
                Effect::Engine(Call::Cancel { heard: Some(4800) }),
            ]
        );
        assert_eq!(a.barge_ins(), 1);
        assert_eq!(a.state(), TurnState::UserSpeaking);
        // What the cancelled reply still sends is not played.
        assert!(a
            .handle(audio("reply-1", 1920), speaker(5800, 5800))
            .is_empty());
        a.handle(done("reply-1", "reply-1", true), speaker(5800, 5800));
        assert!(a.handle(Input::Tick, speaker(5800, 5800)).is_empty());
        // The interruption is a new turn.
        let out = a.handle(
            Input::SpeechEnded {
                at: at(4),
                audio: vec![0.2; 2],
            },
            speaker(5800, 5800),
        );
        assert_eq!(out, vec![add("user-2", vec![0.2; 2]), respond(2)]);
    }

    #[test]
    fn a_reply_generated_in_full_is_cut_to_what_was_heard() {
        let mut a = asked();
        a.handle(started("reply-1", "reply-1"), speaker(0, 0));
        a.handle(audio("reply-1", 48_000), speaker(0, 0));
        a.handle(done("reply-1", "reply-1", false), speaker(0, 48_000));
        assert!(a.handle(Input::Tick, speaker(1920, 48_000)).is_empty());
        let out = a.handle(Input::SpeechStarted { at: at(3) }, speaker(12_000, 48_000));
        assert_eq!(
            out,
            vec![
                Effect::StopPlayback,
                Effect::BargeIn { heard: 12_000 },
                Effect::ReplyPlayed { cut: true },
                Effect::Engine(Call::Truncate {
                    item_id: "reply-1".into(),
                    audio_samples: 12_000
                }),
            ]
        );
        // The reply is over (it counts), and the user holds the floor.
        assert_eq!(
            a.handle(Input::Tick, speaker(12_000, 12_000)),
            vec![Effect::ReplyOver { replies: 1 }]
        );
        assert_eq!(a.state(), TurnState::UserSpeaking);
    }

    #[test]
    fn speaking_on_before_the_reply_starts_continues_the_utterance() {
        let mut a = asked();
        // Nothing was said yet: no playback to stop, nothing heard.
        let out = a.handle(Input::SpeechStarted { at: at(3) }, speaker(0, 0));
        assert_eq!(
            out,
            vec![
                Effect::BargeIn { heard: 0 },
                Effect::Engine(Call::Cancel { heard: Some(0) })
            ]
        );
        // The reply that was on its way is dropped unheard.
        assert!(a.handle(audio("reply-1", 1920), speaker(0, 0)).is_empty());
        let out = a.handle(
            Input::SpeechEnded {
                at: at(4),
                audio: vec![0.3; 2],
            },
            speaker(0, 0),
        );
        assert_eq!(
            out,
            vec![
                Effect::Engine(Call::Delete {
                    item_id: "user-1".into()
                }),
                add("user-2", vec![0.1, 0.1, 0.1, 0.1, 0.3, 0.3]),
                respond(2),
            ]
        );
        assert_eq!(a.user_turns(), 2);
    }

    #[test]
    fn a_tool_round_keeps_the_response_going_until_the_answer() {
        let mut a = asked();
        a.handle(started("reply-1", "reply-1"), speaker(0, 0));
        a.handle(
            Input::Engine(ConvEvent::ToolCall {
                response_id: "reply-1".into(),
                call_id: "call_1_1".into(),
                name: "get_time".into(),
                arguments: "{}".into(),
            }),
            speaker(0, 0),
        );
        a.handle(done("reply-1", "reply-1", false), speaker(0, 0));
        assert!(
            a.handle(Input::Tick, speaker(0, 0)).is_empty(),
            "the tool's result and the answer are still to come"
        );
        assert_eq!(a.state(), TurnState::Responding);
        assert_eq!(a.replies(), 0);
        // The answer: a second round of the same response, in an item of its own.
        a.handle(started("reply-1", "reply-1-1"), speaker(0, 0));
        a.handle(audio("reply-1", 100), speaker(0, 0));
        // A barge-in now cuts the answer's item, not the call's.
        a.handle(done("reply-1", "reply-1-1", false), speaker(0, 100));
        let out = a.handle(Input::SpeechStarted { at: at(5) }, speaker(40, 100));
        assert_eq!(
            out.last(),
            Some(&Effect::Engine(Call::Truncate {
                item_id: "reply-1-1".into(),
                audio_samples: 40
            }))
        );
        assert_eq!(a.replies(), 1);
    }

    #[test]
    fn a_response_whose_tool_rounds_run_out_is_over() {
        let mut a = Assistant::new(false, false).tool_policy(ToolPolicy::Run { max_rounds: 1 });
        a.handle(Input::Start, speaker(0, 0));
        a.handle(Input::SpeechStarted { at: at(1) }, speaker(0, 0));
        a.handle(
            Input::SpeechEnded {
                at: at(2),
                audio: vec![0.1],
            },
            speaker(0, 0),
        );
        let call = |item: &str| {
            Input::Engine(ConvEvent::ToolCall {
                response_id: "reply-1".into(),
                call_id: format!("call-{item}"),
                name: "get_time".into(),
                arguments: "{}".into(),
            })
        };
        a.handle(started("reply-1", "reply-1"), speaker(0, 0));
        a.handle(call("reply-1"), speaker(0, 0));
        a.handle(done("reply-1", "reply-1", false), speaker(0, 0));
        assert!(a.handle(Input::Tick, speaker(0, 0)).is_empty());
        // The answer round calls again: the engine runs no more rounds, and the response ends.
        a.handle(started("reply-1", "reply-1-1"), speaker(0, 0));
        a.handle(call("reply-1-1"), speaker(0, 0));
        a.handle(done("reply-1", "reply-1-1", false), speaker(0, 0));
        let out = a.handle(Input::Tick, speaker(0, 0));
        assert!(out.contains(&Effect::ReplyOver { replies: 1 }), "{out:?}");
        assert_eq!(a.state(), TurnState::Listening);
    }

    #[test]
    fn half_duplex_plays_the_reply_through_speech() {
        let mut a = Assistant::new(true, true);
        let s = SpeakerState::default();
        a.handle(Input::Start, s);
        a.handle(Input::SpeechStarted { at: at(1) }, s);
        let out = a.handle(
            Input::SpeechEnded {
                at: at(2),
                audio: vec![0.1],
            },
            s,
        );
        assert_eq!(
            out.last(),
            Some(&Effect::Engine(Call::TranscribeWhenIdle {
                item_id: "user-1".into(),
                audio: vec![0.1]
            })),
            "the user's words are asked for"
        );
        a.handle(started("reply-1", "reply-1"), s);
        assert!(a
            .handle(Input::SpeechStarted { at: at(3) }, speaker(10, 100))
            .is_empty());
        assert_eq!(a.state(), TurnState::Responding);
    }

    fn text(response_id: &str, piece: &str) -> Input {
        Input::Engine(ConvEvent::Text {
            response_id: response_id.into(),
            piece: piece.into(),
        })
    }

    /// A speculative assistant that heard speech start.
    fn speaking() -> Assistant {
        let mut a = Assistant::new(false, false).speculative(true);
        let s = SpeakerState::default();
        a.handle(Input::Start, s);
        a.handle(Input::SpeechStarted { at: at(1) }, s);
        a
    }

    #[test]
    fn a_pause_starts_the_reply_and_the_end_of_the_silence_plays_it() {
        let mut a = speaking();
        let s = SpeakerState::default();
        let out = a.handle(
            Input::SpeechPaused {
                audio: vec![0.1; 4],
            },
            s,
        );
        assert_eq!(out, vec![add("user-1", vec![0.1; 4]), speculate(1)]);
        assert!(a.speculating());
        assert_eq!(a.speculative_response(), Some("reply-1"));
        assert_eq!(a.state(), TurnState::UserSpeaking, "the user may go on");
        // The reply's first events are held back, nothing is played.
        for ev in [
            started("reply-1", "reply-1"),
            text("reply-1", "Hi"),
            audio("reply-1", 3),
        ] {
            assert!(a.handle(ev, s).is_empty());
        }
        assert_eq!(a.reply_base(), None);
        // The silence holds: the same utterance ends, and the reply comes out at once.
        let out = a.handle(
            Input::SpeechEnded {
                at: at(2),
                audio: vec![0.1; 4],
            },
            speaker(50, 50),
        );
        assert_eq!(
            out,
            vec![
                confirm(1),
                report(&started("reply-1", "reply-1")),
                Effect::BeginReply {
                    response_id: "reply-1".into()
                },
                Effect::Text("Hi".into()),
                Effect::Audio(vec![0.5; 3]),
            ]
        );
        assert!(!a.speculating());
        assert_eq!(a.speculative_response(), None, "confirmed");
        assert_eq!(a.state(), TurnState::Responding);
        assert_eq!(
            a.reply_base(),
            Some(50),
            "the reply begins where the speaker is now"
        );
        assert_eq!(a.user_turns(), 1);
        // From here it is a reply like any other.
        assert_eq!(
            a.handle(audio("reply-1", 2), speaker(50, 53)),
            vec![Effect::Audio(vec![0.5; 2])]
        );
        a.handle(done("reply-1", "reply-1", false), speaker(50, 55));
        assert_eq!(
            a.handle(Input::Tick, speaker(55, 55)),
            vec![
                Effect::ReplyPlayed { cut: false },
                Effect::ReplyOver { replies: 1 }
            ]
        );
        assert_eq!(a.state(), TurnState::Listening);
    }

    #[test]
    fn speech_after_a_pause_drops_the_speculative_reply_and_answers_the_whole() {
        let mut a = speaking();
        let s = SpeakerState::default();
        a.handle(
            Input::SpeechPaused {
                audio: vec![0.1; 4],
            },
            s,
        );
        a.handle(started("reply-1", "reply-1"), s);
        a.handle(audio("reply-1", 3), s);
        // The user goes on: the reply is cancelled with nothing heard, its turn deleted.
        assert_eq!(
            a.handle(Input::SpeechResumed, s),
            vec![
                Effect::Engine(Call::Cancel { heard: Some(0) }),
                Effect::Engine(Call::Delete {
                    item_id: "user-1".into()
                }),
            ]
        );
        assert!(!a.speculating());
        // Its late events are not news, for the dialog nor for a log.
        let event = |input: Input| match input {
            Input::Engine(ev) => ev,
            _ => unreachable!("an engine event"),
        };
        assert!(a.is_dropped(&event(done("reply-1", "reply-1", true))));
        assert!(!a.is_dropped(&event(done("reply-2", "reply-2", true))));
        assert!(a.handle(audio("reply-1", 3), s).is_empty());
        assert!(a.handle(done("reply-1", "reply-1", true), s).is_empty());
        assert_eq!(a.replies(), 0);
        // The next pause starts over on the whole utterance, and the silence confirms it.
        let whole = vec![0.1; 9];
        assert_eq!(
            a.handle(
                Input::SpeechPaused {
                    audio: whole.clone()
                },
                s
            ),
            vec![add("user-2", whole.clone()), speculate(2)]
        );
        a.handle(started("reply-2", "reply-2"), s);
        let out = a.handle(
            Input::SpeechEnded {
                at: at(3),
                audio: whole,
            },
            s,
        );
        assert_eq!(
            out,
            vec![
                confirm(2),
                report(&started("reply-2", "reply-2")),
                Effect::BeginReply {
                    response_id: "reply-2".into()
                }
            ]
        );
        assert_eq!(a.user_turns(), 1, "one user turn, of the whole utterance");
        a.handle(done("reply-2", "reply-2", false), s);
        assert_eq!(
            a.handle(Input::Tick, speaker(0, 0)),
            vec![
                Effect::ReplyPlayed { cut: false },
                Effect::ReplyOver { replies: 1 }
            ]
        );
    }

    /// A speculative reply generated in full before the end of the silence is news only once
    /// the turn is confirmed: its end is reported after the user's turn, not before.
    #[test]
    fn a_speculative_reply_finished_early_is_reported_at_the_end_of_the_silence() {
        let mut a = speaking();
        let s = SpeakerState::default();
        a.handle(
            Input::SpeechPaused {
                audio: vec![0.1; 4],
            },
            s,
        );
        for ev in [
            started("reply-1", "reply-1"),
            audio("reply-1", 3),
            done("reply-1", "reply-1", false),
        ] {
            assert!(a.handle(ev, s).is_empty(), "held back");
        }
        assert_eq!(a.replies(), 0);
        let out = a.handle(
            Input::SpeechEnded {
                at: at(2),
                audio: vec![0.1; 4],
            },
            s,
        );
        assert_eq!(
            out,
            vec![
                confirm(1),
                report(&started("reply-1", "reply-1")),
                Effect::BeginReply {
                    response_id: "reply-1".into()
                },
                Effect::Audio(vec![0.5; 3]),
                report(&done("reply-1", "reply-1", false)),
            ]
        );
        assert!(a.reply_done());
        assert_eq!(a.replies(), 1);
    }

    #[test]
    fn an_end_on_other_audio_than_the_pause_starts_over() {
        let mut a = speaking();
        let s = SpeakerState::default();
        a.handle(
            Input::SpeechPaused {
                audio: vec![0.1; 4],
            },
            s,
        );
        let out = a.handle(
            Input::SpeechEnded {
                at: at(2),
                audio: vec![0.2; 5],
            },
            s,
        );
        assert_eq!(
            out,
            vec![
                Effect::Engine(Call::Cancel { heard: Some(0) }),
                Effect::Engine(Call::Delete {
                    item_id: "user-1".into()
                }),
                add("user-2", vec![0.2; 5]),
                respond(2),
            ]
        );
    }

    #[test]
    fn a_speculative_reply_already_finished_is_deleted_when_the_user_goes_on() {
        let mut a = speaking();
        let s = SpeakerState::default();
        a.handle(
            Input::SpeechPaused {
                audio: vec![0.1; 4],
            },
            s,
        );
        a.handle(started("reply-1", "reply-1"), s);
        a.handle(done("reply-1", "reply-1", false), s);
        assert_eq!(
            a.handle(Input::SpeechResumed, s),
            vec![
                Effect::Engine(Call::Delete {
                    item_id: "reply-1".into()
                }),
                Effect::Engine(Call::Delete {
                    item_id: "user-1".into()
                }),
            ]
        );
    }

    #[test]
    fn without_speculation_a_pause_changes_nothing() {
        let mut a = Assistant::new(false, false);
        let s = SpeakerState::default();
        a.handle(Input::Start, s);
        a.handle(Input::SpeechStarted { at: at(1) }, s);
        assert!(a
            .handle(
                Input::SpeechPaused {
                    audio: vec![0.1; 4]
                },
                s
            )
            .is_empty());
        assert!(a.handle(Input::SpeechResumed, s).is_empty());
    }
}
