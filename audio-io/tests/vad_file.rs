//! The whole capture path on a file: espeak-ng speech with pauses → WAV (22.05 kHz) →
//! WavCapture → Listener (resampling, Silero VAD through ONNX Runtime, endpointing). The
//! boundaries must be within 100 ms of the truth. Needs `tools/fetch_vad.sh` and espeak-ng.

mod common;

use std::time::Duration;

use audio_io::vad::{VadConfig, WINDOW};
use audio_io::{
    write_wav, ListenEvent, Listener, ListenerConfig, MemoryCapture, Pacing, WavCapture,
};

fn collect(listener: Listener) -> Vec<ListenEvent> {
    let events: Vec<ListenEvent> = listener.events().iter().collect();
    match events.last() {
        Some(ListenEvent::Stopped { error: None, .. }) => events,
        other => panic!("listener did not stop cleanly: {other:?}"),
    }
}

#[test]
fn silero_scores_speech_high_and_silence_low() {
    let dir = common::scratch_dir("silero");
    let (speech, rate) = common::espeak("Testing one two three four five", &dir, "count");
    let speech = audio_io::resample::resample_clip(&speech, rate, 16_000).unwrap();
    let mut vad = common::load_vad();
    let silence = vec![0.0f32; WINDOW];
    let silent_prob = (0..10)
        .map(|_| vad.probability(&silence).unwrap())
        .fold(0.0f32, f32::max);
    vad.reset();
    let probs: Vec<f32> = speech
        .chunks_exact(WINDOW)
        .map(|w| vad.probability(w).unwrap())
        .collect();
    let speechy = probs.iter().filter(|&&p| p > 0.5).count();
    println!(
        "silence max prob {silent_prob:.3}; speech windows over 0.5: {speechy}/{}",
        probs.len()
    );
    assert!(silent_prob < 0.1, "silence scored {silent_prob}");
    assert!(
        speechy * 2 > probs.len(),
        "too few speech windows: {probs:?}"
    );
    assert!(
        vad.probability(&silence[..100]).is_err(),
        "a short window is an error"
    );
}

#[test]
fn utterance_boundaries_from_a_wav_file() {
    let dir = common::scratch_dir("vadfile");
    let clip = common::speech_with_pauses(&dir);
    let path = dir.join("speech.wav");
    write_wav(&path, &clip.samples, clip.format()).unwrap();

    let capture = WavCapture::open(&path, Pacing::AsFastAsPossible).unwrap();
    let listener = Listener::start(
        Box::new(capture),
        common::load_vad(),
        ListenerConfig::default(),
    )
    .unwrap();
    let events = collect(listener);
    common::check_boundaries(&common::utterances(&events), &clip.truth, 0.0);
}

#[test]
fn stereo_48k_source_gives_the_same_boundaries() {
    // Same speech, upsampled to 48 kHz stereo: downmix and resampling must not move boundaries.
    let dir = common::scratch_dir("vadstereo");
    let clip = common::speech_with_pauses(&dir);
    let mono48 = audio_io::resample::resample_clip(&clip.samples, clip.rate, 48_000).unwrap();
    let stereo: Vec<f32> = mono48.iter().flat_map(|&s| [s, s * 0.5]).collect();
    let capture = MemoryCapture::new(
        stereo,
        audio_io::StreamFormat::new(48_000, 2),
        Pacing::AsFastAsPossible,
    )
    .unwrap();
    let config = ListenerConfig {
        levels: true,
        ..ListenerConfig::default()
    };
    let listener = Listener::start(Box::new(capture), common::load_vad(), config).unwrap();
    let events = collect(listener);
    let levels = events
        .iter()
        .filter(|e| matches!(e, ListenEvent::Level { .. }))
        .count();
    let windows = (mono48.len() as f64 / 3.0 / WINDOW as f64) as usize;
    assert!(
        levels.abs_diff(windows) <= 1,
        "one level per window: {levels} vs {windows}"
    );
    common::check_boundaries(&common::utterances(&events), &clip.truth, 0.0);
}

#[test]
fn threshold_and_silence_knobs_change_the_result() {
    // The pauses between phrases are 1.2 s of silence plus espeak's own (about 1.55 s in
    // all): with min_silence 2 s, all is one utterance.
    let dir = common::scratch_dir("vadknobs");
    let clip = common::speech_with_pauses(&dir);
    let capture = MemoryCapture::new(
        clip.samples.clone(),
        clip.format(),
        Pacing::AsFastAsPossible,
    )
    .unwrap();
    let vad = VadConfig {
        min_silence: Duration::from_millis(2000),
        ..VadConfig::default()
    };
    let listener = Listener::start(
        Box::new(capture),
        common::load_vad(),
        ListenerConfig {
            vad,
            ..Default::default()
        },
    )
    .unwrap();
    let found = common::utterances(&collect(listener));
    assert_eq!(found.len(), 1, "{found:?}");

    // An invalid threshold is refused before anything starts.
    let format = clip.format();
    let capture = MemoryCapture::new(clip.samples, format, Pacing::AsFastAsPossible).unwrap();
    let vad = VadConfig::with_threshold(1.5);
    assert!(Listener::start(
        Box::new(capture),
        common::load_vad(),
        ListenerConfig {
            vad,
            ..Default::default()
        }
    )
    .is_err());
}
