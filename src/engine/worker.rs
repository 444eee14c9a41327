//! The engine thread's side: conversations, their histories, and the reply loop.
//!
//! A conversation is the system turn followed by entries (user turns, tool turns, replies), each
//! remembering the positions it occupies in the session and what is needed to prefill it again.
//! Appending an entry prefills only that entry. Changing the history in the middle (deleting or
//! truncating an entry, dropping the oldest turns, new instructions) truncates the session at the
//! first changed entry and prefills everything after it in one batch.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use candle_core::Tensor;
use codec::Detokenizer;
use codec::{ReplyStream, StreamEvent};
use crossbeam_channel::{Receiver, Sender};
use dialog::reply::{ReplyItem, ReplyTracker};
use dialog::tools::{self, ToolCall, ToolOutcome};
use lfm2_audio::format::{Frame, SAMPLES_PER_FRAME};
use lfm2_audio::generate::{
    asr_chat, generate_text, is_audible, prefill_chat, Generation, GenerationMode, ReplyEnd, Token,
};
use lfm2_audio::model::Lfm2AudioModel;
use lfm2_audio::prompt::{self, ChatState, Item};
use lfm2_audio::sampling::{Sampler, SamplingParams};
use lfm2_audio::session::Session;
use lfm2_audio::tokenizer::TextStream;

use super::background::Background;
use super::{
    Cancel, Content, ConvEvent, EngineOptions, Job, Output, Placement, Respond, Setup, ToolPolicy,
    Usage,
};

/// Environment variable of the test seam: text teacher-forced at the start of the first reply of
/// every conversation that declares tools (see the README).
pub const FORCE_REPLY_ENV: &str = "LFM2D_FORCE_REPLY";

/// Longest transcript of one clip, in tokens.
const MAX_TRANSCRIPT_TOKENS: usize = 448;

/// Benchmark seams for random-weight models, which never end a transcript nor start speaking by
/// themselves: a smaller cap on transcripts (in tokens), and text teacher-forced at the start of
/// every text-to-speech reply (e.g. the sentence and `<|audio_start|>`, as a trained model
/// answers). Latency figures measured with them say so (see docs/WYOMING.md).
pub const TRANSCRIPT_TOKENS_ENV: &str = "LFM2D_BENCH_TRANSCRIPT_TOKENS";
pub const FORCE_TTS_ENV: &str = "LFM2D_BENCH_FORCE_TTS";

/// A run of positions, as needed to prefill it again.
#[derive(Debug, Clone)]
pub(crate) enum Part {
    Text(Vec<u32>),
    /// Encoder output of a clip, `[n, hidden]`.
    AudioIn(Tensor),
    /// Generated audio frames.
    Frames(Vec<Frame>),
}

#[derive(Debug, Clone)]
pub(crate) enum Body {
    /// A whole turn, markers included.
    Turn(Vec<Part>),
    /// A generated reply: `<|im_start|>assistant\n`, what was generated, `<|im_end|>\n`.
    Reply {
        header: Vec<u32>,
        tokens: Vec<Token>,
        footer: Vec<u32>,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) id: String,
    pub(crate) body: Body,
    /// Where it starts in the session, and how many positions it has.
    pub(crate) start: usize,
    pub(crate) len: usize,
}

impl Entry {
    fn parts(&self) -> Vec<Part> {
        match &self.body {
            Body::Turn(parts) => parts.clone(),
            Body::Reply {
                header,
                tokens,
                footer,
            } => {
                let mut parts = vec![Part::Text(header.clone())];
                parts.extend(token_parts(tokens));
                parts.push(Part::Text(footer.clone()));
                parts
            }
        }
    }
}

/// Groups a reply's tokens into runs of text and of frames.
fn token_parts(tokens: &[Token]) -> Vec<Part> {
    let mut parts: Vec<Part> = Vec::new();
    for t in tokens {
        match (t, parts.last_mut()) {
            (Token::Text(id), Some(Part::Text(ids))) => ids.push(*id),
            (Token::Text(id), _) => parts.push(Part::Text(vec![*id])),
            (Token::Audio(f), Some(Part::Frames(fs))) => fs.push(*f),
            (Token::Audio(f), _) => parts.push(Part::Frames(vec![*f])),
        }
    }
    parts
}

fn samples_of(tokens: &[Token]) -> u64 {
    tokens
        .iter()
        .filter(|t| matches!(t, Token::Audio(f) if is_audible(f)))
        .count() as u64
        * SAMPLES_PER_FRAME as u64
}

pub(crate) struct Conv {
    pub(crate) setup: Setup,
    pub(crate) session: Session,
    events: Sender<ConvEvent>,
    pub(crate) cancel: Arc<Cancel>,
    /// Positions of `<|startoftext|>` and the system turn.
    base: usize,
    pub(crate) entries: Vec<Entry>,
    /// Replies generated so far (the test seam forces only the first).
    replies: u64,
    /// Tool calls so far, for their ids, and the ids of those reported.
    calls: u64,
    call_ids: std::collections::HashSet<String>,
    /// An item that could not be added since the last reply was asked for: the next reply is
    /// refused rather than made without it.
    failed_add: Option<String>,
    /// The last clips of user speech encoded for items, with their encodings: a transcript of
    /// the same clip starts from it instead of encoding it again.
    encoded: std::collections::VecDeque<(Vec<f32>, Tensor)>,
    /// Items withdrawn while they were being added, whose deletion is queued.
    withdrawn: Vec<String>,
}

/// Encoded clips a conversation keeps (the daemon transcribes the last turn, or the one before
/// when the next has begun).
const ENCODED_KEPT: usize = 2;

impl Conv {
    /// The encoding of `audio` if it was encoded for an item lately.
    pub(crate) fn encoded(&self, audio: &[f32]) -> Option<Tensor> {
        self.encoded
            .iter()
            .find(|(a, _)| a.as_slice() == audio)
            .map(|(_, emb)| emb.clone())
    }

    fn remember_encoding(&mut self, audio: Vec<f32>, emb: &Tensor) {
        if self.encoded.len() == ENCODED_KEPT {
            self.encoded.pop_front();
        }
        self.encoded.push_back((audio, emb.clone()));
    }

    fn emit(&self, ev: ConvEvent) {
        // A client that went away no longer listens; the engine carries on.
        let _ = self.events.send(ev);
    }

    fn position_of(&self, item_id: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.id == item_id)
    }
}

/// The jobs waiting, one queue per conversation, taken in turn: a conversation that queues many
/// jobs (long audio items, replies one after the other) delays another's next job by at most one
/// of its own. Within a conversation the order is kept (clients queue a transcription after the
/// reply it must not delay). A close goes first and drops what its conversation still had queued.
#[derive(Default)]
pub(crate) struct FairQueue {
    /// Jobs to run before any other (close, shutdown).
    urgent: std::collections::VecDeque<Job>,
    /// Conversations with jobs waiting, in the order they get their turn.
    turns: std::collections::VecDeque<u64>,
    by_conv: HashMap<u64, std::collections::VecDeque<Job>>,
}

impl FairQueue {
    pub(crate) fn is_empty(&self) -> bool {
        self.urgent.is_empty() && self.turns.is_empty()
    }

    pub(crate) fn push(&mut self, job: Job) {
        let conv = match &job {
            Job::Shutdown => {
                self.urgent.push_back(job);
                return;
            }
            Job::Close { conv } => {
                let conv = *conv;
                self.by_conv.remove(&conv);
                self.turns.retain(|c| *c != conv);
                self.urgent.push_back(job);
                return;
            }
            Job::Open { conv, .. }
            | Job::Configure { conv, .. }
            | Job::Add { conv, .. }
            | Job::Respond { conv, .. }
            | Job::RespondApart { conv, .. }
            | Job::Truncate { conv, .. }
            | Job::Delete { conv, .. }
            | Job::Confirm { conv, .. }
            | Job::Transcribe { conv, .. } => *conv,
        };
        let q = self.by_conv.entry(conv).or_default();
        if q.is_empty() {
            self.turns.push_back(conv);
        }
        q.push_back(job);
    }

    #[cfg(test)]
    pub(crate) fn pop(&mut self) -> Option<Job> {
        self.pop_unless(&HashSet::new())
    }

    /// The next job, passing over the conversations in `held` (their jobs keep their order and
    /// wait until they are not held any more).
    #[cfg(test)]
    pub(crate) fn pop_unless(&mut self, held: &HashSet<u64>) -> Option<Job> {
        self.pop_where(|conv, _| !held.contains(&conv))
    }

