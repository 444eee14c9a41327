//! The engine: one thread that owns the model and runs every conversation in turn.
//!
//! Clients (the voice daemon, the Realtime WebSocket server, tests) [`open`](EngineHandle::open)
//! a [`Conversation`] and talk to it through its methods; each call queues a job for the engine
//! thread, and what happens comes back as [`ConvEvent`]s on the conversation's own channel. The
//! model state of a conversation (its backbone caches) is kept between jobs: history is never
//! recomputed, except when it must change in the middle (an item deleted or truncated, the
//! instructions replaced, the oldest turns dropped when the context is full), and then the
//! history from the first changed item on is prefilled again, once.
//!
//! Jobs of all conversations go through one queue, taken in turn. Every reply asked for is
//! generated together with the others in progress, one step of each in turn (each in its own
//! session, with its own audio decoder), so a reply never waits for another to end. A reply can be
//! cancelled between two steps ([`Conversation::cancel`] does not wait for the queue). Tool
//! commands the engine runs ([`ToolPolicy::Run`]) run on threads of their own: while one
//! conversation waits for a slow tool, the others are served; its own later jobs wait, in order,
//! until its response has gone on.
//!
//! The vocabulary (items, replies, events, tool policy) is the `dialog` crate's
//! ([`dialog::conversation`]), re-exported here; [`Setup`] adds what only the model knows.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use dialog::tools::ToolSpec;
use lfm2_audio::generate::GenerationParams;

pub use dialog::conversation::{
    Call, Content, ConvEvent, Output, Placement, Respond, ToolPolicy, Usage,
};

/// How a conversation behaves.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The system prompt (the tool list is appended to it when there are tools).
    pub instructions: String,
    pub tools: Vec<ToolSpec>,
    pub tool_policy: ToolPolicy,
    pub params: GenerationParams,
    pub output: Output,
}

/// Cancellation of replies, shared by a conversation's handle and the engine thread. Replies are
/// numbered; a cancel covers every reply asked for before it, started or still queued, and never
/// a later one.
///
/// It also knows the items whose deletion is queued: an item being added when its deletion is
/// asked, with every reply asked so far cancelled, is not worth finishing (nothing can use it
/// before it goes). A reply started on a pause and dropped when the user speaks on is undone so,
/// at once, and the engine is free for the next pause.
#[derive(Debug, Default)]
pub(crate) struct Cancel {
    /// Number of replies asked for.
    asked: AtomicU64,
    /// Replies up to this number are cancelled.
    upto: AtomicU64,
    /// Samples of the cancelled reply the user heard, plus one; 0: keep everything generated.
    heard: AtomicU64,
    /// Items whose deletion is queued.
    deleting: std::sync::Mutex<Vec<String>>,
}

impl Cancel {
    /// The deletion of `item_id` is queued.
    pub(crate) fn deleting(&self, item_id: &str) {
        if let Ok(mut d) = self.deleting.lock() {
            d.push(item_id.to_owned());
        }
    }

    /// The queued deletion of `item_id` is being done.
    pub(crate) fn deleted(&self, item_id: &str) {
        if let Ok(mut d) = self.deleting.lock() {
            if let Some(i) = d.iter().position(|x| x == item_id) {
                d.swap_remove(i);
            }
        }
    }

    /// Whether adding `item_id` can stop half-way: its deletion is queued, and no reply asked
    /// so far is still to be made.
    pub(crate) fn withdrawn(&self, item_id: &str) -> bool {
        self.upto.load(Ordering::SeqCst) >= self.asked.load(Ordering::SeqCst)
            && self
                .deleting
                .lock()
                .is_ok_and(|d| d.iter().any(|x| x == item_id))
    }

