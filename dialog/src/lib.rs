//! The dialog layer of lfm2d, free of I/O: what a conversation with the engine is made of, and
//! the state machines that decide what happens in it.
//!
//! - [`conversation`]: the vocabulary the engine executes: items, replies, cancel and truncate,
//!   tool policy, usage, the conversation's events, and calls as data ([`conversation::Call`]);
//! - [`assistant`]: the dialog manager of a spoken conversation: turn-taking, barge-in (what was
//!   heard, where to cut), tool rounds and the items of the conversation;
//! - [`turn`]: turn-taking as a state machine (listening, the user speaking, responding);
//! - [`reply`]: a reply position by position, to keep exactly what was heard when it is cut;
//! - [`speculation`]: a reply started when the user pauses, held until the turn is confirmed or
//!   undone exactly (shared by the dialog manager and the Realtime server's sessions);
//! - [`rounds`]: the rounds of tool calls of a response: which reply ends it, which a round;
//! - [`tools`]: the tools the model may call: their specs, the call format, running them.
//!
//! Not for: running the model, threads or the sound card; the engine (in the `lfm2d` binary) and
//! `audio-io` do that, driven by these state machines.

pub mod assistant;
pub mod conversation;
pub mod reply;
pub mod rounds;
pub mod speculation;
pub mod tools;
pub mod turn;
