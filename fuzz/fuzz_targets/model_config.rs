//! Checkpoint configuration parsing: `config.json` (the backbone, the depthformer, the mel
//! front-end and the encoder sections), the LFM2 detokenizer's config and `mimi_config.json`.
//! Every input gives a configuration or an error naming a key; nothing panics or allocates by an
//! unchecked size.
#![no_main]

use std::path::Path;

use lfm2_audio::config::{Lfm2AudioConfig, Lfm2Config};
use lfm2_audio::conformer::EncoderConfig;
use lfm2_audio::mel::{MelFrontend, PreprocessorConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("config.json");
    if let Ok(cfg) = Lfm2AudioConfig::from_str(text, path) {
        if let Ok(pre) = PreprocessorConfig::from_json(&cfg.preprocessor, path) {
            let mel = MelFrontend::new(&pre);
            let _ = mel.frames(16_000);
        }
        if let Ok(enc) = EncoderConfig::from_json(&cfg.encoder, path) {
            let _ = enc.output_len(100);
        }
    }
    if let Ok(serde_json::Value::Object(obj)) = serde_json::from_str::<serde_json::Value>(text) {
        let _ = Lfm2Config::from_json(&obj, path, "");
        if let Ok(mimi) = serde_json::from_value::<codec::mimi::config::MimiConfig>(obj.into()) {
            let _ = mimi.validate(path);
        }
    }
});
