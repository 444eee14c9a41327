//! The tool-call parser: whatever text a model generates gives calls or a parse error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(call) = dialog::tools::extract_call_text(text) {
        let _ = dialog::tools::parse_calls(call);
    }
    let _ = dialog::tools::parse_calls(text);
});
