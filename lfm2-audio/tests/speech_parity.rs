//! Parity of speech output with the reference: the interleaved and sequential generation loops
//! (greedy, 60 steps, text and audio), the depthformer of the first frame, and the frame
//! embedding fed back, on speech-to-speech and TTS prompts of the tiny-a/b/c checkpoints.

mod common;

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::{assert_close, fixtures};
use lfm2_audio::format::CODEBOOKS;
use lfm2_audio::generate::{prefill_chat, GenerationMode, GenerationParams, Generator, Token};
use lfm2_audio::model::Lfm2AudioModel;
use lfm2_audio::prompt::{ChatState, Item};
use lfm2_audio::sampling::{Sampler, SamplingParams};
use lfm2_audio::session::Session;

const MODELS: [&str; 3] = ["tiny-a", "tiny-b", "tiny-c"];
const REL: f32 = 1e-4;

fn read_clip(name: &str) -> (Vec<f32>, u32) {
    let mut r =
        hound::WavReader::open(fixtures().join("audio").join(format!("{name}.wav"))).unwrap();
    let rate = r.spec().sample_rate;
    (
        r.samples::<i16>()
            .map(|s| s.unwrap() as f32 / 32768.0)
            .collect(),
        rate,
    )
}

/// The reference's prompt pieces, each added on its own; `<audio NAME>` is a clip.
fn build_chat(model: &Lfm2AudioModel, pieces: &[serde_json::Value]) -> ChatState {
    let tok = &model.tokenizer;
    let mut chat = ChatState::new(tok).unwrap();
    assert_eq!(pieces[0], "<|startoftext|>");
    for piece in &pieces[1..] {
        let piece = piece.as_str().unwrap();
        if let Some(clip) = piece
            .strip_prefix("<audio ")
            .and_then(|p| p.strip_suffix('>'))
        {
            let (wave, rate) = read_clip(clip);
            chat.add_audio(model.audio.embed_at(&wave, rate).unwrap())
                .unwrap();
        } else {
            chat.add_text(tok, piece).unwrap();
        }
    }
    chat
}

fn reference_items(meta: &serde_json::Value) -> Vec<Token> {
    meta["generate"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| match (i.get("text"), i.get("audio")) {
            (Some(t), None) => Token::Text(t.as_u64().unwrap() as u32),
            (None, Some(a)) => Token::Audio(
                a.as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c.as_u64().unwrap() as u32)
                    .collect::<Vec<_>>()
                    .try_into()
                    .unwrap(),
            ),
            _ => panic!("bad item {i}"),
        })
        .collect()
}

