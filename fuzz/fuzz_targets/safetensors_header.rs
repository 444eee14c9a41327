//! The safetensors header as the weight loader parses and checks it: any bytes give the list of
//! tensors or a one-line error.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = lfm2_audio::weights::inspect(data, Path::new("model.safetensors"));
});