    /// The next job, from the first conversation in turn whose next job `runnable` accepts
    /// (given the conversation and the job); conversations passed over keep their turn.
    pub(crate) fn pop_where(&mut self, runnable: impl Fn(u64, &Job) -> bool) -> Option<Job> {
        if let Some(job) = self.urgent.pop_front() {
            return Some(job);
        }
        let at = self.turns.iter().position(|c| {
            self.by_conv
                .get(c)
                .and_then(|q| q.front())
                .is_some_and(|job| runnable(*c, job))
        })?;
        let conv = self.turns.remove(at)?;
        let q = self.by_conv.get_mut(&conv)?;
        let job = q.pop_front();
        if q.is_empty() {
            self.by_conv.remove(&conv);
        } else {
            self.turns.push_back(conv);
        }
        job
    }
}

/// How a reply ended.
enum Ending {
    /// The model finished (or reached the step or context limit).
    Done,
    /// Cancelled (what was heard, if the client said, is in the reply's cut).
    Cancelled,
    /// Text output and the model wanted to speak: stopped before the audio.
    TextOnly,
}

pub(crate) struct Worker {
    model: Arc<Lfm2AudioModel>,
    /// Audio decoders not in use by a reply, and the one they are forked from (each reply in
    /// progress decodes with a stream of its own).
    detoks: Vec<Box<dyn Detokenizer>>,
    template: Box<dyn Detokenizer>,
    options: EngineOptions,
    convs: HashMap<u64, Conv>,
    forced: Option<String>,
    forced_tts: Option<String>,
    max_transcript_tokens: usize,
    /// The forced text applies to conversations without tools too (tests only).
    force_without_tools: bool,
    /// Tool commands run on threads of their own (a slow tool never stalls another
    /// conversation); their results come back here. A conversation waiting for its tools is
    /// held: its later jobs wait, in order, until the response has gone on.
    tools_done: (Sender<ToolsDone>, Receiver<ToolsDone>),
    held: HashSet<u64>,
    /// Tool calls of speculative replies (asked for on a turn not yet confirmed), by
    /// conversation: kept unrun until the turn is confirmed; dropped when the reply is cancelled
    /// or deleted. They hold nothing up.
    waiting: Vec<(u64, ToolRun)>,
    /// The responses whose replies are in progress (one per conversation at most), stepped in
    /// turn.
    active: Vec<Active>,
}

/// Where a response's reply is made.
pub(crate) enum Place {
    /// In its conversation, where it stays.
    Conversation,
    /// In its conversation, cut off again when it is over (back to this many positions and
    /// entries): an out-of-band reply to the conversation as it is.
    Restore { len: usize, entries: usize },
    /// In a conversation of its own: an out-of-band reply to items of its own.
    Apart(Box<Conv>),
}

/// A response in progress on the engine thread.
pub(crate) struct Active {
    conv: u64,
    place: Place,
    round: Round,
    /// The round's reply (None before it begins).
    run: Option<ReplyRun>,
}

/// What a step of a response led to.
enum Step {
    Going,
    Done,
    /// Tools to run before the response goes on.
    Tools(ToolRun),
}

/// A response between its rounds: what the next round needs.
#[derive(Clone)]
pub(crate) struct Round {
    seq: u64,
    req: Respond,
    output: Output,
    started: Instant,
    /// Rounds of tool calls so far, and the item of the round in progress.
    number: usize,
    item_id: String,
    /// Asked for on a turn not yet confirmed: its tool calls wait for the confirmation.
    speculative: bool,
}

impl Round {
    /// The item of the reply of the round after the tool calls (`item-N` for round N).
    fn next_item_id(&self) -> String {
        format!("{}-{}", self.req.item_id, self.number)
    }
}

/// The end of a reply that said nothing (failed, cancelled, or never begun).
fn nothing_said(response_id: String, item_id: String, cancelled: bool) -> ConvEvent {
    ConvEvent::ReplyDone {
        response_id,
        item_id,
        text: String::new(),
        audio_samples: 0,
        cancelled,
    }
}

/// Tool calls of a round, to run before the response goes on.
pub(crate) struct ToolRun {
    round: Round,
    calls: Vec<(String, Result<ToolCall, String>)>,
    tools: Vec<dialog::tools::ToolSpec>,
    events: Sender<ConvEvent>,
}

impl ToolRun {
    /// Runs the calls, in order (on whatever thread calls this).
    fn run(self) -> (Round, Vec<(String, ToolOutcome)>) {
        let results = self
            .calls
            .into_iter()
            .map(|(call_id, call)| {
                let outcome = match call {
                    Ok(call) => run_tool(&self.tools, &self.events, &call),
                    Err(e) => ToolOutcome::Failed(e),
                };
                (call_id, outcome)
            })
            .collect();
        (self.round, results)
    }
}

/// The results of a conversation's tool calls, back from their thread.
pub(crate) struct ToolsDone {
    conv: u64,
    round: Round,
    results: Vec<(String, ToolOutcome)>,
}

fn run_tool(
    tools: &[dialog::tools::ToolSpec],
    events: &Sender<ConvEvent>,
    call: &ToolCall,
) -> ToolOutcome {
    let events = events.clone();
    tools::run(tools, call, move |label| {
        let _ = events.send(ConvEvent::TimerFired { label });
    })
}

impl Worker {
    pub(crate) fn new(
        model: Arc<Lfm2AudioModel>,
        detok: Box<dyn Detokenizer>,
        options: EngineOptions,
    ) -> Self {
        let forced = std::env::var(FORCE_REPLY_ENV)
            .ok()
            .filter(|s| !s.is_empty());
        let forced_tts = std::env::var(FORCE_TTS_ENV).ok().filter(|s| !s.is_empty());
        let max_transcript_tokens = std::env::var(TRANSCRIPT_TOKENS_ENV)
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or(MAX_TRANSCRIPT_TOKENS);
        Self {
            model,
            detoks: Vec::new(),
            template: detok,
            options,
            convs: HashMap::new(),
            forced,
            forced_tts,
            max_transcript_tokens,
            force_without_tools: false,
            tools_done: crossbeam_channel::unbounded(),
            held: HashSet::new(),
            waiting: Vec::new(),
            active: Vec::new(),
        }
    }

    pub(crate) fn run(&mut self, jobs: Receiver<Job>) {
        // Conversations are served in turn (`FairQueue`), and every reply asked for is
        // generated at once with the others in progress, one step of each in turn: a reply never
        // waits for another to end, only for the jobs in front of it. Between two rounds of
        // steps, one job of another conversation runs (an item to prefill, a transcription). A
        // conversation with a reply in progress or tools running is passed over (its jobs keep
        // their order).
        // Background transcriptions wait until nothing else is queued or in progress, and give
        // way within one step (a few prompt positions or one token) to any job that arrives
        // meanwhile, going on later from where they stopped: the words of a turn that are only
        // for the record must never hold up a reply.
        let mut queue = FairQueue::default();
        let mut deferred: std::collections::VecDeque<Background> = Default::default();
        let tools_done = self.tools_done.1.clone();
        let mut open = true;
        loop {
            while open {
                match jobs.try_recv() {
                    Ok(job) => queue.push(job),
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => open = false,
                }
            }
            while let Ok(done) = tools_done.try_recv() {
                self.tools_finished(done);
            }
            if !open && queue.is_empty() && self.active.is_empty() {
                // Every handle is gone (and with them every conversation).
                break;
            }
            let busy: HashSet<u64> = self
                .held
                .iter()
                .copied()
                .chain(self.active.iter().map(|a| a.conv))
                .collect();
            let job = queue.pop_where(|conv, _| !busy.contains(&conv));
            match job {
                Some(Job::Shutdown) => break,
                Some(Job::Transcribe {
                    conv,
                    item_id,
                    audio,
                    background: true,
                    ..
                }) => deferred.push_back(Background::new(conv, item_id, audio)),
                Some(Job::Open {
                    conv,
                    setup,
                    events,
                    cancel,
                    done,
                }) => {
                    let r = self.open(setup, events, cancel).map(|c| {
                        self.convs.insert(conv, c);
                    });
                    let _ = done.send(r);
                }
                Some(Job::Close { conv }) => {
                    self.convs.remove(&conv);
                    self.held.remove(&conv);
                    self.waiting.retain(|(c, _)| *c != conv);
                    let (gone, kept) = std::mem::take(&mut self.active)
                        .into_iter()
                        .partition(|a| a.conv == conv);
                    self.active = kept;
                    for a in gone {
                        self.retire(a);
                    }
                }
                Some(job @ (Job::Respond { .. } | Job::RespondApart { .. })) => {
                    self.start_active(job)
                }
                Some(Job::Confirm { conv, response_id }) => self.confirm(conv, &response_id),
                Some(job) => self.conversation_job(job),
                None if self.active.is_empty() => {
                    // Nothing to run and no reply in progress.
                    if let Some(mut bg) = deferred.pop_front() {
                        if !self.transcribe_unless(&mut bg, &jobs) {
                            deferred.push_front(bg);
                        }
                        continue;
                    }
                    let incoming = if open {
                        jobs.clone()
                    } else {
                        crossbeam_channel::never()
                    };
                    crossbeam_channel::select! {
                        recv(incoming) -> job => match job {
                            Ok(job) => queue.push(job),
                            Err(_) => open = false,
                        },
                        recv(tools_done) -> done => {
                            if let Ok(done) = done {
                                self.tools_finished(done);
                            }
                        }
                    }
                    continue;
                }
                None => {}
            }
            // One step of each reply in progress, in turn.
            let mut i = 0;
            while i < self.active.len() {
                let mut a = self.active.swap_remove(i);
                match self.step_active(&mut a) {
                    Step::Going => {
                        // Back in its place: the order of turns is kept.
                        self.active.push(a);
                        let last = self.active.len() - 1;
                        self.active.swap(i, last);
                        i += 1;
                    }
                    Step::Done => self.retire(a),
                    Step::Tools(run) => {
                        let conv = a.conv;
                        self.retire(a);
                        if run.round.speculative {
                            // Reported; run only once the turn is confirmed.
                            self.waiting.push((conv, run));
                        } else {
                            self.start_tools(conv, run);
                        }
                    }
                }
            }
        }
        for a in std::mem::take(&mut self.active) {
            self.retire(a);
        }
    }