fn check_recording(model: &Lfm2AudioModel, name: &str, path: &Path) -> (usize, usize) {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let r =
        candle_core::safetensors::load(path.with_extension("safetensors"), &Device::Cpu).unwrap();
    let what = format!("{name}/{}", path.file_stem().unwrap().to_str().unwrap());
    let chat = build_chat(model, meta["prompt"].as_array().unwrap());

    let want_ids: Vec<u32> = meta["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(chat.text_ids(), want_ids, "{what} prompt ids");
    let flags: Vec<u64> = meta["modality_flag"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let got_flags: Vec<u64> = chat
        .items()
        .iter()
        .map(|i| if matches!(i, Item::AudioIn) { 2 } else { 1 })
        .collect();
    assert_eq!(got_flags, flags, "{what} modality layout");

    let g = &meta["generate"];
    let mode = match g["loop"].as_str().unwrap() {
        "generate_interleaved" => GenerationMode::Interleaved {
            n_text: g["interleaved_n_text"].as_u64().unwrap() as usize,
            n_audio: g["interleaved_n_audio"].as_u64().unwrap() as usize,
        },
        "generate_sequential" => GenerationMode::Sequential,
        other => panic!("{other}"),
    };
    if let GenerationMode::Interleaved { n_text, n_audio } = mode {
        assert_eq!(
            (n_text, n_audio),
            (
                model.config.interleaved_n_text,
                model.config.interleaved_n_audio
            ),
            "{what}: config.json cadence"
        );
    }
    let params = GenerationParams {
        max_new_tokens: g["max_new_tokens"].as_u64().unwrap() as usize,
        text: SamplingParams::GREEDY,
        audio: SamplingParams::GREEDY,
        seed: 0,
    };
    let mut session = Session::new(Arc::clone(&model.backbone)).unwrap();
    let hidden = prefill_chat(&mut session, &chat).unwrap();
    let mut gen = Generator::new(
        &mut session,
        &model.audio_head,
        model.tokenizer.special(),
        mode,
        params,
        hidden,
    );
    let want = reference_items(&meta);
    let want_hidden = &r["steps.hidden"];
    let mut got = Vec::new();
    let mut first_audio_hidden = None;
    while let Some(token) = gen.next_item().unwrap() {
        let step = got.len();
        let h = gen.last_hidden().unwrap().clone();
        if step < want_hidden.dim(0).unwrap() {
            assert_close(
                &format!("{what} step {step} hidden"),
                &h,
                &want_hidden.get(step).unwrap(),
                REL,
            );
        }
        if matches!(token, Token::Audio(_)) && first_audio_hidden.is_none() {
            first_audio_hidden = Some(h);
        }
        got.push(token);
    }
    assert_eq!(got, want, "{what} generated items");
    if g["stopped_on_unyielded_im_end"].as_bool() == Some(true) {
        assert!(
            gen.is_finished() && gen.steps() == want.len() + 1,
            "{what}: stop on <|im_end|>"
        );
    }

    // The first frame, stage by stage.
    let n_audio = got.iter().filter(|t| matches!(t, Token::Audio(_))).count();
    if let Some(h) = first_audio_hidden {
        let mut sampler = Sampler::new(SamplingParams::GREEDY, 0);
        let (frame, trace) = model
            .audio_head
            .sample_frame_traced(&h, &mut sampler)
            .unwrap();
        assert_close(
            &format!("{what} depth_linear"),
            &trace.depth_in,
            &r["first_frame.depth_linear"],
            REL,
        );
        assert_close(
            &format!("{what} depthformer out"),
            &trace.outputs,
            &r["first_frame.depthformer_out"],
            REL,
        );
        assert_close(
            &format!("{what} depthformer logits"),
            &trace.logits,
            &r["first_frame.logits"],
            REL,
        );
        let mut frame = frame;
        if frame[0] == 2048 {
            frame.iter_mut().for_each(|c| *c = 2048);
        }
        let emb = model.audio_head.frame_embedding(&frame).unwrap();
        assert_close(
            &format!("{what} frame embedding"),
            &emb,
            &r["first_frame.audio_embedding"],
            REL,
        );
    }
    (got.len(), n_audio)
}

#[test]
fn generation_matches_the_reference() {
    let mut recordings = 0;
    let mut switched = 0;
    for name in MODELS {
        let model = Lfm2AudioModel::load(&fixtures().join(name).join("model")).unwrap();
        let mut paths: Vec<_> = std::fs::read_dir(fixtures().join(name).join("speech"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.extension().and_then(|e| e.to_str()) == Some("json")
                    && p.file_stem().unwrap() != "decode"
            })
            .collect();
        paths.sort();
        for path in paths {
            let (items, audio) = check_recording(&model, name, &path);
            println!(
                "{name}/{}: {items} items, {audio} audio frames",
                path.file_stem().unwrap().to_str().unwrap()
            );
            recordings += 1;
            if audio > 0 && audio < items {
                switched += 1;
            }
        }
    }
    assert!(recordings >= 18, "only {recordings} recordings");
    assert!(switched >= 10, "only {switched} recordings switch modality");
}

#[test]
fn frames_with_bad_codes_are_errors() {
    let model = Lfm2AudioModel::load(&fixtures().join("tiny-c/model")).unwrap();
    let err = model
        .audio_head
        .frame_embedding(&[0, 1, 2, 3, 4, 5, 6, 2049])
        .unwrap_err()
        .to_string();
    assert!(err.contains("2049") && err.contains("codebook 7"), "{err}");
    let err = model
        .audio_head
        .frame_embedding(&[0, 1, 2])
        .unwrap_err()
        .to_string();
    assert!(err.contains("3 codes"), "{err}");
    let emb = model.audio_head.frame_embedding(&[2048; 8]).unwrap();
    assert_eq!(emb.dims(), &[model.config.lfm.hidden_size]);
    let _ = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu);
}

#[test]
fn a_frame_reads_depth_linear_every_layer_per_codebook_and_the_heads() {
    for name in MODELS {
        let dir = fixtures().join(name).join("model");
        let model = Lfm2AudioModel::load(&dir).unwrap();
        let tensors =
            candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        let elements = |name: &str| -> usize {
            tensors
                .get(name)
                .unwrap_or_else(|| panic!("{name} not in the checkpoint"))
                .elem_count()
        };
        let layers = model.config.depthformer.layers;
        let per_layer: usize = (0..layers)
            .map(|i| {
                let p = format!("depthformer.layers.{i}");
                ["operator.qkv_proj", "operator.out_proj"]
                    .iter()
                    .chain(&["feed_forward.w1", "feed_forward.w2", "feed_forward.w3"])
                    .map(|m| elements(&format!("{p}.{m}.weight")))
                    .sum::<usize>()
            })
            .sum();
        // A tied checkpoint's heads are its codebook embeddings.
        let heads: usize = (0..CODEBOOKS)
            .map(|c| {
                let own = format!("depth_embeddings.{c}.to_logits.weight");
                if tensors.contains_key(&own) {
                    elements(&own)
                } else {
                    elements(&format!("depth_embeddings.{c}.embedding.weight"))
                }
            })
            .sum();
        let expected = elements("depth_linear.weight") + CODEBOOKS * per_layer + heads;
        // The f32 path keeps every weight as 4 bytes.
        assert_eq!(
            model.audio_head.frame_weight_bytes(),
            4 * expected,
            "{name}"
        );
    }
}