    pub(crate) fn ask(&self) -> u64 {
        self.asked.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub(crate) fn cancel(&self, heard: Option<u64>) {
        self.heard
            .store(heard.map_or(0, |h| h.saturating_add(1)), Ordering::SeqCst);
        self.upto
            .store(self.asked.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// Whether reply `seq` is cancelled, and if so how much of it was heard (None: all kept).
    pub(crate) fn check(&self, seq: u64) -> Option<Option<u64>> {
        (self.upto.load(Ordering::SeqCst) >= seq).then(|| {
            let h = self.heard.load(Ordering::SeqCst);
            (h > 0).then(|| h - 1)
        })
    }
}

pub(crate) enum Job {
    Open {
        conv: u64,
        setup: Setup,
        events: Sender<ConvEvent>,
        cancel: Arc<Cancel>,
        done: Sender<anyhow::Result<()>>,
    },
    Configure {
        conv: u64,
        setup: Setup,
    },
    Add {
        conv: u64,
        item_id: String,
        content: Content,
        place: Placement,
    },
    /// A reply outside the conversation (which is left as it was): to `input` alone, or to the
    /// conversation as it is (None).
    RespondApart {
        conv: u64,
        seq: u64,
        respond: Respond,
        input: Option<Vec<(String, Content)>>,
    },
    Respond {
        conv: u64,
        seq: u64,
        respond: Respond,
        /// On a turn not yet confirmed: its tool calls wait for `Confirm`.
        speculative: bool,
    },
    /// The turn of a speculative reply is confirmed: its tool calls run.
    Confirm {
        conv: u64,
        response_id: String,
    },
    Truncate {
        conv: u64,
        item_id: String,
        audio_samples: u64,
    },
    Delete {
        conv: u64,
        item_id: String,
    },
    Transcribe {
        conv: u64,
        item_id: String,
        audio: Vec<f32>,
        /// Send the text piece by piece as it is decoded too.
        stream: bool,
        /// Run only when nothing else is queued, giving way to any job that comes.
        background: bool,
    },
    Close {
        conv: u64,
    },
    Shutdown,
}

/// A handle on the engine thread; cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: Sender<Job>,
    next_conv: Arc<AtomicU64>,
}

impl EngineHandle {
    /// Opens a conversation: its system turn is prefilled before this returns.
    pub fn open(&self, setup: Setup) -> anyhow::Result<Conversation> {
        let conv = self.next_conv.fetch_add(1, Ordering::SeqCst);
        let (events_tx, events) = crossbeam_channel::unbounded();
        let (done_tx, done) = crossbeam_channel::bounded(1);
        let cancel = Arc::new(Cancel::default());
        self.jobs
            .send(Job::Open {
                conv,
                setup,
                events: events_tx,
                cancel: Arc::clone(&cancel),
                done: done_tx,
            })
            .map_err(|_| anyhow::anyhow!("the engine has stopped"))?;
        done.recv()
            .map_err(|_| anyhow::anyhow!("the engine has stopped"))??;
        Ok(Conversation {
            id: conv,
            jobs: self.jobs.clone(),
            events,
            cancel,
        })
    }

    /// Asks the engine thread to stop after the job in progress.
    pub fn shutdown(&self) {
        let _ = self.jobs.send(Job::Shutdown);
    }
}

/// One conversation with the model. Dropping it frees its state in the engine.
pub struct Conversation {
    id: u64,
    jobs: Sender<Job>,
    events: Receiver<ConvEvent>,
    cancel: Arc<Cancel>,
}

impl Conversation {
    /// Everything that happens in this conversation, in order.
    pub fn events(&self) -> &Receiver<ConvEvent> {
        &self.events
    }

    fn send(&self, job: Job) {
        // A stopped engine reports nothing more; the client sees its event channel close.
        let _ = self.jobs.send(job);
    }

    /// Makes a call given as data (see [`Call`]).
    pub fn apply(&self, call: Call<Setup>) {
        match call {
            Call::Configure(setup) => self.configure(setup),
            Call::Add {
                item_id,
                content,
                place,
            } => self.insert(item_id, content, place),
            Call::Respond(r) => self.respond(r),
            Call::Speculate(r) => self.respond_speculatively(r),
            Call::Confirm { response_id } => self.confirm(response_id),
            Call::RespondApart { respond, input } => self.respond_apart(respond, input),
            Call::Cancel { heard } => self.cancel(heard),
            Call::Truncate {
                item_id,
                audio_samples,
            } => self.truncate(item_id, audio_samples),
            Call::Delete { item_id } => self.delete(item_id),
            Call::Transcribe { item_id, audio } => self.transcribe(item_id, audio),
            Call::TranscribeWhenIdle { item_id, audio } => {
                self.transcribe_when_idle(item_id, audio)
            }
        }
    }

    /// Replaces the instructions, tools, sampling or output (the history is prefilled again
    /// after the new system turn).
    pub fn configure(&self, setup: Setup) {
        self.send(Job::Configure {
            conv: self.id,
            setup,
        });
    }

    /// Appends an item (prefilled at once; [`ConvEvent::Added`] follows).
    pub fn add(&self, item_id: impl Into<String>, content: Content) {
        self.insert(item_id, content, Placement::End);
    }

    /// Puts an item at `place`; the history after it is prefilled again.
    pub fn insert(&self, item_id: impl Into<String>, content: Content, place: Placement) {
        self.send(Job::Add {
            conv: self.id,
            item_id: item_id.into(),
            content,
            place,
        });
    }

    /// Asks for a reply that does not join the conversation: to `input` alone (after the
    /// conversation's instructions and tools), or with None to the conversation as it is. The
    /// conversation is left as it was; the events name `respond.response_id` as usual.
    pub fn respond_apart(&self, respond: Respond, input: Option<Vec<(String, Content)>>) {
        let seq = self.cancel.ask();
        self.send(Job::RespondApart {
            conv: self.id,
            seq,
            respond,
            input,
        });
    }

    /// Asks for a reply to the conversation so far.
    pub fn respond(&self, respond: Respond) {
        let seq = self.cancel.ask();
        self.send(Job::Respond {
            conv: self.id,
            seq,
            respond,
            speculative: false,
        });
    }

    /// As [`respond`](Self::respond), on a turn that is not yet certain (started when the user
    /// paused): the tool calls the reply makes are reported but not run until
    /// [`confirm`](Self::confirm); a cancel, or deleting the reply, drops them unrun.
    pub fn respond_speculatively(&self, respond: Respond) {
        let seq = self.cancel.ask();
        self.send(Job::Respond {
            conv: self.id,
            seq,
            respond,
            speculative: true,
        });
    }

    /// The turn of the speculative reply `response_id` is confirmed: its tool calls run (once it
    /// has made them), and the response goes on as any other.
    pub fn confirm(&self, response_id: impl Into<String>) {
        self.send(Job::Confirm {
            conv: self.id,
            response_id: response_id.into(),
        });
    }

    /// Cancels the reply in progress and any queued, within one decode step. With `heard`, the
    /// reply is cut to that many 24 kHz samples of its speech (what the user heard) and the text
    /// before them; without, everything generated so far is kept.
    pub fn cancel(&self, heard: Option<u64>) {
        self.cancel.cancel(heard);
    }

    /// Cuts an assistant item to its first `audio_samples` samples of speech (24 kHz).
    pub fn truncate(&self, item_id: impl Into<String>, audio_samples: u64) {
        self.send(Job::Truncate {
            conv: self.id,
            item_id: item_id.into(),
            audio_samples,
        });
    }

    /// Removes an item from the conversation.
    pub fn delete(&self, item_id: impl Into<String>) {
        let item_id = item_id.into();
        self.cancel.deleting(&item_id);
        self.send(Job::Delete {
            conv: self.id,
            item_id,
        });
    }

    /// Transcribes 16 kHz speech (without adding it to the conversation);
    /// [`ConvEvent::Transcript`] carries the text.
    pub fn transcribe(&self, item_id: impl Into<String>, audio: Vec<f32>) {
        self.send(Job::Transcribe {
            conv: self.id,
            item_id: item_id.into(),
            audio,
            stream: false,
            background: false,
        });
    }

    /// As [`Conversation::transcribe`], with [`ConvEvent::TranscriptDelta`]s as the text is
    /// decoded before the whole [`ConvEvent::Transcript`].
    pub fn transcribe_streaming(&self, item_id: impl Into<String>, audio: Vec<f32>) {
        self.send(Job::Transcribe {
            conv: self.id,
            item_id: item_id.into(),
            audio,
            stream: true,
            background: false,
        });
    }

    /// [`transcribe`](Self::transcribe), but only when the engine has nothing else to do: it
    /// never delays a job queued after it (a reply), and one that arrives while it runs stops
    /// it within a token (it starts again later). For words that are only for the record.
    pub fn transcribe_when_idle(&self, item_id: impl Into<String>, audio: Vec<f32>) {
        self.send(Job::Transcribe {
            conv: self.id,
            item_id: item_id.into(),
            audio,
            stream: false,
            background: true,
        });
    }
}

impl Drop for Conversation {
    fn drop(&mut self) {
        self.cancel(None);
        self.send(Job::Close { conv: self.id });
    }
}

/// Settings of the engine as a whole.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// Positions a conversation may hold before its oldest turns are dropped (None: the model's
    /// context).
    pub context_limit: Option<usize>,
}

/// Starts the engine thread. It owns the model and the audio decoder (`detok`) until
/// [`EngineHandle::shutdown`] or until every handle is dropped.
pub fn spawn_with(
    model: Arc<lfm2_audio::model::Lfm2AudioModel>,
    detok: Box<dyn codec::Detokenizer>,
    options: EngineOptions,
) -> anyhow::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    spawn(worker::Worker::new(model, detok, options))
}

/// Starts the engine thread on `worker`.
fn spawn(
    mut worker: worker::Worker,
) -> anyhow::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    let (jobs, rx) = crossbeam_channel::unbounded();
    let thread = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || worker.run(rx))?;
    Ok((
        EngineHandle {
            jobs,
            next_conv: Arc::new(AtomicU64::new(1)),
        },
        thread,
    ))
}

mod background;
#[cfg(test)]
mod tests;
mod worker;
