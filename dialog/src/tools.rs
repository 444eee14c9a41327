//! Tool calls in LFM2's format.
//!
//! - The tools are listed in the system prompt:
//!   `List of tools: <|tool_list_start|>[{json}, {json}]<|tool_list_end|>`.
//! - The model calls them with Pythonic calls between markers:
//!   `<|tool_call_start|>[get_weather(city="Paris", days=2)]<|tool_call_end|>`
//!   (a JSON list `[{"name": ..., "arguments": {...}}]` is accepted too).
//! - Results go back as a `tool` turn: `<|tool_response_start|>…<|tool_response_end|>`.
//!
//! Configured tools run a command with the JSON arguments on stdin, under a timeout; a few
//! tools are built in. A malformed call or a failing tool is reported, never fatal.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub const TOOL_LIST_START: &str = "<|tool_list_start|>";
pub const TOOL_LIST_END: &str = "<|tool_list_end|>";
pub const TOOL_CALL_START: &str = "<|tool_call_start|>";
pub const TOOL_CALL_END: &str = "<|tool_call_end|>";
pub const TOOL_RESPONSE_START: &str = "<|tool_response_start|>";
pub const TOOL_RESPONSE_END: &str = "<|tool_response_end|>";

/// Longest tool output kept (the rest is cut, so a runaway tool cannot flood the context).
pub const MAX_RESULT_BYTES: usize = 8 * 1024;

/// A tool as declared in the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// JSON schema of the arguments object.
    #[serde(default = "empty_schema")]
    pub parameters: Value,
    /// Program and arguments to run; the call's JSON arguments arrive on stdin, the result is
    /// read from stdout. Empty for built-in tools.
    #[serde(default)]
    pub command: Vec<String>,
    /// Seconds before the command is killed.
    #[serde(default = "default_timeout")]
    pub timeout_secs: f64,
}

fn empty_schema() -> Value {
    serde_json::json!({"type": "object", "properties": {}})
}

fn default_timeout() -> f64 {
    10.0
}

/// Longest time a tool may run, in seconds (a day); configurations are checked against it.
pub const MAX_TOOL_TIMEOUT_SECS: f64 = 86_400.0;

/// The time a tool may run for a configured `timeout_secs`: at least 10 ms, at most
/// [`MAX_TOOL_TIMEOUT_SECS`]; a value that is not a number gets the longest.
pub fn tool_timeout(secs: f64) -> Duration {
    let secs = if secs.is_nan() {
        MAX_TOOL_TIMEOUT_SECS
    } else {
        secs.clamp(0.01, MAX_TOOL_TIMEOUT_SECS)
    };
    Duration::from_secs_f64(secs)
}

impl ToolSpec {
    /// The declaration the model sees.
    pub fn declaration(&self) -> Value {
        serde_json::json!({"name": self.name, "description": self.description, "parameters": self.parameters})
    }
}

/// The built-in tools: the current date and time, and a timer.
pub fn built_in() -> Vec<ToolSpec> {
    vec![
        ToolSpec {
            name: "get_current_time".into(),
            description: "Get the current local date and time.".into(),
            parameters: empty_schema(),
            command: vec![],
            timeout_secs: 1.0,
        },
        ToolSpec {
            name: "set_timer".into(),
            description: "Start a timer that rings after the given number of seconds.".into(),
            parameters: serde_json::json!({
                "type": "object",
                "properties": {
                    "seconds": {"type": "number", "description": "Duration in seconds."},
                    "label": {"type": "string", "description": "What the timer is for."}
                },
                "required": ["seconds"]
            }),
            command: vec![],
            timeout_secs: 1.0,
        },
    ]
}

/// The system prompt with the tool list appended, as LFM2's chat template writes it.
pub fn system_prompt(system: &str, tools: &[ToolSpec]) -> String {
    if tools.is_empty() {
        return system.to_owned();
    }
    let list: Vec<String> = tools.iter().map(|t| t.declaration().to_string()).collect();
    let sep = if system.is_empty() { "" } else { "\n" };
    format!(
        "{system}{sep}List of tools: {TOOL_LIST_START}[{}]{TOOL_LIST_END}",
        list.join(", ")
    )
}

/// The content of a `tool` turn carrying a result.
pub fn response_content(result: &str) -> String {
    format!("{TOOL_RESPONSE_START}{result}{TOOL_RESPONSE_END}")
}

/// One parsed call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: Map<String, Value>,
}

