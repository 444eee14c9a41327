//! One Realtime session: its settings, the input audio buffer and server VAD, the items of the
//! conversation, and the reply in progress.
//!
//! The session is a state machine with no I/O: client events and engine events go in, and
//! [`Effect`]s come out, server events to send and calls to make on the engine conversation.
//! The server applies them in order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use audio_io::vad::{Endpointer, SileroVad, VadAssets, VadConfig, VadEvent, WINDOW};
use dialog::speculation::{Seen, Speculation};
use dialog::tools::ToolSpec;
use lfm2_audio::format::INPUT_SAMPLE_RATE;
use lfm2_audio::generate::GenerationParams;
use lfm2_audio::resample::Resampler;

use super::protocol::{
    ClientEvent, Dialect, Envelope, FunctionTool, ItemBody, ItemStatus, ItemView, Modality,
    NewItemContent, PartRef, ProtocolError, ResponseOptions, ResponseStatus, ResponseView,
    ServerEvent, ServerVad, SessionUpdate, SessionView, Usage, SAMPLE_RATE,
};
use crate::engine::Setup;
use dialog::conversation::{Call, Content, ConvEvent, Output, Placement, Respond, ToolPolicy};

/// Samples of 24 kHz audio per millisecond.
const SAMPLES_PER_MS: u64 = SAMPLE_RATE as u64 / 1000;
/// The shortest audio a commit takes (the OpenAI server's rule).
const MIN_COMMIT_MS: u64 = 100;

/// Positions of the markers around one turn (`<|im_start|>role\n` ... `<|im_end|>\n`), with room
/// to spare.
const TURN_MARKERS: usize = 8;
/// No token of the model's vocabulary is this long: a text of more bytes than this many per
/// position left cannot fit, and is refused before it is tokenized.
const MAX_BYTES_PER_POSITION: usize = 64;

/// What fits in the model's context, measured with the model's own tokenizer and audio encoder.
#[derive(Clone)]
pub struct Budget {
    /// Positions a conversation may hold.
    pub context: usize,
    /// Positions (tokens) of a text.
    pub text: Arc<dyn Fn(&str) -> usize + Send + Sync>,
    /// Positions of a clip of this many 16 kHz samples.
    pub audio: Arc<dyn Fn(usize) -> usize + Send + Sync>,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Budget {{ context: {} }}", self.context)
    }
}

impl Budget {
    /// Positions of `text`, or None when it is too long to be worth tokenizing (over
    /// `MAX_BYTES_PER_POSITION` bytes for each of the `room` positions).
    fn text_positions(&self, text: &str, room: usize) -> Option<usize> {
        (text.len() <= room.saturating_mul(MAX_BYTES_PER_POSITION)).then(|| (self.text)(text))
    }
}

/// What the session asks of the server.
#[derive(Debug)]
pub enum Effect {
    Send(ServerEvent),
    Engine(EngineCall),
}

/// A call on the session's engine conversation (the engine's vocabulary, shared with the
/// dialog manager).
pub type EngineCall = Call<Setup>;

/// Fixed for the server's life: the model, defaults and limits every session starts from.
#[derive(Debug, Clone)]
pub struct SessionDefaults {
    pub model: String,
    pub instructions: String,
    pub voice: String,
    pub params: GenerationParams,
    /// Where the VAD's files are; None when server VAD is unavailable (then sessions start with
    /// manual turn-taking, and asking for server_vad is an error that says why).
    pub vad_assets: Result<VadAssets, String>,
    pub min_speech: Duration,
    /// The silence after speech that counts as a pause (a speculative reply starts on it).
    pub pause: Duration,
    /// The most audio the input buffer holds, in 24 kHz samples.
    pub max_buffer_samples: usize,
    /// Sizes items and instructions before they go to the engine (None: not checked here; the
    /// engine refuses what does not fit).
    pub budget: Option<Budget>,
    /// With server VAD, start the reply when the user pauses, unseen by the client until the
    /// end of the silence confirms the turn (see [`Session::speculate_on`]).
    pub speculative_start: bool,
}

/// The session settings a client can change.
#[derive(Debug, Clone, PartialEq)]
struct Settings {
    instructions: String,
    voice: String,
    modality: Modality,
    transcription: Option<String>,
    turn_detection: Option<ServerVad>,
    tools: Vec<FunctionTool>,
    temperature: f64,
    max_output_tokens: Option<u32>,
}

/// Server VAD on the input stream.
struct Vad {
    silero: SileroVad,
    endpointer: Endpointer,
    resampler: Resampler,
    /// 16 kHz samples not yet in a full window.
    pending: Vec<f32>,
    /// The item the utterance in progress will become.
    item_id: Option<String>,
    /// Where the endpointer's clock starts in the session's input audio, in ms.
    base_ms: u64,
}

#[derive(Debug, Clone, PartialEq)]
enum ItemKind {
    User,
    Assistant {
        modality: Modality,
        audio_samples: u64,
    },
    FunctionCall,
    FunctionCallOutput,
    System,
}

#[derive(Debug, Clone)]
struct Item {
    id: String,
    kind: ItemKind,
    /// Whether the engine holds it (function call items of a reply with a message do not).
    in_engine: bool,
    /// The item as `conversation.item.retrieve` shows it.
    view: ItemView,
}

/// The reply in progress.
struct Active {
    view: ResponseView,
    /// The id the engine gives the reply's item.
    item_id: String,
    started: bool,
    /// Output index of the message item, once shown.
    message: Option<u32>,
    /// Whether the reply's engine item has been shown to the client (as the message or as the
    /// first function call).
    engine_item_shown: bool,
    text: String,
    sent_samples: u64,
    /// Set once cancelled: by the user speaking (true) or the client (false).
    cancelled: Option<bool>,
    /// What the reply used, and whether it was cut by the token limit (from the engine).
    usage: Option<Usage>,
    hit_limit: bool,
    /// Out of band (`conversation: "none"`): its items stay out of the conversation.
    apart: bool,
}

pub struct Session {
    id: String,
    defaults: SessionDefaults,
    dialect: Dialect,
    settings: Settings,
    next_id: u64,
    /// Uncommitted input audio, 24 kHz.
    buffer: Vec<f32>,
    /// 24 kHz samples appended since the session began (the VAD's timestamps count from there).
    appended: u64,
    /// Server VAD, while turn detection is on.
    vad: Option<Vad>,
    items: Vec<Item>,
    active: Option<Active>,
    /// A reply asked for (by the VAD) while another was in progress.
    pending_reply: bool,
    /// Truncations asked for and not yet confirmed: item → audio_end_ms.
    truncating: HashMap<String, u64>,
    /// Transcriptions asked for: item → seconds of audio.
    transcribing: HashMap<String, f64>,
    /// Transcriptions to ask for once the other calls of this event are made (a reply asked
    /// for by the same event goes first: the transcript must not delay it).
    deferred: Vec<EngineCall>,
    /// Positions of the system turn (instructions and tools).
    system_positions: usize,
    /// The reply started on a pause of the server VAD, and those dropped.
    speculation: Speculation,
    /// Replies started on a pause, and how many of them the end of the silence confirmed.
    speculated: u64,
    confirmed: u64,
    out: Vec<Effect>,
}

fn setup_of(settings: &Settings, params: &GenerationParams) -> Setup {
    let mut params = *params;
    if let Some(n) = settings.max_output_tokens {
        params.max_new_tokens = n as usize;
    }
    params.text = lfm2_audio::sampling::SamplingParams::new(
        (settings.temperature > 0.0).then_some(settings.temperature as f32),
        params.text.top_k,
    );
    Setup {
        instructions: settings.instructions.clone(),
        tools: settings
            .tools
            .iter()
            .map(|t| ToolSpec {
                name: t.name.clone(),
                description: t.description.clone(),
                parameters: t.parameters.clone(),
                command: Vec::new(),
                timeout_secs: 10.0,
            })
            .collect(),
        tool_policy: ToolPolicy::Report,
        params,
        output: output_of(settings.modality),
    }
}

fn output_of(m: Modality) -> Output {
    match m {
        Modality::Audio => Output::Speech,
        Modality::Text => Output::Text,
    }
}

impl Session {
    /// A new session (`number` makes its ids unique in the server) and the setup of its engine
    /// conversation. `dialect` is the one the client announced (the `OpenAI-Beta` header).
    pub fn new(number: u64, defaults: SessionDefaults, dialect: Dialect) -> (Self, Setup) {
        let settings = Settings {
            instructions: defaults.instructions.clone(),
            voice: defaults.voice.clone(),
            modality: Modality::Audio,
            transcription: None,
            turn_detection: defaults.vad_assets.is_ok().then(ServerVad::default),
            tools: Vec::new(),
            temperature: defaults.params.text.temperature.map_or(0.0, f64::from),
            max_output_tokens: None,
        };
        let setup = setup_of(&settings, &defaults.params);
        let system_positions = defaults.budget.as_ref().map_or(0, |b| {
            (b.text)(&dialog::tools::system_prompt(
                &setup.instructions,
                &setup.tools,
            )) + TURN_MARKERS
        });
        let session = Self {
            id: format!("sess_{number:06}"),
            defaults,
            dialect,
            settings,
            next_id: 0,
            buffer: Vec::new(),
            appended: 0,
            vad: None,
            items: Vec::new(),
            active: None,
            pending_reply: false,
            truncating: HashMap::new(),
            transcribing: HashMap::new(),
            deferred: Vec::new(),
            system_positions,
            speculation: Speculation::new(),
            speculated: 0,
            confirmed: 0,
            out: Vec::new(),
        };
        (session, setup)
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Replies started on a pause of the server VAD, and how many of them were confirmed.
    pub fn speculations(&self) -> (u64, u64) {
        (self.speculated, self.confirmed)
    }

    /// Whether a reply is being generated (the idle timer waits for it).
    pub fn busy(&self) -> bool {
        self.active.is_some()
    }

    /// The first events: `session.created` (and the VAD, if it is on).
    pub fn start(&mut self) -> Vec<Effect> {
        if let Some(vad) = self.settings.turn_detection.clone() {
            if let Err(e) = self.start_vad(&vad) {
                self.settings.turn_detection = None;
                self.error(None, "vad_unavailable", e);
            }
        }
        let view = self.view();
        self.send(ServerEvent::SessionCreated(view));
        std::mem::take(&mut self.out)
    }

    fn view(&self) -> SessionView {
        SessionView {
            id: self.id.clone(),
            model: self.defaults.model.clone(),
            instructions: self.settings.instructions.clone(),
            voice: self.settings.voice.clone(),
            modality: self.settings.modality,
            transcription: self.settings.transcription.clone(),
            turn_detection: self.settings.turn_detection.clone(),
            tools: self.settings.tools.clone(),
            temperature: self.settings.temperature,
            max_output_tokens: self.settings.max_output_tokens,
        }
    }

    fn new_id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        let session = self.id.trim_start_matches("sess_");
        format!("{prefix}_{session}_{:06}", self.next_id)
    }

    fn send(&mut self, e: ServerEvent) {
        self.out.push(Effect::Send(e));
    }

    fn engine(&mut self, c: EngineCall) {
        self.out.push(Effect::Engine(c));
    }