    /// The turn of a speculative reply is confirmed: the tool calls it made run now (its later
    /// rounds are not speculative). Nothing to do when it made none (or has not ended yet:
    /// this job waits behind it).
    fn confirm(&mut self, conv: u64, response_id: &str) {
        self.drop_waiting(conv, None);
        let Some(i) = self
            .waiting
            .iter()
            .position(|(c, run)| *c == conv && run.round.req.response_id == response_id)
        else {
            return;
        };
        let (_, mut run) = self.waiting.remove(i);
        run.round.speculative = false;
        self.start_tools(conv, run);
    }

    /// Drops the unrun tool calls of `conv`'s speculative replies that were cancelled, or whose
    /// item is `deleted`.
    fn drop_waiting(&mut self, conv: u64, deleted: Option<&str>) {
        let cancel = self.convs.get(&conv).map(|c| Arc::clone(&c.cancel));
        self.waiting.retain(|(c, run)| {
            if *c != conv {
                return true;
            }
            let cancelled = cancel
                .as_ref()
                .is_none_or(|k| k.check(run.round.seq).is_some());
            let gone = deleted.is_some_and(|d| d == run.round.req.item_id);
            !cancelled && !gone
        });
    }

    /// Runs a round's tool calls on a thread of their own; the conversation is held until
    /// [`Worker::tools_finished`] takes the results.
    fn start_tools(&mut self, conv: u64, run: ToolRun) {
        let done = self.tools_done.0.clone();
        let (response_id, item_id) = (run.round.req.response_id.clone(), run.round.next_item_id());
        let spawned = std::thread::Builder::new()
            .name("tool".into())
            .spawn(move || {
                let (round, results) = run.run();
                let _ = done.send(ToolsDone {
                    conv,
                    round,
                    results,
                });
            });
        match spawned {
            Ok(_) => {
                self.held.insert(conv);
            }
            Err(e) => {
                // No thread: the response ends with the reason rather than stalling the engine.
                if let Some(c) = self.convs.get(&conv) {
                    c.emit(ConvEvent::Error {
                        item_id: Some(item_id.clone()),
                        message: format!("could not start a thread for the tool calls: {e}"),
                    });
                    c.emit(nothing_said(response_id, item_id, false));
                }
            }
        }
    }

    /// A conversation's tool results are back: its response goes on (and its jobs with it), its
    /// next reply stepped among the others.
    fn tools_finished(&mut self, done: ToolsDone) {
        self.held.remove(&done.conv);
        // A closed conversation has nobody to report to.
        let Some(mut conv) = self.convs.remove(&done.conv) else {
            return;
        };
        let next = self.add_results(&mut conv, done.round, done.results);
        self.convs.insert(done.conv, conv);
        if let Some(round) = next {
            self.active.push(Active {
                conv: done.conv,
                place: Place::Conversation,
                round,
                run: None,
            });
        }
    }

    /// Starts a response job on the engine thread: its reply is stepped among the others by
    /// [`Worker::step_active`]. Nothing to step when the job is answered at once.
    fn start_active(&mut self, job: Job) {
        let (id, item_id) = match &job {
            Job::Respond { conv, respond, .. } | Job::RespondApart { conv, respond, .. } => {
                (*conv, respond.item_id.clone())
            }
            _ => return,
        };
        // A job of a closed conversation has nobody to report to.
        let Some(mut conv) = self.convs.remove(&id) else {
            return;
        };
        let speculative = matches!(
            job,
            Job::Respond {
                speculative: true,
                ..
            }
        );
        let (seq, respond, place) = match job {
            Job::Respond { seq, respond, .. } => match conv.failed_add.take() {
                Some(failed) => {
                    conv.emit(ConvEvent::Error {
                        item_id: Some(respond.item_id.clone()),
                        message: format!(
                            "item {failed:?} could not be added to the conversation (see the error before); no reply is made without it"
                        ),
                    });
                    conv.emit(nothing_said(respond.response_id, respond.item_id, false));
                    self.convs.insert(id, conv);
                    return;
                }
                None => (seq, respond, Place::Conversation),
            },
            Job::RespondApart {
                seq,
                respond,
                input,
                ..
            } => match self.place_apart(&mut conv, &respond, input) {
                Ok(Some(place)) => (seq, respond, place),
                Ok(None) => {
                    self.convs.insert(id, conv);
                    return;
                }
                Err(e) => {
                    self.fail(&mut conv, Some(item_id), e);
                    self.convs.insert(id, conv);
                    return;
                }
            },
            _ => return,
        };
        let round = Round {
            seq,
            output: respond.output.unwrap_or(conv.setup.output),
            item_id: respond.item_id.clone(),
            req: respond,
            started: Instant::now(),
            number: 0,
            speculative,
        };
        self.convs.insert(id, conv);
        self.active.push(Active {
            conv: id,
            place,
            round,
            run: None,
        });
    }

    /// Where an out-of-band reply of `conv` is made: in it (cut off again afterwards), or in a
    /// conversation of its own holding `input`. None when its input could not be added
    /// (reported, and the response closed).
    fn place_apart(
        &mut self,
        conv: &mut Conv,
        respond: &Respond,
        input: Option<Vec<(String, Content)>>,
    ) -> anyhow::Result<Option<Place>> {
        let Some(input) = input else {
            return Ok(Some(Place::Restore {
                len: conv.session.len(),
                entries: conv.entries.len(),
            }));
        };
        let mut apart = self.open(
            conv.setup.clone(),
            conv.events.clone(),
            Arc::clone(&conv.cancel),
        )?;
        // The test seam's count and the call ids go on from the conversation's.
        apart.replies = conv.replies;
        apart.calls = conv.calls + 1_000_000;
        for (id, content) in input {
            if let Err(e) = self.insert(&mut apart, id, content, Placement::End) {
                conv.emit(ConvEvent::Error {
                    item_id: Some(respond.item_id.clone()),
                    message: format!("{e:#}"),
                });
                conv.emit(nothing_said(
                    respond.response_id.clone(),
                    respond.item_id.clone(),
                    false,
                ));
                return Ok(None);
            }
        }
        Ok(Some(Place::Apart(Box::new(apart))))
    }

    /// One step of a response in progress: its reply's start, one step of it, or its end (and
    /// what follows: the next round, or tools to run).
    fn step_active(&mut self, active: &mut Active) -> Step {
        // A closed conversation has nobody to report to.
        let Some(mut conv) = self.convs.remove(&active.conv) else {
            return Step::Done;
        };
        let step = self.step_in(&mut conv, active);
        if !matches!(step, Step::Going) {
            if let Place::Restore { len, entries } = active.place {
                conv.entries.truncate(entries);
                if let Err(e) = conv.session.truncate_to(len) {
                    self.fail(&mut conv, None, e.into());
                }
            }
        }
        self.convs.insert(active.conv, conv);
        step
    }

