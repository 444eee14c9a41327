//! A reply started before its turn is certain: when the user pauses, the utterance so far gets
//! its item and its reply at once; the end of the silence confirms the turn (the same audio), or
//! the user speaks on and the work is undone.
//!
//! This type keeps the books of it, free of I/O, for every driver of a spoken conversation (the
//! voice loop's dialog manager, the Realtime server's sessions): which reply is speculative, its
//! events held back until the turn is confirmed, the engine calls that undo it, and which
//! replies were dropped (their late events are ignored). The driver names the items and makes
//! the calls; nothing here decides when to speculate.

use std::collections::VecDeque;

use crate::conversation::{Call, ConvEvent};

/// Dropped replies remembered: their late events come soon, a few are enough.
const DROPPED_KEPT: usize = 8;

#[derive(Debug, Clone)]
struct Pending {
    /// The utterance it answers.
    audio: Vec<f32>,
    user_item: String,
    response_id: String,
    reply_item: String,
    /// The reply's events so far (and errors of its items), held back.
    held: Vec<ConvEvent>,
}

impl Pending {
    fn owns(&self, ev: &ConvEvent) -> bool {
        match ev {
            ConvEvent::Error {
                item_id: Some(id), ..
            } => *id == self.user_item || *id == self.reply_item,
            _ => ev.response_id() == Some(self.response_id.as_str()),
        }
    }
}

#[derive(Debug, Clone)]
struct Dropped {
    response_id: String,
    user_item: String,
    reply_item: String,
    /// Items whose deletion was asked for: the news of each (deleted, or an error) is the
    /// undoing's, once (a driver may give a later item the same id).
    deleting: Vec<String>,
    /// Its end has not come yet: errors of its items are its own.
    open: bool,
    /// Cancelled before it was seen to end: should it end done anyway (it was over before the
    /// cancel reached it), its item is deleted then.
    cancelled: bool,
}

impl Dropped {
    fn owns(&self, ev: &ConvEvent) -> bool {
        match ev {
            ConvEvent::Deleted { item_id } => self.deleting.contains(item_id),
            ConvEvent::Error {
                item_id: Some(id), ..
            } => {
                (self.open && (*id == self.user_item || *id == self.reply_item))
                    || self.deleting.contains(id)
            }
            _ => ev.response_id() == Some(self.response_id.as_str()),
        }
    }
}

/// What an engine event is to the speculation.
#[derive(Debug, PartialEq)]
pub enum Seen {
    /// Not its business: the driver handles the event as usual.
    Pass(ConvEvent),
    /// An event of the speculative reply, held back until the turn is confirmed.
    Held,
    /// An event of a dropped reply: nothing of it is played, shown or reported. The calls (if
    /// any) finish undoing it: a reply that was over before its cancel reached the engine is
    /// deleted.
    Dropped(Vec<Call>),
}

/// A confirmed speculative turn: its items, and the reply's events so far, to give out now as if
/// they came now.
#[derive(Debug, PartialEq)]
pub struct Confirmed {
    /// Tells the engine: the reply's tool calls may run.
    pub call: Call,
    pub audio: Vec<f32>,
    pub user_item: String,
    pub response_id: String,
    pub reply_item: String,
    pub held: Vec<ConvEvent>,
}

/// The speculation of one conversation: at most one reply at a time.
#[derive(Debug, Clone, Default)]
pub struct Speculation {
    pending: Option<Pending>,
    dropped: VecDeque<Dropped>,
}

impl Speculation {
    pub fn new() -> Self {
        Self::default()
    }

    /// A speculative reply waits for its turn to be confirmed.
    pub fn active(&self) -> bool {
        self.pending.is_some()
    }

    /// The speculative reply's response id.
    pub fn response_id(&self) -> Option<&str> {
        self.pending.as_ref().map(|p| p.response_id.as_str())
    }

