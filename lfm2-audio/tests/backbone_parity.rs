//! Parity of the LFM2 backbone with the reference implementation on random-weight checkpoints in
//! the official layout (`tests/fixtures/tiny-{a,b}`, made by `tools/reference/make_fixtures.py`).
//! tiny-a uses the original LFM2 key spellings and f32 weights; tiny-b the newer spellings, bf16
//! weights, a different layer pattern, width and rope theta.

mod common;

use std::sync::Arc;

use candle_core::Tensor;
use common::{assert_close, Reference};
use lfm2_audio::model::Lfm2AudioModel;
use lfm2_audio::prompt::ChatState;
use lfm2_audio::sampling::argmax;
use lfm2_audio::session::Session;

const MODELS: [&str; 2] = ["tiny-a", "tiny-b"];
/// Hidden states and logits must match the reference within this relative error.
const REL: f32 = 1e-4;

fn load(name: &str) -> (Lfm2AudioModel, Reference) {
    let model = Lfm2AudioModel::load(&common::fixtures().join(name).join("model"))
        .expect("fixture model loads");
    (model, Reference::load(name))
}

fn prompt_ids(model: &Lfm2AudioModel, reference: &Reference) -> Vec<u32> {
    let system = reference
        .json
        .pointer("/prompt/system")
        .and_then(|v| v.as_str())
        .unwrap();
    let user = reference
        .json
        .pointer("/prompt/user")
        .and_then(|v| v.as_str())
        .unwrap();
    ChatState::text_chat(&model.tokenizer, Some(system), user)
        .unwrap()
        .text_ids()
}

#[test]
fn chat_prompt_ids_match_reference() {
    for name in MODELS {
        let (model, reference) = load(name);
        assert_eq!(
            prompt_ids(&model, &reference),
            reference.ids("/input_ids"),
            "{name}"
        );
    }
}

#[test]
fn prefill_matches_reference_layer_by_layer() {
    for name in MODELS {
        let (model, reference) = load(name);
        let ids = reference.ids("/input_ids");
        let emb = model.backbone.embed_text(&ids).unwrap();
        let mut state = model.backbone.new_state().unwrap();
        let (hidden, layers) = model
            .backbone
            .stack()
            .forward_with_layers(&emb, &mut state)
            .unwrap();
        let want_layers = reference.tensor("prefill.layer_outputs");
        for (i, got) in layers.iter().enumerate() {
            assert_close(
                &format!("{name} layer {i} output"),
                got,
                &want_layers.get(i).unwrap(),
                REL,
            );
        }
        assert_close(
            &format!("{name} prefill hidden"),
            &hidden,
            reference.tensor("prefill.hidden"),
            REL,
        );
        let logits = model.backbone.text_logits(&hidden).unwrap();
        assert_close(
            &format!("{name} prefill logits"),
            &logits,
            reference.tensor("prefill.logits"),
            REL,
        );
    }
}

/// Greedy decoding from `hidden` (last prompt position), step by step through the session;
/// returns the tokens and the logits that produced them.
fn greedy(session: &mut Session, hidden: Tensor, steps: usize) -> (Vec<u32>, Tensor) {
    let mut hidden = hidden;
    let mut ids = Vec::new();
    let mut all_logits = Vec::new();
    for _ in 0..steps {
        let logits = session
            .model()
            .text_logits(&hidden.unsqueeze(0).unwrap())
            .unwrap();
        let id = argmax(&logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap());
        all_logits.push(logits);
        ids.push(id);
        hidden = session.step_text(id).unwrap();
    }
    (ids, Tensor::cat(&all_logits, 0).unwrap())
}

#[test]
fn greedy_tokens_match_reference() {
    for name in MODELS {
        let (model, reference) = load(name);
        let ids = reference.ids("/input_ids");
        let mut session = Session::new(Arc::clone(&model.backbone)).unwrap();
        let hidden = session.prefill_text(&ids).unwrap();
        let (tokens, logits) = greedy(&mut session, hidden.get(ids.len() - 1).unwrap(), 30);
        assert_close(
            &format!("{name} greedy logits"),
            &logits,
            reference.tensor("greedy.logits"),
            REL,
        );
        assert_eq!(
            tokens,
            reference.ids("/greedy/text_ids"),
            "{name} greedy tokens"
        );
    }
}

#[test]
fn prefill_of_a_prefix_matches_reference() {
    for name in MODELS {
        let (model, reference) = load(name);
        let want = reference.tensor("prefill_prefix.hidden");
        let ids = reference.ids("/input_ids");
        let mut session = Session::new(Arc::clone(&model.backbone)).unwrap();
        let hidden = session.prefill_text(&ids[..want.dim(0).unwrap()]).unwrap();
        assert_close(&format!("{name} prefix hidden"), &hidden, want, REL);
    }
}

