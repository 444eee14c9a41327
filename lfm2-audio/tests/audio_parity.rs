//! Parity of audio understanding with the reference: resampling, log-mel features, the
//! FastConformer encoder and adapter, the ASR prompt with audio positions, and greedy ASR
//! decoding, on espeak-ng speech (`tests/fixtures/audio`) and the tiny-a/b/c checkpoints.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::{assert_close, errors, fixtures};
use lfm2_audio::encoder::MIN_SAMPLES;
use lfm2_audio::generate::{asr_chat, generate_text, prefill_chat};
use lfm2_audio::model::Lfm2AudioModel;
use lfm2_audio::prompt::Item;
use lfm2_audio::resample::Resampler;
use lfm2_audio::sampling::{Sampler, SamplingParams};
use lfm2_audio::session::Session;

const MODELS: [&str; 3] = ["tiny-a", "tiny-b", "tiny-c"];
const REL: f32 = 1e-4;

/// A clip as the reference read it: int16 / 32768, stereo averaged.
fn read_clip(name: &str) -> (Vec<f32>, u32) {
    let mut r =
        hound::WavReader::open(fixtures().join("audio").join(format!("{name}.wav"))).unwrap();
    let spec = r.spec();
    let raw: Vec<f32> = r
        .samples::<i16>()
        .map(|s| s.unwrap() as f32 / 32768.0)
        .collect();
    let mono = match spec.channels {
        1 => raw,
        2 => raw.chunks(2).map(|c| (c[0] + c[1]) / 2.0).collect(),
        n => panic!("{n} channels"),
    };
    (mono, spec.sample_rate)
}

fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn clips() -> Vec<String> {
    let front = json(&fixtures().join("audio/frontend.json"));
    let mut names: Vec<String> = front["clips"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    names.sort();
    names
}

fn to_16k(wave: &[f32], rate: u32) -> Vec<f32> {
    Resampler::resample_all(rate, 16_000, wave).unwrap()
}

#[test]
fn resampling_and_mel_match_the_reference() {
    let model = Lfm2AudioModel::load(&fixtures().join("tiny-a/model")).unwrap();
    let mut checked = 0;
    for clip in clips() {
        let (wave, rate) = read_clip(&clip);
        let reference =
            load_tensors(&fixtures().join(format!("audio/frontend/{clip}.safetensors")));
        let wave16 = to_16k(&wave, rate);
        if let Some(want) = reference.get("resampled") {
            let got = Tensor::new(wave16.as_slice(), &Device::Cpu).unwrap();
            assert_close(&format!("{clip} resampled"), &got, want, 1e-5);
        }
        if wave16.len() < MIN_SAMPLES {
            continue;
        }
        let mel = model.audio.mel().compute(&wave16).unwrap();
        let (abs, _) = errors(&mel, &reference["mel"]);
        println!("{clip} ({rate} Hz) mel: max abs err {abs:.3e}");
        // Other rates go through the resampler too, which follows torchaudio's kernel exactly.
        assert!(
            abs <= 1e-4,
            "{clip} ({rate} Hz): mel error {abs:.3e} > 1e-4"
        );
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} clips checked");
}

#[test]
fn encoder_and_adapter_match_the_reference() {
    for name in MODELS {
        let model = Lfm2AudioModel::load(&fixtures().join(name).join("model")).unwrap();
        for entry in std::fs::read_dir(fixtures().join(name).join("asr")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
                continue;
            }
            let clip = path.file_stem().unwrap().to_str().unwrap().to_owned();
            let r = load_tensors(&path);
            let mel = &load_tensors(&fixtures().join(format!("audio/frontend/{clip}.safetensors")))
                ["mel"];
            let (out, sub, layers) = model.audio.conformer().forward_with_layers(mel).unwrap();
            if let Some(want) = r.get("encoder.pre_encode") {
                assert_close(&format!("{name}/{clip} subsampling"), &sub, want, REL);
                let pos = model
                    .audio
                    .conformer()
                    .relative_positions(sub.dim(0).unwrap())
                    .unwrap();
                assert_close(
                    &format!("{name}/{clip} positions"),
                    &pos,
                    &r["encoder.pos_emb"],
                    REL,
                );
                for (i, got) in layers.iter().enumerate() {
                    assert_close(
                        &format!("{name}/{clip} layer {i}"),
                        got,
                        &r["encoder.layers"].get(i).unwrap(),
                        REL,
                    );
                }
            }
            assert_close(
                &format!("{name}/{clip} encoder"),
                &out,
                &r["encoder.output"],
                REL,
            );
            let adapted = model.audio.adapter().forward(&out).unwrap();
            assert_close(
                &format!("{name}/{clip} adapter"),
                &adapted,
                &r["adapter.output"],
                REL,
            );

            // The whole path from the file, resampling included (clips long enough to be accepted).
            let (wave, rate) = read_clip(&clip);
            if to_16k(&wave, rate).len() < MIN_SAMPLES {
                continue;
            }
            let from_file = model.audio.embed_at(&wave, rate).unwrap();
            assert_close(
                &format!("{name}/{clip} file to embeddings"),
                &from_file,
                &r["adapter.output"],
                REL,
            );
        }
    }
}