    fn step_in(&mut self, conv: &mut Conv, active: &mut Active) -> Step {
        let in_conversation = matches!(active.place, Place::Conversation);
        let conv = match &mut active.place {
            Place::Apart(apart) => apart.as_mut(),
            _ => conv,
        };
        let round = &active.round;
        let Some(run) = active.run.as_mut() else {
            let begun = self.begin_reply(
                conv,
                round.seq,
                &round.req.response_id,
                &round.item_id,
                round.output,
                round.started,
            );
            return match begun {
                Ok(Some(run)) => {
                    active.run = Some(run);
                    Step::Going
                }
                Ok(None) => Step::Done,
                Err(e) => {
                    // The error first: it says why the reply is empty.
                    self.fail(conv, Some(round.item_id.clone()), e);
                    Self::close_round(conv, round, false);
                    Step::Done
                }
            };
        };
        let ended = match self.step_reply(conv, run) {
            Ok(false) => return Step::Going,
            Ok(true) => active.run.take().map(|run| self.end_reply(conv, run)),
            Err(e) => {
                if let Some(run) = active.run.take() {
                    self.recycle(run);
                }
                Some(Err(e))
            }
        };
        let calls = match ended {
            Some(Ok(calls)) => calls,
            Some(Err(e)) => {
                self.fail(conv, Some(round.item_id.clone()), e);
                Self::close_round(conv, round, false);
                return Step::Done;
            }
            None => return Step::Done,
        };
        let Some(tools) = self.round_calls(conv, round.clone(), calls) else {
            return Step::Done;
        };
        if in_conversation {
            return Step::Tools(tools);
        }
        // Out of band: the tools run here, and the reply goes on.
        let (round, results) = tools.run();
        match self.add_results(conv, round, results) {
            Some(next) => {
                active.round = next;
                Step::Going
            }
            None => Step::Done,
        }
    }

    /// Drops a response (over, or of a closed conversation), keeping its audio decoder.
    fn retire(&mut self, active: Active) {
        if let Some(run) = active.run {
            self.recycle(run);
        }
    }

    /// Goes on with a deferred transcription until it is complete (true; also when its
    /// conversation is gone or it failed) or another job arrives (false: it gives way within one
    /// step, keeping what it did).
    fn transcribe_unless(&mut self, bg: &mut Background, jobs: &Receiver<Job>) -> bool {
        // A closed conversation has nobody to report to.
        let Some(c) = self.convs.get(&bg.conv) else {
            return true;
        };
        let tools_done = &self.tools_done.1;
        let stop = || !jobs.is_empty() || !tools_done.is_empty();
        let encode = |audio: &[f32]| self.encoding(c, audio);
        match bg.resume(&self.model, encode, self.max_transcript_tokens, stop) {
            Ok(Some(text)) => {
                c.emit(ConvEvent::Transcript {
                    item_id: bg.item_id.clone(),
                    text,
                });
                true
            }
            Ok(None) => false,
            Err(e) => {
                c.emit(ConvEvent::Error {
                    item_id: Some(bg.item_id.clone()),
                    message: format!("{e:#}"),
                });
                true
            }
        }
    }

    /// A conversation of the engine, by id.
    #[cfg(test)]
    pub(crate) fn conversation(&self, id: u64) -> Option<&Conv> {
        self.convs.get(&id)
    }

    /// Teacher-forces `text` at the start of the first reply of conversations with tools (the
    /// test seam that [`FORCE_REPLY_ENV`] sets).
    #[cfg(test)]
    pub(crate) fn force_reply(&mut self, text: &str) {
        self.forced = Some(text.to_owned());
    }

    /// Teacher-forces `text` at the start of every text-to-speech reply (the benchmark seam that
    /// [`FORCE_TTS_ENV`] sets).
    #[cfg(test)]
    pub(crate) fn force_tts(&mut self, text: &str) {
        self.forced_tts = Some(text.to_owned());
    }

    /// As [`Worker::force_reply`], for conversations without tools too.
    #[cfg(test)]
    pub(crate) fn force_reply_without_tools(&mut self, text: &str) {
        self.forced = Some(text.to_owned());
        self.force_without_tools = true;
    }

    /// The model's context, or the configured smaller one.
    fn context_limit(&self) -> usize {
        let model = self.model.config.lfm.max_position_embeddings;
        match self.options.context_limit {
            Some(n) if n > 0 => n.min(model),
            _ => model,
        }
    }

    fn conversation_job(&mut self, job: Job) {
        let (id, item_id) = match &job {
            Job::Configure { conv, .. } => (*conv, None),
            Job::Add { conv, item_id, .. }
            | Job::Truncate { conv, item_id, .. }
            | Job::Delete { conv, item_id }
            | Job::Transcribe { conv, item_id, .. } => (*conv, Some(item_id.clone())),
            Job::Respond { conv, respond, .. } | Job::RespondApart { conv, respond, .. } => {
                (*conv, Some(respond.item_id.clone()))
            }
            Job::Open { .. } | Job::Close { .. } | Job::Confirm { .. } | Job::Shutdown => return,
        };
        // Tool calls of a speculative reply undone (cancelled, or deleted) never run.
        let deleted = match &job {
            Job::Delete { item_id, .. } => Some(item_id.as_str()),
            _ => None,
        };
        self.drop_waiting(id, deleted);
        // A job of a closed conversation has nobody to report to.
        let Some(mut conv) = self.convs.remove(&id) else {
            return;
        };
        let result = match job {
            Job::Configure { setup, .. } => self.configure(&mut conv, setup),
            Job::Add {
                item_id,
                content,
                place,
                ..
            } => {
                let r = self.insert(&mut conv, item_id.clone(), content, place);
                if r.is_err() {
                    conv.failed_add = Some(item_id);
                }
                r
            }
            Job::Truncate {
                item_id,
                audio_samples,
                ..
            } => self.truncate(&mut conv, &item_id, audio_samples),
            Job::Delete { item_id, .. } => self.delete(&mut conv, &item_id),
            Job::Transcribe {
                item_id,
                audio,
                stream,
                ..
            } => self.transcribe(&conv, item_id, &audio, stream),
            // Responses are started by `start_active` and stepped by the run loop.
            Job::Respond { .. }
            | Job::RespondApart { .. }
            | Job::Confirm { .. }
            | Job::Open { .. }
            | Job::Close { .. }
            | Job::Shutdown => Ok(()),
        };
        if let Err(e) = result {
            self.fail(&mut conv, item_id, e);
        }
        self.convs.insert(id, conv);
    }

    /// Reports a failed job, after putting the session back in line with the entries.
    fn fail(&self, conv: &mut Conv, item_id: Option<String>, e: anyhow::Error) {
        if let Err(e2) = self.rebuild(conv, 0) {
            conv.emit(ConvEvent::Error {
                item_id: None,
                message: format!("the conversation could not be restored: {e2:#}"),
            });
        }
        conv.emit(ConvEvent::Error {
            item_id,
            message: format!("{e:#}"),
        });
    }

    fn system_chat(&self, setup: &Setup) -> anyhow::Result<ChatState> {
        let tok = &self.model.tokenizer;
        let mut chat = ChatState::new(tok)?;
        let system = tools::system_prompt(&setup.instructions, &setup.tools);
        if !system.is_empty() {
            chat.new_turn(tok, "system")?;
            chat.add_text(tok, &system)?;
            chat.end_turn(tok)?;
        }
        Ok(chat)
    }

    pub(crate) fn open(
        &self,
        setup: Setup,
        events: Sender<ConvEvent>,
        cancel: Arc<Cancel>,
    ) -> anyhow::Result<Conv> {
        let chat = self.system_chat(&setup)?;
        anyhow::ensure!(
            chat.len() < self.context_limit() / 2,
            "the instructions take {} positions, over half the context of {}",
            chat.len(),
            self.context_limit()
        );
        let mut session = Session::new(self.model.backbone.clone())?;
        prefill_chat(&mut session, &chat)?;
        Ok(Conv {
            setup,
            base: session.len(),
            session,
            events,
            cancel,
            entries: Vec::new(),
            replies: 0,
            calls: 0,
            call_ids: Default::default(),
            failed_add: None,
            encoded: Default::default(),
            withdrawn: Vec::new(),
        })
    }

