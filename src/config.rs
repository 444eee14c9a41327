//! The daemon's configuration file (`config/lfm2d.toml` documents every key). Unknown keys and
//! wrong types are errors that name the line.

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub model: ModelSection,
    pub audio: AudioSection,
    pub vad: VadSection,
    pub echo: EchoSection,
    pub assistant: AssistantSection,
    pub sampling: SamplingSection,
    pub wyoming: WyomingSection,
    pub tools: Vec<dialog::tools::ToolSpec>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    pub dir: String,
    pub quant: String,
    pub threads: usize,
    pub codec: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AudioSection {
    pub input: String,
    pub output: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct VadSection {
    pub threshold: f32,
    pub prefix_padding_ms: u64,
    pub silence_duration_ms: u64,
    pub min_speech_ms: u64,
    pub pause_ms: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EchoSection {
    pub mode: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AssistantSection {
    pub mode: String,
    pub system_prompt: String,
    pub voice: String,
    pub translate_to: String,
    pub transcript_file: String,
    pub speak_translation: bool,
    pub max_reply_tokens: usize,
    pub context_limit: usize,
    pub builtin_tools: bool,
    pub max_tool_rounds: usize,
    pub transcribe_user: bool,
    /// Start the reply when the user pauses, before the end of the silence confirms the turn
    /// (played only once it does; dropped exactly if the user goes on).
    pub speculative_start: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingSection {
    pub text_temperature: f32,
    pub text_top_k: usize,
    pub audio_temperature: f32,
    pub audio_top_k: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WyomingSection {
    pub address: String,
    pub zeroconf: bool,
    pub system_prompt: String,
}

// The defaults are the values written in config/lfm2d.toml (a test checks they agree).
impl Default for ModelSection {
    fn default() -> Self {
        Self {
            dir: String::new(),
            quant: "q4".into(),
            threads: 0,
            codec: "auto".into(),
        }
    }
}

impl Default for AudioSection {
    fn default() -> Self {
        Self {
            input: "default".into(),
            output: "default".into(),
        }
    }
}

impl Default for VadSection {
    fn default() -> Self {
        Self {
            threshold: 0.5,
            prefix_padding_ms: 300,
            silence_duration_ms: 500,
            min_speech_ms: 250,
            pause_ms: 64,
        }
    }
}

impl Default for EchoSection {
    fn default() -> Self {
        Self {
            mode: "cancel".into(),
        }
    }
}

impl Default for AssistantSection {
    fn default() -> Self {
        Self {
            mode: "assistant".into(),
            system_prompt: "Respond with interleaved text and audio.".into(),
            voice: "us-female".into(),
            translate_to: String::new(),
            transcript_file: String::new(),
            speak_translation: false,
            max_reply_tokens: 1024,
            context_limit: 4096,
            builtin_tools: true,
            max_tool_rounds: 3,
            transcribe_user: true,
            speculative_start: true,
        }
    }
}

impl Default for SamplingSection {
    fn default() -> Self {
        Self {
            text_temperature: 0.0,
            text_top_k: 0,
            audio_temperature: 1.0,
            audio_top_k: 4,
            seed: 0,
        }
    }
}

impl Default for WyomingSection {
    fn default() -> Self {
        Self {
            address: String::new(),
            zeroconf: true,
            system_prompt: "You are a helpful voice assistant in a smart home. Answer in one or two short sentences of plain text.".into(),
        }
    }
}

impl Config {
    /// Parses a configuration; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> anyhow::Result<Self> {
        let cfg: Config = toml::from_str(text)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), one_line(&e.to_string())))?;
        cfg.validate()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Self::parse(&text, path)
    }

    fn validate(&self) -> Result<(), String> {
        let one_of = |key: &str, v: &str, allowed: &[&str]| {
            if allowed.contains(&v) {
                Ok(())
            } else {
                Err(format!(
                    "{key} = {v:?}: expected one of {}",
                    allowed.join(", ")
                ))
            }
        };
        let presets = crate::cmd::runtime::Quant::ALL.map(|(name, _)| name);
        one_of("model.quant", &self.model.quant, &presets)?;
        one_of("model.codec", &self.model.codec, &["auto", "lfm2", "mimi"])?;
        one_of(
            "echo.mode",
            &self.echo.mode,
            &["cancel", "gate", "half-duplex", "off"],
        )?;
        one_of(
            "assistant.mode",
            &self.assistant.mode,
            &["assistant", "transcribe", "translate", "speak"],
        )?;
        if !(0.0..=1.0).contains(&self.vad.threshold) {
            return Err(format!(
                "vad.threshold = {}: expected a probability in [0, 1]",
                self.vad.threshold
            ));
        }
        if self.assistant.mode == "translate" && self.assistant.translate_to.trim().is_empty() {
            return Err("assistant.translate_to is required in translate mode".into());
        }
        for (key, t) in [
            ("sampling.text_temperature", self.sampling.text_temperature),
            (
                "sampling.audio_temperature",
                self.sampling.audio_temperature,
            ),
        ] {
            if !(t.is_finite() && t >= 0.0) {
                return Err(format!("{key} = {t}: expected a number >= 0"));
            }
        }
        let max_threads = lfm2_audio::quant::MAX_THREADS;
        if self.model.threads > max_threads {
            return Err(format!(
                "model.threads = {}: expected 0 (one per core) to {max_threads}; more than the \
                 cores are clamped to the core count",
                self.model.threads
            ));
        }
        if self.assistant.max_reply_tokens == 0 {
            return Err("assistant.max_reply_tokens must be at least 1".into());
        }
        for tool in &self.tools {
            if tool.name.is_empty() || tool.command.is_empty() {
                return Err(format!("tools: {:?} needs a name and a command", tool.name));
            }
            let max = dialog::tools::MAX_TOOL_TIMEOUT_SECS;
            if !(tool.timeout_secs > 0.0 && tool.timeout_secs <= max) {
                return Err(format!(
                    "tools: {:?}: timeout_secs = {}: expected a number of seconds in (0, {max}]",
                    tool.name, tool.timeout_secs
                ));
            }
        }
        Ok(())
    }

    /// The model directory: the configured one, else the default cache location.
    pub fn model_dir(&self) -> Option<PathBuf> {
        (!self.model.dir.is_empty()).then(|| PathBuf::from(&self.model.dir))
    }
}

fn one_line(s: &str) -> String {
    // toml's messages span lines (a source excerpt); keep "line N, column M" and the reason.
    s.lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with('|') && !l.chars().all(|c| c == '^' || c == ' ')
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundled_file_is_the_default() {
        let bundled = Config::parse(
            include_str!("../config/lfm2d.toml"),
            Path::new("config/lfm2d.toml"),
        )
        .unwrap();
        assert_eq!(bundled, Config::default());
        let cfg = Config::default();
        assert_eq!(cfg.model.quant, "q4");
        assert_eq!(cfg.vad.silence_duration_ms, 500);
        assert_eq!(
            cfg.assistant.system_prompt,
            "Respond with interleaved text and audio."
        );
        assert_eq!(Config::parse("", Path::new("empty.toml")).unwrap(), cfg);
    }

    #[test]
    fn errors_name_the_line_or_key() {
        let err = Config::parse("[vad]\nthreshold = \"high\"\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.toml") && err.contains("line 2"), "{err}");
        let err = Config::parse("[vad]\nthreshhold = 0.4\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("threshhold") && err.contains("line 2"),
            "{err}"
        );
        let err = Config::parse("[model]\nquant = \"q3\"\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.quant") && err.contains("q4"), "{err}");
        assert!(err.contains("mixed") && err.contains("q4k"), "{err}");
        for preset in ["f32", "q8", "q6k", "mixed", "q4k", "q4"] {
            let cfg = Config::parse(
                &format!("[model]\nquant = \"{preset}\"\n"),
                Path::new("c.toml"),
            )
            .unwrap();
            assert_eq!(cfg.model.quant, preset);
        }
        let err = Config::parse("[assistant]\nmode = \"translate\"\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("translate_to"), "{err}");
    }

    #[test]
    fn absurd_threads_and_tool_timeouts_are_refused() {
        let err = Config::parse("[model]\nthreads = 100000\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.threads = 100000"), "{err}");
        for t in ["inf", "nan", "-1.0", "0.0", "1e9"] {
            let text = format!(
                "[[tools]]\nname = \"w\"\ndescription = \"W\"\ncommand = [\"true\"]\ntimeout_secs = {t}\n"
            );
            let err = Config::parse(&text, Path::new("c.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("timeout_secs"), "{t}: {err}");
        }
        // A spec made elsewhere still runs with a bounded time.
        assert_eq!(
            dialog::tools::tool_timeout(f64::INFINITY).as_secs_f64(),
            dialog::tools::MAX_TOOL_TIMEOUT_SECS
        );
        assert_eq!(
            dialog::tools::tool_timeout(f64::NAN).as_secs_f64(),
            dialog::tools::MAX_TOOL_TIMEOUT_SECS
        );
    }

    #[test]
    fn tools_are_read() {
        let cfg = Config::parse(
            "[[tools]]\nname = \"weather\"\ndescription = \"Weather\"\ncommand = [\"sh\", \"-c\", \"echo sunny\"]\n",
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!(cfg.tools[0].name, "weather");
        assert_eq!(cfg.tools[0].timeout_secs, 10.0);
    }
}