/// Why a call could not be parsed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("malformed tool call at byte {at}: {message}")]
pub struct ParseError {
    pub at: usize,
    pub message: String,
}

/// Finds the text between the tool-call markers in generated text, if the model made a call.
pub fn extract_call_text(generated: &str) -> Option<&str> {
    let start = generated.find(TOOL_CALL_START)? + TOOL_CALL_START.len();
    let rest = &generated[start..];
    let end = rest.find(TOOL_CALL_END).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

/// Parses the calls between the markers: a Pythonic list `[f(a=1), g(b="x")]`, or a JSON list of
/// `{"name": ..., "arguments": {...}}` objects.
pub fn parse_calls(text: &str) -> Result<Vec<ToolCall>, ParseError> {
    let trimmed = text.trim();
    if trimmed.starts_with("[{") || trimmed.starts_with("{") {
        if let Ok(calls) = parse_json_calls(trimmed) {
            return Ok(calls);
        }
    }
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
    };
    p.ws();
    let bracketed = p.eat(b'[');
    let mut calls = Vec::new();
    loop {
        p.ws();
        if bracketed && p.eat(b']') {
            break;
        }
        calls.push(p.call()?);
        p.ws();
        if p.eat(b',') {
            continue;
        }
        if bracketed {
            p.expect(b']')?;
        }
        break;
    }
    p.ws();
    if p.i != p.s.len() {
        return Err(p.err("unexpected text after the calls"));
    }
    if calls.is_empty() {
        return Err(ParseError {
            at: 0,
            message: "no call".into(),
        });
    }
    Ok(calls)
}

fn parse_json_calls(text: &str) -> Result<Vec<ToolCall>, ()> {
    let value: Value = serde_json::from_str(text).map_err(|_| ())?;
    let items = match value {
        Value::Array(a) => a,
        obj @ Value::Object(_) => vec![obj],
        _ => return Err(()),
    };
    items
        .into_iter()
        .map(|item| {
            let name = item
                .get("name")
                .and_then(|n| n.as_str())
                .ok_or(())?
                .to_owned();
            let arguments = match item.get("arguments") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(m)) => m.clone(),
                // Some models write the arguments as a JSON string.
                Some(Value::String(s)) => serde_json::from_str(s).map_err(|_| ())?,
                Some(_) => return Err(()),
            };
            Ok(ToolCall { name, arguments })
        })
        .collect()
}

/// A recursive-descent parser of Python literals and keyword calls.
struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

/// Nesting deeper than this is refused (hostile input must not overflow the stack).
const MAX_DEPTH: usize = 32;