    /// New instructions or tools: a new system turn, and the history prefilled after it.
    pub(crate) fn configure(&self, conv: &mut Conv, setup: Setup) -> anyhow::Result<()> {
        let old = std::mem::replace(&mut conv.setup, setup);
        let chat = match self.system_chat(&conv.setup).and_then(|chat| {
            anyhow::ensure!(
                chat.len() < self.context_limit() / 2,
                "the instructions take {} positions, over half the context of {}",
                chat.len(),
                self.context_limit()
            );
            Ok(chat)
        }) {
            Ok(c) => c,
            Err(e) => {
                conv.setup = old;
                return Err(e);
            }
        };
        if chat.items() == &conv.session.items()[..conv.base.min(conv.session.len())]
            && chat.len() == conv.base
        {
            return Ok(());
        }
        conv.session.truncate_to(0)?;
        prefill_chat(&mut conv.session, &chat)?;
        conv.base = conv.session.len();
        self.rebuild(conv, 0)
    }

    /// Truncates the session at entry `from` and prefills it and everything after in one batch.
    fn rebuild(&self, conv: &mut Conv, from: usize) -> anyhow::Result<()> {
        // Entries before `from` are where they were; the rest start after them.
        let start = match from.checked_sub(1).and_then(|i| conv.entries.get(i)) {
            Some(prev) => prev.start + prev.len,
            None => conv.base,
        };
        conv.session.truncate_to(start)?;
        let mut parts = Vec::new();
        let mut at = start;
        for e in &mut conv.entries[from..] {
            let p = e.parts();
            e.start = at;
            e.len = parts_len(&p)?;
            at += e.len;
            parts.extend(p);
        }
        if parts.is_empty() {
            return Ok(());
        }
        let (emb, items) = self.embed(&parts)?;
        conv.session.prefill(&emb, &items)?;
        Ok(())
    }

    /// Input embeddings and position kinds of `parts`.
    fn embed(&self, parts: &[Part]) -> anyhow::Result<(Tensor, Vec<Item>)> {
        let mut rows = Vec::with_capacity(parts.len());
        let mut items = Vec::new();
        for p in parts {
            match p {
                Part::Text(ids) if ids.is_empty() => {}
                Part::Text(ids) => {
                    rows.push(self.model.backbone.embed_text(ids)?);
                    items.extend(ids.iter().map(|&id| Item::Text(id)));
                }
                Part::AudioIn(t) => {
                    items.extend(std::iter::repeat_n(Item::AudioIn, t.dim(0)?));
                    rows.push(t.clone());
                }
                Part::Frames(frames) => {
                    for f in frames {
                        rows.push(self.model.audio_head.frame_embedding(f)?.unsqueeze(0)?);
                        items.push(Item::AudioOut);
                    }
                }
            }
        }
        anyhow::ensure!(!rows.is_empty(), "nothing to prefill");
        Ok((Tensor::cat(&rows, 0)?, items))
    }

    /// Makes room for `needed` more positions, dropping the oldest entries (with one re-prefill
    /// of the rest) when the context would overflow.
    fn make_room(&self, conv: &mut Conv, needed: usize) -> anyhow::Result<()> {
        let limit = self.context_limit();
        anyhow::ensure!(
            conv.base + needed <= limit,
            "this needs {needed} positions; the context holds {limit} ({} taken by the instructions)",
            conv.base
        );
        if conv.session.len() + needed <= limit {
            return Ok(());
        }
        // Keep at most three quarters of the context after trimming, so that trimming is rare.
        let target = (limit * 3 / 4).max(conv.base + needed).min(limit);
        let mut dropped = Vec::new();
        let mut len = conv.session.len();
        let mut n = 0;
        while n < conv.entries.len() && len + needed > target {
            len -= conv.entries[n].len;
            dropped.push(conv.entries[n].id.clone());
            n += 1;
        }
        conv.entries.drain(..n);
        self.rebuild(conv, 0)?;
        conv.emit(ConvEvent::Trimmed { item_ids: dropped });
        Ok(())
    }

    pub(crate) fn add(
        &self,
        conv: &mut Conv,
        item_id: String,
        content: Content,
    ) -> anyhow::Result<()> {
        self.insert(conv, item_id, content, Placement::End)
    }

    /// An out-of-band reply, made where the engine thread makes it ([`Worker::place_apart`]):
    /// in the conversation and cut off again, or in a conversation of its own holding `input`.
    #[cfg(test)]
    pub(crate) fn respond_apart(
        &mut self,
        conv: &mut Conv,
        seq: u64,
        respond: Respond,
        input: Option<Vec<(String, Content)>>,
    ) -> anyhow::Result<()> {
        match self.place_apart(conv, &respond, input)? {
            None => Ok(()),
            Some(Place::Restore { len, entries }) => {
                self.respond(conv, seq, respond)?;
                conv.entries.truncate(entries);
                conv.session.truncate_to(len)?;
                Ok(())
            }
            Some(Place::Apart(mut apart)) => self.respond(&mut apart, seq, respond),
            Some(Place::Conversation) => self.respond(conv, seq, respond),
        }
    }

    /// Puts an item at `place` and prefills it (and what follows it).
    pub(crate) fn insert(
        &self,
        conv: &mut Conv,
        item_id: String,
        content: Content,
        place: Placement,
    ) -> anyhow::Result<()> {
        match self.insert_until_withdrawn(conv, item_id.clone(), content, place) {
            Err(e)
                if matches!(
                    e.downcast_ref::<lfm2_audio::error::Error>(),
                    Some(lfm2_audio::error::Error::Stopped)
                ) =>
            {
                Self::withdrawn(conv, item_id);
                Ok(())
            }
            r => r,
        }
    }

    /// [`Worker::insert`], whose encoding and prefill end with `Error::Stopped` when the item is
    /// withdrawn meanwhile (the session is then as before).
    fn insert_until_withdrawn(
        &self,
        conv: &mut Conv,
        item_id: String,
        content: Content,
        place: Placement,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(
            conv.position_of(&item_id).is_none(),
            "an item with id {item_id:?} is already in the conversation"
        );
        let tok = &self.model.tokenizer;
        let text_turn = |role: &str, text: &str| -> anyhow::Result<Vec<u32>> {
            Ok(prompt::text_turn(tok, role, text)?)
        };
        let parts = match content {
            Content::UserAudio(audio) => {
                let cancel = Arc::clone(&conv.cancel);
                let emb = self
                    .model
                    .audio
                    .embed_until(&audio, &|| cancel.withdrawn(&item_id))
                    .context("encoding the user's speech")?;
                conv.remember_encoding(audio, &emb);
                vec![
                    Part::Text(prompt::turn_start(tok, "user")?),
                    Part::AudioIn(emb),
                    Part::Text(prompt::turn_end(tok)?),
                ]
            }
            Content::UserText(text) => vec![Part::Text(text_turn("user", &text)?)],
            Content::AssistantText(text) => vec![Part::Text(text_turn("assistant", &text)?)],
            Content::SystemText(text) => vec![Part::Text(text_turn("system", &text)?)],
            Content::ToolResult { call_id, output } => {
                anyhow::ensure!(
                    conv.call_ids.contains(&call_id),
                    "no tool call with id {call_id:?} in this conversation"
                );
                vec![Part::Text(text_turn(
                    "tool",
                    &tools::response_content(&output),
                )?)]
            }
        };
        let at = match &place {
            Placement::End => None,
            Placement::Start => Some(0),
            Placement::After(id) => match conv.position_of(id) {
                Some(i) if i + 1 == conv.entries.len() => None,
                Some(i) => Some(i + 1),
                None => {
                    anyhow::bail!("no item {id:?} in the conversation to put {item_id:?} after")
                }
            },
        };
        match at {
            None => {
                let cancel = Arc::clone(&conv.cancel);
                let stop = || cancel.withdrawn(&item_id);
                self.append(conv, item_id.clone(), Body::Turn(parts), &stop)?;
            }
            Some(i) => {
                let len = parts_len(&parts)?;
                let limit = self.context_limit();
                anyhow::ensure!(
                    conv.session.len() + len <= limit,
                    "the item takes {len} positions; the context holds {limit} and has {} free",
                    limit.saturating_sub(conv.session.len())
                );
                conv.entries.insert(
                    i,
                    Entry {
                        id: item_id.clone(),
                        body: Body::Turn(parts),
                        start: 0,
                        len,
                    },
                );
                if let Err(e) = self.rebuild(conv, i) {
                    conv.entries.remove(i);
                    return Err(e);
                }
            }
        }
        conv.emit(ConvEvent::Added { item_id });
        Ok(())
    }

    /// An item withdrawn while it was being added (see [`super::Cancel::withdrawn`]): the
    /// session is as before, and the item is reported added, then deleted when its queued
    /// deletion comes, as if it had been.
    fn withdrawn(conv: &mut Conv, item_id: String) {
        conv.withdrawn.push(item_id.clone());
        conv.emit(ConvEvent::Added { item_id });
    }

