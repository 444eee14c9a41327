//! `lfm2d listen`: a live view of the microphone: level meter, VAD state, and utterance
//! boundaries as they happen; optionally each utterance saved as a WAV file.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use audio_io::vad::{SileroVad, VadAssets, VadConfig, VadEvent};
use audio_io::{
    write_wav, Capture, DeviceCapture, DeviceSelector, ListenEvent, Listener, ListenerConfig,
    Pacing, StreamFormat, WavCapture,
};
use lfm2_audio::format::INPUT_SAMPLE_RATE;

#[derive(clap::Args)]
pub struct Args {
    /// Input device: a name (or unique part of one) or an index from `lfm2d devices`.
    #[arg(long, short, default_value = "default")]
    device: DeviceSelector,
    /// Listen to a WAV file (in real time) instead of a device.
    #[arg(long, conflicts_with = "device")]
    file: Option<PathBuf>,
    /// Save each utterance (16 kHz mono, with pre-roll) as DIR/utterance-NNNN.wav.
    #[arg(long, value_name = "DIR")]
    record: Option<PathBuf>,
    /// Speech probability that starts speech (0..1).
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    /// Silence that ends an utterance, in milliseconds.
    #[arg(long, default_value_t = 500)]
    min_silence_ms: u64,
    /// Shortest speech that counts, in milliseconds.
    #[arg(long, default_value_t = 250)]
    min_speech_ms: u64,
    /// Audio kept before the start of speech, in milliseconds.
    #[arg(long, default_value_t = 300)]
    prefix_padding_ms: u64,
    /// Stop after this many seconds (default: until interrupted or the file ends).
    #[arg(long)]
    seconds: Option<f64>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(s) = args.seconds {
        anyhow::ensure!(
            s.is_finite() && (0.0..=1e9).contains(&s),
            "--seconds must be a number of seconds from 0 to 1e9, got {s}"
        );
    }
    let vad_config = VadConfig {
        min_silence: Duration::from_millis(args.min_silence_ms),
        min_speech: Duration::from_millis(args.min_speech_ms),
        prefix_padding: Duration::from_millis(args.prefix_padding_ms),
        ..VadConfig::with_threshold(args.threshold)
    };
    vad_config.validate().map_err(anyhow::Error::msg)?;
    if let Some(dir) = &args.record {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let assets = VadAssets::locate()?;
    let vad = SileroVad::load(&assets)?;
    let capture: Box<dyn Capture> = match &args.file {
        Some(path) => Box::new(WavCapture::open(path, Pacing::RealTime)?),
        None => Box::new(DeviceCapture::open(&args.device)?),
    };
    let config = ListenerConfig {
        vad: vad_config,
        levels: true,
        tap_audio: false,
    };
    let listener = Listener::start(capture, vad, config)?;
    let mut view = View::new(args.record.clone());
    let mut deadline = args
        .seconds
        .map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    loop {
        let timeout = deadline.map_or(Duration::from_millis(200), |d| {
            d.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(200))
        });
        match listener.events().recv_timeout(timeout) {
            Ok(ListenEvent::Stopped { stats, error }) => {
                view.stopped(&stats);
                return match error {
                    Some(e) => Err(anyhow::anyhow!("capture stopped: {e}")),
                    None => Ok(()),
                };
            }
            Ok(event) => view.show(event)?,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return Ok(()),
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            // The pump finishes its current read, closes an open utterance and says Stopped.
            listener.request_stop();
            deadline = None;
        }
    }
}

struct View {
    tty: bool,
    record: Option<PathBuf>,
    utterances: usize,
    last_level_line: Instant,
    meter_shown: bool,
}

impl View {
    fn new(record: Option<PathBuf>) -> Self {
        Self {
            tty: std::io::stdout().is_terminal(),
            record,
            utterances: 0,
            last_level_line: Instant::now(),
            meter_shown: false,
        }
    }

    fn line(&mut self, text: &str) {
        if self.tty && self.meter_shown {
            print!("\r\x1b[2K");
            self.meter_shown = false;
        }
        println!("{text}");
    }

    fn show(&mut self, event: ListenEvent) -> anyhow::Result<()> {
        match event {
            ListenEvent::Started { source, format } => {
                self.line(&format!(
                    "listening on {source:?} ({format}); VAD windows of 32 ms at 16 kHz"
                ));
            }
            ListenEvent::Level {
                at,
                rms_dbfs,
                peak_dbfs,
                speech_prob,
                in_speech,
            } => {
                let state = if in_speech { "SPEECH" } else { "silence" };
                if self.tty {
                    // A 40-column bar for -80..0 dBFS.
                    let filled = (((rms_dbfs + 80.0) / 80.0).clamp(0.0, 1.0) * 40.0) as usize;
                    print!(
                        "\r\x1b[2K{:>8.2}s [{}{}] {:>6.1} dBFS (peak {:>6.1})  vad {:.2}  {state}",
                        at.as_secs_f64(),
                        "#".repeat(filled),
                        ".".repeat(40 - filled),
                        rms_dbfs,
                        peak_dbfs,
                        speech_prob
                    );
                    std::io::stdout().flush()?;
                    self.meter_shown = true;
                } else if self.last_level_line.elapsed() >= Duration::from_secs(1) {
                    self.last_level_line = Instant::now();
                    println!(
                        "{:>8.2}s level {rms_dbfs:.1} dBFS peak {peak_dbfs:.1} vad {speech_prob:.2} {state}",
                        at.as_secs_f64()
                    );
                }
            }
            ListenEvent::Vad {
                event: VadEvent::SpeechStarted { at },
                latency,
                ..
            } => {
                self.line(&format!(
                    "{:>8.2}s speech started (event {:.1} ms after the deciding sample)",
                    at.as_secs_f64(),
                    latency.as_secs_f64() * 1e3
                ));
            }
            ListenEvent::Vad {
                event:
                    VadEvent::SpeechEnded {
                        started, at, audio, ..
                    },
                latency,
                ..
            } => {
                self.utterances += 1;
                let mut text = format!(
                    "{:>8.2}s speech ended: {:.2} s utterance (event {:.1} ms after the deciding sample)",
                    at.as_secs_f64(),
                    (at - started).as_secs_f64(),
                    latency.as_secs_f64() * 1e3
                );
                if let Some(dir) = &self.record {
                    let path = dir.join(format!("utterance-{:04}.wav", self.utterances));
                    write_wav(&path, &audio, StreamFormat::new(INPUT_SAMPLE_RATE, 1))?;
                    text.push_str(&format!(", saved {}", path.display()));
                }
                self.line(&text);
            }
            ListenEvent::Vad {
                event: VadEvent::SpeechPaused { at, .. },
                ..
            } => self.line(&format!("{:>8.2}s speech paused", at.as_secs_f64())),
            ListenEvent::Vad {
                event: VadEvent::SpeechResumed { at },
                ..
            } => self.line(&format!("{:>8.2}s speech resumed", at.as_secs_f64())),
            ListenEvent::Device(event) => self.line(&format!("device: {event}")),
            ListenEvent::Audio { .. } | ListenEvent::Stopped { .. } => {}
        }
        Ok(())
    }

    fn stopped(&mut self, stats: &audio_io::StreamStats) {
        self.line(&format!(
            "stopped: {} utterance(s); capture {} frames, {} ring overflow(s), {} driver xrun(s), \
             callbacks {} (mean {:?}, max {:?}, {} frames each)",
            self.utterances,
            stats.frames,
            stats.xruns,
            stats.device_xruns,
            stats.callbacks,
            stats.callback_mean,
            stats.callback_max,
            stats.period_frames
        ));
    }
}
