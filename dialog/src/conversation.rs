//! The vocabulary of a conversation with the engine, shared by everything that talks to it: the
//! items ([`Content`], and where they go: [`Placement`]), the requests for replies
//! ([`Respond`], [`Output`]), the calls on a conversation as data ([`Call`]: add, respond,
//! cancel, truncate, delete, transcribe), who runs the tools ([`ToolPolicy`]), and what comes
//! back ([`ConvEvent`], [`Usage`]).
//!
//! The engine (in the `lfm2d` binary) executes these; the dialog manager
//! ([`crate::assistant`]) and the servers' sessions speak them without depending on the engine.

/// What a reply is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Interleaved text and speech (the model's assistant mode).
    Speech,
    /// Text only.
    Text,
    /// The text first, then its speech (the model's sequential mode, used for text to speech).
    Tts,
}

/// Who runs the tools the model calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolPolicy {
    /// The engine runs them (configured commands and built-ins), feeds the results back as a
    /// `tool` turn and lets the model answer, up to `max_rounds` times per reply.
    Run { max_rounds: usize },
    /// The engine reports each call ([`ConvEvent::ToolCall`]) and ends the reply; the client
    /// answers with a [`Content::ToolResult`] item and asks for a new reply.
    Report,
}

/// An item of the conversation.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    /// A user turn of 16 kHz mono speech.
    UserAudio(Vec<f32>),
    /// A user turn of text.
    UserText(String),
    /// An assistant turn of text (written by the client, not generated).
    AssistantText(String),
    /// A system turn in the conversation (after the instructions' own).
    SystemText(String),
    /// The result of a tool call, as a `tool` turn.
    ToolResult { call_id: String, output: String },
}

/// Where an item goes in the conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// After the last item.
    End,
    /// Before the first item (right after the instructions).
    Start,
    /// Right after the item with this id.
    After(String),
}

/// A request for a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Respond {
    /// Names the reply in the events.
    pub response_id: String,
    /// The id the reply's item gets in the conversation (for later truncation or deletion).
    pub item_id: String,
    /// Overrides the conversation's output for this reply.
    pub output: Option<Output>,
}

/// What happens in a conversation.
#[derive(Debug, Clone, PartialEq)]
pub enum ConvEvent {
    /// An item is in the conversation (prefilled).
    Added {
        item_id: String,
    },
    /// A reply has begun; `latency_ms` is the time from the job's start to its first item.
    ReplyStarted {
        response_id: String,
        item_id: String,
        latency_ms: f64,
    },
    /// Readable text of the reply as it grows.
    Text {
        response_id: String,
        piece: String,
    },
    /// 24 kHz samples of the reply's speech.
    Audio {
        response_id: String,
        samples: Vec<f32>,
    },
    /// The model called a tool. With [`ToolPolicy::Run`] a [`ConvEvent::ToolResult`] follows.
    ToolCall {
        response_id: String,
        call_id: String,
        name: String,
        /// The arguments as a JSON object.
        arguments: String,
    },
    /// The engine ran a tool (with [`ToolPolicy::Run`]); `output` went back to the model.
    ToolResult {
        response_id: String,
        call_id: String,
        output: String,
        ok: bool,
    },
    /// What the reply used (sent just before its [`ConvEvent::ReplyDone`]); `hit_limit` when
    /// the reply was cut by `max_new_tokens` or by the end of the context.
    ReplyUsage {
        response_id: String,
        usage: Usage,
        hit_limit: bool,
    },
    /// The reply is over: what stays in the conversation. `audio_samples` counts the 24 kHz
    /// samples kept (all generated ones, or what was heard when cancelled with a count).
    ReplyDone {
        response_id: String,
        item_id: String,
        text: String,
        audio_samples: u64,
        cancelled: bool,
    },
    /// An assistant item was cut to `audio_samples` of its speech (and the text before it).
    Truncated {
        item_id: String,
        audio_samples: u64,
        text: String,
    },
    Deleted {
        item_id: String,
    },
    /// A piece of a transcript as it is decoded (only for a streaming transcription); the pieces
    /// come before the [`Transcript`].
    ///
    /// [`Transcript`]: ConvEvent::Transcript
    TranscriptDelta {
        item_id: String,
        text: String,
    },
    /// The transcript of a user audio item (asked for with a transcription call).
    Transcript {
        item_id: String,
        text: String,
    },
    /// A timer set with the built-in `set_timer` tool has run out.
    TimerFired {
        label: String,
    },
    /// The oldest items were dropped to make room (the context was full).
    Trimmed {
        item_ids: Vec<String>,
    },
    /// A job failed; the conversation is as it was before the job.
    Error {
        item_id: Option<String>,
        message: String,
    },
}