    /// Appends an entry and prefills it (`stop`: see [`lfm2_audio::error::Stop`]).
    fn append(
        &self,
        conv: &mut Conv,
        id: String,
        body: Body,
        stop: lfm2_audio::error::Stop,
    ) -> anyhow::Result<()> {
        let mut entry = Entry {
            id,
            body,
            start: 0,
            len: 0,
        };
        let parts = entry.parts();
        entry.len = parts_len(&parts)?;
        self.make_room(conv, entry.len)?;
        entry.start = conv.session.len();
        let (emb, items) = self.embed(&parts)?;
        conv.session.prefill_until(&emb, &items, stop)?;
        conv.entries.push(entry);
        Ok(())
    }

    pub(crate) fn delete(&self, conv: &mut Conv, item_id: &str) -> anyhow::Result<()> {
        conv.cancel.deleted(item_id);
        if let Some(w) = conv.withdrawn.iter().position(|x| x == item_id) {
            conv.withdrawn.swap_remove(w);
            conv.emit(ConvEvent::Deleted {
                item_id: item_id.to_owned(),
            });
            return Ok(());
        }
        let i = conv
            .position_of(item_id)
            .ok_or_else(|| anyhow::anyhow!("no item {item_id:?} in the conversation"))?;
        conv.entries.remove(i);
        self.rebuild(conv, i)?;
        conv.emit(ConvEvent::Deleted {
            item_id: item_id.to_owned(),
        });
        Ok(())
    }

    pub(crate) fn truncate(
        &self,
        conv: &mut Conv,
        item_id: &str,
        audio_samples: u64,
    ) -> anyhow::Result<()> {
        let i = conv
            .position_of(item_id)
            .ok_or_else(|| anyhow::anyhow!("no item {item_id:?} in the conversation"))?;
        let Body::Reply { tokens, .. } = &conv.entries[i].body else {
            anyhow::bail!(
                "item {item_id:?} is not a generated reply; only those have audio to cut"
            );
        };
        let total = samples_of(tokens);
        anyhow::ensure!(
            audio_samples <= total,
            "item {item_id:?} has {total} samples ({} ms) of audio; cannot truncate at {audio_samples} ({} ms)",
            total / 24,
            audio_samples / 24
        );
        let mut tracker = ReplyTracker::new(0);
        for t in tokens {
            tracker.push(reply_item(t));
        }
        let cut = tracker.cut(audio_samples);
        let tok = &self.model.tokenizer;
        let text = strip_specials(&tok.decode_readable(&cut.text)?);
        if let Body::Reply { tokens, .. } = &mut conv.entries[i].body {
            tokens.truncate(cut.position);
        }
        self.rebuild(conv, i)?;
        conv.emit(ConvEvent::Truncated {
            item_id: item_id.to_owned(),
            audio_samples: cut.frames as u64 * SAMPLES_PER_FRAME as u64,
            text,
        });
        Ok(())
    }

    /// The encoding of a clip of user speech to transcribe: the one its item was made from when
    /// the conversation still has it, else made now.
    fn encoding(&self, conv: &Conv, audio: &[f32]) -> anyhow::Result<Tensor> {
        match conv.encoded(audio) {
            Some(emb) => Ok(emb),
            None => Ok(self
                .model
                .audio
                .embed(audio)
                .context("encoding the speech")?),
        }
    }

    /// The transcript of `audio` (the clip of item `item_id`), from [`Worker::encoding`].
    pub(crate) fn transcribe(
        &self,
        conv: &Conv,
        item_id: String,
        audio: &[f32],
        stream: bool,
    ) -> anyhow::Result<()> {
        let model = &self.model;
        let chat = asr_chat(&model.tokenizer, self.encoding(conv, audio)?)?;
        let mut session = Session::new(model.backbone.clone())?;
        let hidden = prefill_chat(&mut session, &chat)?;
        let mut sampler = Sampler::new(SamplingParams::GREEDY, 0);
        let special = model.tokenizer.special();
        // Streamed pieces add up to the final text exactly: no special tokens, nothing of the
        // white space the final text trims (held back until more text follows), and what the
        // stream held back (an incomplete character at the end) sent with the final text.
        let mut pieces = TextStream::new();
        let mut streamed = String::new();
        let mut sent = 0;
        let delta = |text: &str| {
            conv.emit(ConvEvent::TranscriptDelta {
                item_id: item_id.clone(),
                text: text.to_owned(),
            })
        };
        let (ids, _) = generate_text(
            &mut session,
            &hidden,
            &mut sampler,
            self.max_transcript_tokens,
            &[special.im_end],
            |id| {
                if stream {
                    if let Some(piece) = pieces.push(&model.tokenizer, id)? {
                        streamed.push_str(&strip_specials(&piece));
                        let visible = streamed.trim();
                        if visible.len() > sent {
                            delta(&visible[sent..]);
                            sent = visible.len();
                        }
                    }
                }
                Ok(true)
            },
        )?;
        let text = strip_specials(&model.tokenizer.decode_readable(&ids)?)
            .trim()
            .to_owned();
        if stream {
            let visible = streamed.trim();
            if let Some(rest) = text.strip_prefix(&visible[..sent]) {
                if !rest.is_empty() {
                    delta(rest);
                }
            }
        }
        conv.emit(ConvEvent::Transcript { item_id, text });
        Ok(())
    }

    /// A reply, and with [`ToolPolicy::Run`] the rounds of tool calls that follow it, the tools
    /// run on the calling thread. The engine thread's replies run them on threads of their own
    /// (see [`Worker::start_response`]); this is for the tests and for out-of-band replies, whose
    /// conversation is apart from its history (the Realtime server's, which report their calls
    /// to the client rather than run them).
    #[cfg(test)]
    pub(crate) fn respond(
        &mut self,
        conv: &mut Conv,
        seq: u64,
        req: Respond,
    ) -> anyhow::Result<()> {
        let mut next = self.start_response(conv, seq, req);
        while let Some(run) = next {
            let (round, results) = run.run();
            next = self.after_tools(conv, round, results);
        }
        Ok(())
    }

    /// The first round of a response. Returns the tool calls to run before it goes on, if any
    /// (with [`ToolPolicy::Run`]).
    #[cfg(test)]
    pub(crate) fn start_response(
        &mut self,
        conv: &mut Conv,
        seq: u64,
        req: Respond,
    ) -> Option<ToolRun> {
        let round = Round {
            seq,
            output: req.output.unwrap_or(conv.setup.output),
            item_id: req.item_id.clone(),
            req,
            started: Instant::now(),
            number: 0,
            speculative: false,
        };
        self.reply_round(conv, round)
    }

    /// Every reply ends with ReplyDone, a failed or cancelled one too, so that clients waiting
    /// for the end of a response are never left hanging.
    fn close_round(conv: &Conv, round: &Round, cancelled: bool) {
        conv.emit(nothing_said(
            round.req.response_id.clone(),
            round.item_id.clone(),
            cancelled,
        ))
    }

    /// One round: a reply, and the tool calls it made if they are to be run.
    #[cfg(test)]
    fn reply_round(&mut self, conv: &mut Conv, round: Round) -> Option<ToolRun> {
        let calls = match self.reply(
            conv,
            round.seq,
            &round.req.response_id,
            &round.item_id,
            round.output,
            round.started,
        ) {
            Ok(calls) => calls,
            Err(e) => {
                // The error first: it says why the reply is empty.
                self.fail(conv, Some(round.item_id.clone()), e);
                Self::close_round(conv, &round, false);
                return None;
            }
        };
        self.round_calls(conv, round, calls)
    }

    /// What follows a round's reply: the tool calls it made, if they are to be run.
    fn round_calls(
        &mut self,
        conv: &mut Conv,
        mut round: Round,
        calls: Vec<(String, Result<ToolCall, String>)>,
    ) -> Option<ToolRun> {
        if calls.is_empty() {
            return None;
        }
        let ToolPolicy::Run { max_rounds } = conv.setup.tool_policy else {
            return None;
        };
        // The dialog manager counts the rounds by the same rule (dialog::rounds).
        if !conv.setup.tool_policy.runs_round(round.number) {
            conv.emit(ConvEvent::Error {
                item_id: Some(round.item_id),
                message: format!("the model called tools again after {max_rounds} rounds; not run"),
            });
            return None;
        }
        round.number += 1;
        Some(ToolRun {
            round,
            calls,
            tools: conv.setup.tools.clone(),
            events: conv.events.clone(),
        })
    }