    /// A reply `response_id` (item `reply_item`) was asked for on `audio`, added as
    /// `user_item`, before the turn is certain. Replaces (without undoing) any speculation in
    /// progress: the driver abandons that one first.
    pub fn start(
        &mut self,
        audio: Vec<f32>,
        user_item: impl Into<String>,
        response_id: impl Into<String>,
        reply_item: impl Into<String>,
    ) {
        self.pending = Some(Pending {
            audio,
            user_item: user_item.into(),
            response_id: response_id.into(),
            reply_item: reply_item.into(),
            held: Vec::new(),
        });
    }

    /// Whether the speculative reply answers exactly `audio` (the end of the silence confirms
    /// it); false when there is none.
    pub fn answers(&self, audio: &[f32]) -> bool {
        self.pending.as_ref().is_some_and(|p| p.audio == audio)
    }

    /// Sorts an engine event: held for the speculative reply, ignored for a dropped one, or
    /// passed on.
    pub fn event(&mut self, ev: ConvEvent) -> Seen {
        if let Some(p) = &mut self.pending {
            if p.owns(&ev) {
                p.held.push(ev);
                return Seen::Held;
            }
        }
        let Some(d) = self.dropped.iter_mut().find(|d| d.owns(&ev)) else {
            return Seen::Pass(ev);
        };
        let mut calls = Vec::new();
        match &ev {
            ConvEvent::ReplyDone {
                cancelled, item_id, ..
            } => {
                d.open = false;
                if !cancelled && std::mem::take(&mut d.cancelled) {
                    calls.push(Call::Delete {
                        item_id: item_id.clone(),
                    });
                    d.deleting.push(item_id.clone());
                }
            }
            ConvEvent::Deleted { item_id: id }
            | ConvEvent::Error {
                item_id: Some(id), ..
            } => {
                let own = d.open && (*id == d.user_item || *id == d.reply_item);
                if !own {
                    if let Some(i) = d.deleting.iter().position(|x| x == id) {
                        d.deleting.remove(i);
                    }
                }
            }
            _ => {}
        }
        Seen::Dropped(calls)
    }

    /// Whether an engine event belongs to a dropped reply (or is the news of undoing it).
    pub fn is_dropped(&self, ev: &ConvEvent) -> bool {
        self.dropped.iter().any(|d| d.owns(ev))
    }

    /// The turn is confirmed: the reply is live from now on.
    pub fn confirm(&mut self) -> Option<Confirmed> {
        let p = self.pending.take()?;
        Some(Confirmed {
            call: Call::Confirm {
                response_id: p.response_id.clone(),
            },
            audio: p.audio,
            user_item: p.user_item,
            response_id: p.response_id,
            reply_item: p.reply_item,
            held: p.held,
        })
    }