    fn error(&mut self, event_id: Option<String>, code: &'static str, message: impl Into<String>) {
        let mut e = ProtocolError::new(code, message);
        e.event_id = event_id;
        self.send(ServerEvent::Error(e));
    }

    /// A client event that did not parse.
    pub fn reject(&mut self, e: ProtocolError) -> Vec<Effect> {
        self.send(ServerEvent::Error(e));
        std::mem::take(&mut self.out)
    }

    /// A client event.
    pub fn handle_client(&mut self, env: Envelope) -> Vec<Effect> {
        if let Some(d) = env.dialect {
            self.dialect = d;
        }
        let eid = env.event_id;
        if !matches!(
            env.event,
            ClientEvent::AudioAppend(_) | ClientEvent::ItemRetrieve { .. }
        ) {
            // The client acts on the conversation: a turn it has not seen yet is undone first,
            // and its event applies to the conversation as the client knows it.
            self.abandon();
        }
        match env.event {
            ClientEvent::SessionUpdate(u) => self.update(eid, u),
            ClientEvent::AudioAppend(samples) => self.append(eid, &samples),
            ClientEvent::AudioCommit => self.commit(eid),
            ClientEvent::AudioClear => {
                self.buffer.clear();
                let now = self.appended / SAMPLES_PER_MS;
                if let Some(vad) = &mut self.vad {
                    vad.endpointer = Endpointer::new(vad.endpointer.config().clone());
                    vad.resampler.reset();
                    vad.pending.clear();
                    vad.item_id = None;
                    vad.base_ms = now;
                }
                self.send(ServerEvent::Cleared);
            }
            ClientEvent::OutputAudioClear => {}
            ClientEvent::ItemCreate {
                previous_item_id,
                item,
            } => self.create_item(eid, previous_item_id, item.id, item.content),
            ClientEvent::ItemTruncate {
                item_id,
                content_index,
                audio_end_ms,
            } => self.truncate(eid, item_id, content_index, audio_end_ms),
            ClientEvent::ItemDelete { item_id } => self.delete(eid, item_id),
            ClientEvent::ItemRetrieve { item_id } => {
                match self.items.iter().find(|i| i.id == item_id) {
                    Some(i) => {
                        let item = i.view.clone();
                        self.send(ServerEvent::ItemRetrieved { item });
                    }
                    None => self.error(
                        eid,
                        "item_not_found",
                        format!("no item {item_id:?} in the conversation"),
                    ),
                }
            }
            ClientEvent::ResponseCreate(o) => {
                if self.active.is_some() {
                    self.error(
                        eid,
                        "conversation_already_has_active_response",
                        "a reply is in progress: wait for its response.done or cancel it",
                    );
                } else {
                    self.respond(o);
                }
            }
            ClientEvent::ResponseCancel { response_id } => match &self.active {
                Some(a) if response_id.as_ref().is_none_or(|r| *r == a.view.id) => {
                    self.cancel(false)
                }
                Some(_) => self.error(
                    eid,
                    "invalid_value",
                    format!("response {response_id:?} is not the reply in progress"),
                ),
                None => self.error(
                    eid,
                    "response_cancel_not_active",
                    "there is no reply in progress to cancel",
                ),
            },
        }
        self.take_out()
    }

    /// The effects of one event, transcriptions last.
    fn take_out(&mut self) -> Vec<Effect> {
        let deferred = std::mem::take(&mut self.deferred);
        self.out.extend(deferred.into_iter().map(Effect::Engine));
        std::mem::take(&mut self.out)
    }

    /// Positions an item may take: the context less the instructions and the room a reply needs.
    fn item_room(&self, b: &Budget) -> usize {
        let max_new = self
            .settings
            .max_output_tokens
            .map_or(self.defaults.params.max_new_tokens, |n| n as usize);
        let reserve = (max_new + TURN_MARKERS).min(b.context / 4);
        b.context
            .saturating_sub(self.system_positions)
            .saturating_sub(reserve)
    }

    /// Refuses (with an error event) an item of `positions` that cannot fit the context.
    fn fits(&mut self, eid: &Option<String>, what: &str, positions: Option<usize>) -> bool {
        let Some(b) = self.defaults.budget.clone() else {
            return true;
        };
        let room = self.item_room(&b);
        match positions {
            Some(n) if n + TURN_MARKERS <= room => true,
            n => {
                let size =
                    n.map_or_else(|| "too many".to_owned(), |n| (n + TURN_MARKERS).to_string());
                self.error(
                    eid.clone(),
                    "context_length_exceeded",
                    format!(
                        "{what} would take {size} positions of the model's context; at most {room} fit ({} in all, {} taken by the instructions, the rest kept for the reply)",
                        b.context, self.system_positions
                    ),
                );
                false
            }
        }
    }

    fn text_fits(&mut self, eid: &Option<String>, what: &str, text: &str) -> bool {
        let Some(b) = self.defaults.budget.clone() else {
            return true;
        };
        let room = self.item_room(&b);
        let n = b.text_positions(text, room);
        self.fits(eid, what, n)
    }

    fn audio_fits(&mut self, eid: &Option<String>, what: &str, samples16: usize) -> bool {
        let n = self.defaults.budget.as_ref().map(|b| (b.audio)(samples16));
        self.fits(eid, what, n)
    }

    fn start_vad(&mut self, v: &ServerVad) -> Result<(), String> {
        let assets = self.defaults.vad_assets.clone()?;
        let config = VadConfig {
            prefix_padding: Duration::from_millis(v.prefix_padding_ms),
            min_silence: Duration::from_millis(v.silence_duration_ms),
            min_speech: self.defaults.min_speech,
            pause: self.defaults.pause,
            ..VadConfig::with_threshold(v.threshold as f32)
        };
        config.validate()?;
        // Keep the model (and its ONNX session) when only the knobs change.
        let silero = match self.vad.take() {
            Some(mut old) => {
                old.silero.reset();
                old.silero
            }
            None => SileroVad::load(&assets).map_err(|e| e.to_string())?,
        };
        self.vad = Some(Vad {
            silero,
            endpointer: Endpointer::new(config),
            resampler: Resampler::new(SAMPLE_RATE, INPUT_SAMPLE_RATE)?,
            pending: Vec::new(),
            item_id: None,
            base_ms: self.appended / SAMPLES_PER_MS,
        });
        Ok(())
    }

    fn update(&mut self, eid: Option<String>, u: SessionUpdate) {
        let mut s = self.settings.clone();
        if let Some(i) = u.instructions {
            s.instructions = i;
        }
        if let Some(v) = u.voice {
            s.voice = v;
        }
        if let Some(m) = u.modality {
            s.modality = m;
        }
        if let Some(t) = u.transcription {
            s.transcription = t;
        }
        if let Some(t) = u.turn_detection {
            s.turn_detection = t;
        }
        if let Some(t) = u.tools {
            s.tools = t;
        }
        if let Some(t) = u.temperature {
            s.temperature = t;
        }
        if let Some(m) = u.max_output_tokens {
            s.max_output_tokens = m;
        }
        let old = setup_of(&self.settings, &self.defaults.params);
        let new = setup_of(&s, &self.defaults.params);
        let mut system_positions = self.system_positions;
        if let Some(b) = self.defaults.budget.clone() {
            if old.instructions != new.instructions || old.tools != new.tools {
                // The engine keeps the instructions under half the context.
                let room = b.context / 2;
                let system = dialog::tools::system_prompt(&new.instructions, &new.tools);
                match b.text_positions(&system, room) {
                    Some(n) if n + TURN_MARKERS < room => system_positions = n + TURN_MARKERS,
                    n => {
                        let size = n.map_or_else(
                            || format!("{} bytes", system.len()),
                            |n| format!("{} positions", n + TURN_MARKERS),
                        );
                        self.error(
                            eid,
                            "context_length_exceeded",
                            format!(
                                "the instructions (with the tools) take {size}; they must stay under half the model's context ({room} of {} positions); the session is unchanged",
                                b.context
                            ),
                        );
                        return;
                    }
                }
            }
        }
        if s.turn_detection != self.settings.turn_detection {
            match &s.turn_detection {
                Some(v) => {
                    if let Err(e) = self.start_vad(v) {
                        self.error(
                            eid,
                            "vad_unavailable",
                            format!("server_vad is not available: {e}"),
                        );
                        return;
                    }
                }
                None => self.vad = None,
            }
        }
        let changed = old.instructions != new.instructions
            || old.tools != new.tools
            || old.output != new.output
            || old.params.max_new_tokens != new.params.max_new_tokens
            || old.params.text.temperature != new.params.text.temperature;
        self.settings = s;
        self.system_positions = system_positions;
        if changed {
            self.engine(EngineCall::Configure(new));
        }
        let view = self.view();
        self.send(ServerEvent::SessionUpdated(view));
    }