    /// The results of a round's tools go back to the model as `tool` turns, and the next round
    /// begins (unless the response was cancelled meanwhile).
    #[cfg(test)]
    fn after_tools(
        &mut self,
        conv: &mut Conv,
        round: Round,
        results: Vec<(String, ToolOutcome)>,
    ) -> Option<ToolRun> {
        let round = self.add_results(conv, round, results)?;
        self.reply_round(conv, round)
    }

    /// The results of a round's tools go back to the model as `tool` turns; returns the next
    /// round (None when the response is over: cancelled meanwhile, or a result not added).
    fn add_results(
        &mut self,
        conv: &mut Conv,
        mut round: Round,
        results: Vec<(String, ToolOutcome)>,
    ) -> Option<Round> {
        for (call_id, outcome) in results {
            let ok = matches!(outcome, ToolOutcome::Ok(_));
            let output = outcome.as_result_text();
            conv.emit(ConvEvent::ToolResult {
                response_id: round.req.response_id.clone(),
                call_id: call_id.clone(),
                output: output.clone(),
                ok,
            });
            if let Err(e) = self.add(
                conv,
                format!("{}-result-{call_id}", round.item_id),
                Content::ToolResult { call_id, output },
            ) {
                self.fail(conv, Some(round.item_id.clone()), e);
                Self::close_round(conv, &round, false);
                return None;
            }
        }
        round.item_id = round.next_item_id();
        if conv.cancel.check(round.seq).is_some() {
            // Cancelled while its tools ran: the response ends here, and says so (its next
            // round is over before it began).
            Self::close_round(conv, &round, true);
            return None;
        }
        Some(round)
    }

    /// Generates one assistant turn, to its end. Returns the tool calls it made (each with its
    /// call id; a malformed one as the parse error).
    #[cfg(test)]
    fn reply(
        &mut self,
        conv: &mut Conv,
        seq: u64,
        response_id: &str,
        item_id: &str,
        output: Output,
        started: Instant,
    ) -> anyhow::Result<Vec<(String, Result<ToolCall, String>)>> {
        let Some(mut run) = self.begin_reply(conv, seq, response_id, item_id, output, started)?
        else {
            return Ok(Vec::new());
        };
        loop {
            match self.step_reply(conv, &mut run) {
                Ok(false) => {}
                Ok(true) => break,
                Err(e) => {
                    self.recycle(run);
                    return Err(e);
                }
            }
        }
        self.end_reply(conv, run)
    }

    /// Starts an assistant turn: its header (and any forced text) prefilled, and a stream ready
    /// to step with [`Worker::step_reply`]. None when it was cancelled before it began (its
    /// [`ConvEvent::ReplyDone`] is sent).
    fn begin_reply(
        &mut self,
        conv: &mut Conv,
        seq: u64,
        response_id: &str,
        item_id: &str,
        output: Output,
        started: Instant,
    ) -> anyhow::Result<Option<ReplyRun>> {
        let model = Arc::clone(&self.model);
        let tok = &model.tokenizer;
        let special = tok.special();
        if conv.cancel.check(seq).is_some() {
            // Cancelled before it began: nothing was said.
            conv.emit(nothing_said(
                response_id.to_owned(),
                item_id.to_owned(),
                true,
            ));
            return Ok(None);
        }
        anyhow::ensure!(
            conv.position_of(item_id).is_none(),
            "an item with id {item_id:?} is already in the conversation"
        );
        let header = prompt::turn_start(tok, "assistant")?;
        let footer = prompt::turn_end(tok)?;
        let reserve = (conv.setup.params.max_new_tokens + header.len() + footer.len())
            .min(self.context_limit() / 4);
        self.make_room(conv, reserve)?;

        // Without tools, a tool-call token the model makes anyway (a random-weight model does) is
        // only text: the reply goes on, and nothing is parsed as a call.
        let with_tools = !conv.setup.tools.is_empty();
        let forced: Vec<u32> = match &self.forced {
            Some(text) if conv.replies == 0 && (with_tools || self.force_without_tools) => {
                tok.encode(text)?
            }
            _ => match &self.forced_tts {
                Some(text) if output == Output::Tts => tok.encode(text)?,
                _ => Vec::new(),
            },
        };
        conv.replies += 1;
        let call_end = tok.encode(tools::TOOL_CALL_END)?;
        let call_end = (with_tools && call_end.len() == 1).then(|| call_end[0]);
        let call_start = tok.encode(tools::TOOL_CALL_START)?;
        let call_start = (with_tools && call_start.len() == 1).then(|| call_start[0]);

        let start = conv.session.len();
        let input = conv.session.items()[..start]
            .iter()
            .fold(Usage::default(), |mut u, item| {
                match item {
                    Item::Text(_) => u.input_text += 1,
                    _ => u.input_audio += 1,
                }
                u
            });
        let mut prompt = header.clone();
        prompt.extend(&forced);
        let hidden = conv.session.prefill_text(&prompt)?;
        let hidden = hidden.get(hidden.dim(0)? - 1)?;
        let reply_start = start + header.len();

        let mode = match output {
            Output::Speech => GenerationMode::Interleaved {
                n_text: model.config.interleaved_n_text,
                n_audio: model.config.interleaved_n_audio,
            },
            Output::Text | Output::Tts => GenerationMode::Sequential,
        };
        let params = lfm2_audio::generate::GenerationParams {
            seed: conv.setup.params.seed.wrapping_add(conv.replies),
            ..conv.setup.params
        };
        let mut generation =
            Generation::new(Arc::clone(&model.audio_head), special, mode, params, hidden);
        if mode == GenerationMode::Sequential && forced.last() == Some(&special.audio_start) {
            generation.continue_in_audio();
        }
        let detok = match self.detoks.pop() {
            Some(d) => d,
            None => self.template.fork()?,
        };
        let mut run = ReplyRun {
            seq,
            response_id: response_id.to_owned(),
            item_id: item_id.to_owned(),
            output,
            started,
            header,
            footer,
            start,
            reply_start,
            with_tools,
            call_start,
            call_end,
            input,
            tokens: Vec::new(),
            tracker: ReplyTracker::new(reply_start),
            text: TextStream::new(),
            samples: 0,
            in_call: false,
            call_done: false,
            first: true,
            ending: Ending::Done,
            cut: None,
            hit_limit: false,
            stream: ReplyStream::new(generation, Some(detok)),
        };
        for &id in &forced {
            if let Err(e) = self.on_text(conv, &mut run, id) {
                self.recycle(run);
                return Err(e);
            }
        }
        Ok(Some(run))
    }

    /// Sends the reply's start event, once, before its first item.
    fn started(conv: &Conv, run: &mut ReplyRun) {
        if run.first {
            run.first = false;
            conv.emit(ConvEvent::ReplyStarted {
                response_id: run.response_id.clone(),
                item_id: run.item_id.clone(),
                latency_ms: run.started.elapsed().as_secs_f64() * 1e3,
            });
        }
    }

    /// A text token of the reply: recorded, and shown unless it belongs to a tool call.
    fn on_text(&self, conv: &Conv, run: &mut ReplyRun, id: u32) -> anyhow::Result<()> {
        Self::started(conv, run);
        run.tokens.push(Token::Text(id));
        run.tracker.push(ReplyItem::Text(id));
        if Some(id) == run.call_start {
            run.in_call = true;
        }
        let ended = Some(id) == run.call_end;
        if ended {
            run.in_call = false;
            run.call_done = true;
        }
        // Speech of a tool call is not played.
        run.stream.set_muted(run.in_call);
        let shown = !run.in_call && !ended;
        if let Some(piece) = run.text.push(&self.model.tokenizer, id)? {
            let piece = strip_specials(&piece);
            // A tool call's text is for the engine, not for the listener.
            if shown && !piece.is_empty() {
                conv.emit(ConvEvent::Text {
                    response_id: run.response_id.clone(),
                    piece,
                });
            }
        }
        Ok(())
    }