    /// The user went on: the engine calls that undo the speculative turn, leaving no trace (a
    /// reply still in progress is cancelled with nothing heard, one over already is deleted;
    /// then the user item goes). Nothing when there is no speculation.
    pub fn abandon(&mut self) -> Vec<Call> {
        let Some(p) = self.pending.take() else {
            return Vec::new();
        };
        let finished = p
            .held
            .iter()
            .any(|e| matches!(e, ConvEvent::ReplyDone { .. }));
        let mut calls = Vec::new();
        let mut deleting = Vec::new();
        if finished {
            // Generated in full already: only its item can go.
            calls.push(Call::Delete {
                item_id: p.reply_item.clone(),
            });
            deleting.push(p.reply_item.clone());
        } else {
            calls.push(Call::Cancel { heard: Some(0) });
        }
        calls.push(Call::Delete {
            item_id: p.user_item.clone(),
        });
        deleting.push(p.user_item.clone());
        if self.dropped.len() >= DROPPED_KEPT {
            self.dropped.pop_front();
        }
        self.dropped.push_back(Dropped {
            response_id: p.response_id,
            user_item: p.user_item,
            reply_item: p.reply_item,
            deleting,
            open: !finished,
            cancelled: !finished,
        });
        calls
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(id: &str) -> ConvEvent {
        ConvEvent::ReplyStarted {
            response_id: id.into(),
            item_id: id.into(),
            latency_ms: 0.0,
        }
    }

    fn done(id: &str, cancelled: bool) -> ConvEvent {
        ConvEvent::ReplyDone {
            response_id: id.into(),
            item_id: id.into(),
            text: String::new(),
            audio_samples: 0,
            cancelled,
        }
    }

    fn speculating() -> Speculation {
        let mut s = Speculation::new();
        s.start(vec![0.1; 4], "user-1", "reply-1", "reply-1");
        s
    }

    #[test]
    fn the_reply_is_held_until_the_same_audio_confirms_it() {
        let mut s = speculating();
        assert!(s.active());
        assert_eq!(s.event(started("reply-1")), Seen::Held);
        let other = ConvEvent::Transcript {
            item_id: "user-0".into(),
            text: "hi".into(),
        };
        assert_eq!(s.event(other.clone()), Seen::Pass(other));
        assert!(s.answers(&[0.1; 4]));
        assert!(!s.answers(&[0.1; 5]));
        let c = s.confirm().expect("confirmed");
        assert_eq!(
            c.call,
            Call::Confirm {
                response_id: "reply-1".into()
            }
        );
        assert_eq!(c.user_item, "user-1");
        assert_eq!(c.held, vec![started("reply-1")]);
        assert!(!s.active());
        // Live from now on.
        assert_eq!(
            s.event(done("reply-1", false)),
            Seen::Pass(done("reply-1", false))
        );
    }

    #[test]
    fn an_abandoned_reply_is_cancelled_and_its_late_events_dropped() {
        let mut s = speculating();
        s.event(started("reply-1"));
        assert_eq!(
            s.abandon(),
            vec![
                Call::Cancel { heard: Some(0) },
                Call::Delete {
                    item_id: "user-1".into()
                }
            ]
        );
        assert!(!s.active());
        assert!(s.abandon().is_empty(), "once");
        assert_eq!(s.event(done("reply-1", true)), Seen::Dropped(Vec::new()));
        let deleted = ConvEvent::Deleted {
            item_id: "user-1".into(),
        };
        assert!(s.is_dropped(&deleted));
        assert_eq!(s.event(deleted.clone()), Seen::Dropped(Vec::new()));
        // Once: an item of the same id later is news again.
        assert_eq!(s.event(deleted.clone()), Seen::Pass(deleted));
        assert!(!s.is_dropped(&done("reply-2", true)));
    }

    #[test]
    fn a_reply_over_before_its_cancel_arrived_is_deleted_when_it_ends() {
        let mut s = speculating();
        s.abandon();
        assert_eq!(
            s.event(done("reply-1", false)),
            Seen::Dropped(vec![Call::Delete {
                item_id: "reply-1".into()
            }])
        );
        let deleted = ConvEvent::Deleted {
            item_id: "reply-1".into(),
        };
        assert_eq!(s.event(deleted), Seen::Dropped(Vec::new()));
    }

    #[test]
    fn a_reply_seen_over_is_deleted_at_once() {
        let mut s = speculating();
        s.event(started("reply-1"));
        s.event(done("reply-1", false));
        assert_eq!(
            s.abandon(),
            vec![
                Call::Delete {
                    item_id: "reply-1".into()
                },
                Call::Delete {
                    item_id: "user-1".into()
                }
            ]
        );
    }

    #[test]
    fn errors_of_the_speculative_items_are_held() {
        let mut s = speculating();
        let e = ConvEvent::Error {
            item_id: Some("user-1".into()),
            message: "too long".into(),
        };
        assert_eq!(s.event(e.clone()), Seen::Held);
        assert_eq!(s.confirm().map(|c| c.held), Some(vec![e]));
    }
}
