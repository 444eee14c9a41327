//! The Wyoming event codec, free of I/O.
//!
//! An event on the wire is one line of JSON (the header: `type`, optional `data`, `data_length`,
//! `payload_length`, `version`), then `data_length` bytes of JSON merged into `data`, then
//! `payload_length` bytes of payload (raw PCM for audio chunks). The `wyoming` Python package
//! (1.10) is the reference.
//!
//! [`parse_event`] reads one event from the front of a byte slice and never panics: it gives the
//! event and the bytes it used, says it needs more bytes, or returns a [`ProtocolError`] that
//! also says how a reader gets back in step (skip the rest of the line, skip a known number of
//! bytes, or give up on the connection).

use serde_json::{Map, Value};

/// The protocol version written in the headers we send (the `wyoming` package we follow).
pub const PROTOCOL_VERSION: &str = "1.10.2";

/// How large the parts of an incoming event may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The header line, newline included.
    pub max_header: usize,
    /// The extra data after the header.
    pub max_data: usize,
    /// The payload (an audio chunk).
    pub max_payload: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header: 64 << 10,
            max_data: 1 << 20,
            // 4 MiB: over 20 s of 48 kHz 16-bit stereo in one chunk (clients send ~64 ms).
            max_payload: 4 << 20,
        }
    }
}

/// How a reader gets back in step after an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resync {
    /// The bytes of the bad event (given) are consumed; reading goes on after them.
    Skip(usize),
    /// The stream cannot be followed any more (a header without an end in sight, lengths that
    /// make no sense): the connection should be closed after the error is sent.
    Close,
}

/// An event that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    /// A short machine-readable reason, sent as the error event's `code`.
    pub code: &'static str,
    pub message: String,
    pub resync: Resync,
}

impl ProtocolError {
    fn new(code: &'static str, message: impl Into<String>, resync: Resync) -> Self {
        Self {
            code,
            message: message.into(),
            resync,
        }
    }
}

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

/// One event.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Event {
    pub kind: String,
    pub data: Map<String, Value>,
    pub payload: Vec<u8>,
}

impl Event {
    #[cfg(test)]
    pub fn new(kind: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            ..Self::default()
        }
    }

    /// An event with `data` (a JSON object; anything else gives empty data).
    pub fn with_data(kind: impl Into<String>, data: Value) -> Self {
        Self {
            kind: kind.into(),
            data: match data {
                Value::Object(m) => m,
                _ => Map::new(),
            },
            payload: Vec::new(),
        }
    }

    pub fn with_payload(mut self, payload: Vec<u8>) -> Self {
        self.payload = payload;
        self
    }

    /// The bytes on the wire: the header line, the data, the payload. Like the reference, the
    /// data goes after the header (`data_length`) rather than inside it.
    pub fn encode(&self) -> Vec<u8> {
        let mut header = Map::new();
        header.insert("type".into(), Value::String(self.kind.clone()));
        header.insert("version".into(), Value::String(PROTOCOL_VERSION.into()));
        let data = if self.data.is_empty() {
            None
        } else {
            let d = Value::Object(self.data.clone()).to_string();
            header.insert("data_length".into(), Value::from(d.len()));
            Some(d)
        };
        if !self.payload.is_empty() {
            header.insert("payload_length".into(), Value::from(self.payload.len()));
        }
        let mut out = Value::Object(header).to_string().into_bytes();
        out.push(b'\n');
        if let Some(d) = data {
            out.extend_from_slice(d.as_bytes());
        }
        out.extend_from_slice(&self.payload);
        out
    }
}

/// A parsed header line: what follows it and how long it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub kind: String,
    pub data: Map<String, Value>,
    pub data_length: usize,
    pub payload_length: usize,
}

impl Header {
    /// Bytes after the header line.
    pub fn body_len(&self) -> usize {
        self.data_length.saturating_add(self.payload_length)
    }
}

fn length(header: &Map<String, Value>, key: &str) -> Result<usize, String> {
    match header.get(key) {
        None | Some(Value::Null) => Ok(0),
        Some(v) => match v.as_u64() {
            Some(n) => usize::try_from(n).map_err(|_| format!("{key} {n} is too large")),
            None => Err(format!("{key} must be a non-negative integer, got {v}")),
        },
    }
}

