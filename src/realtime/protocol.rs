//! The OpenAI Realtime event protocol: client events parsed from text frames into typed values,
//! server events written in the client's dialect.
//!
//! Two dialects exist. The beta one (`OpenAI-Beta: realtime=v1`) has flat session fields
//! (`modalities`, `input_audio_format: "pcm16"`, `turn_detection`) and names its output events
//! `response.audio.delta`, `response.audio_transcript.delta`, `response.text.delta`. The GA one
//! nests audio settings under `session.audio.{input,output}` with formats as objects
//! (`{"type": "audio/pcm", "rate": 24000}`), says `output_modalities`, and names its output
//! events `response.output_audio.delta`, `response.output_audio_transcript.delta`,
//! `response.output_text.delta`. The parser accepts either (and a mix) and reports which one an
//! event was written in, when it tells.
//!
//! [`parse`] never panics: any text gives either a [`ClientEvent`] or a [`ProtocolError`] whose
//! message says what was wrong.

use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// The only audio format lfm2d speaks: 16-bit little-endian PCM, mono, 24 kHz.
pub const SAMPLE_RATE: u32 = 24_000;
/// The longest id a client may give an item.
pub const MAX_ID_LEN: usize = 64;
const SUPPORTED_FORMAT: &str =
    "lfm2d supports only pcm16 (\"pcm16\", or {\"type\": \"audio/pcm\", \"rate\": 24000}): 16-bit little-endian mono PCM at 24000 Hz";

/// Which spelling of the protocol a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `OpenAI-Beta: realtime=v1`: flat session fields, `response.audio.delta`.
    Beta,
    /// The generally available API: nested `session.audio`, `response.output_audio.delta`.
    Ga,
}

/// A client event that could not be understood. It becomes an `error` event; the session goes
/// on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    /// A short machine-readable reason (`invalid_json`, `unknown_event`, `invalid_audio`, ...).
    pub code: &'static str,
    pub message: String,
    /// The field at fault, when there is one.
    pub param: Option<String>,
    /// The client's `event_id`, when it could be read.
    pub event_id: Option<String>,
}

impl ProtocolError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            param: None,
            event_id: None,
        }
    }

    fn param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }
}

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// What a reply is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Modality {
    /// Speech with its transcript.
    Audio,
    /// Text only.
    Text,
}

/// Server voice activity detection settings (`turn_detection: {"type": "server_vad", ...}`).
#[derive(Debug, Clone, PartialEq)]
pub struct ServerVad {
    pub threshold: f64,
    pub prefix_padding_ms: u64,
    pub silence_duration_ms: u64,
    /// Ask for a reply when the user stops speaking.
    pub create_response: bool,
    /// Cancel the reply in progress when the user starts speaking.
    pub interrupt_response: bool,
}

impl Default for ServerVad {
    fn default() -> Self {
        // The OpenAI server's defaults.
        Self {
            threshold: 0.5,
            prefix_padding_ms: 300,
            silence_duration_ms: 500,
            create_response: true,
            interrupt_response: true,
        }
    }
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionTool {
    pub name: String,
    pub description: String,
    /// JSON schema of the arguments object.
    pub parameters: Value,
}

/// `session.update`: what the client changes (a field left out stays as it is).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionUpdate {
    pub instructions: Option<String>,
    pub voice: Option<String>,
    pub modality: Option<Modality>,
    /// `Some(None)` turns input transcription off; the string is the model name the client asked
    /// for (echoed back; the transcript always comes from the loaded model).
    pub transcription: Option<Option<String>>,
    /// `Some(None)` is manual turn-taking (the client commits and asks for replies).
    pub turn_detection: Option<Option<ServerVad>>,
    pub tools: Option<Vec<FunctionTool>>,
    pub temperature: Option<f64>,
    /// `Some(None)` is no limit ("inf").
    pub max_output_tokens: Option<Option<u32>>,
}

/// An item a client adds to the conversation.
#[derive(Debug, Clone, PartialEq)]
pub enum NewItemContent {
    UserText(String),
    /// 24 kHz mono samples.
    UserAudio(Vec<f32>),
    AssistantText(String),
    SystemText(String),
    FunctionCallOutput {
        call_id: String,
        output: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct NewItem {
    pub id: Option<String>,
    pub content: NewItemContent,
}

/// `response.create` options lfm2d honours.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResponseOptions {
    pub modality: Option<Modality>,
    /// Per-reply instructions: accepted and reported, but the engine keeps the session's.
    pub instructions: Option<String>,
    pub metadata: Option<Value>,
    /// `conversation: "none"`: a reply outside the conversation, to `input` alone.
    pub apart: bool,
    /// The items an out-of-band reply answers (None: the conversation's, which the reply does
    /// not join).
    pub input: Option<Vec<NewItem>>,
}

/// A client event, whatever dialect it was written in.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    SessionUpdate(SessionUpdate),
    /// 24 kHz mono samples decoded from base64 pcm16.
    AudioAppend(Vec<f32>),
    AudioCommit,
    AudioClear,
    ItemCreate {
        previous_item_id: Option<String>,
        item: NewItem,
    },
    ItemTruncate {
        item_id: String,
        content_index: u32,
        audio_end_ms: u64,
    },
    ItemDelete {
        item_id: String,
    },
    ItemRetrieve {
        item_id: String,
    },
    ResponseCreate(ResponseOptions),
    ResponseCancel {
        response_id: Option<String>,
    },
    /// `output_audio_buffer.clear` (WebRTC): nothing is buffered server-side here.
    OutputAudioClear,
}

/// A parsed client event with its envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub event_id: Option<String>,
    pub event: ClientEvent,
    /// The dialect the event was written in, when it tells.
    pub dialect: Option<Dialect>,
}

/// The client event types lfm2d understands.
pub const CLIENT_EVENTS: &[&str] = &[
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "conversation.item.create",
    "conversation.item.truncate",
    "conversation.item.delete",
    "conversation.item.retrieve",
    "response.create",
    "response.cancel",
    "output_audio_buffer.clear",
];

/// Parses one text frame.
pub fn parse(text: &str) -> Result<Envelope, ProtocolError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ProtocolError::new("invalid_json", format!("the message is not JSON: {e}")))?;
    parse_value(value)
}

/// Parses a JSON value (the body of a text frame).
pub fn parse_value(value: Value) -> Result<Envelope, ProtocolError> {
    let Value::Object(mut obj) = value else {
        return Err(ProtocolError::new(
            "invalid_event",
            "an event is a JSON object with a \"type\" field",
        ));
    };
    let event_id = match obj.remove("event_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => {
            return Err(
                ProtocolError::new("invalid_event", "event_id must be a string").param("event_id"),
            )
        }
    };
    let with_id = |mut e: ProtocolError| {
        e.event_id = event_id.clone();
        e
    };
    let kind = match obj.remove("type") {
        Some(Value::String(s)) => s,
        Some(_) => {
            return Err(with_id(
                ProtocolError::new("invalid_event", "\"type\" must be a string").param("type"),
            ))
        }
        None => {
            return Err(with_id(
                ProtocolError::new("invalid_event", "the event has no \"type\" field")
                    .param("type"),
            ))
        }
    };
    let (event, dialect) = parse_body(&kind, obj).map_err(with_id)?;
    Ok(Envelope {
        event_id,
        event,
        dialect,
    })
}