impl Parser<'_> {
    fn err(&self, message: &str) -> ParseError {
        ParseError {
            at: self.i,
            message: message.to_owned(),
        }
    }

    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), ParseError> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(self.err(&format!("expected '{}'", c as char)))
        }
    }

    fn ident(&mut self) -> Result<String, ParseError> {
        let start = self.i;
        while self.i < self.s.len()
            && (self.s[self.i].is_ascii_alphanumeric()
                || self.s[self.i] == b'_'
                || self.s[self.i] == b'.')
        {
            self.i += 1;
        }
        if start == self.i || self.s[start].is_ascii_digit() {
            return Err(self.err("expected a name"));
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    fn call(&mut self) -> Result<ToolCall, ParseError> {
        let name = self.ident()?;
        self.ws();
        self.expect(b'(')?;
        let mut arguments = Map::new();
        loop {
            self.ws();
            if self.eat(b')') {
                break;
            }
            let key = self.ident()?;
            self.ws();
            self.expect(b'=')?;
            self.ws();
            let value = self.value(0)?;
            arguments.insert(key, value);
            self.ws();
            if self.eat(b',') {
                continue;
            }
            self.expect(b')')?;
            break;
        }
        Ok(ToolCall { name, arguments })
    }

    fn value(&mut self, depth: usize) -> Result<Value, ParseError> {
        if depth > MAX_DEPTH {
            return Err(self.err("nested too deeply"));
        }
        self.ws();
        match self.s.get(self.i) {
            None => Err(self.err("expected a value")),
            Some(b'"') | Some(b'\'') => Ok(Value::String(self.string()?)),
            Some(b'[') | Some(b'(') => {
                let close = if self.s[self.i] == b'[' { b']' } else { b')' };
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    self.ws();
                    if self.eat(close) {
                        break;
                    }
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    if !self.eat(b',') {
                        self.expect(close)?;
                        break;
                    }
                }
                Ok(Value::Array(items))
            }
            Some(b'{') => {
                self.i += 1;
                let mut map = Map::new();
                loop {
                    self.ws();
                    if self.eat(b'}') {
                        break;
                    }
                    let key = match self.value(depth + 1)? {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    self.ws();
                    self.expect(b':')?;
                    let v = self.value(depth + 1)?;
                    map.insert(key, v);
                    self.ws();
                    if !self.eat(b',') {
                        self.expect(b'}')?;
                        break;
                    }
                }
                Ok(Value::Object(map))
            }
            Some(c) if c.is_ascii_digit() || *c == b'-' || *c == b'+' || *c == b'.' => {
                self.number()
            }
            Some(_) => {
                let word = self.ident()?;
                match word.as_str() {
                    "True" | "true" => Ok(Value::Bool(true)),
                    "False" | "false" => Ok(Value::Bool(false)),
                    "None" | "null" => Ok(Value::Null),
                    _ => Err(ParseError {
                        at: self.i - word.len(),
                        message: format!("unknown value {word:?}"),
                    }),
                }
            }
        }
    }

    fn number(&mut self) -> Result<Value, ParseError> {
        let start = self.i;
        while self.i < self.s.len()
            && matches!(
                self.s[self.i],
                b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E' | b'_'
            )
        {
            self.i += 1;
        }
        let text: String = String::from_utf8_lossy(&self.s[start..self.i]).replace('_', "");
        if let Ok(n) = text.parse::<i64>() {
            return Ok(Value::from(n));
        }
        match text.parse::<f64>() {
            Ok(f) if f.is_finite() => Ok(Value::from(f)),
            _ => Err(ParseError {
                at: start,
                message: format!("bad number {text:?}"),
            }),
        }
    }

    fn string(&mut self) -> Result<String, ParseError> {
        let quote = self.s[self.i];
        let start = self.i;
        self.i += 1;
        let mut out = Vec::new();
        while let Some(&c) = self.s.get(self.i) {
            self.i += 1;
            if c == quote {
                return String::from_utf8(out).map_err(|_| ParseError {
                    at: start,
                    message: "string is not UTF-8".into(),
                });
            }
            if c == b'\\' {
                let Some(&e) = self.s.get(self.i) else { break };
                self.i += 1;
                match e {
                    b'n' => out.push(b'\n'),
                    b't' => out.push(b'\t'),
                    b'r' => out.push(b'\r'),
                    b'0' => out.push(0),
                    b'u' => {
                        let hex = self
                            .s
                            .get(self.i..self.i + 4)
                            .and_then(|h| std::str::from_utf8(h).ok());
                        let ch = hex
                            .and_then(|h| u32::from_str_radix(h, 16).ok())
                            .and_then(char::from_u32);
                        let Some(ch) = ch else {
                            return Err(self.err("bad \\u escape"));
                        };
                        self.i += 4;
                        let mut buf = [0u8; 4];
                        out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                    }
                    other => out.push(other),
                }
            } else {
                out.push(c);
            }
        }
        Err(ParseError {
            at: start,
            message: "unterminated string".into(),
        })
    }
}

/// What running a tool gave.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolOutcome {
    /// The result text for the model.
    Ok(String),
    /// What went wrong, also told to the model so it can say so.
    Failed(String),
}

impl ToolOutcome {
    /// The text fed back to the model.
    pub fn as_result_text(&self) -> String {
        match self {
            ToolOutcome::Ok(s) => s.clone(),
            ToolOutcome::Failed(e) => serde_json::json!({"error": e}).to_string(),
        }
    }
}