/// `truncate_to(p)` leaves the state of a fresh prefill of the first p positions: the caches
/// agree, continuing the prompt gives the reference's hidden states, and greedy decoding from
/// there gives the reference's tokens.
#[test]
fn truncate_equals_fresh_prefill_of_the_kept_prefix() {
    for name in MODELS {
        let (model, reference) = load(name);
        let ids = reference.ids("/input_ids");
        let keep = reference.json["prefix_len"].as_u64().unwrap() as usize;

        // A conversation that went on past the prefix: the whole prompt, then 12 decode steps.
        let mut session = Session::new(Arc::clone(&model.backbone)).unwrap();
        let hidden = session.prefill_text(&ids).unwrap();
        greedy(&mut session, hidden.get(ids.len() - 1).unwrap(), 12);
        session.truncate_to(keep).unwrap();
        assert_eq!(session.len(), keep);

        let mut fresh = Session::new(Arc::clone(&model.backbone)).unwrap();
        fresh.prefill_text(&ids[..keep]).unwrap();
        let got = session.state().caches().unwrap();
        let want = fresh.state().caches().unwrap();
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // Same positions, computed in different batch shapes: equal up to rounding.
            assert_close(&format!("{name} cache {i} after truncation"), g, w, 1e-5);
        }

        let rest = session.prefill_text(&ids[keep..]).unwrap();
        let want_rest = reference
            .tensor("prefill.hidden")
            .narrow(0, keep, ids.len() - keep)
            .unwrap();
        assert_close(
            &format!("{name} hidden after truncation"),
            &rest,
            &want_rest,
            REL,
        );
        let (tokens, _) = greedy(&mut session, rest.get(ids.len() - keep - 1).unwrap(), 30);
        assert_eq!(
            tokens,
            reference.ids("/greedy/text_ids"),
            "{name} greedy after truncation"
        );
    }
}

#[test]
fn truncate_beyond_the_end_is_an_error() {
    let (model, _) = load("tiny-a");
    let mut session = Session::new(Arc::clone(&model.backbone)).unwrap();
    session.prefill_text(&[1, 6, 7]).unwrap();
    let err = session.truncate_to(4).unwrap_err().to_string();
    assert!(err.contains("has 3 positions"), "{err}");
    assert_eq!(session.len(), 3);
}

/// 1500 token ids spread over the vocabulary: a prompt long enough to be prefilled in pieces.
fn long_prompt(model: &Lfm2AudioModel) -> Vec<u32> {
    let vocab = model.config.lfm.vocab_size as u32;
    (0..1500u32)
        .map(|i| 300 + (i * 7919) % (vocab - 400))
        .collect()
}