    fn append(&mut self, eid: Option<String>, samples: &[f32]) {
        let max = self.defaults.max_buffer_samples;
        if self.vad.is_none() && self.buffer.len() + samples.len() > max {
            self.error(
                eid,
                "input_audio_buffer_full",
                format!(
                    "the input audio buffer holds at most {} s; commit or clear it (this append was dropped)",
                    max as u64 / u64::from(SAMPLE_RATE)
                ),
            );
            return;
        }
        self.buffer.extend_from_slice(samples);
        self.appended += samples.len() as u64;
        if self.buffer.len() > max {
            // With server VAD the buffer only backs a manual commit; the VAD keeps what it
            // needs of an utterance itself.
            let extra = self.buffer.len() - max;
            self.buffer.drain(..extra);
        }
        let Some(vad) = &mut self.vad else { return };
        let mut resampled = Vec::with_capacity(samples.len() * 2 / 3 + 1);
        vad.resampler.push(samples, &mut resampled);
        vad.pending.extend_from_slice(&resampled);
        let mut events = Vec::new();
        let mut failure = None;
        let mut start = 0;
        while vad.pending.len() - start >= WINDOW {
            let window = &vad.pending[start..start + WINDOW];
            start += WINDOW;
            match vad.silero.probability(window) {
                Ok(p) => {
                    if let Some(e) = vad.endpointer.push(window, p) {
                        events.push(e);
                    }
                }
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        vad.pending.drain(..start);
        if let Some(e) = failure {
            self.abandon();
            self.vad = None;
            self.settings.turn_detection = None;
            self.error(
                eid,
                "vad_failed",
                format!("server VAD failed and is now off (manual turn-taking): {e}"),
            );
            return;
        }
        for e in events {
            self.vad_event(e);
        }
    }

    fn vad_event(&mut self, e: VadEvent) {
        let Some(settings) = self.settings.turn_detection.clone() else {
            return;
        };
        match e {
            VadEvent::SpeechStarted { at } => {
                self.abandon();
                let item_id = self.new_id("item");
                let mut base = 0;
                if let Some(vad) = &mut self.vad {
                    vad.item_id = Some(item_id.clone());
                    base = vad.base_ms;
                }
                // Where the committed audio will begin: the speech less the prefix padding.
                let start = (at.as_millis() as u64).saturating_sub(settings.prefix_padding_ms);
                self.send(ServerEvent::SpeechStarted {
                    audio_start_ms: base + start,
                    item_id,
                });
                if settings.interrupt_response && self.active.is_some() {
                    self.cancel(true);
                }
            }
            VadEvent::SpeechEnded { at, audio, .. } => {
                let confirmed = self.speculation.answers(&audio);
                if !confirmed {
                    // Not the utterance the reply was started on: undone, and the turn goes
                    // on as without it.
                    self.abandon();
                }
                let item_id = self
                    .vad
                    .as_mut()
                    .and_then(|v| v.item_id.take())
                    .unwrap_or_else(|| self.new_id("item"));
                let base = self.vad.as_ref().map_or(0, |v| v.base_ms);
                // The end of the speech and the silence that confirmed it.
                self.send(ServerEvent::SpeechStopped {
                    audio_end_ms: base + at.as_millis() as u64 + settings.silence_duration_ms,
                    item_id: item_id.clone(),
                });
                self.buffer.clear();
                if !self.audio_fits(&None, "the utterance", audio.len()) {
                    self.abandon();
                    return;
                }
                if confirmed {
                    self.confirm(audio);
                    return;
                }
                self.commit_audio(item_id, audio);
                if settings.create_response {
                    if self.active.is_some() {
                        self.pending_reply = true;
                    } else {
                        self.respond(ResponseOptions::default());
                    }
                }
            }
            VadEvent::SpeechPaused { audio, .. } => self.speculate_on(&settings, audio),
            VadEvent::SpeechResumed { .. } => self.abandon(),
        }
    }

    /// The user paused: the utterance so far becomes the user item and the reply is asked for,
    /// in the engine only. The protocol commits the buffer and creates the response only at the
    /// end of the silence; until then the client sees nothing of this turn, and the reply's
    /// events are held. Only when the VAD creates responses and none is in progress or waiting.
    fn speculate_on(&mut self, settings: &ServerVad, audio: Vec<f32>) {
        if !self.defaults.speculative_start
            || !settings.create_response
            || self.active.is_some()
            || self.pending_reply
            || self.speculation.active()
        {
            return;
        }
        let Some(user_item) = self.vad.as_ref().and_then(|v| v.item_id.clone()) else {
            return;
        };
        if let Some(b) = &self.defaults.budget {
            // What does not fit is refused at the end of the silence, as without speculation.
            if (b.audio)(audio.len()) + TURN_MARKERS > self.item_room(b) {
                return;
            }
        }
        // The ids the response would take at the end of the silence (an undone reply's are
        // not taken again: its late events must not be mistaken for the next one's).
        let response_id = self.new_id("resp");
        let reply_item = self.new_id("item");
        self.engine(EngineCall::Add {
            item_id: user_item.clone(),
            content: Content::UserAudio(audio.clone()),
            place: Placement::End,
        });
        self.engine(EngineCall::Speculate(Respond {
            response_id: response_id.clone(),
            item_id: reply_item.clone(),
            output: Some(output_of(self.settings.modality)),
        }));
        self.speculation
            .start(audio, user_item, response_id, reply_item);
        self.speculated += 1;
    }

    /// Undoes the speculative turn, if any, unseen by the client.
    fn abandon(&mut self) {
        for call in self.speculation.abandon() {
            self.engine(call.widen());
        }
    }

    /// The end of the silence confirmed the speculative turn (of `audio`): the client sees the
    /// turn as it would have without speculation (committed, the item, the response), then the
    /// reply's events so far, and the reply goes on live.
    fn confirm(&mut self, audio: Vec<f32>) {
        let Some(c) = self.speculation.confirm() else {
            return;
        };
        self.confirmed += 1;
        self.engine(c.call.widen());
        let previous = self.items.last().map(|i| i.id.clone());
        self.send(ServerEvent::Committed {
            item_id: c.user_item.clone(),
            previous_item_id: previous.clone(),
        });
        self.add_user_audio(c.user_item, previous, audio, false);
        self.respond_as(
            ResponseOptions::default(),
            Some((c.response_id, c.reply_item)),
        );
        for ev in c.held {
            self.engine_event(ev);
        }
    }

    fn commit(&mut self, eid: Option<String>) {
        let ms = self.buffer.len() as u64 / SAMPLES_PER_MS;
        if ms < MIN_COMMIT_MS {
            self.error(
                eid,
                "input_audio_buffer_commit_empty",
                format!(
                    "the input audio buffer has {ms} ms of audio; a commit needs at least {MIN_COMMIT_MS} ms"
                ),
            );
            return;
        }
        let audio = std::mem::take(&mut self.buffer);
        let now = self.appended / SAMPLES_PER_MS;
        let item_id = match &mut self.vad {
            Some(vad) => {
                vad.endpointer = Endpointer::new(vad.endpointer.config().clone());
                vad.resampler.reset();
                vad.pending.clear();
                vad.base_ms = now;
                vad.item_id.take()
            }
            None => None,
        }
        .unwrap_or_else(|| self.new_id("item"));
        match Resampler::resample_all(SAMPLE_RATE, INPUT_SAMPLE_RATE, &audio) {
            Ok(audio16) => {
                if self.audio_fits(&eid, "the committed audio", audio16.len()) {
                    self.commit_audio(item_id, audio16)
                }
            }
            Err(e) => self.error(eid, "invalid_audio", e),
        }
    }

    /// A user audio item from the input buffer (16 kHz).
    fn commit_audio(&mut self, item_id: String, audio16: Vec<f32>) {
        let previous = self.items.last().map(|i| i.id.clone());
        self.send(ServerEvent::Committed {
            item_id: item_id.clone(),
            previous_item_id: previous.clone(),
        });
        self.add_user_audio(item_id, previous, audio16, true);
    }

    /// A user audio item: shown to the client, and put in the engine conversation unless
    /// `to_engine` is false (it is there already).
    fn add_user_audio(
        &mut self,
        item_id: String,
        previous: Option<String>,
        audio16: Vec<f32>,
        to_engine: bool,
    ) {
        let view = ItemView {
            id: item_id.clone(),
            status: ItemStatus::Completed,
            body: ItemBody::UserAudio { transcript: None },
        };
        self.push_item(
            Item {
                id: item_id.clone(),
                kind: ItemKind::User,
                in_engine: true,
                view,
            },
            previous,
            true,
        );
        if self.settings.transcription.is_some() {
            self.transcribing.insert(
                item_id.clone(),
                audio16.len() as f64 / f64::from(INPUT_SAMPLE_RATE),
            );
            self.deferred.push(EngineCall::Transcribe {
                item_id: item_id.clone(),
                audio: audio16.clone(),
            });
        }
        if to_engine {
            self.engine(EngineCall::Add {
                item_id,
                content: Content::UserAudio(audio16),
                place: Placement::End,
            });
        }
    }

    /// Puts an item at the end of the conversation and tells the client: `added` (and `done`
    /// when it is final already).
    fn push_item(&mut self, item: Item, previous: Option<String>, done: bool) {
        let view = item.view.clone();
        self.items.push(item);
        self.send(ServerEvent::ItemAdded {
            previous_item_id: previous.clone(),
            item: view.clone(),
        });
        if done {
            self.send(ServerEvent::ItemDone {
                previous_item_id: previous,
                item: view,
            });
        }
    }

    /// Tells the client that an item is final, as it is now.
    fn item_done(&mut self, item_id: &str) {
        let Some(pos) = self.items.iter().position(|i| i.id == item_id) else {
            return;
        };
        let previous = pos.checked_sub(1).map(|p| self.items[p].id.clone());
        let item = self.items[pos].view.clone();
        self.send(ServerEvent::ItemDone {
            previous_item_id: previous,
            item,
        });
    }

    /// The engine content of a new item, with its kind and view; None (after an error event)
    /// when it is refused.
    fn item_content(
        &mut self,
        eid: &Option<String>,
        content: NewItemContent,
    ) -> Option<(ItemKind, ItemBody, Content)> {
        let r = match content {
            NewItemContent::UserText(t) => (
                ItemKind::User,
                ItemBody::UserText(t.clone()),
                Content::UserText(t),
            ),
            NewItemContent::UserAudio(a) => {
                if (a.len() as u64) < SAMPLES_PER_MS * 20 {
                    self.error(
                        eid.clone(),
                        "invalid_audio",
                        "an audio item needs at least 20 ms of audio",
                    );
                    return None;
                }
                let a16 = match Resampler::resample_all(SAMPLE_RATE, INPUT_SAMPLE_RATE, &a) {
                    Ok(a16) => a16,
                    Err(e) => {
                        self.error(eid.clone(), "invalid_audio", e);
                        return None;
                    }
                };
                if !self.audio_fits(eid, "the audio item", a16.len()) {
                    return None;
                }
                (
                    ItemKind::User,
                    ItemBody::UserAudio { transcript: None },
                    Content::UserAudio(a16),
                )
            }
            NewItemContent::AssistantText(t) => (
                ItemKind::Assistant {
                    modality: Modality::Text,
                    audio_samples: 0,
                },
                ItemBody::Assistant {
                    modality: Modality::Text,
                    text: t.clone(),
                },
                Content::AssistantText(t),
            ),
            NewItemContent::SystemText(t) => (
                ItemKind::System,
                ItemBody::SystemText(t.clone()),
                Content::SystemText(t),
            ),
            NewItemContent::FunctionCallOutput { call_id, output } => (
                ItemKind::FunctionCallOutput,
                ItemBody::FunctionCallOutput {
                    call_id: call_id.clone(),
                    output: output.clone(),
                },
                Content::ToolResult { call_id, output },
            ),
        };
        let text = match &r.2 {
            Content::UserText(t) | Content::AssistantText(t) | Content::SystemText(t) => {
                Some(t.as_str())
            }
            Content::ToolResult { output, .. } => Some(output.as_str()),
            Content::UserAudio(_) => None,
        };
        if let Some(text) = text {
            let text = text.to_owned();
            if !self.text_fits(eid, "the item", &text) {
                return None;
            }
        }
        Some(r)
    }

    fn create_item(
        &mut self,
        eid: Option<String>,
        previous_item_id: Option<String>,
        id: Option<String>,
        content: NewItemContent,
    ) {
        let pos = match previous_item_id.as_deref() {
            None => self.items.len(),
            Some("root") => 0,
            Some(p) => match self.items.iter().position(|i| i.id == p) {
                Some(i) => i + 1,
                None => {
                    self.error(
                        eid,
                        "item_not_found",
                        format!("previous_item_id {p:?} is not in the conversation (\"root\" puts the item first)"),
                    );
                    return;
                }
            },
        };
        if let Some(id) = &id {
            if self.items.iter().any(|i| &i.id == id) {
                self.error(
                    eid,
                    "duplicate_item_id",
                    format!("an item with id {id:?} exists already"),
                );
                return;
            }
        }
        let Some((kind, body, content)) = self.item_content(&eid, content) else {
            return;
        };
        let item_id = id.unwrap_or_else(|| self.new_id("item"));
        // The engine knows the items it holds: the new one goes after the nearest of those.
        let place = if pos == self.items.len() {
            Placement::End
        } else {
            match self.items[..pos].iter().rev().find(|i| i.in_engine) {
                Some(i) => Placement::After(i.id.clone()),
                None => Placement::Start,
            }
        };
        let previous = pos.checked_sub(1).map(|i| self.items[i].id.clone());
        let view = ItemView {
            id: item_id.clone(),
            status: ItemStatus::Completed,
            body,
        };
        self.items.insert(
            pos,
            Item {
                id: item_id.clone(),
                kind,
                in_engine: true,
                view: view.clone(),
            },
        );
        self.send(ServerEvent::ItemAdded {
            previous_item_id: previous.clone(),
            item: view.clone(),
        });
        self.send(ServerEvent::ItemDone {
            previous_item_id: previous,
            item: view,
        });
        if let (Content::UserAudio(a16), Some(_)) = (&content, &self.settings.transcription) {
            self.transcribing.insert(
                item_id.clone(),
                a16.len() as f64 / f64::from(INPUT_SAMPLE_RATE),
            );
            self.deferred.push(EngineCall::Transcribe {
                item_id: item_id.clone(),
                audio: a16.clone(),
            });
        }
        self.engine(EngineCall::Add {
            item_id,
            content,
            place,
        });
    }

    fn truncate(&mut self, eid: Option<String>, item_id: String, content_index: u32, ms: u64) {
        let Some(item) = self.items.iter().find(|i| i.id == item_id) else {
            self.error(
                eid,
                "item_not_found",
                format!("no item {item_id:?} in the conversation"),
            );
            return;
        };
        let ItemKind::Assistant {
            modality: Modality::Audio,
            audio_samples,
        } = item.kind
        else {
            self.error(
                eid,
                "invalid_value",
                format!("item {item_id:?} is not an assistant message with audio; only those can be truncated"),
            );
            return;
        };
        if content_index != 0 {
            self.error(
                eid,
                "invalid_value",
                format!("content_index {content_index} does not exist: an assistant message has one content part (0)"),
            );
            return;
        }
        // The reply in progress: what has been sent so far.
        let have = match &self.active {
            Some(a) if a.item_id == item_id => a.sent_samples,
            _ => audio_samples,
        };
        let want = ms.saturating_mul(SAMPLES_PER_MS);
        if want > have {
            self.error(
                eid,
                "invalid_value",
                format!(
                    "audio_end_ms {ms} is beyond the item's audio ({} ms)",
                    have / SAMPLES_PER_MS
                ),
            );
            return;
        }
        self.truncating.insert(item_id.clone(), ms);
        self.engine(EngineCall::Truncate {
            item_id,
            audio_samples: want,
        });
    }

    fn delete(&mut self, eid: Option<String>, item_id: String) {
        let Some(pos) = self.items.iter().position(|i| i.id == item_id) else {
            self.error(
                eid,
                "item_not_found",
                format!("no item {item_id:?} in the conversation"),
            );
            return;
        };
        let item = self.items.remove(pos);
        if item.in_engine {
            self.engine(EngineCall::Delete { item_id });
        } else {
            self.send(ServerEvent::ItemDeleted { item_id });
        }
    }

    fn respond(&mut self, o: ResponseOptions) {
        self.respond_as(o, None);
    }

    /// A response; with `asked`, the engine was asked for it already with these response and
    /// item ids (a speculative reply now confirmed).
    fn respond_as(&mut self, o: ResponseOptions, asked: Option<(String, String)>) {
        self.pending_reply = false;
        let mut input = None;
        if let Some(items) = o.input {
            let mut given = Vec::new();
            for item in items {
                let Some((_, _, content)) = self.item_content(&None, item.content) else {
                    return;
                };
                let id = item.id.unwrap_or_else(|| self.new_id("item"));
                given.push((id, content));
            }
            input = Some(given);
        }
        let apart = o.apart;
        let modality = o.modality.unwrap_or(self.settings.modality);
        let in_engine = asked.is_some();
        let (response_id, item_id) = match asked {
            Some(ids) => ids,
            None => (self.new_id("resp"), self.new_id("item")),
        };
        let view = ResponseView {
            id: response_id.clone(),
            status: ResponseStatus::InProgress,
            modality,
            output: Vec::new(),
            error: None,
            metadata: o.metadata,
            usage: None,
            conversation: apart.then(|| "none".to_owned()),
        };
        self.send(ServerEvent::ResponseCreated(view.clone()));
        self.active = Some(Active {
            view,
            item_id: item_id.clone(),
            started: false,
            message: None,
            engine_item_shown: false,
            text: String::new(),
            sent_samples: 0,
            cancelled: None,
            usage: None,
            hit_limit: false,
            apart,
        });
        let respond = Respond {
            response_id,
            item_id,
            output: Some(output_of(modality)),
        };
        match (in_engine, apart) {
            // Asked for already (speculatively).
            (true, _) => {}
            (false, true) => self.engine(EngineCall::RespondApart { respond, input }),
            (false, false) => self.engine(EngineCall::Respond(respond)),
        }
    }

    fn cancel(&mut self, turn_detected: bool) {
        let Some(a) = &mut self.active else { return };
        if a.cancelled.is_some() {
            return;
        }
        a.cancelled = Some(turn_detected);
        let heard = a.started.then_some(a.sent_samples);
        let started = a.started;
        self.engine(EngineCall::Cancel { heard });
        if !started {
            // Not begun: it ends here, and whatever the engine says of it later is dropped.
            self.finish(ResponseStatus::Cancelled { turn_detected }, None);
        }
    }

    /// Ends the reply in progress: closes its message item and sends `response.done`.
    fn finish(&mut self, status: ResponseStatus, kept_samples: Option<u64>) {
        let Some(mut a) = self.active.take() else {
            return;
        };
        let dialect_modality = a.view.modality;
        if let Some(index) = a.message {
            let at = PartRef {
                response_id: a.view.id.clone(),
                item_id: a.item_id.clone(),
                output_index: index,
                content_index: 0,
            };
            match dialect_modality {
                Modality::Audio => {
                    self.out
                        .push(Effect::Send(ServerEvent::AudioDone { at: at.clone() }));
                    self.out.push(Effect::Send(ServerEvent::TranscriptDone {
                        at: at.clone(),
                        transcript: a.text.clone(),
                    }));
                }
                Modality::Text => self.out.push(Effect::Send(ServerEvent::TextDone {
                    at: at.clone(),
                    text: a.text.clone(),
                })),
            }
            self.out.push(Effect::Send(ServerEvent::ContentPartDone {
                at,
                modality: dialect_modality,
                text: a.text.clone(),
            }));
            let status_item = if status == ResponseStatus::Completed {
                ItemStatus::Completed
            } else {
                ItemStatus::Incomplete
            };
            let item = ItemView {
                id: a.item_id.clone(),
                status: status_item,
                body: ItemBody::Assistant {
                    modality: dialect_modality,
                    text: a.text.clone(),
                },
            };
            if let Some(slot) = a.view.output.get_mut(index as usize) {
                *slot = item.clone();
            }
            self.out.push(Effect::Send(ServerEvent::OutputItemDone {
                response_id: a.view.id.clone(),
                output_index: index,
                item: item.clone(),
            }));
            let kept = kept_samples.unwrap_or(a.sent_samples);
            if let Some(i) = self.items.iter_mut().find(|i| i.id == a.item_id) {
                i.kind = ItemKind::Assistant {
                    modality: dialect_modality,
                    audio_samples: kept,
                };
                i.view = item;
            }
            self.item_done(&a.item_id);
        }
        a.view.status = status;
        a.view.usage = a.usage.or_else(|| Some(Usage::default()));
        self.out
            .push(Effect::Send(ServerEvent::ResponseDone(a.view)));
        if self.pending_reply {
            self.respond(ResponseOptions::default());
        }
    }

    /// Shows the reply's message item, once.
    fn ensure_message(&mut self) {
        let Some(a) = &mut self.active else { return };
        if a.message.is_some() {
            return;
        }
        let index = a.view.output.len() as u32;
        a.message = Some(index);
        a.engine_item_shown = true;
        let item = ItemView {
            id: a.item_id.clone(),
            status: ItemStatus::InProgress,
            body: ItemBody::Assistant {
                modality: a.view.modality,
                text: String::new(),
            },
        };
        a.view.output.push(item.clone());
        let response_id = a.view.id.clone();
        let modality = a.view.modality;
        let item_id = a.item_id.clone();
        let apart = a.apart;
        let previous = self.items.last().map(|i| i.id.clone());
        self.send(ServerEvent::OutputItemAdded {
            response_id: response_id.clone(),
            output_index: index,
            item: item.clone(),
        });
        if !apart {
            self.push_item(
                Item {
                    id: item_id.clone(),
                    kind: ItemKind::Assistant {
                        modality,
                        audio_samples: 0,
                    },
                    in_engine: true,
                    view: item,
                },
                previous,
                false,
            );
        }
        self.send(ServerEvent::ContentPartAdded {
            at: PartRef {
                response_id,
                item_id,
                output_index: index,
                content_index: 0,
            },
            modality,
        });
    }

    /// The part reference of the reply's message, if `response_id` is the live reply.
    fn live_part(&self, response_id: &str) -> Option<PartRef> {
        let a = self.active.as_ref()?;
        if a.view.id != response_id || a.cancelled.is_some() {
            return None;
        }
        Some(PartRef {
            response_id: a.view.id.clone(),
            item_id: a.item_id.clone(),
            output_index: a.message?,
            content_index: 0,
        })
    }

    fn is_live(&self, response_id: &str) -> bool {
        self.active
            .as_ref()
            .is_some_and(|a| a.view.id == response_id)
    }

    /// An event of the engine conversation.
    pub fn handle_engine(&mut self, ev: ConvEvent) -> Vec<Effect> {
        match self.speculation.event(ev) {
            Seen::Pass(ev) => self.engine_event(ev),
            Seen::Held => {}
            Seen::Dropped(calls) => {
                for call in calls {
                    self.engine(call.widen());
                }
            }
        }
        self.take_out()
    }

    fn engine_event(&mut self, ev: ConvEvent) {
        match ev {
            ConvEvent::Added { .. }
            | ConvEvent::ToolResult { .. }
            | ConvEvent::TimerFired { .. } => {}
            ConvEvent::ReplyUsage {
                response_id,
                usage,
                hit_limit,
            } => {
                if let Some(a) = &mut self.active {
                    if a.view.id == response_id {
                        a.usage = Some(Usage {
                            input_text: usage.input_text,
                            input_audio: usage.input_audio,
                            output_text: usage.output_text,
                            output_audio: usage.output_audio,
                        });
                        a.hit_limit = hit_limit;
                    }
                }
            }
            ConvEvent::ReplyStarted { response_id, .. } => {
                if let Some(a) = &mut self.active {
                    if a.view.id == response_id {
                        a.started = true;
                    }
                }
            }
            ConvEvent::Text { response_id, piece } => {
                if self.is_live(&response_id)
                    && self.active.as_ref().is_some_and(|a| a.cancelled.is_none())
                {
                    self.ensure_message();
                    if let (Some(at), Some(a)) = (self.live_part(&response_id), &mut self.active) {
                        a.text.push_str(&piece);
                        let ev = match a.view.modality {
                            Modality::Audio => ServerEvent::TranscriptDelta { at, delta: piece },
                            Modality::Text => ServerEvent::TextDelta { at, delta: piece },
                        };
                        self.send(ev);
                    }
                }
            }
            ConvEvent::Audio {
                response_id,
                samples,
            } => {
                let speaking = self.active.as_ref().is_some_and(|a| {
                    a.view.id == response_id
                        && a.cancelled.is_none()
                        && a.view.modality == Modality::Audio
                });
                if speaking && !samples.is_empty() {
                    self.ensure_message();
                    if let (Some(at), Some(a)) = (self.live_part(&response_id), &mut self.active) {
                        a.sent_samples += samples.len() as u64;
                        let delta = super::protocol::encode_pcm16(&samples);
                        self.send(ServerEvent::AudioDelta { at, delta });
                    }
                }
            }
            ConvEvent::ToolCall {
                response_id,
                call_id,
                name,
                arguments,
            } => self.tool_call(response_id, call_id, name, arguments),
            ConvEvent::ReplyDone {
                response_id,
                audio_samples,
                cancelled,
                text,
                ..
            } => {
                // The final text is what the deltas carried (the engine's, trimmed, may differ
                // in white space).
                let _ = text;
                if self.is_live(&response_id) {
                    let hit_limit = self.active.as_ref().is_some_and(|a| a.hit_limit);
                    let status = match self.active.as_ref().and_then(|a| a.cancelled) {
                        Some(turn_detected) => ResponseStatus::Cancelled { turn_detected },
                        None if cancelled => ResponseStatus::Cancelled {
                            turn_detected: false,
                        },
                        None if hit_limit => ResponseStatus::Incomplete,
                        None => ResponseStatus::Completed,
                    };
                    self.finish(status, Some(audio_samples));
                }
            }
            ConvEvent::Truncated {
                item_id,
                audio_samples,
                text,
            } => {
                if let Some(i) = self.items.iter_mut().find(|i| i.id == item_id) {
                    if let ItemBody::Assistant { text: t, .. } = &mut i.view.body {
                        *t = text;
                    }
                }
                let ms = self
                    .truncating
                    .remove(&item_id)
                    .unwrap_or(audio_samples / SAMPLES_PER_MS);
                if let Some(i) = self.items.iter_mut().find(|i| i.id == item_id) {
                    if let ItemKind::Assistant {
                        audio_samples: s, ..
                    } = &mut i.kind
                    {
                        *s = audio_samples;
                    }
                }
                self.send(ServerEvent::ItemTruncated {
                    item_id,
                    content_index: 0,
                    audio_end_ms: ms,
                });
            }
            ConvEvent::Deleted { item_id } => self.send(ServerEvent::ItemDeleted { item_id }),
            // Input transcription is asked for whole (`Conversation::transcribe`).
            ConvEvent::TranscriptDelta { .. } => {}
            ConvEvent::Transcript { item_id, text } => {
                let seconds = self.transcribing.remove(&item_id).unwrap_or(0.0);
                if let Some(i) = self.items.iter_mut().find(|i| i.id == item_id) {
                    i.view.body = ItemBody::UserAudio {
                        transcript: Some(text.clone()),
                    };
                }
                self.send(ServerEvent::TranscriptionCompleted {
                    item_id,
                    transcript: text,
                    seconds,
                })
            }
            ConvEvent::Trimmed { item_ids } => {
                for id in item_ids {
                    self.items.retain(|i| i.id != id);
                    self.send(ServerEvent::ItemDeleted { item_id: id });
                }
            }
            ConvEvent::Error { item_id, message } => {
                let reply_failed = matches!(
                    (&self.active, &item_id),
                    (Some(a), Some(id)) if a.item_id == *id
                );
                if let Some(id) = &item_id {
                    self.truncating.remove(id);
                    self.transcribing.remove(id);
                }
                self.error(None, "engine_error", message.clone());
                if reply_failed {
                    if let Some(a) = &mut self.active {
                        a.view.error = Some(message);
                    }
                    self.finish(ResponseStatus::Failed, None);
                } else if let Some(id) = item_id {
                    // A failed add: the item is not in the conversation.
                    if let Some(pos) = self.items.iter().position(|i| i.id == id && i.in_engine) {
                        if !matches!(self.items[pos].kind, ItemKind::Assistant { .. }) {
                            self.items.remove(pos);
                        }
                    }
                }
            }
        }
    }

    fn tool_call(&mut self, response_id: String, call_id: String, name: String, arguments: String) {
        if !self.is_live(&response_id)
            || self.active.as_ref().is_some_and(|a| a.cancelled.is_some())
        {
            return;
        }
        // The first visible item of the reply carries the engine's item id, so that deleting
        // it reaches the engine.
        let use_engine_id = self.active.as_ref().is_some_and(|a| !a.engine_item_shown);
        let item_id = if use_engine_id {
            self.active
                .as_ref()
                .map(|a| a.item_id.clone())
                .unwrap_or_default()
        } else {
            self.new_id("item")
        };
        let Some(a) = &mut self.active else { return };
        if use_engine_id {
            a.engine_item_shown = true;
        }
        let index = a.view.output.len() as u32;
        let body = ItemBody::FunctionCall {
            call_id: call_id.clone(),
            name: name.clone(),
            arguments: String::new(),
        };
        let added = ItemView {
            id: item_id.clone(),
            status: ItemStatus::InProgress,
            body,
        };
        let done = ItemView {
            id: item_id.clone(),
            status: ItemStatus::Completed,
            body: ItemBody::FunctionCall {
                call_id: call_id.clone(),
                name: name.clone(),
                arguments: arguments.clone(),
            },
        };
        a.view.output.push(done.clone());
        let response_id = a.view.id.clone();
        let apart = a.apart;
        let previous = self.items.last().map(|i| i.id.clone());
        self.send(ServerEvent::OutputItemAdded {
            response_id: response_id.clone(),
            output_index: index,
            item: added.clone(),
        });
        if !apart {
            self.push_item(
                Item {
                    id: item_id.clone(),
                    kind: ItemKind::FunctionCall,
                    in_engine: use_engine_id,
                    view: done.clone(),
                },
                previous,
                false,
            );
            // Shown in progress, as it was added.
            if let Some(i) = self.items.last_mut() {
                i.view = added;
            }
        }
        self.send(ServerEvent::FunctionCallArgumentsDelta {
            response_id: response_id.clone(),
            item_id: item_id.clone(),
            output_index: index,
            call_id: call_id.clone(),
            delta: arguments.clone(),
        });
        self.send(ServerEvent::FunctionCallArgumentsDone {
            response_id: response_id.clone(),
            item_id,
            output_index: index,
            call_id,
            name,
            arguments,
        });
        self.send(ServerEvent::OutputItemDone {
            response_id,
            output_index: index,
            item: done.clone(),
        });
        if let Some(i) = self.items.iter_mut().find(|i| i.id == done.id) {
            i.view = done.clone();
        }
        self.item_done(&done.id);
    }

    /// The engine conversation has gone: an error, and the reply in progress fails.
    pub fn engine_gone(&mut self) -> Vec<Effect> {
        self.error(None, "engine_stopped", "the model engine has stopped");
        if self.active.is_some() {
            if let Some(a) = &mut self.active {
                a.view.error = Some("the model engine has stopped".into());
            }
            self.finish(ResponseStatus::Failed, None);
        }
        std::mem::take(&mut self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::realtime::protocol::parse;
    use lfm2_audio::sampling::SamplingParams;

    fn defaults(vad: bool) -> SessionDefaults {
        SessionDefaults {
            model: "tiny".into(),
            instructions: "Be brief.".into(),
            voice: "us-female".into(),
            params: GenerationParams {
                max_new_tokens: 64,
                text: SamplingParams::GREEDY,
                audio: SamplingParams::GREEDY,
                seed: 0,
            },
            vad_assets: if vad {
                VadAssets::locate().map_err(|e| e.to_string())
            } else {
                Err("off in this test".into())
            },
            min_speech: Duration::from_millis(250),
            pause: Duration::from_millis(160),
            max_buffer_samples: 10 * SAMPLE_RATE as usize,
            budget: None,
            speculative_start: false,
        }
    }

    fn manual() -> Session {
        let (mut s, setup) = Session::new(1, defaults(false), Dialect::Beta);
        assert_eq!(setup.instructions, "Be brief.");
        assert_eq!(setup.tool_policy, ToolPolicy::Report);
        let start = s.start();
        assert!(
            matches!(start[..], [Effect::Send(ServerEvent::SessionCreated(_))]),
            "{start:?}"
        );
        s
    }

    fn client(s: &mut Session, text: &str) -> Vec<Effect> {
        s.handle_client(parse(text).unwrap_or_else(|e| panic!("{text}: {e}")))
    }

    fn names(effects: &[Effect], dialect: Dialect) -> Vec<String> {
        effects
            .iter()
            .filter(|e| !matches!(e, Effect::Send(ev) if !ev.exists_in(dialect)))
            .map(|e| match e {
                Effect::Send(ev) => ev.name(dialect).to_string(),
                Effect::Engine(c) => format!(
                    "engine:{}",
                    format!("{c:?}").split([' ', '(', '{']).next().unwrap_or("")
                ),
            })
            .collect()
    }

    fn error_message(effects: &[Effect]) -> String {
        effects
            .iter()
            .find_map(|e| match e {
                Effect::Send(ServerEvent::Error(e)) => Some(e.message.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no error in {effects:?}"))
    }

    fn append_ms(s: &mut Session, ms: usize) -> Vec<Effect> {
        let samples = vec![0.1f32; ms * 24];
        let text = serde_json::json!({"type": "input_audio_buffer.append", "audio": crate::realtime::protocol::encode_pcm16(&samples)});
        client(s, &text.to_string())
    }

    /// Asks for a reply and returns its response and item ids.
    fn start_reply(s: &mut Session) -> (String, String) {
        let out = client(s, r#"{"type": "response.create"}"#);
        let Some(Effect::Engine(EngineCall::Respond(r))) = out.last() else {
            panic!("{out:?}")
        };
        assert!(matches!(
            out[0],
            Effect::Send(ServerEvent::ResponseCreated(_))
        ));
        let ids = (r.response_id.clone(), r.item_id.clone());
        s.handle_engine(ConvEvent::ReplyStarted {
            response_id: ids.0.clone(),
            item_id: ids.1.clone(),
            latency_ms: 1.0,
        });
        ids
    }

    #[test]
    fn a_manual_commit_becomes_a_16khz_user_item() {
        let mut s = manual();
        assert!(append_ms(&mut s, 300).is_empty());
        let out = client(&mut s, r#"{"type": "input_audio_buffer.commit"}"#);
        assert_eq!(
            names(&out, Dialect::Beta),
            [
                "input_audio_buffer.committed",
                "conversation.item.created",
                "engine:Add"
            ]
        );
        let Effect::Engine(EngineCall::Add {
            content: Content::UserAudio(a),
            ..
        }) = &out[3]
        else {
            panic!("{out:?}")
        };
        assert_eq!(a.len(), 300 * 16);
        // The buffer is empty again.
        let out = client(&mut s, r#"{"type": "input_audio_buffer.commit"}"#);
        assert!(error_message(&out).contains("0 ms"));
    }

    #[test]
    fn an_overfull_buffer_refuses_the_append_and_goes_on() {
        let mut s = manual();
        assert!(append_ms(&mut s, 9_000).is_empty());
        let out = append_ms(&mut s, 2_000);
        assert!(error_message(&out).contains("at most 10 s"));
        let out = client(&mut s, r#"{"type": "input_audio_buffer.clear"}"#);
        assert_eq!(names(&out, Dialect::Beta), ["input_audio_buffer.cleared"]);
        assert!(append_ms(&mut s, 2_000).is_empty());
    }

    #[test]
    fn a_reply_streams_deltas_and_ends_with_response_done() {
        let mut s = manual();
        let (rid, iid) = start_reply(&mut s);
        let mut out = s.handle_engine(ConvEvent::Text {
            response_id: rid.clone(),
            piece: "Hel".into(),
        });
        out.extend(s.handle_engine(ConvEvent::Audio {
            response_id: rid.clone(),
            samples: vec![0.0; 1920],
        }));
        out.extend(s.handle_engine(ConvEvent::Text {
            response_id: rid.clone(),
            piece: "lo".into(),
        }));
        out.extend(s.handle_engine(ConvEvent::ReplyDone {
            response_id: rid.clone(),
            item_id: iid.clone(),
            text: "Hello".into(),
            audio_samples: 1920,
            cancelled: false,
        }));
        assert_eq!(
            names(&out, Dialect::Ga),
            [
                "response.output_item.added",
                "conversation.item.added",
                "response.content_part.added",
                "response.output_audio_transcript.delta",
                "response.output_audio.delta",
                "response.output_audio_transcript.delta",
                "response.output_audio.done",
                "response.output_audio_transcript.done",
                "response.content_part.done",
                "response.output_item.done",
                "conversation.item.done",
                "response.done",
            ]
        );
        let Some(Effect::Send(ServerEvent::ResponseDone(r))) = out.last() else {
            panic!()
        };
        assert_eq!(r.status, ResponseStatus::Completed);
        assert_eq!(
            r.output[0].body,
            ItemBody::Assistant {
                modality: Modality::Audio,
                text: "Hello".into()
            }
        );
        // Truncation: within the audio is asked of the engine, beyond it is an error.
        let out = client(
            &mut s,
            &format!(
                r#"{{"type": "conversation.item.truncate", "item_id": "{iid}", "content_index": 0, "audio_end_ms": 80}}"#
            ),
        );
        assert!(
            matches!(
                &out[..],
                [Effect::Engine(EngineCall::Truncate {
                    audio_samples: 1920,
                    ..
                })]
            ),
            "{out:?}"
        );
        let out = s.handle_engine(ConvEvent::Truncated {
            item_id: iid.clone(),
            audio_samples: 1920,
            text: "Hel".into(),
        });
        assert!(
            matches!(
                &out[..],
                [Effect::Send(ServerEvent::ItemTruncated {
                    audio_end_ms: 80,
                    ..
                })]
            ),
            "{out:?}"
        );
        let out = client(
            &mut s,
            &format!(
                r#"{{"type": "conversation.item.truncate", "item_id": "{iid}", "content_index": 0, "audio_end_ms": 81}}"#
            ),
        );
        assert!(error_message(&out).contains("beyond the item's audio (80 ms)"));
        let out = client(
            &mut s,
            r#"{"type": "conversation.item.truncate", "item_id": "nope", "audio_end_ms": 1}"#,
        );
        assert!(error_message(&out).contains("no item"));
    }

    #[test]
    fn a_cancelled_reply_keeps_what_was_sent() {
        let mut s = manual();
        let (rid, iid) = start_reply(&mut s);
        s.handle_engine(ConvEvent::Audio {
            response_id: rid.clone(),
            samples: vec![0.0; 960],
        });
        let out = client(&mut s, r#"{"type": "response.cancel"}"#);
        assert!(
            matches!(
                &out[..],
                [Effect::Engine(EngineCall::Cancel { heard: Some(960) })]
            ),
            "{out:?}"
        );
        // Late audio is not forwarded.
        assert!(s
            .handle_engine(ConvEvent::Audio {
                response_id: rid.clone(),
                samples: vec![0.0; 960]
            })
            .is_empty());
        let out = s.handle_engine(ConvEvent::ReplyDone {
            response_id: rid,
            item_id: iid,
            text: String::new(),
            audio_samples: 960,
            cancelled: true,
        });
        let Some(Effect::Send(ServerEvent::ResponseDone(r))) = out.last() else {
            panic!("{out:?}")
        };
        assert_eq!(
            r.status,
            ResponseStatus::Cancelled {
                turn_detected: false
            }
        );
        let out = client(&mut s, r#"{"type": "response.cancel"}"#);
        assert!(error_message(&out).contains("no reply in progress"));
    }

    #[test]
    fn a_reply_cancelled_before_it_began_ends_at_once() {
        let mut s = manual();
        let out = client(&mut s, r#"{"type": "response.create"}"#);
        let Some(Effect::Engine(EngineCall::Respond(r))) = out.last() else {
            panic!()
        };
        let rid = r.response_id.clone();
        let out = client(&mut s, r#"{"type": "response.create"}"#);
        assert!(error_message(&out).contains("in progress"));
        let out = client(&mut s, r#"{"type": "response.cancel"}"#);
        assert_eq!(
            names(&out, Dialect::Beta),
            ["engine:Cancel", "response.done"]
        );
        // What the engine says of it later is dropped.
        assert!(s
            .handle_engine(ConvEvent::Text {
                response_id: rid.clone(),
                piece: "x".into()
            })
            .is_empty());
        assert!(s
            .handle_engine(ConvEvent::ReplyDone {
                response_id: rid,
                item_id: "i".into(),
                text: "x".into(),
                audio_samples: 0,
                cancelled: true
            })
            .is_empty());
    }

    #[test]
    fn a_tool_call_becomes_a_function_call_item_and_its_output_goes_back() {
        let mut s = manual();
        let out = client(
            &mut s,
            r#"{"type": "session.update", "session": {"type": "realtime", "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]}}"#,
        );
        assert_eq!(s.dialect(), Dialect::Ga);
        let Effect::Engine(EngineCall::Configure(setup)) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(setup.tools[0].name, "get_weather");
        assert!(setup.tools[0].command.is_empty());
        let (rid, iid) = start_reply(&mut s);
        let mut out = s.handle_engine(ConvEvent::ToolCall {
            response_id: rid.clone(),
            call_id: "call_1".into(),
            name: "get_weather".into(),
            arguments: r#"{"city":"Paris"}"#.into(),
        });
        out.extend(s.handle_engine(ConvEvent::ReplyDone {
            response_id: rid,
            item_id: iid.clone(),
            text: String::new(),
            audio_samples: 0,
            cancelled: false,
        }));
        assert_eq!(
            names(&out, Dialect::Ga),
            [
                "response.output_item.added",
                "conversation.item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "conversation.item.done",
                "response.done",
            ]
        );
        let Effect::Send(ServerEvent::FunctionCallArgumentsDone {
            item_id, arguments, ..
        }) = &out[3]
        else {
            panic!()
        };
        assert_eq!(item_id, &iid);
        assert_eq!(arguments, r#"{"city":"Paris"}"#);
        let out = client(
            &mut s,
            r#"{"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": "call_1", "output": "{\"sky\": \"clear\"}"}}"#,
        );
        let Some(Effect::Engine(EngineCall::Add {
            content: Content::ToolResult { call_id, output },
            ..
        })) = out.last()
        else {
            panic!("{out:?}")
        };
        assert_eq!(
            (call_id.as_str(), output.as_str()),
            ("call_1", "{\"sky\": \"clear\"}")
        );
    }

    #[test]
    fn items_are_added_at_the_end_and_deleted_by_id() {
        let mut s = manual();
        let out = client(
            &mut s,
            r#"{"type": "conversation.item.create", "item": {"id": "u1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}}"#,
        );
        assert_eq!(
            names(&out, Dialect::Beta),
            ["conversation.item.created", "engine:Add"]
        );
        let out = client(
            &mut s,
            r#"{"type": "conversation.item.create", "item": {"id": "u1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}}"#,
        );
        assert!(error_message(&out).contains("exists already"));
        let out = client(
            &mut s,
            r#"{"type": "conversation.item.create", "previous_item_id": "nope", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}}"#,
        );
        assert!(error_message(&out).contains("previous_item_id"));
        // "root" puts an item first; a system item is an item like the others.
        let out = client(
            &mut s,
            r#"{"type": "conversation.item.create", "previous_item_id": "root", "item": {"id": "s0", "type": "message", "role": "system", "content": [{"type": "input_text", "text": "Be terse."}]}}"#,
        );
        assert!(
            matches!(
                out.last(),
                Some(Effect::Engine(EngineCall::Add {
                    content: Content::SystemText(_),
                    place: Placement::Start,
                    ..
                }))
            ),
            "{out:?}"
        );
        let out = client(
            &mut s,
            r#"{"type": "conversation.item.create", "previous_item_id": "s0", "item": {"id": "u0", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hey"}]}}"#,
        );
        assert!(
            matches!(
                out.last(),
                Some(Effect::Engine(EngineCall::Add { place: Placement::After(p), .. })) if p == "s0"
            ),
            "{out:?}"
        );
        let Some(Effect::Send(ServerEvent::ItemAdded {
            previous_item_id, ..
        })) = out.first()
        else {
            panic!("{out:?}")
        };
        assert_eq!(previous_item_id.as_deref(), Some("s0"));
        let out = client(
            &mut s,
            r#"{"type": "conversation.item.retrieve", "item_id": "u0"}"#,
        );
        let Some(Effect::Send(ServerEvent::ItemRetrieved { item })) = out.first() else {
            panic!("{out:?}")
        };
        assert_eq!(item.body, ItemBody::UserText("Hey".into()));
        let ids: Vec<&str> = s.items.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["s0", "u0", "u1"]);
        let out = client(
            &mut s,
            r#"{"type": "conversation.item.delete", "item_id": "u1"}"#,
        );
        assert!(matches!(
            &out[..],
            [Effect::Engine(EngineCall::Delete { .. })]
        ));
        let out = client(
            &mut s,
            r#"{"type": "conversation.item.delete", "item_id": "u1"}"#,
        );
        assert!(error_message(&out).contains("no item"));
    }

    #[test]
    fn server_vad_is_refused_with_the_reason_when_it_is_unavailable() {
        let mut s = manual();
        let out = client(
            &mut s,
            r#"{"type": "session.update", "session": {"turn_detection": {"type": "server_vad"}}}"#,
        );
        assert!(error_message(&out).contains("off in this test"));
    }

    /// `tests/fixtures/audio/what_time_16k.wav` at 24 kHz.
    fn question_24k() -> Vec<f32> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/audio/what_time_16k.wav"
        );
        let mut r = hound::WavReader::open(path).unwrap();
        let x: Vec<f32> = r
            .samples::<i16>()
            .map(|s| f32::from(s.unwrap()) / 32768.0)
            .collect();
        Resampler::resample_all(16_000, 24_000, &x).unwrap()
    }

    #[test]
    fn server_vad_finds_the_question_commits_it_and_asks_for_a_reply() {
        let (mut s, _) = Session::new(2, defaults(true), Dialect::Ga);
        let start = s.start();
        assert_eq!(names(&start, Dialect::Ga), ["session.created"], "{start:?}");
        let mut audio = vec![0.0f32; 24_000 / 2];
        audio.extend(question_24k());
        audio.extend(vec![0.0f32; 24_000]);
        let mut out = Vec::new();
        for chunk in audio.chunks(2400) {
            let text = serde_json::json!({"type": "input_audio_buffer.append", "audio": crate::realtime::protocol::encode_pcm16(chunk)});
            out.extend(client(&mut s, &text.to_string()));
        }
        assert_eq!(
            names(&out, Dialect::Ga),
            [
                "input_audio_buffer.speech_started",
                "input_audio_buffer.speech_stopped",
                "input_audio_buffer.committed",
                "conversation.item.added",
                "conversation.item.done",
                "engine:Add",
                "response.created",
                "engine:Respond",
            ]
        );
        let (
            Effect::Send(ServerEvent::SpeechStarted {
                audio_start_ms,
                item_id: a,
            }),
            Effect::Send(ServerEvent::SpeechStopped {
                audio_end_ms,
                item_id: b,
            }),
        ) = (&out[0], &out[1])
        else {
            panic!()
        };
        assert_eq!(a, b);
        // The speech begins at about 500 ms; the committed audio 300 ms (the prefix) before.
        assert!((100..400).contains(audio_start_ms), "{audio_start_ms}");
        assert!(*audio_end_ms > audio_start_ms + 800, "{audio_end_ms}");
        // The committed audio: from audio_start_ms to the end of the speech (audio_end_ms less
        // the 500 ms of silence).
        let Effect::Engine(EngineCall::Add {
            content: Content::UserAudio(a),
            ..
        }) = &out[5]
        else {
            panic!()
        };
        let committed_ms = a.len() as u64 / 16;
        let span = audio_end_ms - 500 - audio_start_ms;
        assert!(
            committed_ms.abs_diff(span) <= 40,
            "{committed_ms} vs {span}"
        );
        // Speaking over the reply cancels it (interrupt_response).
        let (rid, _) = {
            let Effect::Engine(EngineCall::Respond(r)) = &out[7] else {
                panic!()
            };
            (r.response_id.clone(), r.item_id.clone())
        };
        s.handle_engine(ConvEvent::ReplyStarted {
            response_id: rid,
            item_id: "x".into(),
            latency_ms: 0.0,
        });
        let mut out = Vec::new();
        for chunk in question_24k().chunks(2400) {
            let text = serde_json::json!({"type": "input_audio_buffer.append", "audio": crate::realtime::protocol::encode_pcm16(chunk)});
            out.extend(client(&mut s, &text.to_string()));
        }
        assert_eq!(
            names(&out, Dialect::Ga)[..2],
            ["input_audio_buffer.speech_started", "engine:Cancel"]
        );
    }

    /// A session with server VAD, speculating or not.
    fn vad_session(speculate: bool) -> Session {
        let mut d = defaults(true);
        d.speculative_start = speculate;
        let (mut s, _) = Session::new(3, d, Dialect::Ga);
        s.start();
        s
    }

    fn append_chunk(s: &mut Session, chunk: &[f32]) -> Vec<Effect> {
        let text = serde_json::json!({"type": "input_audio_buffer.append", "audio": crate::realtime::protocol::encode_pcm16(chunk)});
        client(s, &text.to_string())
    }

    /// The engine's side of the session's calls, scripted: each reply says "Hi" and 480
    /// samples at once, and ends at once (`finish_at_once`) or when `finish` is called.
    struct Script {
        finish_at_once: bool,
        /// Replies begun and not over: response and item ids.
        open: Vec<(String, String)>,
        /// What the client was sent, in order.
        sent: Vec<ServerEvent>,
        /// The engine calls, by name.
        calls: Vec<String>,
        /// Replies asked for before the end of the utterance (on a pause).
        early: usize,
    }

    impl Script {
        fn new(finish_at_once: bool) -> Self {
            Self {
                finish_at_once,
                open: Vec::new(),
                sent: Vec::new(),
                calls: Vec::new(),
                early: 0,
            }
        }

        /// Takes the session's effects, and answers its engine calls until none is left.
        fn take(&mut self, s: &mut Session, effects: Vec<Effect>) {
            let mut events = Vec::new();
            for e in effects {
                match e {
                    Effect::Send(ev) => self.sent.push(ev),
                    Effect::Engine(c) => {
                        let name = format!("{c:?}");
                        let name = name.split([' ', '(', '{']).next().unwrap_or("");
                        self.calls.push(format!("engine:{name}"));
                        events.extend(self.answer(c));
                    }
                }
            }
            for ev in events {
                let out = s.handle_engine(ev);
                self.take(s, out);
            }
        }

        fn answer(&mut self, c: EngineCall) -> Vec<ConvEvent> {
            match c {
                EngineCall::Add { item_id, .. } => vec![ConvEvent::Added { item_id }],
                EngineCall::Respond(r) | EngineCall::Speculate(r) => {
                    let mut evs = vec![
                        ConvEvent::ReplyStarted {
                            response_id: r.response_id.clone(),
                            item_id: r.item_id.clone(),
                            latency_ms: 1.0,
                        },
                        ConvEvent::Text {
                            response_id: r.response_id.clone(),
                            piece: "Hi".into(),
                        },
                        ConvEvent::Audio {
                            response_id: r.response_id.clone(),
                            samples: vec![0.25; 480],
                        },
                    ];
                    if self.finish_at_once {
                        evs.push(done_event(&r.response_id, &r.item_id, false));
                    } else {
                        self.open.push((r.response_id, r.item_id));
                    }
                    evs
                }
                EngineCall::Cancel { .. } => std::mem::take(&mut self.open)
                    .into_iter()
                    .map(|(r, i)| done_event(&r, &i, true))
                    .collect(),
                EngineCall::Delete { item_id } => vec![ConvEvent::Deleted { item_id }],
                _ => Vec::new(),
            }
        }

        /// The replies in progress end.
        fn finish(&mut self, s: &mut Session) {
            for (r, i) in std::mem::take(&mut self.open) {
                let out = s.handle_engine(done_event(&r, &i, false));
                self.take(s, out);
            }
        }
    }

    fn done_event(response_id: &str, item_id: &str, cancelled: bool) -> ConvEvent {
        ConvEvent::ReplyDone {
            response_id: response_id.into(),
            item_id: item_id.into(),
            text: if cancelled {
                String::new()
            } else {
                "Hi".into()
            },
            audio_samples: if cancelled { 0 } else { 480 },
            cancelled,
        }
    }

    /// Runs `audio` through a server-VAD session, speculating or not, with the scripted engine.
    fn vad_turns(audio: &[f32], speculate: bool, finish_at_once: bool) -> Script {
        let mut s = vad_session(speculate);
        let mut script = Script::new(finish_at_once);
        for chunk in audio.chunks(2400) {
            let sent = script.sent.len();
            let calls = script.calls.len();
            let out = append_chunk(&mut s, chunk);
            script.take(&mut s, out);
            if script.calls[calls..]
                .iter()
                .any(|c| c == "engine:Speculate")
            {
                // A pause: the reply is started without a word to the client (unless the
                // same chunk ended the utterance).
                let stopped = script.sent[sent..]
                    .iter()
                    .any(|e| matches!(e, ServerEvent::SpeechStopped { .. }));
                assert!(
                    stopped || script.sent.len() == sent,
                    "{:?}",
                    &script.sent[sent..]
                );
                if !stopped {
                    script.early += 1;
                }
            }
        }
        script.finish(&mut s);
        script
    }

    /// The question, a pause of 300 ms (longer than a pause, shorter than the silence that ends
    /// a turn), and the question again.
    fn question_twice() -> Vec<f32> {
        let mut audio = vec![0.0f32; 24_000 / 2];
        audio.extend(question_24k());
        audio.extend(vec![0.0f32; 24_000 * 3 / 10]);
        audio.extend(question_24k());
        audio.extend(vec![0.0f32; 24_000]);
        audio
    }

    fn question_once() -> Vec<f32> {
        let mut audio = vec![0.0f32; 24_000 / 2];
        audio.extend(question_24k());
        audio.extend(vec![0.0f32; 24_000]);
        audio
    }

    /// The events as text, each id replaced by its rank of first appearance: a session numbers
    /// its ids in one sequence, and a turn undone unseen leaves a gap in it.
    fn canonical(events: &[ServerEvent]) -> Vec<String> {
        let mut ids: Vec<String> = Vec::new();
        let mut out = Vec::new();
        for e in events {
            let text = format!("{e:?}");
            let mut parts = Vec::new();
            for (i, part) in text.split('"').enumerate() {
                let is_id = i % 2 == 1
                    && ["item_", "resp_"].iter().any(|p| {
                        part.strip_prefix(p).is_some_and(|r| {
                            !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit() || b == b'_')
                        })
                    });
                if !is_id {
                    parts.push(part.to_string());
                    continue;
                }
                let k = match ids.iter().position(|x| x == part) {
                    Some(k) => k,
                    None => {
                        ids.push(part.to_string());
                        ids.len() - 1
                    }
                };
                parts.push(format!("{}#{k}", &part[..4]));
            }
            out.push(parts.join("\""));
        }
        out
    }

    fn count(calls: &[String], name: &str) -> usize {
        calls.iter().filter(|c| *c == name).count()
    }

    #[test]
    fn a_speculative_turn_confirmed_looks_like_a_turn_started_at_the_end() {
        for finish_at_once in [false, true] {
            let plain = vad_turns(&question_once(), false, finish_at_once);
            let spec = vad_turns(&question_once(), true, finish_at_once);
            assert!(spec.early >= 1, "the reply is asked for on a pause");
            assert_eq!(plain.early, 0);
            assert_eq!(
                canonical(&spec.sent),
                canonical(&plain.sent),
                "finish_at_once {finish_at_once}"
            );
            let names: Vec<_> = spec
                .sent
                .iter()
                .filter(|e| e.exists_in(Dialect::Ga))
                .map(|e| e.name(Dialect::Ga))
                .collect();
            assert_eq!(
                names[..8],
                [
                    "input_audio_buffer.speech_started",
                    "input_audio_buffer.speech_stopped",
                    "input_audio_buffer.committed",
                    "conversation.item.added",
                    "conversation.item.done",
                    "response.created",
                    "response.output_item.added",
                    "conversation.item.added",
                ]
            );
            assert_eq!(names.last(), Some(&"response.done"));
        }
    }

    #[test]
    fn a_speculative_turn_the_user_went_on_from_is_undone_unseen() {
        for finish_at_once in [false, true] {
            let plain = vad_turns(&question_twice(), false, finish_at_once);
            let spec = vad_turns(&question_twice(), true, finish_at_once);
            let undo = if finish_at_once {
                // Over before the user went on: deleted.
                "engine:Delete"
            } else {
                "engine:Cancel"
            };
            assert!(count(&spec.calls, undo) >= 1, "{:?}", spec.calls);
            assert!(spec.early >= 2, "{:?}", spec.calls);
            assert_eq!(count(&plain.calls, "engine:Respond"), 1);
            // The client sees one turn of the whole utterance, its ids in the same places.
            assert_eq!(
                canonical(&spec.sent),
                canonical(&plain.sent),
                "finish_at_once {finish_at_once}"
            );
        }
    }

    /// Runs the question until the reply is started on a pause; returns the session.
    fn speculating_session() -> (Session, Script) {
        let mut s = vad_session(true);
        let mut script = Script::new(false);
        let audio = question_once();
        for chunk in audio.chunks(2400) {
            let out = append_chunk(&mut s, chunk);
            script.take(&mut s, out);
            if s.speculation.active() {
                break;
            }
        }
        assert!(s.speculation.active(), "{:?}", script.calls);
        (s, script)
    }

    #[test]
    fn a_client_event_while_speculating_undoes_the_turn_first() {
        let (mut s, mut script) = speculating_session();
        let sent = script.sent.len();
        let calls = script.calls.len();
        let out = client(&mut s, r#"{"type": "input_audio_buffer.clear"}"#);
        script.take(&mut s, out);
        assert_eq!(
            script.calls[calls..],
            ["engine:Cancel", "engine:Delete"],
            "undone in the engine"
        );
        assert_eq!(
            script.sent[sent..],
            [ServerEvent::Cleared],
            "nothing else is seen of it: {:?}",
            &script.sent[sent..]
        );
        assert!(!s.speculation.active());

        // A response the client asks for while the reply waits on a pause.
        let (mut s, mut script) = speculating_session();
        let sent = script.sent.len();
        let calls = script.calls.len();
        let out = client(&mut s, r#"{"type": "response.create"}"#);
        script.take(&mut s, out);
        assert_eq!(
            script.calls[calls..calls + 3],
            ["engine:Cancel", "engine:Delete", "engine:Respond"]
        );
        let names: Vec<_> = script.sent[sent..]
            .iter()
            .filter(|e| e.exists_in(Dialect::Ga))
            .map(|e| e.name(Dialect::Ga))
            .collect();
        assert_eq!(names[0], "response.created", "{names:?}");
        assert!(
            !script.sent[sent..]
                .iter()
                .any(|e| matches!(e, ServerEvent::ItemDeleted { .. } | ServerEvent::Error(_))),
            "{:?}",
            &script.sent[sent..]
        );
    }

    #[test]
    fn speech_over_a_pause_never_interrupts_a_reply_the_client_did_not_see() {
        let (mut s, mut script) = speculating_session();
        // The user goes on speaking: the speculative reply goes, no response.cancelled or
        // response.done is sent for it.
        let sent = script.sent.len();
        for chunk in question_24k().chunks(2400) {
            let out = append_chunk(&mut s, chunk);
            script.take(&mut s, out);
        }
        assert!(
            count(&script.calls, "engine:Cancel") >= 1,
            "{:?}",
            script.calls
        );
        assert!(
            !script.sent[sent..].iter().any(|e| matches!(
                e,
                ServerEvent::ResponseDone(_)
                    | ServerEvent::ResponseCreated(_)
                    | ServerEvent::ItemDeleted { .. }
                    | ServerEvent::SpeechStarted { .. }
            )),
            "{:?}",
            &script.sent[sent..]
        );
    }

    #[test]
    fn a_reply_cut_by_the_limit_is_incomplete_and_reports_its_usage() {
        let mut s = manual();
        let (rid, iid) = start_reply(&mut s);
        let mut out = s.handle_engine(ConvEvent::Text {
            response_id: rid.clone(),
            piece: "Hé".into(),
        });
        out.extend(s.handle_engine(ConvEvent::ReplyUsage {
            response_id: rid.clone(),
            usage: crate::engine::Usage {
                input_text: 30,
                input_audio: 50,
                output_text: 3,
                output_audio: 1,
            },
            hit_limit: true,
        }));
        // The engine's own text (trimmed, with a broken last character) is not what is shown:
        // the done events carry what the deltas carried.
        out.extend(s.handle_engine(ConvEvent::ReplyDone {
            response_id: rid,
            item_id: iid,
            text: "Hé\u{FFFD}".into(),
            audio_samples: 1920,
            cancelled: false,
        }));
        let Some(Effect::Send(ServerEvent::ResponseDone(r))) = out.last() else {
            panic!("{out:?}")
        };
        assert_eq!(r.status, ResponseStatus::Incomplete);
        let v = r.to_json(Dialect::Ga);
        assert_eq!(v["status"], "incomplete");
        assert_eq!(v["status_details"]["reason"], "max_output_tokens");
        assert_eq!(v["usage"]["total_tokens"], 84);
        assert_eq!(v["usage"]["input_tokens"], 80);
        assert_eq!(v["usage"]["input_token_details"]["audio_tokens"], 50);
        assert_eq!(v["usage"]["output_token_details"]["text_tokens"], 3);
        assert_eq!(v["usage"]["output_token_details"]["audio_tokens"], 1);
        assert!(out.iter().any(|e| matches!(
            e,
            Effect::Send(ServerEvent::TranscriptDone { transcript, .. }) if transcript == "Hé"
        )));
        let Some(Effect::Send(ServerEvent::ItemDone { item, .. })) = out
            .iter()
            .rev()
            .find(|e| matches!(e, Effect::Send(ServerEvent::ItemDone { .. })))
        else {
            panic!("{out:?}")
        };
        assert_eq!(item.status, ItemStatus::Incomplete);
    }

    /// A budget where every word (or 100 samples of audio) is one position.
    fn budgeted(context: usize) -> Session {
        let mut d = defaults(false);
        d.budget = Some(Budget {
            context,
            text: Arc::new(|t: &str| t.split_whitespace().count()),
            audio: Arc::new(|n: usize| n / 100),
        });
        let (mut s, _) = Session::new(1, d, Dialect::Ga);
        s.start();
        s
    }

    #[test]
    fn what_cannot_fit_the_context_is_refused_when_it_is_given() {
        let mut s = budgeted(1000);
        // Instructions: under half the context.
        let text = serde_json::json!({"type": "session.update", "session": {"instructions": "w ".repeat(600)}});
        let out = client(&mut s, &text.to_string());
        assert!(error_message(&out).contains("half"), "{out:?}");
        assert!(!out.iter().any(|e| matches!(e, Effect::Engine(_))));
        assert_eq!(s.settings.instructions, "Be brief.");
        // Megabytes are refused without being measured.
        let text = serde_json::json!({"type": "session.update", "session": {"instructions": "w".repeat(8 << 20)}});
        let out = client(&mut s, &text.to_string());
        assert!(error_message(&out).contains("bytes"), "{out:?}");
        let text = serde_json::json!({"type": "session.update", "session": {"instructions": "w ".repeat(400)}});
        let out = client(&mut s, &text.to_string());
        assert!(
            matches!(out[0], Effect::Engine(EngineCall::Configure(_))),
            "{out:?}"
        );
        // Items: the context less the instructions (408) and the reply's room (64 + 8).
        let item = |n: usize| {
            serde_json::json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "w ".repeat(n)}]}}).to_string()
        };
        let out = client(&mut s, &item(600));
        assert!(error_message(&out).contains("at most 520 fit"), "{out:?}");
        assert!(s.items.is_empty());
        let out = client(&mut s, &item(500));
        assert!(matches!(
            out.last(),
            Some(Effect::Engine(EngineCall::Add { .. }))
        ));
        // Audio: a commit of 5 s at 16 kHz is 800 positions here.
        append_ms(&mut s, 5_000);
        let out = client(&mut s, r#"{"type": "input_audio_buffer.commit"}"#);
        assert!(error_message(&out).contains("committed audio"), "{out:?}");
    }

    #[test]
    fn transcription_is_asked_for_after_the_item_and_the_reply() {
        let mut s = manual();
        client(
            &mut s,
            r#"{"type": "session.update", "session": {"input_audio_transcription": {"model": "whisper-1"}}}"#,
        );
        append_ms(&mut s, 300);
        let out = client(&mut s, r#"{"type": "input_audio_buffer.commit"}"#);
        assert_eq!(
            names(&out, Dialect::Beta).last().map(String::as_str),
            Some("engine:Transcribe"),
            "{out:?}"
        );
    }

    #[test]
    fn an_out_of_band_reply_stays_out_of_the_conversation() {
        let mut s = manual();
        let out = client(
            &mut s,
            r#"{"type": "response.create", "response": {"conversation": "none", "output_modalities": ["text"], "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Sum up."}]}]}}"#,
        );
        let Some(Effect::Engine(EngineCall::RespondApart { respond, input })) = out.last() else {
            panic!("{out:?}")
        };
        assert!(matches!(input.as_deref(), Some([(_, Content::UserText(t))]) if t == "Sum up."));
        let (rid, iid) = (respond.response_id.clone(), respond.item_id.clone());
        let mut out = s.handle_engine(ConvEvent::Text {
            response_id: rid.clone(),
            piece: "Ok".into(),
        });
        out.extend(s.handle_engine(ConvEvent::ReplyDone {
            response_id: rid,
            item_id: iid.clone(),
            text: "Ok".into(),
            audio_samples: 0,
            cancelled: false,
        }));
        assert_eq!(
            names(&out, Dialect::Ga),
            [
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.done",
            ]
        );
        let Some(Effect::Send(ServerEvent::ResponseDone(r))) = out.last() else {
            panic!()
        };
        assert_eq!(
            r.to_json(Dialect::Ga)["conversation_id"],
            serde_json::Value::Null
        );
        assert!(s.items.is_empty());
        let out = client(
            &mut s,
            &format!(r#"{{"type": "conversation.item.retrieve", "item_id": "{iid}"}}"#),
        );
        assert!(error_message(&out).contains("no item"));
    }

    #[test]
    fn session_values_echo_as_the_client_wrote_them() {
        let env = parse(
            r#"{"type": "session.update", "session": {"turn_detection": {"type": "server_vad", "threshold": 0.6}, "temperature": 0.7}}"#,
        )
        .unwrap();
        let ClientEvent::SessionUpdate(u) = env.event else {
            panic!()
        };
        let vad = u.turn_detection.unwrap().unwrap();
        let view = SessionView {
            id: "s".into(),
            model: "m".into(),
            instructions: String::new(),
            voice: "v".into(),
            modality: Modality::Audio,
            transcription: None,
            turn_detection: Some(vad),
            tools: Vec::new(),
            temperature: u.temperature.unwrap(),
            max_output_tokens: None,
        };
        let beta = view.to_json(Dialect::Beta).to_string();
        assert!(beta.contains(r#""threshold":0.6,"#), "{beta}");
        assert!(beta.contains(r#""temperature":0.7,"#), "{beta}");
        let ga = view.to_json(Dialect::Ga).to_string();
        assert!(ga.contains(r#""threshold":0.6,"#), "{ga}");
    }
}