/// Runs a configured tool's command: JSON arguments on stdin, result from stdout.
pub fn run_command(spec: &ToolSpec, call: &ToolCall) -> ToolOutcome {
    let Some((program, args)) = spec.command.split_first() else {
        return ToolOutcome::Failed(format!("tool {} has no command", spec.name));
    };
    let mut child = match Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return ToolOutcome::Failed(format!("cannot start {program}: {e}")),
    };
    let input = Value::Object(call.arguments.clone()).to_string();
    if let Some(mut stdin) = child.stdin.take() {
        // A tool that does not read its input is fine.
        let _ = stdin.write_all(input.as_bytes());
    }
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.take(MAX_RESULT_BYTES as u64 + 1).read_to_end(&mut out);
        }
        let mut err = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.take(2048).read_to_end(&mut err);
        }
        (out, err)
    });
    let deadline = Instant::now() + tool_timeout(spec.timeout_secs);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!(
                    "tool {} timed out after {:.1} s",
                    spec.name, spec.timeout_secs
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => break Err(format!("waiting for tool {}: {e}", spec.name)),
        }
    };
    let (out, err) = reader.join().unwrap_or_default();
    match status {
        Err(e) => ToolOutcome::Failed(e),
        Ok(s) if !s.success() => {
            let err = String::from_utf8_lossy(&err).trim().to_owned();
            ToolOutcome::Failed(format!(
                "tool {} failed ({s}){}",
                spec.name,
                if err.is_empty() {
                    String::new()
                } else {
                    format!(": {err}")
                }
            ))
        }
        Ok(_) => {
            let mut text = String::from_utf8_lossy(&out).trim().to_owned();
            if text.len() > MAX_RESULT_BYTES {
                let mut cut = MAX_RESULT_BYTES;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
                text.push_str(" [truncated]");
            }
            ToolOutcome::Ok(text)
        }
    }
}

/// Runs a call of one of `tools`: the built-in ones here, the others' commands. `on_timer` is
/// called with the label of a timer the built-in `set_timer` set, when it runs out.
pub fn run(
    tools: &[ToolSpec],
    call: &ToolCall,
    on_timer: impl FnOnce(String) + Send + 'static,
) -> ToolOutcome {
    let Some(spec) = tools.iter().find(|t| t.name == call.name) else {
        return ToolOutcome::Failed(format!("there is no tool named {:?}", call.name));
    };
    if spec.command.is_empty() {
        run_built_in(call, on_timer)
    } else {
        run_command(spec, call)
    }
}