/// A long prefill goes through in pieces (so that its attention scores stay small); the hidden
/// states equal those of the whole prompt in one batch, and decoding goes on the same.
#[test]
fn a_long_prefill_in_pieces_equals_one_batch() {
    let (model, _) = load("tiny-a");
    let backbone = model.backbone.clone();
    let ids = long_prompt(&model);
    let emb = backbone.embed_text(&ids).unwrap();
    let mut whole = backbone.new_state().unwrap();
    let want = backbone.stack().forward(&emb, &mut whole).unwrap();
    let mut session = Session::new(Arc::clone(&backbone)).unwrap();
    let got = session.prefill_text(&ids).unwrap();
    assert_eq!(session.len(), ids.len());
    assert_close("hidden of 1500 positions", &got, &want, 1e-5);
    // The next step from both states.
    let next = backbone.embed_text(&[ids[7]]).unwrap();
    let want = backbone.stack().forward(&next, &mut whole).unwrap();
    let got = session.step_text(ids[7]).unwrap().unsqueeze(0).unwrap();
    assert_close("the step after it", &got, &want, 1e-5);
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Every cache of a session, as plain values.
fn cache_values(session: &Session) -> Vec<Vec<f32>> {
    session
        .state()
        .caches()
        .unwrap()
        .iter()
        .map(values)
        .collect()
}

/// A prefill asked to stop stops between two layers, in any piece, and leaves the session as it
/// was (same length, same caches to the bit); the prefill made afterwards is the one made without
/// the question, and still the reference's.
#[test]
fn a_prefill_stopped_between_layers_leaves_the_session_as_it_was() {
    use lfm2_audio::error::Error;
    for name in MODELS {
        let (model, reference) = load(name);
        let ids = reference.ids("/input_ids");
        let keep = reference.json["prefix_len"].as_u64().unwrap() as usize;
        let layers = model.config.lfm.layer_types.len();
        let mut session = Session::new(Arc::clone(&model.backbone)).unwrap();
        session.prefill_text(&ids[..keep]).unwrap();
        let before = cache_values(&session);
        let emb = model.backbone.embed_text(&ids[keep..]).unwrap();
        let items = vec![lfm2_audio::prompt::Item::Text(0); ids.len() - keep];
        let mut untouched = Session::new(Arc::clone(&model.backbone)).unwrap();
        untouched.prefill_text(&ids[..keep]).unwrap();
        let want = untouched.prefill(&emb, &items).unwrap();
        for stop_at in 1..=layers {
            let asked = std::cell::Cell::new(0);
            let r = session.prefill_until(&emb, &items, &|| {
                asked.set(asked.get() + 1);
                asked.get() == stop_at
            });
            assert!(matches!(r, Err(Error::Stopped)), "{name}: {r:?}");
            assert_eq!(asked.get(), stop_at, "{name}: asked once a layer");
            assert_eq!(session.len(), keep, "{name}");
            let after = cache_values(&session);
            assert!(
                after == before,
                "{name}: caches changed by a stop at {stop_at}"
            );
        }
        let got = session.prefill_until(&emb, &items, &|| false).unwrap();
        assert_eq!(values(&got), values(&want), "{name}");
        let want_rest = reference
            .tensor("prefill.hidden")
            .narrow(0, keep, ids.len() - keep)
            .unwrap();
        assert_close(&format!("{name} after stops"), &got, &want_rest, REL);
    }
}

/// A long prefill stopped in a later piece undoes the pieces before it too.
#[test]
fn a_long_prefill_stopped_in_a_later_piece_is_undone_whole() {
    use lfm2_audio::error::Error;
    let (model, _) = load("tiny-a");
    let backbone = model.backbone.clone();
    let ids = long_prompt(&model);
    let layers = model.config.lfm.layer_types.len();
    let mut session = Session::new(Arc::clone(&backbone)).unwrap();
    session.prefill_text(&ids[..5]).unwrap();
    let emb = backbone.embed_text(&ids[5..]).unwrap();
    let items = vec![lfm2_audio::prompt::Item::Text(0); ids.len() - 5];
    let asked = std::cell::Cell::new(0);
    let r = session.prefill_until(&emb, &items, &|| {
        asked.set(asked.get() + 1);
        asked.get() > layers + 2
    });
    assert!(matches!(r, Err(Error::Stopped)), "{r:?}");
    assert_eq!(session.len(), 5);
    assert_eq!(session.items().len(), 5);
    let got = session.prefill(&emb, &items).unwrap();
    let mut fresh = Session::new(Arc::clone(&backbone)).unwrap();
    fresh.prefill_text(&ids[..5]).unwrap();
    let want = fresh.prefill(&emb, &items).unwrap();
    assert_eq!(values(&got), values(&want));
}

/// The step-wise text generator gives the reference's greedy tokens, refuses a second token
/// before the first is fed back, and ends at `max_new_tokens` or at a stop token.
#[test]
fn text_steps_give_the_reference_greedy_tokens() {
    use lfm2_audio::generate::{StopReason, TextSteps};
    use lfm2_audio::sampling::{Sampler, SamplingParams};
    for name in MODELS {
        let (model, reference) = load(name);
        let ids = reference.ids("/input_ids");
        let want = reference.ids("/greedy/text_ids");
        let mut sampler = Sampler::new(SamplingParams::GREEDY, 0);
        // Generation after the prompt, to its end; also whether a second sample before a feed
        // was refused every time.
        let mut run = |max_new_tokens: usize, stop_tokens: &[u32]| {
            let mut session = Session::new(Arc::clone(&model.backbone)).unwrap();
            let hidden = session
                .prefill_text(&ids)
                .unwrap()
                .get(ids.len() - 1)
                .unwrap();
            let mut steps = TextSteps::new(hidden, max_new_tokens, stop_tokens);
            let mut refused = true;
            while let Some(_id) = steps.sample(&model.backbone, &mut sampler).unwrap() {
                refused &= steps.sample(&model.backbone, &mut sampler).is_err();
                steps.feed(&mut session).unwrap();
            }
            (steps, refused)
        };

        let (steps, refused) = run(want.len(), &[]);
        assert!(refused, "{name}: a second sample was let through");
        assert_eq!(steps.ended(), Some(StopReason::MaxTokens), "{name}");
        assert_eq!(steps.ids(), &want[..], "{name} greedy tokens");

        // A stop token: the first token of the reference that did not come before it.
        let k = (1..want.len())
            .find(|&k| !want[..k].contains(&want[k]))
            .expect("a token that is new");
        let (steps, _) = run(want.len(), &[want[k]]);
        assert_eq!(steps.ended(), Some(StopReason::StopToken), "{name}");
        assert_eq!(
            steps.ids(),
            &want[..k],
            "{name}: the tokens before the stop token"
        );

        let (steps, _) = run(0, &[]);
        assert!(steps.ids().is_empty(), "{name}");
        assert_eq!(steps.ended(), Some(StopReason::MaxTokens), "{name}");
    }
}