    /// One step of a reply: a cancellation handled, or one event of its stream (a token, a
    /// frame, a frame's samples). True when the reply is over ([`Worker::end_reply`] next).
    fn step_reply(&self, conv: &mut Conv, run: &mut ReplyRun) -> anyhow::Result<bool> {
        if run.call_done {
            // A tool call is complete: the reply ends after it, with what the decoder held.
            run.stream.feed_pending(&mut conv.session)?;
            let tail = run.stream.finish()?;
            if !tail.is_empty() {
                run.samples += tail.len() as u64;
                conv.emit(ConvEvent::Audio {
                    response_id: run.response_id.clone(),
                    samples: tail.to_vec(),
                });
            }
            return Ok(true);
        }
        if let Some(heard) = conv.cancel.check(run.seq) {
            run.ending = Ending::Cancelled;
            if let Some(h) = heard {
                let c = run.tracker.cut(h);
                // The last item may not have run through the model yet; the cut may need it.
                if c.position > conv.session.len() {
                    run.stream.feed_pending(&mut conv.session)?;
                }
                run.cut = Some(c);
            } else {
                run.stream.feed_pending(&mut conv.session)?;
            }
            return Ok(true);
        }
        let special = self.model.tokenizer.special();
        match run.stream.next(&mut conv.session)? {
            StreamEvent::End(end) => {
                run.hit_limit = end != ReplyEnd::StopToken;
                run.stream.feed_pending(&mut conv.session)?;
                Ok(true)
            }
            // A sequential reply yields its stop token; the footer closes the turn.
            StreamEvent::Text(id) if id == special.im_end => Ok(false),
            StreamEvent::Text(id) if run.output == Output::Text && id == special.audio_start => {
                // Text output and the model wants to speak: stop before the audio.
                run.ending = Ending::TextOnly;
                Ok(true)
            }
            StreamEvent::Text(id) => {
                self.on_text(conv, run, id)?;
                Ok(false)
            }
            StreamEvent::Frame { frame, audible } => {
                Self::started(conv, run);
                run.tracker.push(ReplyItem::Frame { audible });
                run.tokens.push(Token::Audio(frame));
                Ok(false)
            }
            StreamEvent::Pcm(pcm) => {
                run.samples += pcm.len() as u64;
                conv.emit(ConvEvent::Audio {
                    response_id: run.response_id.clone(),
                    samples: pcm.to_vec(),
                });
                Ok(false)
            }
        }
    }

    /// Gives the decoder of a reply that is over back to the pool.
    fn recycle(&mut self, run: ReplyRun) {
        if let Some(detok) = run.stream.into_detokenizer() {
            self.detoks.push(detok);
        }
    }

    /// Ends a reply: what stays in the conversation, its footer, the tool calls it made (each
    /// with its call id; a malformed one as the parse error) and its closing events.
    fn end_reply(
        &mut self,
        conv: &mut Conv,
        run: ReplyRun,
    ) -> anyhow::Result<Vec<(String, Result<ToolCall, String>)>> {
        let ReplyRun {
            seq,
            response_id,
            item_id,
            header,
            footer,
            start,
            reply_start,
            with_tools,
            input,
            mut tokens,
            samples,
            ending,
            cut,
            hit_limit,
            stream,
            ..
        } = run;
        if let Some(detok) = stream.into_detokenizer() {
            self.detoks.push(detok);
        }
        let tok = &self.model.tokenizer;
        let kept_samples = match (&ending, &cut) {
            (_, Some(c)) => {
                tokens.truncate(c.position - reply_start);
                conv.session.truncate_to(c.position)?;
                c.frames as u64 * SAMPLES_PER_FRAME as u64
            }
            _ => {
                // Everything generated stays; the positions fed are exactly the tokens.
                let fed = conv.session.len() - reply_start;
                tokens.truncate(fed);
                samples
            }
        };
        let cancelled = matches!(ending, Ending::Cancelled);
        if cancelled && tokens.is_empty() {
            // Cancelled before anything was heard: the turn leaves no trace, not even in the
            // seed of the next reply (a speculative reply the user spoke over is undone exactly).
            conv.session.truncate_to(start)?;
            conv.replies -= 1;
            conv.emit(nothing_said(response_id, item_id, cancelled));
            return Ok(Vec::new());
        }
        conv.session.prefill_text(&footer)?;
        let text_ids: Vec<u32> = tokens
            .iter()
            .filter_map(|t| match t {
                Token::Text(id) => Some(*id),
                Token::Audio(_) => None,
            })
            .collect();
        // A reply cut in the middle of a character drops its incomplete bytes.
        let raw = tok.decode(&text_ids)?;
        let raw = raw.trim_end_matches('\u{FFFD}');
        let text = if with_tools {
            strip_specials(&without_calls(raw))
        } else {
            strip_specials(raw)
        };
        let text = text.trim().to_owned();
        conv.entries.push(Entry {
            id: item_id.clone(),
            start,
            len: conv.session.len() - start,
            body: Body::Reply {
                header,
                tokens,
                footer,
            },
        });
        // Calls are reported before the reply ends.
        let call_text = if cancelled || !with_tools {
            None
        } else {
            tools::extract_call_text(raw)
        };
        let parsed = call_text.map(|t| tools::parse_calls(t).map_err(|e| e.to_string()));
        let calls: Vec<Result<ToolCall, String>> = match parsed {
            None => Vec::new(),
            Some(Ok(calls)) if calls.is_empty() => vec![Err("an empty tool call".to_owned())],
            Some(Ok(calls)) => calls.into_iter().map(Ok).collect(),
            Some(Err(e)) => vec![Err(e)],
        };
        let mut out = Vec::new();
        for call in calls {
            conv.calls += 1;
            let call_id = format!("call_{}_{}", seq, conv.calls);
            match &call {
                Ok(c) => conv.emit(ConvEvent::ToolCall {
                    response_id: response_id.clone(),
                    call_id: call_id.clone(),
                    name: c.name.clone(),
                    arguments: serde_json::Value::Object(c.arguments.clone()).to_string(),
                }),
                Err(e) => conv.emit(ConvEvent::Error {
                    item_id: Some(item_id.clone()),
                    message: format!("the model made a malformed tool call: {e}"),
                }),
            }
            conv.call_ids.insert(call_id.clone());
            out.push((call_id, call));
        }
        if let Some(Body::Reply { tokens, .. }) = conv.entries.last().map(|e| &e.body) {
            let audio = tokens
                .iter()
                .filter(|t| matches!(t, Token::Audio(_)))
                .count() as u64;
            conv.emit(ConvEvent::ReplyUsage {
                response_id: response_id.clone(),
                usage: Usage {
                    output_text: tokens.len() as u64 - audio,
                    output_audio: audio,
                    ..input
                },
                hit_limit: hit_limit && !cancelled,
            });
        }
        conv.emit(ConvEvent::ReplyDone {
            response_id,
            item_id,
            text,
            audio_samples: kept_samples,
            cancelled,
        });
        Ok(out)
    }
}

/// A reply between two steps: what [`Worker::begin_reply`] set up and the steps so far.
pub(crate) struct ReplyRun {
    seq: u64,
    response_id: String,
    item_id: String,
    output: Output,
    started: Instant,
    /// The turn's markers, `<|im_start|>assistant\n` and `<|im_end|>\n`.
    header: Vec<u32>,
    footer: Vec<u32>,
    /// Where the turn starts in the session, and where its generated part starts.
    start: usize,
    reply_start: usize,
    with_tools: bool,
    call_start: Option<u32>,
    call_end: Option<u32>,
    /// What the context held when the reply began.
    input: Usage,
    /// What was generated (forced text included).
    tokens: Vec<Token>,
    tracker: ReplyTracker,
    text: TextStream,
    /// 24 kHz samples sent.
    samples: u64,
    /// Inside a tool call (its text is not shown, its speech not played).
    in_call: bool,
    /// A tool call is complete: the reply ends.
    call_done: bool,
    /// Nothing sent yet.
    first: bool,
    ending: Ending,
    cut: Option<dialog::reply::Cut>,
    hit_limit: bool,
    stream: ReplyStream,
}

fn parts_len(parts: &[Part]) -> anyhow::Result<usize> {
    let mut n = 0;
    for p in parts {
        n += match p {
            Part::Text(ids) => ids.len(),
            Part::AudioIn(t) => t.dim(0)?,
            Part::Frames(f) => f.len(),
        };
    }
    Ok(n)
}

fn reply_item(t: &Token) -> ReplyItem {
    match t {
        Token::Text(id) => ReplyItem::Text(*id),
        Token::Audio(f) => ReplyItem::Frame {
            audible: is_audible(f),
        },
    }
}

/// Text without the special-token markers (`<|text_end|>`, `<|tool_call_start|>`, ...).
pub fn strip_specials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("<|") {
        out.push_str(&rest[..start]);
        match rest[start..].find("|>") {
            Some(end) => rest = &rest[start + end + 2..],
            None => rest = "",
        }
    }
    out.push_str(rest);
    out
}

/// Generated text without its tool calls (the markers and what is between them).
fn without_calls(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(start) = rest.find(tools::TOOL_CALL_START) {
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        match rest.find(tools::TOOL_CALL_END) {
            Some(end) => rest = &rest[end + tools::TOOL_CALL_END.len()..],
            None => rest = "",
        }
    }
    out.push_str(rest);
    out
}