fn parse_body(
    kind: &str,
    obj: Map<String, Value>,
) -> Result<(ClientEvent, Option<Dialect>), ProtocolError> {
    let typed = |e: ProtocolError| ProtocolError {
        message: format!("{kind}: {}", e.message),
        ..e
    };
    match kind {
        "session.update" => {
            let wire: SessionUpdateWire = from_map(obj).map_err(typed)?;
            let Some(session) = wire.session else {
                return Err(typed(
                    ProtocolError::new("missing_field", "the \"session\" object is missing")
                        .param("session"),
                ));
            };
            session_update(session).map_err(typed)
        }
        "input_audio_buffer.append" => {
            let wire: AppendWire = from_map(obj).map_err(typed)?;
            let audio = decode_pcm16(&wire.audio).map_err(|e| typed(e.param("audio")))?;
            Ok((ClientEvent::AudioAppend(audio), None))
        }
        "input_audio_buffer.commit" => Ok((ClientEvent::AudioCommit, None)),
        "input_audio_buffer.clear" => Ok((ClientEvent::AudioClear, None)),
        "output_audio_buffer.clear" => Ok((ClientEvent::OutputAudioClear, None)),
        "conversation.item.create" => {
            let wire: ItemCreateWire = from_map(obj).map_err(typed)?;
            let previous_item_id = wire.previous_item_id.map(check_id).transpose();
            let previous_item_id =
                previous_item_id.map_err(|e| typed(e.param("previous_item_id")))?;
            let (item, dialect) = new_item(wire.item).map_err(typed)?;
            Ok((
                ClientEvent::ItemCreate {
                    previous_item_id,
                    item,
                },
                dialect,
            ))
        }
        "conversation.item.truncate" => {
            let wire: TruncateWire = from_map(obj).map_err(typed)?;
            Ok((
                ClientEvent::ItemTruncate {
                    item_id: check_id(wire.item_id).map_err(|e| typed(e.param("item_id")))?,
                    content_index: wire.content_index,
                    audio_end_ms: wire.audio_end_ms,
                },
                None,
            ))
        }
        "conversation.item.delete" => {
            let wire: DeleteWire = from_map(obj).map_err(typed)?;
            Ok((
                ClientEvent::ItemDelete {
                    item_id: check_id(wire.item_id).map_err(|e| typed(e.param("item_id")))?,
                },
                None,
            ))
        }
        "response.create" => {
            let wire: ResponseCreateWire = from_map(obj).map_err(typed)?;
            let (options, dialect) =
                response_options(wire.response.unwrap_or_default()).map_err(typed)?;
            Ok((ClientEvent::ResponseCreate(options), dialect))
        }
        "response.cancel" => {
            let wire: CancelWire = from_map(obj).map_err(typed)?;
            Ok((
                ClientEvent::ResponseCancel {
                    response_id: wire.response_id,
                },
                None,
            ))
        }
        "conversation.item.retrieve" => {
            let wire: DeleteWire = from_map(obj).map_err(typed)?;
            Ok((
                ClientEvent::ItemRetrieve {
                    item_id: check_id(wire.item_id).map_err(|e| typed(e.param("item_id")))?,
                },
                None,
            ))
        }
        "transcription_session.update" | "session.close" => Err(ProtocolError::new(
            "unsupported_event",
            format!("{kind} is not supported by lfm2d"),
        )),
        other => Err(ProtocolError::new(
            "unknown_event",
            format!(
                "unknown event type {other:?}; lfm2d understands {}",
                CLIENT_EVENTS.join(", ")
            ),
        )
        .param("type")),
    }
}

fn from_map<T: DeserializeOwned>(obj: Map<String, Value>) -> Result<T, ProtocolError> {
    serde_json::from_value(Value::Object(obj))
        .map_err(|e| ProtocolError::new("invalid_event", e.to_string()))
}

fn check_id(id: String) -> Result<String, ProtocolError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(ProtocolError::new(
            "invalid_id",
            format!("an id has 1 to {MAX_ID_LEN} bytes, got {}", id.len()),
        ));
    }
    Ok(id)
}

/// Base64 pcm16 (little-endian) to samples in [-1, 1).
pub fn decode_pcm16(b64: &str) -> Result<Vec<f32>, ProtocolError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| {
            ProtocolError::new("invalid_audio", format!("audio is not valid base64: {e}"))
        })?;
    if bytes.len() % 2 != 0 {
        return Err(ProtocolError::new(
            "invalid_audio",
            format!(
                "audio has {} bytes, an odd number: pcm16 has 2 bytes per sample",
                bytes.len()
            ),
        ));
    }
    Ok(bytes
        .chunks_exact(2)
        .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
        .collect())
}

