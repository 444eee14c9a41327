//! The Realtime API's client-event parser: any text frame gives an event or an error, never a
//! panic, a hang or a runaway allocation. The module is included by path (the lfm2d package is a
//! binary crate; the parser depends on nothing of it but serde_json and base64).
#![no_main]

#[allow(dead_code, clippy::all)]
#[path = "../../src/realtime/protocol.rs"]
mod protocol;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = protocol::parse(text);
    }
    // Audio payloads are base64 of pcm16.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = protocol::decode_pcm16(text);
    }
});
