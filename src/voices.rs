//! Voice presets (`voices/*.toml`): the TTS system prompt and audio sampling of a voice. The four
//! presets of the reference are built in; more can be loaded from a directory.

use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

/// One voice preset.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Voice {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub system_prompt: String,
    pub audio_temperature: Option<f32>,
    pub audio_top_k: Option<usize>,
}

const BUILT_IN: [(&str, &str); 4] = [
    ("us-male", include_str!("../voices/us-male.toml")),
    ("us-female", include_str!("../voices/us-female.toml")),
    ("uk-male", include_str!("../voices/uk-male.toml")),
    ("uk-female", include_str!("../voices/uk-female.toml")),
];

fn parse(text: &str, origin: &str) -> anyhow::Result<Voice> {
    let voice: Voice = toml::from_str(text).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
    anyhow::ensure!(
        !voice.system_prompt.trim().is_empty(),
        "{origin}: system_prompt is empty"
    );
    if let Some(t) = voice.audio_temperature {
        anyhow::ensure!(
            t.is_finite() && t >= 0.0,
            "{origin}: audio_temperature must be >= 0"
        );
    }
    Ok(voice)
}

/// Every known voice: the built-in presets, then the `*.toml` files of `extra` (which may
/// override a built-in one by name).
pub fn all(extra: Option<&Path>) -> anyhow::Result<Vec<Voice>> {
    let mut voices = BUILT_IN
        .iter()
        .map(|(name, text)| parse(text, &format!("built-in voice {name}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(dir) = extra {
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("reading voices from {}", dir.display()))?;
        let mut paths: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        paths.sort();
        for path in paths {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let voice = parse(&text, &path.display().to_string())?;
            voices.retain(|v| v.name != voice.name);
            voices.push(voice);
        }
    }
    Ok(voices)
}

/// The voice called `name`, or an error listing the known ones.
pub fn find(name: &str, extra: Option<&Path>) -> anyhow::Result<Voice> {
    let voices = all(extra)?;
    if let Some(v) = voices.iter().find(|v| v.name == name) {
        return Ok(v.clone());
    }
    let names: Vec<&str> = voices.iter().map(|v| v.name.as_str()).collect();
    anyhow::bail!("unknown voice {name:?}; known voices: {}", names.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_voices_are_the_reference_prompts() {
        let v = find("uk-female", None).unwrap();
        assert_eq!(v.system_prompt, "Perform TTS. Use the UK female voice.");
        assert_eq!(all(None).unwrap().len(), 4);
        let err = find("robot", None).unwrap_err().to_string();
        assert!(
            err.contains("us-male, us-female, uk-male, uk-female"),
            "{err}"
        );
    }
}