/// Samples to base64 pcm16 (little-endian), clipped to the 16-bit range.
pub fn encode_pcm16(samples: &[f32]) -> String {
    let mut bytes = Vec::with_capacity(samples.len() * 2);
    for &s in samples {
        let v = if s.is_nan() {
            0
        } else {
            (s * 32768.0).round().clamp(-32768.0, 32767.0) as i16
        };
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

// ---- wire shapes (the union of both dialects' fields; unknown fields are ignored) ----

/// A field that may be absent, null, or set.
fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct SessionUpdateWire {
    session: Option<SessionWire>,
}

#[derive(Deserialize, Default)]
struct SessionWire {
    #[serde(rename = "type")]
    kind: Option<String>,
    instructions: Option<String>,
    // beta
    modalities: Option<Vec<String>>,
    voice: Option<String>,
    input_audio_format: Option<FormatWire>,
    output_audio_format: Option<FormatWire>,
    #[serde(default, deserialize_with = "nullable")]
    input_audio_transcription: Option<Option<TranscriptionWire>>,
    #[serde(default, deserialize_with = "nullable")]
    turn_detection: Option<Option<TurnDetectionWire>>,
    max_response_output_tokens: Option<MaxTokensWire>,
    temperature: Option<f64>,
    // GA
    output_modalities: Option<Vec<String>>,
    audio: Option<AudioWire>,
    max_output_tokens: Option<MaxTokensWire>,
    // both
    tools: Option<Vec<ToolWire>>,
}

#[derive(Deserialize, Default)]
struct AudioWire {
    input: Option<AudioInputWire>,
    output: Option<AudioOutputWire>,
}

#[derive(Deserialize, Default)]
struct AudioInputWire {
    format: Option<FormatWire>,
    #[serde(default, deserialize_with = "nullable")]
    transcription: Option<Option<TranscriptionWire>>,
    #[serde(default, deserialize_with = "nullable")]
    turn_detection: Option<Option<TurnDetectionWire>>,
}

#[derive(Deserialize, Default)]
struct AudioOutputWire {
    format: Option<FormatWire>,
    voice: Option<VoiceWire>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum VoiceWire {
    Name(String),
    Id { id: String },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum FormatWire {
    Name(String),
    Object {
        #[serde(rename = "type")]
        kind: Option<String>,
        rate: Option<u64>,
    },
}

#[derive(Deserialize, Default)]
struct TranscriptionWire {
    model: Option<String>,
}

#[derive(Deserialize)]
struct TurnDetectionWire {
    #[serde(rename = "type")]
    kind: Option<String>,
    threshold: Option<f64>,
    prefix_padding_ms: Option<u64>,
    silence_duration_ms: Option<u64>,
    create_response: Option<bool>,
    interrupt_response: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MaxTokensWire {
    Count(u32),
    Word(String),
}

#[derive(Deserialize)]
struct ToolWire {
    #[serde(rename = "type")]
    kind: Option<String>,
    name: Option<String>,
    description: Option<String>,
    parameters: Option<Value>,
}

#[derive(Deserialize)]
struct AppendWire {
    audio: String,
}

#[derive(Deserialize)]
struct ItemCreateWire {
    previous_item_id: Option<String>,
    item: ItemWire,
}

#[derive(Deserialize)]
struct ItemWire {
    id: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    role: Option<String>,
    content: Option<Vec<ContentWire>>,
    call_id: Option<String>,
    output: Option<String>,
}

#[derive(Deserialize)]
struct ContentWire {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
    audio: Option<String>,
}

#[derive(Deserialize)]
struct TruncateWire {
    item_id: String,
    #[serde(default)]
    content_index: u32,
    audio_end_ms: u64,
}

#[derive(Deserialize)]
struct DeleteWire {
    item_id: String,
}

#[derive(Deserialize)]
struct ResponseCreateWire {
    response: Option<ResponseWire>,
}

#[derive(Deserialize, Default)]
struct ResponseWire {
    modalities: Option<Vec<String>>,
    output_modalities: Option<Vec<String>>,
    instructions: Option<String>,
    conversation: Option<String>,
    input: Option<Vec<Value>>,
    metadata: Option<Value>,
}

#[derive(Deserialize)]
struct CancelWire {
    response_id: Option<String>,
}

// ---- wire to typed ----

fn session_update(s: SessionWire) -> Result<(ClientEvent, Option<Dialect>), ProtocolError> {
    let ga = s.kind.is_some()
        || s.audio.is_some()
        || s.output_modalities.is_some()
        || s.max_output_tokens.is_some();
    let beta = s.modalities.is_some()
        || s.voice.is_some()
        || s.input_audio_format.is_some()
        || s.output_audio_format.is_some()
        || s.input_audio_transcription.is_some()
        || s.turn_detection.is_some()
        || s.max_response_output_tokens.is_some();
    let dialect = if ga {
        Some(Dialect::Ga)
    } else if beta {
        Some(Dialect::Beta)
    } else {
        None
    };
    if let Some(kind) = &s.kind {
        if kind != "realtime" {
            return Err(ProtocolError::new(
                "unsupported_session",
                format!(
                    "session type {kind:?} is not supported; lfm2d serves \"realtime\" sessions"
                ),
            )
            .param("session.type"));
        }
    }
    let mut up = SessionUpdate {
        instructions: s.instructions,
        voice: s.voice,
        temperature: s.temperature,
        ..SessionUpdate::default()
    };
    if let Some(t) = up.temperature {
        if !(t.is_finite() && (0.0..=2.0).contains(&t)) {
            return Err(ProtocolError::new(
                "invalid_value",
                format!("temperature must be between 0 and 2, got {t}"),
            )
            .param("session.temperature"));
        }
    }
    if let Some(m) = s.modalities {
        up.modality = Some(modality(&m).map_err(|e| e.param("session.modalities"))?);
    }
    if let Some(m) = s.output_modalities {
        up.modality = Some(modality(&m).map_err(|e| e.param("session.output_modalities"))?);
    }
    if let Some(f) = &s.input_audio_format {
        check_format(f, "input").map_err(|e| e.param("session.input_audio_format"))?;
    }
    if let Some(f) = &s.output_audio_format {
        check_format(f, "output").map_err(|e| e.param("session.output_audio_format"))?;
    }
    if let Some(t) = s.input_audio_transcription {
        up.transcription = Some(t.map(|t| t.model.unwrap_or_default()));
    }
    if let Some(t) = s.turn_detection {
        up.turn_detection = Some(turn_detection(t).map_err(|e| e.param("session.turn_detection"))?);
    }
    let max = s.max_output_tokens.or(s.max_response_output_tokens);
    if let Some(m) = max {
        up.max_output_tokens = Some(match m {
            MaxTokensWire::Count(0) => {
                return Err(ProtocolError::new(
                    "invalid_value",
                    "max_output_tokens must be at least 1 (or \"inf\")",
                ))
            }
            MaxTokensWire::Count(n) => Some(n),
            MaxTokensWire::Word(w) if w == "inf" => None,
            MaxTokensWire::Word(w) => {
                return Err(ProtocolError::new(
                    "invalid_value",
                    format!("max_output_tokens is a number or \"inf\", got {w:?}"),
                ))
            }
        });
    }
    if let Some(audio) = s.audio {
        if let Some(input) = audio.input {
            if let Some(f) = &input.format {
                check_format(f, "input").map_err(|e| e.param("session.audio.input.format"))?;
            }
            if let Some(t) = input.transcription {
                up.transcription = Some(t.map(|t| t.model.unwrap_or_default()));
            }
            if let Some(t) = input.turn_detection {
                up.turn_detection = Some(
                    turn_detection(t).map_err(|e| e.param("session.audio.input.turn_detection"))?,
                );
            }
        }
        if let Some(output) = audio.output {
            if let Some(f) = &output.format {
                check_format(f, "output").map_err(|e| e.param("session.audio.output.format"))?;
            }
            if let Some(v) = output.voice {
                up.voice = Some(match v {
                    VoiceWire::Name(n) => n,
                    VoiceWire::Id { id } => id,
                });
            }
        }
    }
    if let Some(tools) = s.tools {
        let mut out = Vec::with_capacity(tools.len());
        for (i, t) in tools.into_iter().enumerate() {
            let param = format!("session.tools[{i}]");
            match t.kind.as_deref() {
                None | Some("function") => {}
                Some(other) => {
                    return Err(ProtocolError::new(
                        "unsupported_tool",
                        format!(
                            "tool type {other:?} is not supported; lfm2d calls \"function\" tools"
                        ),
                    )
                    .param(&param))
                }
            }
            let name = t.name.unwrap_or_default();
            let valid = !name.is_empty()
                && name.len() <= MAX_ID_LEN
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !valid {
                return Err(ProtocolError::new(
                    "invalid_value",
                    format!("a function's name is 1 to {MAX_ID_LEN} letters, digits, '_' or '-', got {name:?}"),
                )
                .param(&param));
            }
            let parameters = match t.parameters {
                None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
                Some(p @ Value::Object(_)) => p,
                Some(_) => {
                    return Err(ProtocolError::new(
                        "invalid_value",
                        "a function's parameters are a JSON schema object",
                    )
                    .param(&param))
                }
            };
            out.push(FunctionTool {
                name,
                description: t.description.unwrap_or_default(),
                parameters,
            });
        }
        up.tools = Some(out);
    }
    Ok((ClientEvent::SessionUpdate(up), dialect))
}

fn modality(list: &[String]) -> Result<Modality, ProtocolError> {
    let mut audio = false;
    for m in list {
        match m.as_str() {
            "audio" => audio = true,
            "text" => {}
            other => {
                return Err(ProtocolError::new(
                    "invalid_value",
                    format!("unknown modality {other:?}: use \"text\" and/or \"audio\""),
                ))
            }
        }
    }
    if list.is_empty() {
        return Err(ProtocolError::new(
            "invalid_value",
            "modalities is empty: use [\"text\"] or [\"audio\"] ([\"text\", \"audio\"] in the beta dialect)",
        ));
    }
    Ok(if audio {
        Modality::Audio
    } else {
        Modality::Text
    })
}

fn check_format(f: &FormatWire, which: &str) -> Result<(), ProtocolError> {
    let ok = match f {
        FormatWire::Name(n) => n == "pcm16",
        FormatWire::Object { kind, rate } => {
            kind.as_deref().is_none_or(|k| k == "audio/pcm") && rate.is_none_or(|r| r == 24_000)
        }
    };
    if ok {
        return Ok(());
    }
    let asked = match f {
        FormatWire::Name(n) => format!("{n:?}"),
        FormatWire::Object { kind, rate } => format!(
            "{} at {}",
            kind.as_deref().unwrap_or("audio/pcm"),
            rate.map_or("24000".to_string(), |r| format!("{r} Hz"))
        ),
    };
    Err(ProtocolError::new(
        "unsupported_audio_format",
        format!("{which} audio format {asked} is not supported: {SUPPORTED_FORMAT}"),
    ))
}

fn turn_detection(t: Option<TurnDetectionWire>) -> Result<Option<ServerVad>, ProtocolError> {
    let Some(t) = t else { return Ok(None) };
    match t.kind.as_deref() {
        None | Some("server_vad") => {}
        Some(other) => {
            return Err(ProtocolError::new(
                "unsupported_turn_detection",
                format!("turn_detection type {other:?} is not supported; use \"server_vad\" or null (manual)"),
            ))
        }
    }
    let d = ServerVad::default();
    let vad = ServerVad {
        threshold: t.threshold.unwrap_or(d.threshold),
        prefix_padding_ms: t.prefix_padding_ms.unwrap_or(d.prefix_padding_ms),
        silence_duration_ms: t.silence_duration_ms.unwrap_or(d.silence_duration_ms),
        create_response: t.create_response.unwrap_or(d.create_response),
        interrupt_response: t.interrupt_response.unwrap_or(d.interrupt_response),
    };
    if !(vad.threshold > 0.0 && vad.threshold < 1.0) {
        return Err(ProtocolError::new(
            "invalid_value",
            format!(
                "threshold must be between 0 and 1 (exclusive), got {}",
                vad.threshold
            ),
        ));
    }
    if vad.prefix_padding_ms > 5_000 || !(32..=10_000).contains(&vad.silence_duration_ms) {
        return Err(ProtocolError::new(
            "invalid_value",
            format!(
                "prefix_padding_ms must be at most 5000 and silence_duration_ms between 32 and 10000, got {} and {}",
                vad.prefix_padding_ms, vad.silence_duration_ms
            ),
        ));
    }
    Ok(Some(vad))
}

fn new_item(w: ItemWire) -> Result<(NewItem, Option<Dialect>), ProtocolError> {
    let id =
        w.id.map(check_id)
            .transpose()
            .map_err(|e| e.param("item.id"))?;
    let kind = w.kind.as_deref().unwrap_or("message");
    let mut dialect = None;
    let content = match kind {
        "function_call_output" => {
            let call_id = w.call_id.filter(|c| !c.is_empty()).ok_or_else(|| {
                ProtocolError::new("missing_field", "a function_call_output needs its call_id")
                    .param("item.call_id")
            })?;
            NewItemContent::FunctionCallOutput {
                call_id,
                output: w.output.unwrap_or_default(),
            }
        }
        "message" => {
            let role = w.role.as_deref().unwrap_or("");
            let parts = w.content.unwrap_or_default();
            if parts.is_empty() {
                return Err(
                    ProtocolError::new("missing_field", "a message needs content")
                        .param("item.content"),
                );
            }
            match role {
                "user" => {
                    let mut texts = Vec::new();
                    let mut audio: Option<Vec<f32>> = None;
                    for p in parts {
                        match p.kind.as_str() {
                            "input_text" | "text" => texts.push(p.text.unwrap_or_default()),
                            "input_audio" => {
                                if audio.is_some() {
                                    return Err(ProtocolError::new(
                                        "unsupported_content",
                                        "a user message holds one input_audio part",
                                    )
                                    .param("item.content"));
                                }
                                let b64 = p.audio.unwrap_or_default();
                                audio = Some(
                                    decode_pcm16(&b64).map_err(|e| e.param("item.content.audio"))?,
                                );
                            }
                            other => {
                                return Err(ProtocolError::new(
                                    "unsupported_content",
                                    format!("user content type {other:?} is not supported; use input_text or input_audio"),
                                )
                                .param("item.content"))
                            }
                        }
                    }
                    match (audio, texts.is_empty()) {
                        (Some(a), true) => NewItemContent::UserAudio(a),
                        (None, false) => NewItemContent::UserText(texts.join("\n")),
                        _ => {
                            return Err(ProtocolError::new(
                                "unsupported_content",
                                "a user message is either text or one audio clip; send them as two items",
                            )
                            .param("item.content"))
                        }
                    }
                }
                "assistant" => {
                    let mut texts = Vec::new();
                    for p in parts {
                        match p.kind.as_str() {
                            "text" => {
                                dialect = Some(Dialect::Beta);
                                texts.push(p.text.unwrap_or_default());
                            }
                            "output_text" => {
                                dialect = Some(Dialect::Ga);
                                texts.push(p.text.unwrap_or_default());
                            }
                            other => {
                                return Err(ProtocolError::new(
                                    "unsupported_content",
                                    format!("assistant content type {other:?} is not supported; use text (beta) or output_text (GA)"),
                                )
                                .param("item.content"))
                            }
                        }
                    }
                    NewItemContent::AssistantText(texts.join("\n"))
                }
                "system" => {
                    let mut texts = Vec::new();
                    for p in parts {
                        match p.kind.as_str() {
                            "input_text" | "text" => texts.push(p.text.unwrap_or_default()),
                            other => {
                                return Err(ProtocolError::new(
                                    "unsupported_content",
                                    format!("system content type {other:?} is not supported; use input_text"),
                                )
                                .param("item.content"))
                            }
                        }
                    }
                    NewItemContent::SystemText(texts.join("\n"))
                }
                other => {
                    return Err(ProtocolError::new(
                        "invalid_value",
                        format!("a message's role is user, assistant or system, got {other:?}"),
                    )
                    .param("item.role"))
                }
            }
        }
        other => {
            return Err(ProtocolError::new(
                "unsupported_item",
                format!(
                    "item type {other:?} is not supported; use message or function_call_output"
                ),
            )
            .param("item.type"))
        }
    };
    Ok((NewItem { id, content }, dialect))
}

fn response_options(r: ResponseWire) -> Result<(ResponseOptions, Option<Dialect>), ProtocolError> {
    let mut dialect = None;
    let mut modality_out = None;
    if let Some(m) = &r.modalities {
        dialect = Some(Dialect::Beta);
        modality_out = Some(modality(m).map_err(|e| e.param("response.modalities"))?);
    }
    if let Some(m) = &r.output_modalities {
        dialect = Some(Dialect::Ga);
        modality_out = Some(modality(m).map_err(|e| e.param("response.output_modalities"))?);
    }
    let apart = match r.conversation.as_deref() {
        None | Some("auto") => false,
        Some("none") => true,
        Some(other) => {
            return Err(ProtocolError::new(
                "invalid_value",
                format!("conversation is \"auto\" or \"none\", got {other:?}"),
            )
            .param("response.conversation"))
        }
    };
    let mut input = None;
    if let Some(items) = r.input {
        let mut given = Vec::new();
        if !apart {
            return Err(ProtocolError::new(
                "unsupported_value",
                "response.input is for out-of-band replies (conversation: \"none\"); a reply in the conversation answers the conversation",
            )
            .param("response.input"));
        }
        for v in items {
            if v.get("type").and_then(Value::as_str) == Some("item_reference") {
                return Err(ProtocolError::new(
                    "unsupported_content",
                    "item_reference in response.input is not supported; give the items themselves",
                )
                .param("response.input"));
            }
            let wire: ItemWire = serde_json::from_value(v).map_err(|e| {
                ProtocolError::new("invalid_event", e.to_string()).param("response.input")
            })?;
            let (item, d) = new_item(wire)?;
            dialect = dialect.or(d);
            given.push(item);
        }
        input = Some(given);
    }
    Ok((
        ResponseOptions {
            modality: modality_out,
            instructions: r.instructions,
            metadata: r.metadata,
            apart,
            input,
        },
        dialect,
    ))
}

// ---- client events written out (for the round-trip tests) ----

#[cfg(test)]
impl ClientEvent {
    /// The event as a client in `dialect` writes it.
    pub fn to_json(&self, dialect: Dialect, event_id: Option<&str>) -> Value {
        let mut v = match self {
            ClientEvent::SessionUpdate(u) => {
                json!({"type": "session.update", "session": session_update_json(u, dialect)})
            }
            ClientEvent::AudioAppend(a) => {
                json!({"type": "input_audio_buffer.append", "audio": encode_pcm16(a)})
            }
            ClientEvent::AudioCommit => json!({"type": "input_audio_buffer.commit"}),
            ClientEvent::AudioClear => json!({"type": "input_audio_buffer.clear"}),
            ClientEvent::OutputAudioClear => json!({"type": "output_audio_buffer.clear"}),
            ClientEvent::ItemCreate {
                previous_item_id,
                item,
            } => {
                let mut item_json = match &item.content {
                    NewItemContent::UserText(t) => {
                        json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": t}]})
                    }
                    NewItemContent::UserAudio(a) => {
                        json!({"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": encode_pcm16(a)}]})
                    }
                    NewItemContent::AssistantText(t) => {
                        let kind = match dialect {
                            Dialect::Beta => "text",
                            Dialect::Ga => "output_text",
                        };
                        json!({"type": "message", "role": "assistant", "content": [{"type": kind, "text": t}]})
                    }
                    NewItemContent::SystemText(t) => {
                        json!({"type": "message", "role": "system", "content": [{"type": "input_text", "text": t}]})
                    }
                    NewItemContent::FunctionCallOutput { call_id, output } => {
                        json!({"type": "function_call_output", "call_id": call_id, "output": output})
                    }
                };
                if let Some(id) = &item.id {
                    item_json["id"] = json!(id);
                }
                let mut v = json!({"type": "conversation.item.create", "item": item_json});
                if let Some(p) = previous_item_id {
                    v["previous_item_id"] = json!(p);
                }
                v
            }
            ClientEvent::ItemTruncate {
                item_id,
                content_index,
                audio_end_ms,
            } => {
                json!({"type": "conversation.item.truncate", "item_id": item_id, "content_index": content_index, "audio_end_ms": audio_end_ms})
            }
            ClientEvent::ItemDelete { item_id } => {
                json!({"type": "conversation.item.delete", "item_id": item_id})
            }
            ClientEvent::ItemRetrieve { item_id } => {
                json!({"type": "conversation.item.retrieve", "item_id": item_id})
            }
            ClientEvent::ResponseCreate(o) => {
                let mut r = Map::new();
                if let Some(m) = o.modality {
                    let (key, list) = modalities_json(m, dialect);
                    r.insert(key.into(), list);
                }
                if let Some(i) = &o.instructions {
                    r.insert("instructions".into(), json!(i));
                }
                if let Some(m) = &o.metadata {
                    r.insert("metadata".into(), m.clone());
                }
                json!({"type": "response.create", "response": r})
            }
            ClientEvent::ResponseCancel { response_id } => match response_id {
                Some(id) => json!({"type": "response.cancel", "response_id": id}),
                None => json!({"type": "response.cancel"}),
            },
        };
        if let Some(id) = event_id {
            v["event_id"] = json!(id);
        }
        v
    }
}

/// The modalities key and list of a dialect (`modalities: ["text", "audio"]` in beta,
/// `output_modalities: ["audio"]` in GA).
pub fn modalities_json(m: Modality, dialect: Dialect) -> (&'static str, Value) {
    match (dialect, m) {
        (Dialect::Beta, Modality::Audio) => ("modalities", json!(["text", "audio"])),
        (Dialect::Beta, Modality::Text) => ("modalities", json!(["text"])),
        (Dialect::Ga, Modality::Audio) => ("output_modalities", json!(["audio"])),
        (Dialect::Ga, Modality::Text) => ("output_modalities", json!(["text"])),
    }
}

fn vad_json(v: &Option<ServerVad>) -> Value {
    match v {
        None => Value::Null,
        Some(v) => json!({
            "type": "server_vad",
            "threshold": v.threshold,
            "prefix_padding_ms": v.prefix_padding_ms,
            "silence_duration_ms": v.silence_duration_ms,
            "create_response": v.create_response,
            "interrupt_response": v.interrupt_response,
        }),
    }
}

fn tools_json(tools: &[FunctionTool]) -> Value {
    Value::Array(
        tools
            .iter()
            .map(|t| json!({"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters}))
            .collect(),
    )
}

fn transcription_json(t: &Option<String>) -> Value {
    match t {
        None => Value::Null,
        Some(model) => json!({"model": model}),
    }
}

#[cfg(test)]
fn session_update_json(u: &SessionUpdate, dialect: Dialect) -> Value {
    let mut s = Map::new();
    if let Some(i) = &u.instructions {
        s.insert("instructions".into(), json!(i));
    }
    if let Some(m) = u.modality {
        let (key, list) = modalities_json(m, dialect);
        s.insert(key.into(), list);
    }
    if let Some(t) = &u.tools {
        s.insert("tools".into(), tools_json(t));
    }
    let max_key = match dialect {
        Dialect::Beta => "max_response_output_tokens",
        Dialect::Ga => "max_output_tokens",
    };
    if let Some(m) = u.max_output_tokens {
        s.insert(max_key.into(), m.map_or(json!("inf"), |n| json!(n)));
    }
    match dialect {
        Dialect::Beta => {
            if let Some(v) = &u.voice {
                s.insert("voice".into(), json!(v));
            }
            if let Some(t) = &u.transcription {
                s.insert("input_audio_transcription".into(), transcription_json(t));
            }
            if let Some(t) = &u.turn_detection {
                s.insert("turn_detection".into(), vad_json(t));
            }
            if let Some(t) = u.temperature {
                s.insert("temperature".into(), json!(t));
            }
        }
        Dialect::Ga => {
            s.insert("type".into(), json!("realtime"));
            let mut input = Map::new();
            if let Some(t) = &u.transcription {
                input.insert("transcription".into(), transcription_json(t));
            }
            if let Some(t) = &u.turn_detection {
                input.insert("turn_detection".into(), vad_json(t));
            }
            let mut audio = Map::new();
            if !input.is_empty() {
                audio.insert("input".into(), Value::Object(input));
            }
            if let Some(v) = &u.voice {
                audio.insert("output".into(), json!({"voice": v}));
            }
            if !audio.is_empty() {
                s.insert("audio".into(), Value::Object(audio));
            }
            // GA has no session temperature; it goes out in the beta spelling, which the
            // parser accepts in any dialect.
            if let Some(t) = u.temperature {
                s.insert("temperature".into(), json!(t));
            }
        }
    }
    Value::Object(s)
}

// ---- server events ----

/// The server's view of its session, written as `session.created` / `session.updated` show it.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionView {
    pub id: String,
    pub model: String,
    pub instructions: String,
    pub voice: String,
    pub modality: Modality,
    pub transcription: Option<String>,
    pub turn_detection: Option<ServerVad>,
    pub tools: Vec<FunctionTool>,
    pub temperature: f64,
    pub max_output_tokens: Option<u32>,
}

impl SessionView {
    pub fn to_json(&self, dialect: Dialect) -> Value {
        let max = self.max_output_tokens.map_or(json!("inf"), |n| json!(n));
        let (mkey, mlist) = modalities_json(self.modality, dialect);
        match dialect {
            Dialect::Beta => json!({
                "id": self.id,
                "object": "realtime.session",
                "model": self.model,
                mkey: mlist,
                "instructions": self.instructions,
                "voice": self.voice,
                "input_audio_format": "pcm16",
                "output_audio_format": "pcm16",
                "input_audio_transcription": transcription_json(&self.transcription),
                "turn_detection": vad_json(&self.turn_detection),
                "tools": tools_json(&self.tools),
                "tool_choice": "auto",
                "temperature": self.temperature,
                "max_response_output_tokens": max,
            }),
            Dialect::Ga => json!({
                "type": "realtime",
                "id": self.id,
                "object": "realtime.session",
                "model": self.model,
                mkey: mlist,
                "instructions": self.instructions,
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": SAMPLE_RATE},
                        "transcription": transcription_json(&self.transcription),
                        "turn_detection": vad_json(&self.turn_detection),
                    },
                    "output": {
                        "format": {"type": "audio/pcm", "rate": SAMPLE_RATE},
                        "voice": self.voice,
                    },
                },
                "tools": tools_json(&self.tools),
                "tool_choice": "auto",
                "max_output_tokens": max,
            }),
        }
    }
}

/// Where an item stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemStatus {
    InProgress,
    Completed,
    Incomplete,
}

impl ItemStatus {
    fn as_str(self) -> &'static str {
        match self {
            ItemStatus::InProgress => "in_progress",
            ItemStatus::Completed => "completed",
            ItemStatus::Incomplete => "incomplete",
        }
    }
}

/// An item as the server shows it.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemBody {
    /// A user message: text, or audio with its transcript (when known).
    UserText(String),
    UserAudio {
        transcript: Option<String>,
    },
    SystemText(String),
    /// An assistant message: speech with its transcript, or text.
    Assistant {
        modality: Modality,
        text: String,
    },
    FunctionCall {
        call_id: String,
        name: String,
        arguments: String,
    },
    FunctionCallOutput {
        call_id: String,
        output: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ItemView {
    pub id: String,
    pub status: ItemStatus,
    pub body: ItemBody,
}

/// The content part type of an assistant reply.
fn assistant_part(m: Modality, dialect: Dialect) -> &'static str {
    match (m, dialect) {
        (Modality::Audio, Dialect::Beta) => "audio",
        (Modality::Text, Dialect::Beta) => "text",
        (Modality::Audio, Dialect::Ga) => "output_audio",
        (Modality::Text, Dialect::Ga) => "output_text",
    }
}

impl ItemView {
    pub fn to_json(&self, dialect: Dialect) -> Value {
        let mut v = match &self.body {
            ItemBody::UserText(t) => {
                json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": t}]})
            }
            ItemBody::UserAudio { transcript } => {
                json!({"type": "message", "role": "user", "content": [{"type": "input_audio", "transcript": transcript}]})
            }
            ItemBody::SystemText(t) => {
                json!({"type": "message", "role": "system", "content": [{"type": "input_text", "text": t}]})
            }
            ItemBody::Assistant { modality, text } => {
                let part = match modality {
                    Modality::Audio => {
                        json!({"type": assistant_part(*modality, dialect), "transcript": text})
                    }
                    Modality::Text => {
                        json!({"type": assistant_part(*modality, dialect), "text": text})
                    }
                };
                json!({"type": "message", "role": "assistant", "content": [part]})
            }
            ItemBody::FunctionCall {
                call_id,
                name,
                arguments,
            } => {
                json!({"type": "function_call", "call_id": call_id, "name": name, "arguments": arguments})
            }
            ItemBody::FunctionCallOutput { call_id, output } => {
                json!({"type": "function_call_output", "call_id": call_id, "output": output})
            }
        };
        v["id"] = json!(self.id);
        v["object"] = json!("realtime.item");
        v["status"] = json!(self.status.as_str());
        v
    }
}

/// How a reply ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseStatus {
    InProgress,
    Completed,
    /// Cancelled by the client (`client_cancelled`) or by the user speaking (`turn_detected`).
    Cancelled {
        turn_detected: bool,
    },
    Failed,
    /// Cut by `max_output_tokens` (or by the end of the context).
    Incomplete,
}