#[test]
fn asr_prompt_prefill_and_greedy_text_match_the_reference() {
    let mut compared = 0;
    for name in MODELS {
        let model = Lfm2AudioModel::load(&fixtures().join(name).join("model")).unwrap();
        let tok = &model.tokenizer;
        for entry in std::fs::read_dir(fixtures().join(name).join("asr")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let meta = json(&path);
            let r = load_tensors(&path.with_extension("safetensors"));
            let clip = meta["clip"].as_str().unwrap();
            let (wave, rate) = read_clip(clip);
            if to_16k(&wave, rate).len() < MIN_SAMPLES {
                continue;
            }
            let audio = model.audio.embed_at(&wave, rate).unwrap();
            let chat = asr_chat(tok, audio).unwrap();

            // Positions: text ids where the reference has text, audio where it has audio.
            let flags: Vec<u64> = meta["modality_flag"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            let want_ids: Vec<u32> = meta["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(chat.len(), flags.len(), "{name}/{clip} positions");
            let mut text = want_ids.iter();
            for (item, flag) in chat.items().iter().zip(&flags) {
                match (item, flag) {
                    (Item::Text(id), 1) => assert_eq!(Some(id), text.next(), "{name}/{clip}"),
                    (Item::AudioIn, 2) => {}
                    other => panic!("{name}/{clip}: position mismatch {other:?}"),
                }
            }

            let mut session = Session::new(Arc::clone(&model.backbone)).unwrap();
            let hidden = prefill_chat(&mut session, &chat).unwrap();
            assert_close(
                &format!("{name}/{clip} prefill hidden"),
                &hidden,
                &r["prefill.hidden_last"],
                REL,
            );
            let logits = model
                .backbone
                .text_logits(&hidden.unsqueeze(0).unwrap())
                .unwrap()
                .squeeze(0)
                .unwrap();
            assert_close(
                &format!("{name}/{clip} prefill logits"),
                &logits,
                &r["prefill.logits_last"],
                REL,
            );

            // Greedy text until <|im_end|> or <|audio_start|> (audio frames are the speech-output tests').
            let items = meta["generate"]["items"].as_array().unwrap();
            let want: Vec<u32> = items
                .iter()
                .map_while(|i| i.get("text").and_then(|t| t.as_u64()).map(|t| t as u32))
                .take_while(|&id| id != 7 && id != 128)
                .collect();
            let s = tok.special();
            let mut sampler = Sampler::new(SamplingParams::GREEDY, 0);
            let (got, _) = generate_text(
                &mut session,
                &hidden,
                &mut sampler,
                want.len() + 1,
                &[s.im_end, s.audio_start],
                |_| Ok(true),
            )
            .unwrap();
            let got: Vec<u32> = got.into_iter().take(want.len()).collect();
            assert_eq!(got, want, "{name}/{clip} greedy ASR tokens");
            compared += 1;
        }
    }
    assert!(compared >= 15, "only {compared} ASR recordings compared");
}

#[test]
fn clips_too_short_for_the_encoder_are_an_error() {
    let model = Lfm2AudioModel::load(&fixtures().join("tiny-a/model")).unwrap();
    for clip in ["cut_1_16k", "cut_159_16k", "cut_160_16k"] {
        let (wave, rate) = read_clip(clip);
        let err = model.audio.embed_at(&wave, rate).unwrap_err().to_string();
        assert!(err.contains("needs at least 320"), "{clip}: {err}");
    }
    let err = model.audio.embed(&[]).unwrap_err().to_string();
    assert!(err.contains("0 samples"), "{err}");
    let (wave, _) = read_clip("cut_320_16k");
    assert_eq!(wave.len(), 320);
    model.audio.embed(&wave).unwrap();
}

/// Encoding asked to stop stops before the subsampling or between two encoder layers, once per
/// layer asked; not asked to, it is the encoding, to the bit.
#[test]
fn encoding_stops_between_layers_when_asked() {
    let model = Lfm2AudioModel::load(&fixtures().join("tiny-c/model")).unwrap();
    let (wave, rate) = read_clip("what_time_16k");
    let wave = to_16k(&wave, rate);
    let want = model.audio.embed(&wave).unwrap();
    let layers = model.audio.conformer().config().n_layers;
    for stop_at in 1..=layers + 1 {
        let asked = std::cell::Cell::new(0);
        let r = model.audio.embed_until(&wave, &|| {
            asked.set(asked.get() + 1);
            asked.get() == stop_at
        });
        assert!(
            matches!(r, Err(lfm2_audio::error::Error::Stopped)),
            "stop at {stop_at}: {r:?}"
        );
    }
    let asked = std::cell::Cell::new(0);
    let got = model
        .audio
        .embed_until(&wave, &|| {
            asked.set(asked.get() + 1);
            false
        })
        .unwrap();
    assert_eq!(asked.get(), layers + 1);
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(values(&got), values(&want));
}
