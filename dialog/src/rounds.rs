//! The rounds of one response: which [`ConvEvent::ReplyDone`] ends the response and which only
//! ends a round of tool calls (the engine runs the tools and the model answers in the next
//! round of the same response).
//!
//! The rule, for a conversation whose engine runs its tools ([`ToolPolicy::Run`]): a reply that
//! called a tool and was not cancelled ends a round, as long as the response has rounds left;
//! any other reply ends the response. The engine decides with [`ToolPolicy::runs_round`] too,
//! so both sides count the same rounds. With [`ToolPolicy::Report`] every reply ends its
//! response (the client runs the tools and asks for a new one).

use crate::conversation::{ConvEvent, ToolPolicy};

/// How a reply ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundEnd {
    /// It called tools: the engine runs them and the response goes on with round `round`
    /// (1 for the first answer after a call).
    ToolsRun { round: usize },
    /// The response is over.
    Over(Ending),
}

/// Why a response is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The last reply called no tool (or the client runs them): it is the answer.
    Answered,
    /// The reply was cancelled.
    Cancelled,
    /// The last reply called tools again after `max_rounds` rounds; they were not run.
    OutOfRounds { max_rounds: usize },
}

impl ToolPolicy {
    /// Whether the engine runs the tools of a reply after `rounds` rounds of the same response
    /// (and so starts another round).
    pub fn runs_round(self, rounds: usize) -> bool {
        matches!(self, ToolPolicy::Run { max_rounds } if rounds < max_rounds)
    }
}

/// Follows one response at a time through its rounds; feed it the response's events in order.
#[derive(Debug, Clone)]
pub struct Rounds {
    policy: ToolPolicy,
    /// Rounds of tool calls so far in the response in progress.
    rounds: usize,
    /// The reply in progress called a tool.
    called: bool,
}

impl Rounds {
    pub fn new(policy: ToolPolicy) -> Self {
        Self {
            policy,
            rounds: 0,
            called: false,
        }
    }

    /// Rounds of tool calls so far in the response in progress.
    pub fn rounds(&self) -> usize {
        self.rounds
    }

    /// An event of the response. At its `ReplyDone` says whether the response goes on (and
    /// after the end of a response starts over for the next one); None for the other events.
    pub fn event(&mut self, ev: &ConvEvent) -> Option<RoundEnd> {
        match ev {
            ConvEvent::ToolCall { .. } => {
                self.called = true;
                None
            }
            ConvEvent::ReplyDone { cancelled, .. } => {
                let called = std::mem::take(&mut self.called);
                let end = if *cancelled {
                    Ending::Cancelled
                } else if !called {
                    Ending::Answered
                } else if self.policy.runs_round(self.rounds) {
                    self.rounds += 1;
                    return Some(RoundEnd::ToolsRun { round: self.rounds });
                } else {
                    match self.policy {
                        ToolPolicy::Run { max_rounds } => Ending::OutOfRounds { max_rounds },
                        ToolPolicy::Report => Ending::Answered,
                    }
                };
                self.rounds = 0;
                Some(RoundEnd::Over(end))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call() -> ConvEvent {
        ConvEvent::ToolCall {
            response_id: "r".into(),
            call_id: "call_1".into(),
            name: "get_time".into(),
            arguments: "{}".into(),
        }
    }

    fn done(cancelled: bool) -> ConvEvent {
        ConvEvent::ReplyDone {
            response_id: "r".into(),
            item_id: "i".into(),
            text: String::new(),
            audio_samples: 0,
            cancelled,
        }
    }

    #[test]
    fn a_reply_with_a_call_ends_a_round_until_the_rounds_run_out() {
        let mut r = Rounds::new(ToolPolicy::Run { max_rounds: 2 });
        assert_eq!(r.event(&call()), None);
        assert_eq!(r.event(&done(false)), Some(RoundEnd::ToolsRun { round: 1 }));
        r.event(&call());
        assert_eq!(r.event(&done(false)), Some(RoundEnd::ToolsRun { round: 2 }));
        r.event(&call());
        assert_eq!(
            r.event(&done(false)),
            Some(RoundEnd::Over(Ending::OutOfRounds { max_rounds: 2 }))
        );
        // The next response starts with all its rounds.
        r.event(&call());
        assert_eq!(r.event(&done(false)), Some(RoundEnd::ToolsRun { round: 1 }));
        assert_eq!(
            r.event(&done(false)),
            Some(RoundEnd::Over(Ending::Answered))
        );
        assert_eq!(r.rounds(), 0);
    }

    #[test]
    fn a_cancelled_reply_or_a_reported_call_ends_the_response() {
        let mut r = Rounds::new(ToolPolicy::Run { max_rounds: 3 });
        r.event(&call());
        assert_eq!(
            r.event(&done(true)),
            Some(RoundEnd::Over(Ending::Cancelled))
        );
        let mut r = Rounds::new(ToolPolicy::Report);
        r.event(&call());
        assert_eq!(
            r.event(&done(false)),
            Some(RoundEnd::Over(Ending::Answered))
        );
        let mut r = Rounds::new(ToolPolicy::Run { max_rounds: 0 });
        r.event(&call());
        assert_eq!(
            r.event(&done(false)),
            Some(RoundEnd::Over(Ending::OutOfRounds { max_rounds: 0 }))
        );
    }

    #[test]
    fn the_engine_and_the_tracker_count_the_same_rounds() {
        let run = ToolPolicy::Run { max_rounds: 1 };
        assert!(run.runs_round(0));
        assert!(!run.runs_round(1));
        assert!(!ToolPolicy::Report.runs_round(0));
    }
}