/// Runs a built-in tool (see [`built_in`]). `on_timer` is called with the timer's label when a
/// timer set with `set_timer` runs out (from a thread of its own).
pub fn run_built_in(
    call: &ToolCall,
    on_timer: impl FnOnce(String) + Send + 'static,
) -> ToolOutcome {
    match call.name.as_str() {
        "get_current_time" => {
            let now = chrono::Local::now();
            ToolOutcome::Ok(
                serde_json::json!({
                    "date": now.format("%A %-d %B %Y").to_string(),
                    "time": now.format("%H:%M").to_string(),
                    "iso": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
                })
                .to_string(),
            )
        }
        "set_timer" => {
            let seconds = match call.arguments.get("seconds").and_then(Value::as_f64) {
                Some(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => s,
                Some(s) => {
                    return ToolOutcome::Failed(format!(
                        "seconds = {s}: expected a duration between 0 and 86400"
                    ))
                }
                None => return ToolOutcome::Failed("set_timer needs a number `seconds`".into()),
            };
            let label = call
                .arguments
                .get("label")
                .and_then(Value::as_str)
                .unwrap_or("timer")
                .to_owned();
            let name = label.clone();
            let spawned = std::thread::Builder::new()
                .name("timer".into())
                .spawn(move || {
                    std::thread::sleep(Duration::from_secs_f64(seconds));
                    on_timer(name);
                });
            match spawned {
                Ok(_) => ToolOutcome::Ok(
                    serde_json::json!({"status": "set", "seconds": seconds, "label": label})
                        .to_string(),
                ),
                Err(e) => ToolOutcome::Failed(format!("cannot start the timer: {e}")),
            }
        }
        other => ToolOutcome::Failed(format!("there is no built-in tool named {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pythonic_calls_parse() {
        let calls = parse_calls(r#"[get_weather(city="Paris", days=2, metric=True), set_timer(seconds=1.5e2, label='tea \'n\' cake')]"#).unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments["city"], "Paris");
        assert_eq!(calls[0].arguments["days"], 2);
        assert_eq!(calls[0].arguments["metric"], true);
        assert_eq!(calls[1].arguments["seconds"], 150.0);
        assert_eq!(calls[1].arguments["label"], "tea 'n' cake");
        let nested =
            parse_calls(r#"[f(xs=[1, -2, 3.5], m={"a": None, 'b': (1, 2)}, s="\u00e9\n")]"#)
                .unwrap();
        assert_eq!(
            Value::Object(nested[0].arguments.clone()),
            serde_json::json!({"xs": [1, -2, 3.5], "m": {"a": null, "b": [1, 2]}, "s": "é\n"})
        );
        assert_eq!(parse_calls("[now()]").unwrap()[0].arguments.len(), 0);
        assert_eq!(parse_calls("now()").unwrap()[0].name, "now");
    }

    #[test]
    fn json_calls_parse() {
        let calls =
            parse_calls(r#"[{"name": "get_weather", "arguments": {"city": "Oslo"}}]"#).unwrap();
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments["city"], "Oslo");
        let calls = parse_calls(r#"{"name": "f", "arguments": "{\"x\": 1}"}"#).unwrap();
        assert_eq!(calls[0].arguments["x"], 1);
    }

    #[test]
    fn malformed_calls_are_errors_not_panics() {
        for bad in [
            "",
            "[",
            "[f(",
            "[f(x=)]",
            "[f(x=1]",
            "[1(x=2)]",
            "[f(x=\"open)]",
            "[f(x=1)] trailing",
            "[f(x=nope)]",
            "[f(x=1e999)]",
        ] {
            assert!(parse_calls(bad).is_err(), "{bad:?} should not parse");
        }
        let deep = format!("[f(x={}{})]", "[".repeat(100), "]".repeat(100));
        assert!(parse_calls(&deep).unwrap_err().message.contains("deeply"));
    }

    #[test]
    fn call_text_is_found_between_markers() {
        let gen = "Let me check.<|tool_call_start|>[get_current_time()]<|tool_call_end|>";
        assert_eq!(extract_call_text(gen), Some("[get_current_time()]"));
        assert_eq!(extract_call_text("no call here"), None);
    }

    #[test]
    fn system_prompt_lists_tools() {
        let p = system_prompt("Be brief.", &built_in());
        assert!(
            p.starts_with("Be brief.\nList of tools: <|tool_list_start|>[{"),
            "{p}"
        );
        assert!(p.ends_with("}]<|tool_list_end|>"));
        assert_eq!(system_prompt("Be brief.", &[]), "Be brief.");
    }

    #[test]
    fn commands_run_with_timeout_and_errors() {
        let mut spec = ToolSpec {
            name: "echo".into(),
            description: String::new(),
            parameters: empty_schema(),
            command: vec!["sh".into(), "-c".into(), "cat".into()],
            timeout_secs: 5.0,
        };
        let call = ToolCall {
            name: "echo".into(),
            arguments: serde_json::json!({"a": 1}).as_object().unwrap().clone(),
        };
        assert_eq!(
            run_command(&spec, &call),
            ToolOutcome::Ok(r#"{"a":1}"#.into())
        );
        spec.command = vec!["sh".into(), "-c".into(), "echo broken >&2; exit 3".into()];
        match run_command(&spec, &call) {
            ToolOutcome::Failed(e) => assert!(e.contains("broken"), "{e}"),
            other => panic!("{other:?}"),
        }
        spec.command = vec!["sleep".into(), "5".into()];
        spec.timeout_secs = 0.2;
        let start = Instant::now();
        assert!(
            matches!(run_command(&spec, &call), ToolOutcome::Failed(e) if e.contains("timed out"))
        );
        assert!(start.elapsed() < Duration::from_secs(3));
        spec.command = vec!["/no/such/program".into()];
        assert!(
            matches!(run_command(&spec, &call), ToolOutcome::Failed(e) if e.contains("cannot start"))
        );
    }

    #[test]
    fn built_in_tools_run() {
        let call = |name: &str, args: Value| ToolCall {
            name: name.into(),
            arguments: args.as_object().cloned().unwrap_or_default(),
        };
        let ToolOutcome::Ok(now) = run_built_in(&call("get_current_time", json!({})), |_| {})
        else {
            panic!("the time is known");
        };
        let now: Value = serde_json::from_str(&now).unwrap();
        assert!(now["time"].as_str().unwrap().contains(':'), "{now}");

        let (tx, rx) = std::sync::mpsc::channel();
        let set = run_built_in(
            &call("set_timer", json!({"seconds": 0.05, "label": "tea"})),
            move |label| tx.send(label).unwrap(),
        );
        assert!(
            matches!(set, ToolOutcome::Ok(ref s) if s.contains("tea")),
            "{set:?}"
        );
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), "tea");

        for bad in [
            json!({}),
            json!({"seconds": -1}),
            json!({"seconds": "soon"}),
        ] {
            let out = run_built_in(&call("set_timer", bad.clone()), |_| {});
            assert!(matches!(out, ToolOutcome::Failed(_)), "{bad}: {out:?}");
        }
        assert!(matches!(
            run_built_in(&call("format_disk", json!({})), |_| {}),
            ToolOutcome::Failed(_)
        ));
    }
}