/// Parses a header line (without its newline). `line_len` is the line's length on the wire
/// (newline included): the bytes a reader skips when the header is bad but its lengths unknown.
pub fn parse_header(line: &[u8], limits: &Limits) -> Result<Header, ProtocolError> {
    let skip_line = Resync::Skip(line.len() + 1);
    let value: Value = serde_json::from_slice(line).map_err(|e| {
        ProtocolError::new(
            "invalid_header",
            format!("the header line is not JSON: {e}"),
            skip_line,
        )
    })?;
    let Value::Object(mut header) = value else {
        return Err(ProtocolError::new(
            "invalid_header",
            "the header line must be a JSON object with a \"type\"",
            skip_line,
        ));
    };
    // Lengths first: with them known, even a header that is wrong otherwise can be skipped whole.
    let data_length = length(&header, "data_length")
        .map_err(|m| ProtocolError::new("invalid_header", m, Resync::Close))?;
    let payload_length = length(&header, "payload_length")
        .map_err(|m| ProtocolError::new("invalid_header", m, Resync::Close))?;
    let whole = Resync::Skip(
        (line.len() + 1)
            .saturating_add(data_length)
            .saturating_add(payload_length),
    );
    let kind = match header.remove("type") {
        Some(Value::String(s)) if !s.is_empty() => s,
        Some(Value::String(_)) | None => {
            return Err(ProtocolError::new(
                "invalid_header",
                "the header has no \"type\"",
                whole,
            ))
        }
        Some(v) => {
            return Err(ProtocolError::new(
                "invalid_header",
                format!("\"type\" must be a string, got {v}"),
                whole,
            ))
        }
    };
    if data_length > limits.max_data {
        return Err(ProtocolError::new(
            "data_too_large",
            format!(
                "{kind}: data_length {data_length} is over the limit of {} bytes",
                limits.max_data
            ),
            whole,
        ));
    }
    if payload_length > limits.max_payload {
        return Err(ProtocolError::new(
            "payload_too_large",
            format!(
                "{kind}: payload_length {payload_length} is over the limit of {} bytes (send audio in smaller chunks)",
                limits.max_payload
            ),
            whole,
        ));
    }
    let data = match header.remove("data") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(v) => {
            return Err(ProtocolError::new(
                "invalid_header",
                format!("{kind}: \"data\" must be an object, got {v}"),
                whole,
            ))
        }
    };
    Ok(Header {
        kind,
        data,
        data_length,
        payload_length,
    })
}

/// Merges the extra data (a JSON object) into the header's data, as the reference does.
pub fn merge_data(header: &mut Header, extra: &[u8]) -> Result<(), String> {
    if extra.is_empty() {
        return Ok(());
    }
    match serde_json::from_slice::<Value>(extra) {
        Ok(Value::Object(m)) => {
            header.data.extend(m);
            Ok(())
        }
        Ok(_) => Err(format!(
            "{}: the data after the header must be a JSON object",
            header.kind
        )),
        Err(e) => Err(format!(
            "{}: the data after the header is not JSON: {e}",
            header.kind
        )),
    }
}