impl ConvEvent {
    /// The response an event belongs to (None for the conversation's own news: transcripts,
    /// timers, trimming, errors).
    pub fn response_id(&self) -> Option<&str> {
        match self {
            ConvEvent::ReplyStarted { response_id, .. }
            | ConvEvent::Text { response_id, .. }
            | ConvEvent::Audio { response_id, .. }
            | ConvEvent::ToolCall { response_id, .. }
            | ConvEvent::ToolResult { response_id, .. }
            | ConvEvent::ReplyUsage { response_id, .. }
            | ConvEvent::ReplyDone { response_id, .. } => Some(response_id),
            _ => None,
        }
    }
}

/// Positions of a reply: the input is what the context held when it began, the output what it
/// generated; audio counts one position per input-audio embedding or generated frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_text: u64,
    pub input_audio: u64,
    pub output_text: u64,
    pub output_audio: u64,
}

/// A call on a conversation, as data: state machines return these and the code that owns the
/// conversation makes them. `S` is what configures a conversation (the engine's setup); a
/// state machine that never reconfigures leaves it [`std::convert::Infallible`].
#[derive(Debug, PartialEq)]
pub enum Call<S = std::convert::Infallible> {
    /// Replaces the instructions, tools, sampling or output.
    Configure(S),
    /// Puts an item in the conversation.
    Add {
        item_id: String,
        content: Content,
        place: Placement,
    },
    /// Asks for a reply to the conversation so far.
    Respond(Respond),
    /// As `Respond`, on a turn that is not yet certain (started when the user paused): tool
    /// calls the reply makes are reported but not run (with [`ToolPolicy::Run`]) until
    /// `Confirm`; a cancel, or deleting the reply, drops them unrun.
    Speculate(Respond),
    /// The turn of a speculative reply is confirmed: its tool calls run, and the response goes
    /// on as any other.
    Confirm { response_id: String },
    /// An out-of-band reply to `input` alone (None: to the conversation, without joining it).
    RespondApart {
        respond: Respond,
        input: Option<Vec<(String, Content)>>,
    },
    /// Cancels the reply in progress and any queued; with `heard`, cuts it to that many 24 kHz
    /// samples of its speech (what the user heard) and the text before them.
    Cancel { heard: Option<u64> },
    /// Cuts an assistant item to its first `audio_samples` samples of speech.
    Truncate { item_id: String, audio_samples: u64 },
    /// Removes an item.
    Delete { item_id: String },
    /// Transcribes 16 kHz speech (a [`ConvEvent::Transcript`] follows).
    Transcribe { item_id: String, audio: Vec<f32> },
    /// As `Transcribe`, but only when nothing else waits (words that are only for the record).
    TranscribeWhenIdle { item_id: String, audio: Vec<f32> },
}

impl Call {
    /// The same call, typed for a conversation configured by `S` (this one configures nothing).
    pub fn widen<S>(self) -> Call<S> {
        match self {
            Call::Configure(never) => match never {},
            Call::Add {
                item_id,
                content,
                place,
            } => Call::Add {
                item_id,
                content,
                place,
            },
            Call::Respond(r) => Call::Respond(r),
            Call::Speculate(r) => Call::Speculate(r),
            Call::Confirm { response_id } => Call::Confirm { response_id },
            Call::RespondApart { respond, input } => Call::RespondApart { respond, input },
            Call::Cancel { heard } => Call::Cancel { heard },
            Call::Truncate {
                item_id,
                audio_samples,
            } => Call::Truncate {
                item_id,
                audio_samples,
            },
            Call::Delete { item_id } => Call::Delete { item_id },
            Call::Transcribe { item_id, audio } => Call::Transcribe { item_id, audio },
            Call::TranscribeWhenIdle { item_id, audio } => {
                Call::TranscribeWhenIdle { item_id, audio }
            }
        }
    }
}