/// What a reply used, in model positions: the input is everything in the context when the reply
/// began (instructions, items), the output what the reply added. Audio counts one position per
/// input-audio embedding and one per generated audio frame (80 ms each).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_text: u64,
    pub input_audio: u64,
    pub output_text: u64,
    pub output_audio: u64,
}

impl Usage {
    fn to_json(self) -> Value {
        let input = self.input_text + self.input_audio;
        let output = self.output_text + self.output_audio;
        json!({
            "total_tokens": input + output,
            "input_tokens": input,
            "output_tokens": output,
            "input_token_details": {
                "text_tokens": self.input_text,
                "audio_tokens": self.input_audio,
                "image_tokens": 0,
                "cached_tokens": 0,
                "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 0, "image_tokens": 0},
            },
            "output_token_details": {
                "text_tokens": self.output_text,
                "audio_tokens": self.output_audio,
            },
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ResponseView {
    pub id: String,
    pub status: ResponseStatus,
    pub modality: Modality,
    pub output: Vec<ItemView>,
    pub error: Option<String>,
    pub metadata: Option<Value>,
    /// Known once the reply is over.
    pub usage: Option<Usage>,
    /// `"none"` for a reply outside the conversation.
    pub conversation: Option<String>,
}

impl ResponseView {
    pub fn to_json(&self, dialect: Dialect) -> Value {
        let (status, details) = match self.status {
            ResponseStatus::InProgress => ("in_progress", Value::Null),
            ResponseStatus::Completed => ("completed", Value::Null),
            ResponseStatus::Cancelled { turn_detected } => (
                "cancelled",
                json!({"type": "cancelled", "reason": if turn_detected { "turn_detected" } else { "client_cancelled" }}),
            ),
            ResponseStatus::Failed => (
                "failed",
                json!({"type": "failed", "error": {"type": "server_error", "message": self.error}}),
            ),
            ResponseStatus::Incomplete => (
                "incomplete",
                json!({"type": "incomplete", "reason": "max_output_tokens"}),
            ),
        };
        let (mkey, mlist) = modalities_json(self.modality, dialect);
        json!({
            "id": self.id,
            "object": "realtime.response",
            "status": status,
            "status_details": details,
            "output": self.output.iter().map(|i| i.to_json(dialect)).collect::<Vec<_>>(),
            "conversation_id": self.conversation.as_deref().map_or(json!("conv_default"), |_| Value::Null),
            mkey: mlist,
            "metadata": self.metadata,
            "usage": self.usage.map_or(Value::Null, Usage::to_json),
        })
    }
}

/// Where a delta belongs.
#[derive(Debug, Clone, PartialEq)]
pub struct PartRef {
    pub response_id: String,
    pub item_id: String,
    pub output_index: u32,
    pub content_index: u32,
}

impl PartRef {
    fn fields(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("response_id".into(), json!(self.response_id));
        m.insert("item_id".into(), json!(self.item_id));
        m.insert("output_index".into(), json!(self.output_index));
        m.insert("content_index".into(), json!(self.content_index));
        m
    }
}

/// A server event.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerEvent {
    SessionCreated(SessionView),
    SessionUpdated(SessionView),
    SpeechStarted {
        audio_start_ms: u64,
        item_id: String,
    },
    SpeechStopped {
        audio_end_ms: u64,
        item_id: String,
    },
    Committed {
        item_id: String,
        previous_item_id: Option<String>,
    },
    Cleared,
    /// An item entered the conversation: `conversation.item.added` in GA,
    /// `conversation.item.created` in beta.
    ItemAdded {
        previous_item_id: Option<String>,
        item: ItemView,
    },
    /// An item is final (GA only: `conversation.item.done`; beta clients are not sent it).
    ItemDone {
        previous_item_id: Option<String>,
        item: ItemView,
    },
    /// `conversation.item.retrieved`.
    ItemRetrieved {
        item: ItemView,
    },
    ItemTruncated {
        item_id: String,
        content_index: u32,
        audio_end_ms: u64,
    },
    ItemDeleted {
        item_id: String,
    },
    TranscriptionCompleted {
        item_id: String,
        transcript: String,
        seconds: f64,
    },
    ResponseCreated(ResponseView),
    ResponseDone(ResponseView),
    OutputItemAdded {
        response_id: String,
        output_index: u32,
        item: ItemView,
    },
    OutputItemDone {
        response_id: String,
        output_index: u32,
        item: ItemView,
    },
    ContentPartAdded {
        at: PartRef,
        modality: Modality,
    },
    ContentPartDone {
        at: PartRef,
        modality: Modality,
        text: String,
    },
    AudioDelta {
        at: PartRef,
        delta: String,
    },
    AudioDone {
        at: PartRef,
    },
    TranscriptDelta {
        at: PartRef,
        delta: String,
    },
    TranscriptDone {
        at: PartRef,
        transcript: String,
    },
    TextDelta {
        at: PartRef,
        delta: String,
    },
    TextDone {
        at: PartRef,
        text: String,
    },
    FunctionCallArgumentsDelta {
        response_id: String,
        item_id: String,
        output_index: u32,
        call_id: String,
        delta: String,
    },
    FunctionCallArgumentsDone {
        response_id: String,
        item_id: String,
        output_index: u32,
        call_id: String,
        name: String,
        arguments: String,
    },
    Error(ProtocolError),
}

impl ServerEvent {
    /// Whether clients of `dialect` are sent this event (beta has no `conversation.item.done`).
    pub fn exists_in(&self, dialect: Dialect) -> bool {
        !(dialect == Dialect::Beta && matches!(self, ServerEvent::ItemDone { .. }))
    }

    /// The event's `type` in `dialect`.
    pub fn name(&self, dialect: Dialect) -> &'static str {
        let ga = dialect == Dialect::Ga;
        match self {
            ServerEvent::SessionCreated(_) => "session.created",
            ServerEvent::SessionUpdated(_) => "session.updated",
            ServerEvent::SpeechStarted { .. } => "input_audio_buffer.speech_started",
            ServerEvent::SpeechStopped { .. } => "input_audio_buffer.speech_stopped",
            ServerEvent::Committed { .. } => "input_audio_buffer.committed",
            ServerEvent::Cleared => "input_audio_buffer.cleared",
            ServerEvent::ItemAdded { .. } if ga => "conversation.item.added",
            ServerEvent::ItemAdded { .. } => "conversation.item.created",
            ServerEvent::ItemDone { .. } => "conversation.item.done",
            ServerEvent::ItemRetrieved { .. } => "conversation.item.retrieved",
            ServerEvent::ItemTruncated { .. } => "conversation.item.truncated",
            ServerEvent::ItemDeleted { .. } => "conversation.item.deleted",
            ServerEvent::TranscriptionCompleted { .. } => {
                "conversation.item.input_audio_transcription.completed"
            }
            ServerEvent::ResponseCreated(_) => "response.created",
            ServerEvent::ResponseDone(_) => "response.done",
            ServerEvent::OutputItemAdded { .. } => "response.output_item.added",
            ServerEvent::OutputItemDone { .. } => "response.output_item.done",
            ServerEvent::ContentPartAdded { .. } => "response.content_part.added",
            ServerEvent::ContentPartDone { .. } => "response.content_part.done",
            ServerEvent::AudioDelta { .. } if ga => "response.output_audio.delta",
            ServerEvent::AudioDelta { .. } => "response.audio.delta",
            ServerEvent::AudioDone { .. } if ga => "response.output_audio.done",
            ServerEvent::AudioDone { .. } => "response.audio.done",
            ServerEvent::TranscriptDelta { .. } if ga => "response.output_audio_transcript.delta",
            ServerEvent::TranscriptDelta { .. } => "response.audio_transcript.delta",
            ServerEvent::TranscriptDone { .. } if ga => "response.output_audio_transcript.done",
            ServerEvent::TranscriptDone { .. } => "response.audio_transcript.done",
            ServerEvent::TextDelta { .. } if ga => "response.output_text.delta",
            ServerEvent::TextDelta { .. } => "response.text.delta",
            ServerEvent::TextDone { .. } if ga => "response.output_text.done",
            ServerEvent::TextDone { .. } => "response.text.done",
            ServerEvent::FunctionCallArgumentsDelta { .. } => {
                "response.function_call_arguments.delta"
            }
            ServerEvent::FunctionCallArgumentsDone { .. } => {
                "response.function_call_arguments.done"
            }
            ServerEvent::Error(_) => "error",
        }
    }

    /// The event as JSON in `dialect`, with the server's `event_id`.
    pub fn to_json(&self, dialect: Dialect, event_id: &str) -> Value {
        let mut m = Map::new();
        m.insert("type".into(), json!(self.name(dialect)));
        m.insert("event_id".into(), json!(event_id));
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        match self {
            ServerEvent::SessionCreated(s) | ServerEvent::SessionUpdated(s) => {
                put("session", s.to_json(dialect))
            }
            ServerEvent::SpeechStarted {
                audio_start_ms,
                item_id,
            } => {
                put("audio_start_ms", json!(audio_start_ms));
                put("item_id", json!(item_id));
            }
            ServerEvent::SpeechStopped {
                audio_end_ms,
                item_id,
            } => {
                put("audio_end_ms", json!(audio_end_ms));
                put("item_id", json!(item_id));
            }
            ServerEvent::Committed {
                item_id,
                previous_item_id,
            } => {
                put("item_id", json!(item_id));
                put("previous_item_id", json!(previous_item_id));
            }
            ServerEvent::Cleared => {}
            ServerEvent::ItemAdded {
                previous_item_id,
                item,
            }
            | ServerEvent::ItemDone {
                previous_item_id,
                item,
            } => {
                put("previous_item_id", json!(previous_item_id));
                put("item", item.to_json(dialect));
            }
            ServerEvent::ItemRetrieved { item } => put("item", item.to_json(dialect)),
            ServerEvent::ItemTruncated {
                item_id,
                content_index,
                audio_end_ms,
            } => {
                put("item_id", json!(item_id));
                put("content_index", json!(content_index));
                put("audio_end_ms", json!(audio_end_ms));
            }
            ServerEvent::ItemDeleted { item_id } => put("item_id", json!(item_id)),
            ServerEvent::TranscriptionCompleted {
                item_id,
                transcript,
                seconds,
            } => {
                put("item_id", json!(item_id));
                put("content_index", json!(0));
                put("transcript", json!(transcript));
                put("usage", json!({"type": "duration", "seconds": seconds}));
            }
            ServerEvent::ResponseCreated(r) | ServerEvent::ResponseDone(r) => {
                put("response", r.to_json(dialect))
            }
            ServerEvent::OutputItemAdded {
                response_id,
                output_index,
                item,
            }
            | ServerEvent::OutputItemDone {
                response_id,
                output_index,
                item,
            } => {
                put("response_id", json!(response_id));
                put("output_index", json!(output_index));
                put("item", item.to_json(dialect));
            }
            ServerEvent::ContentPartAdded { at, modality } => {
                m.extend(at.fields());
                m.insert("part".into(), part_json(*modality, ""));
            }
            ServerEvent::ContentPartDone { at, modality, text } => {
                m.extend(at.fields());
                m.insert("part".into(), part_json(*modality, text));
            }
            ServerEvent::AudioDelta { at, delta }
            | ServerEvent::TranscriptDelta { at, delta }
            | ServerEvent::TextDelta { at, delta } => {
                m.extend(at.fields());
                m.insert("delta".into(), json!(delta));
            }
            ServerEvent::AudioDone { at } => m.extend(at.fields()),
            ServerEvent::TranscriptDone { at, transcript } => {
                m.extend(at.fields());
                m.insert("transcript".into(), json!(transcript));
            }
            ServerEvent::TextDone { at, text } => {
                m.extend(at.fields());
                m.insert("text".into(), json!(text));
            }
            ServerEvent::FunctionCallArgumentsDelta {
                response_id,
                item_id,
                output_index,
                call_id,
                delta,
            } => {
                put("response_id", json!(response_id));
                put("item_id", json!(item_id));
                put("output_index", json!(output_index));
                put("call_id", json!(call_id));
                put("delta", json!(delta));
            }
            ServerEvent::FunctionCallArgumentsDone {
                response_id,
                item_id,
                output_index,
                call_id,
                name,
                arguments,
            } => {
                put("response_id", json!(response_id));
                put("item_id", json!(item_id));
                put("output_index", json!(output_index));
                put("call_id", json!(call_id));
                put("name", json!(name));
                put("arguments", json!(arguments));
            }
            ServerEvent::Error(e) => put(
                "error",
                json!({
                    "type": "invalid_request_error",
                    "code": e.code,
                    "message": e.message,
                    "param": e.param,
                    "event_id": e.event_id,
                }),
            ),
        }
        Value::Object(m)
    }
}

/// A content part as `response.content_part.added/done` show it. Both dialects name the part
/// `audio` or `text` there.
fn part_json(m: Modality, text: &str) -> Value {
    match m {
        Modality::Audio => json!({"type": "audio", "transcript": text}),
        Modality::Text => json!({"type": "text", "text": text}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event(text: &str) -> Envelope {
        parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn error(text: &str) -> ProtocolError {
        match parse(text) {
            Ok(e) => panic!("{text} parsed as {e:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_beta_session_update_is_read_and_tells_its_dialect() {
        let e = event(
            r#"{"event_id": "e1", "type": "session.update", "session": {
                "modalities": ["text", "audio"], "instructions": "Be brief.", "voice": "alloy",
                "input_audio_format": "pcm16", "output_audio_format": "pcm16",
                "input_audio_transcription": {"model": "whisper-1"},
                "turn_detection": {"type": "server_vad", "threshold": 0.6, "prefix_padding_ms": 200,
                                   "silence_duration_ms": 400, "create_response": false},
                "tools": [{"type": "function", "name": "get_weather", "description": "Weather",
                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}],
                "tool_choice": "auto", "temperature": 0.8, "max_response_output_tokens": "inf"}}"#,
        );
        assert_eq!(e.event_id.as_deref(), Some("e1"));
        assert_eq!(e.dialect, Some(Dialect::Beta));
        let ClientEvent::SessionUpdate(u) = e.event else {
            panic!("{e:?}")
        };
        assert_eq!(u.instructions.as_deref(), Some("Be brief."));
        assert_eq!(u.modality, Some(Modality::Audio));
        assert_eq!(u.transcription, Some(Some("whisper-1".into())));
        assert_eq!(
            u.turn_detection,
            Some(Some(ServerVad {
                threshold: 0.6,
                prefix_padding_ms: 200,
                silence_duration_ms: 400,
                create_response: false,
                interrupt_response: true,
            }))
        );
        let tools = u.tools.unwrap();
        assert_eq!(tools[0].name, "get_weather");
        assert_eq!(u.max_output_tokens, Some(None));
        assert_eq!(u.temperature, Some(0.8));
    }

    #[test]
    fn a_ga_session_update_is_read_and_tells_its_dialect() {
        let e = event(
            r#"{"type": "session.update", "session": {"type": "realtime",
                "output_modalities": ["text"], "instructions": "Hi",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                    "transcription": null, "turn_detection": null},
                          "output": {"format": {"type": "audio/pcm"}, "voice": "marin"}},
                "max_output_tokens": 50}}"#,
        );
        assert_eq!(e.dialect, Some(Dialect::Ga));
        let ClientEvent::SessionUpdate(u) = e.event else {
            panic!("{e:?}")
        };
        assert_eq!(u.modality, Some(Modality::Text));
        assert_eq!(u.transcription, Some(None));
        assert_eq!(u.turn_detection, Some(None));
        assert_eq!(u.voice.as_deref(), Some("marin"));
        assert_eq!(u.max_output_tokens, Some(Some(50)));
    }

    #[test]
    fn formats_other_than_pcm16_at_24khz_are_refused_with_what_is_supported() {
        for text in [
            r#"{"type": "session.update", "session": {"input_audio_format": "g711_ulaw"}}"#,
            r#"{"type": "session.update", "session": {"output_audio_format": "g711_alaw"}}"#,
            r#"{"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcmu"}}}}}"#,
            r#"{"type": "session.update", "session": {"type": "realtime", "audio": {"output": {"format": {"type": "audio/pcm", "rate": 16000}}}}}"#,
        ] {
            let e = error(text);
            assert_eq!(e.code, "unsupported_audio_format", "{text}");
            assert!(
                e.message.contains("pcm16") && e.message.contains("24000"),
                "{}",
                e.message
            );
        }
    }

    #[test]
    fn bad_input_gives_errors_that_say_what_was_wrong() {
        assert_eq!(error("not json").code, "invalid_json");
        assert_eq!(error("[1, 2]").code, "invalid_event");
        assert_eq!(error(r#"{"no": "type"}"#).code, "invalid_event");
        let e = error(r#"{"type": "nope.nope", "event_id": "x"}"#);
        assert_eq!(e.code, "unknown_event");
        assert_eq!(e.event_id.as_deref(), Some("x"));
        assert!(
            e.message.contains("input_audio_buffer.append"),
            "{}",
            e.message
        );
        let e = error(r#"{"type": "input_audio_buffer.append", "audio": "***"}"#);
        assert_eq!(e.code, "invalid_audio");
        assert!(e.message.contains("base64"), "{}", e.message);
        let e = error(r#"{"type": "input_audio_buffer.append", "audio": "AAAA"}"#);
        assert!(e.message.contains("odd"), "{}", e.message);
        let e = error(r#"{"type": "input_audio_buffer.append"}"#);
        assert!(e.message.contains("audio"), "{}", e.message);
        let e =
            error(r#"{"type": "conversation.item.truncate", "item_id": "a", "audio_end_ms": -5}"#);
        assert_eq!(e.code, "invalid_event");
        let e = error(
            r#"{"type": "session.update", "session": {"turn_detection": {"type": "semantic_vad"}}}"#,
        );
        assert_eq!(e.code, "unsupported_turn_detection");
        let e = error(
            r#"{"type": "session.update", "session": {"turn_detection": {"threshold": 1.5}}}"#,
        );
        assert!(e.message.contains("threshold"), "{}", e.message);
        let e = error(
            r#"{"type": "conversation.item.create", "item": {"type": "message", "role": "critic", "content": [{"type": "input_text", "text": "x"}]}}"#,
        );
        assert!(e.message.contains("system"), "{}", e.message);
        let e = error(r#"{"type": "response.create", "response": {"conversation": "other"}}"#);
        assert_eq!(e.code, "invalid_value");
        let e = error(
            r#"{"type": "response.create", "response": {"input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]}]}}"#,
        );
        assert_eq!(e.code, "unsupported_value");
    }

    #[test]
    fn audio_is_little_endian_pcm16() {
        // 0x0001 = 1, 0xFF7F = 32767, 0x0080 = -32768
        let a = decode_pcm16("AQD/fwCA").unwrap();
        assert_eq!(a, vec![1.0 / 32768.0, 32767.0 / 32768.0, -1.0]);
        assert_eq!(encode_pcm16(&a), "AQD/fwCA");
        assert_eq!(encode_pcm16(&[2.0, -2.0, f32::NAN]), "/38AgAAA");
    }

    #[test]
    fn output_events_are_named_per_dialect() {
        let at = PartRef {
            response_id: "r".into(),
            item_id: "i".into(),
            output_index: 0,
            content_index: 0,
        };
        let audio = ServerEvent::AudioDelta {
            at: at.clone(),
            delta: "AA==".into(),
        };
        let transcript = ServerEvent::TranscriptDelta {
            at: at.clone(),
            delta: "hi".into(),
        };
        let text = ServerEvent::TextDone {
            at,
            text: "hi".into(),
        };
        assert_eq!(audio.name(Dialect::Beta), "response.audio.delta");
        assert_eq!(audio.name(Dialect::Ga), "response.output_audio.delta");
        assert_eq!(
            transcript.name(Dialect::Beta),
            "response.audio_transcript.delta"
        );
        assert_eq!(
            transcript.name(Dialect::Ga),
            "response.output_audio_transcript.delta"
        );
        assert_eq!(text.name(Dialect::Beta), "response.text.done");
        assert_eq!(text.name(Dialect::Ga), "response.output_text.done");
        let v = audio.to_json(Dialect::Ga, "event_7");
        assert_eq!(
            v,
            json!({"type": "response.output_audio.delta", "event_id": "event_7", "response_id": "r",
                   "item_id": "i", "output_index": 0, "content_index": 0, "delta": "AA=="})
        );
    }

    #[test]
    fn sessions_are_shown_flat_in_beta_and_nested_in_ga() {
        let view = SessionView {
            id: "s".into(),
            model: "m".into(),
            instructions: "i".into(),
            voice: "v".into(),
            modality: Modality::Audio,
            transcription: Some(String::new()),
            turn_detection: Some(ServerVad::default()),
            tools: vec![],
            temperature: 0.0,
            max_output_tokens: None,
        };
        let beta = view.to_json(Dialect::Beta);
        assert_eq!(beta["input_audio_format"], "pcm16");
        assert_eq!(beta["modalities"], json!(["text", "audio"]));
        assert_eq!(beta["turn_detection"]["type"], "server_vad");
        let ga = view.to_json(Dialect::Ga);
        assert_eq!(ga["type"], "realtime");
        assert_eq!(ga["output_modalities"], json!(["audio"]));
        assert_eq!(
            ga["audio"]["input"]["format"],
            json!({"type": "audio/pcm", "rate": 24000})
        );
        assert_eq!(ga["audio"]["output"]["voice"], "v");
        assert!(ga.get("input_audio_format").is_none());
        // What the server writes, a client may send back.
        for (d, v) in [(Dialect::Beta, beta), (Dialect::Ga, ga)] {
            let e = parse_value(json!({"type": "session.update", "session": v})).unwrap();
            assert_eq!(e.dialect, Some(d));
        }
    }

    // ---- properties ----

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|n| json!(n)),
            ".{0,12}".prop_map(Value::String),
            prop::sample::select(CLIENT_EVENTS).prop_map(|s| json!(s)),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop::sample::select(
                        &[
                            "type",
                            "session",
                            "audio",
                            "item",
                            "content",
                            "turn_detection",
                            "input",
                            "output",
                            "format",
                            "modalities",
                            "output_modalities",
                            "tools",
                            "role",
                            "item_id",
                            "audio_end_ms",
                            "content_index",
                            "response",
                            "call_id",
                            "event_id",
                            "rate",
                            "text",
                            "threshold",
                            "voice",
                            "x",
                        ][..]
                    ),
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(
                    m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
                )),
            ]
        })
    }

    /// An event of `kind` with a body of random fields.
    fn arb_event() -> impl Strategy<Value = Value> {
        (prop::sample::select(CLIENT_EVENTS), arb_json()).prop_map(|(kind, body)| {
            let mut obj = match body {
                Value::Object(m) => m,
                other => {
                    let mut m = Map::new();
                    m.insert("session".into(), other);
                    m
                }
            };
            obj.insert("type".into(), json!(kind));
            Value::Object(obj)
        })
    }

    fn arb_id() -> impl Strategy<Value = String> {
        "[a-z0-9_]{1,64}"
    }

    fn arb_audio() -> impl Strategy<Value = Vec<f32>> {
        prop::collection::vec(any::<i16>().prop_map(|s| f32::from(s) / 32768.0), 0..64)
    }

    fn arb_modality() -> impl Strategy<Value = Modality> {
        prop_oneof![Just(Modality::Audio), Just(Modality::Text)]
    }

    fn arb_session_update() -> impl Strategy<Value = SessionUpdate> {
        let vad = (
            (1u32..99).prop_map(|t| f64::from(t) / 100.0),
            0u64..5000,
            32u64..10_000,
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(
                |(
                    threshold,
                    prefix_padding_ms,
                    silence_duration_ms,
                    create_response,
                    interrupt_response,
                )| {
                    ServerVad {
                        threshold,
                        prefix_padding_ms,
                        silence_duration_ms,
                        create_response,
                        interrupt_response,
                    }
                },
            );
        let tool = ("[a-z_]{1,20}", ".{0,20}").prop_map(|(name, description)| FunctionTool {
            name,
            description,
            parameters: json!({"type": "object", "properties": {}}),
        });
        (
            (
                prop::option::of(".{0,30}"),
                prop::option::of("[a-z]{1,10}"),
                prop::option::of(arb_modality()),
            ),
            prop::option::of(prop::option::of("[a-z0-9-]{0,10}")),
            prop::option::of(prop::option::of(vad)),
            prop::option::of(prop::collection::vec(tool, 0..3)),
            prop::option::of((0u32..=200).prop_map(|t| f64::from(t) / 100.0)),
            prop::option::of(prop::option::of(1u32..100_000)),
        )
            .prop_map(
                |(
                    (instructions, voice, modality),
                    transcription,
                    turn_detection,
                    tools,
                    temperature,
                    max_output_tokens,
                )| {
                    SessionUpdate {
                        instructions,
                        voice,
                        modality,
                        transcription,
                        turn_detection,
                        tools,
                        temperature,
                        max_output_tokens,
                    }
                },
            )
    }

    fn arb_client_event() -> impl Strategy<Value = ClientEvent> {
        let item = prop_oneof![
            ".{0,30}".prop_map(NewItemContent::UserText),
            arb_audio().prop_map(NewItemContent::UserAudio),
            ".{0,30}".prop_map(NewItemContent::AssistantText),
            ".{0,30}".prop_map(NewItemContent::SystemText),
            (arb_id(), ".{0,30}").prop_map(|(call_id, output)| {
                NewItemContent::FunctionCallOutput { call_id, output }
            }),
        ];
        prop_oneof![
            arb_session_update().prop_map(ClientEvent::SessionUpdate),
            arb_audio().prop_map(ClientEvent::AudioAppend),
            Just(ClientEvent::AudioCommit),
            Just(ClientEvent::AudioClear),
            Just(ClientEvent::OutputAudioClear),
            (prop::option::of(arb_id()), prop::option::of(arb_id()), item).prop_map(
                |(previous_item_id, id, content)| {
                    ClientEvent::ItemCreate {
                        previous_item_id,
                        item: NewItem { id, content },
                    }
                }
            ),
            (arb_id(), any::<u32>(), any::<u64>()).prop_map(
                |(item_id, content_index, audio_end_ms)| {
                    ClientEvent::ItemTruncate {
                        item_id,
                        content_index,
                        audio_end_ms,
                    }
                }
            ),
            arb_id().prop_map(|item_id| ClientEvent::ItemDelete { item_id }),
            arb_id().prop_map(|item_id| ClientEvent::ItemRetrieve { item_id }),
            (
                prop::option::of(arb_modality()),
                prop::option::of(".{0,20}"),
                prop::option::of(Just(json!({"k": "v"})))
            )
                .prop_map(|(modality, instructions, metadata)| {
                    ClientEvent::ResponseCreate(ResponseOptions {
                        modality,
                        instructions,
                        metadata,
                        apart: false,
                        input: None,
                    })
                }),
            prop::option::of(arb_id())
                .prop_map(|response_id| ClientEvent::ResponseCancel { response_id }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn any_text_gives_an_event_or_an_error(text in ".{0,200}") {
            let _ = parse(&text);
        }

        #[test]
        fn any_json_gives_an_event_or_an_error(value in arb_json()) {
            let _ = parse(&value.to_string());
        }

        #[test]
        fn events_of_known_types_with_random_bodies_never_panic(value in arb_event()) {
            if let Err(e) = parse(&value.to_string()) {
                prop_assert!(!e.message.is_empty());
            }
        }

        #[test]
        fn client_events_round_trip_in_both_dialects(
            event in arb_client_event(),
            ga in any::<bool>(),
            event_id in prop::option::of("[a-z0-9]{1,8}"),
        ) {
            let dialect = if ga { Dialect::Ga } else { Dialect::Beta };
            let text = event.to_json(dialect, event_id.as_deref()).to_string();
            let back = parse(&text).map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
            prop_assert_eq!(&back.event, &event);
            prop_assert_eq!(back.event_id, event_id);
            prop_assert!(back.dialect.is_none() || back.dialect == Some(dialect), "{} read as {:?}", text, back.dialect);
        }
    }
}