/// Reads one event from the front of `buf`.
///
/// - `Ok(Some((event, used)))`: an event and the number of bytes it took;
/// - `Ok(None)`: `buf` holds only the beginning of an event (read more and call again);
/// - `Err(e)`: the event is bad; `e.resync` says how many bytes to drop (or to give up).
///
/// A header line longer than `limits.max_header` is an error as soon as that many bytes came
/// without a newline.
pub fn parse_event(buf: &[u8], limits: &Limits) -> Result<Option<(Event, usize)>, ProtocolError> {
    let window = &buf[..buf.len().min(limits.max_header)];
    let Some(nl) = window.iter().position(|&b| b == b'\n') else {
        if buf.len() >= limits.max_header {
            return Err(ProtocolError::new(
                "header_too_long",
                format!(
                    "no end of line within {} bytes: a header is one line of JSON",
                    limits.max_header
                ),
                Resync::Close,
            ));
        }
        return Ok(None);
    };
    let line = trim_cr(&buf[..nl]);
    if line.iter().all(u8::is_ascii_whitespace) {
        // An empty line is not an event; it is skipped quietly by the reader.
        return Err(ProtocolError::new(
            "empty_line",
            "an empty line",
            Resync::Skip(nl + 1),
        ));
    }
    let mut header = parse_header(&buf[..nl], limits)?;
    let body = nl + 1;
    let Some(end) = body.checked_add(header.body_len()) else {
        return Err(ProtocolError::new(
            "invalid_header",
            "the lengths overflow",
            Resync::Close,
        ));
    };
    if buf.len() < end {
        return Ok(None);
    }
    let data_end = body + header.data_length;
    merge_data(&mut header, &buf[body..data_end])
        .map_err(|m| ProtocolError::new("invalid_data", m, Resync::Skip(end)))?;
    Ok(Some((
        Event {
            kind: header.kind,
            data: header.data,
            payload: buf[data_end..end].to_vec(),
        },
        end,
    )))
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// An `error` event.
pub fn error_event(code: &str, text: impl Into<String>) -> Event {
    Event::with_data(
        "error",
        serde_json::json!({"text": text.into(), "code": code}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn parse_all(bytes: &[u8]) -> Vec<Result<Event, ProtocolError>> {
        let limits = Limits::default();
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            match parse_event(&bytes[at..], &limits) {
                Ok(Some((ev, used))) => {
                    out.push(Ok(ev));
                    at += used;
                }
                Ok(None) => break,
                Err(e) => match e.resync {
                    Resync::Skip(n) => {
                        at += n.max(1);
                        if e.code != "empty_line" {
                            out.push(Err(e));
                        }
                    }
                    Resync::Close => {
                        out.push(Err(e));
                        break;
                    }
                },
            }
        }
        out
    }

    #[test]
    fn reads_what_the_reference_writes() {
        // As wyoming 1.10's write_event puts it: data after the header, then the payload.
        let bytes = b"{\"type\": \"audio-chunk\", \"version\": \"1.10.2\", \"data_length\": 50, \"payload_length\": 4}\n{\"rate\": 16000, \"width\": 2, \"channels\": 1, \"t\": 0}\x01\x02\x03\x04";
        let (ev, used) = parse_event(bytes, &Limits::default()).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(ev.kind, "audio-chunk");
        assert_eq!(ev.data["rate"], 16000);
        assert_eq!(ev.payload, vec![1, 2, 3, 4]);
        // Older writers put the data in the header itself.
        let (ev, _) = parse_event(
            b"{\"type\":\"transcribe\",\"data\":{\"language\":\"en\"}}\n",
            &Limits::default(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(ev.data["language"], "en");
        assert!(ev.payload.is_empty());
    }

    #[test]
    fn needs_more_bytes_until_the_event_is_whole() {
        let ev = Event::with_data("synthesize", json!({"text": "Hello there."}))
            .with_payload(vec![9; 10]);
        let bytes = ev.encode();
        for cut in 0..bytes.len() {
            assert_eq!(
                parse_event(&bytes[..cut], &Limits::default()),
                Ok(None),
                "cut {cut}"
            );
        }
        assert_eq!(
            parse_event(&bytes, &Limits::default()),
            Ok(Some((ev, bytes.len())))
        );
    }

    #[test]
    fn bad_events_are_errors_that_keep_the_stream_in_step() {
        let mut bytes = b"not json\n".to_vec();
        bytes.extend_from_slice(b"[1, 2]\n");
        bytes.extend_from_slice(b"{\"data\": {}}\n");
        bytes.extend_from_slice(b"{\"type\": \"x\", \"data_length\": 3}\n[1]");
        bytes.extend_from_slice(b"{\"type\": \"big\", \"payload_length\": 99999999}\n");
        let errors = parse_all(&bytes);
        let codes: Vec<&str> = errors
            .iter()
            .map(|r| r.as_ref().map_or_else(|e| e.code, |_| "ok"))
            .collect();
        assert_eq!(
            codes,
            [
                "invalid_header",
                "invalid_header",
                "invalid_header",
                "invalid_data",
                "payload_too_large"
            ]
        );
        let last = errors[4].as_ref().unwrap_err();
        assert_eq!(last.resync, Resync::Skip(44 + 99_999_999));
        assert!(last.message.contains("payload_length 99999999"), "{last}");
        // After a skippable error the next event reads normally.
        let mut bytes = b"{\"type\": 5, \"data_length\": 2}\n{}".to_vec();
        bytes.extend(Event::new("describe").encode());
        let out = parse_all(&bytes);
        assert!(out[0].is_err());
        assert_eq!(out[1].as_ref().unwrap().kind, "describe");
    }

    #[test]
    fn a_header_without_an_end_is_refused_at_the_limit() {
        let limits = Limits {
            max_header: 100,
            ..Limits::default()
        };
        assert_eq!(parse_event(&[b'{'; 99], &limits), Ok(None));
        let e = parse_event(&[b'{'; 100], &limits).unwrap_err();
        assert_eq!((e.code, e.resync), ("header_too_long", Resync::Close));
        let e = parse_event(b"{\"type\":\"a\",\"payload_length\":-1}\n", &limits).unwrap_err();
        assert_eq!(e.resync, Resync::Close);
        let e = parse_event(b"{\"type\":\"a\",\"data_length\":\"3\"}\n", &limits).unwrap_err();
        assert_eq!(e.resync, Resync::Close);
    }

    #[test]
    fn encodes_like_the_reference() {
        let ev = Event::with_data("transcript", json!({"text": "hi"}));
        let bytes = ev.encode();
        let text = String::from_utf8(bytes).unwrap();
        let (line, rest) = text.split_once('\n').unwrap();
        let header: Value = serde_json::from_str(line).unwrap();
        assert_eq!(header["type"], "transcript");
        assert_eq!(header["version"], PROTOCOL_VERSION);
        assert_eq!(header["data_length"], rest.len());
        assert!(header.get("payload_length").is_none());
        assert_eq!(
            Event::new("describe").encode(),
            b"{\"type\":\"describe\",\"version\":\"1.10.2\"}\n"
        );
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "[^\u{0}]{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        (
            "[a-z][a-z-]{0,20}",
            prop::collection::btree_map("[a-z_]{1,10}", arb_value(), 0..5),
            prop::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(kind, data, payload)| Event {
                kind,
                data: data.into_iter().collect(),
                payload,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn events_round_trip(events in prop::collection::vec(arb_event(), 1..5)) {
            let mut bytes = Vec::new();
            for ev in &events {
                bytes.extend(ev.encode());
            }
            let back: Vec<Event> = parse_all(&bytes).into_iter().map(Result::unwrap).collect();
            prop_assert_eq!(back, events);
        }

        #[test]
        fn garbage_never_panics_and_errors_make_progress(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let limits = Limits { max_header: 200, max_data: 100, max_payload: 100 };
            let mut at = 0;
            while at < bytes.len() {
                match parse_event(&bytes[at..], &limits) {
                    Ok(Some((ev, used))) => {
                        prop_assert!(used > 0 && at + used <= bytes.len());
                        prop_assert!(ev.payload.len() <= 100);
                        at += used;
                    }
                    Ok(None) => {
                        prop_assert!(bytes.len() - at < 200 || bytes[at..at + 200].contains(&b'\n'));
                        break;
                    }
                    Err(e) => match e.resync {
                        Resync::Skip(n) => { prop_assert!(n > 0); at = at.saturating_add(n); }
                        Resync::Close => break,
                    },
                }
            }
        }

        #[test]
        fn json_garbage_headers_give_errors_not_panics(v in arb_value(), tail in prop::collection::vec(any::<u8>(), 0..50)) {
            let mut bytes = v.to_string().into_bytes();
            bytes.push(b'\n');
            bytes.extend(tail);
            let _ = parse_event(&bytes, &Limits::default());
        }
    }
}
