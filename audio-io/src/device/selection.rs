//! Which sound card: listing the devices of a direction and finding the one a
//! [`DeviceSelector`] names (the default, an index in the listing, or a name).

use std::str::FromStr;

use cpal::traits::{DeviceTrait, HostTrait};
use cpal::SampleFormat;

use crate::{AudioError, StreamFormat};

/// Capture or playback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Input,
    Output,
}

impl Direction {
    pub(super) fn word(self) -> &'static str {
        match self {
            Direction::Input => "input",
            Direction::Output => "output",
        }
    }
}

/// Which device to open: the system default, the n-th in [`list_devices`] order, or by name
/// (exact, else a unique case-insensitive substring).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DeviceSelector {
    #[default]
    Default,
    Index(usize),
    Name(String),
}

impl FromStr for DeviceSelector {
    type Err = std::convert::Infallible;

    /// `""` or `"default"` is the default device, a number is an index, anything else a name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        Ok(if s.is_empty() || s.eq_ignore_ascii_case("default") {
            DeviceSelector::Default
        } else if let Ok(i) = s.parse::<usize>() {
            DeviceSelector::Index(i)
        } else {
            DeviceSelector::Name(s.to_string())
        })
    }
}

impl std::fmt::Display for DeviceSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSelector::Default => f.write_str("default"),
            DeviceSelector::Index(i) => write!(f, "#{i}"),
            DeviceSelector::Name(n) => f.write_str(n),
        }
    }
}

/// One device as `lfm2d devices` shows it.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// Position in the listing for its direction; `--device N` picks it.
    pub index: usize,
    pub name: String,
    /// What the host says the device is.
    pub description: String,
    /// The host's stable identifier.
    pub id: String,
    pub is_default: bool,
    /// The format a stream opens with (the device's default), with its sample format.
    pub default_format: Option<(StreamFormat, String)>,
    /// Rate ranges and channel counts the device supports, for display.
    pub supported: Vec<String>,
}

/// The short name of a device: its host id without the host prefix (`alsa:pulse` → `pulse`),
/// which is what ALSA and PulseAudio tools call it too.
fn device_name(device: &cpal::Device) -> String {
    let id = device_id(device);
    match id.split_once(':') {
        Some((_, name)) if !name.is_empty() => name.to_string(),
        _ => device_description(device),
    }
}

/// The host's human-readable description of a device.
fn device_description(device: &cpal::Device) -> String {
    device
        .description()
        .map(|d| d.name().to_string())
        .unwrap_or_else(|_| device.to_string())
}

fn device_id(device: &cpal::Device) -> String {
    device.id().map(|id| id.to_string()).unwrap_or_default()
}

pub(super) fn default_config(
    device: &cpal::Device,
    direction: Direction,
) -> Result<cpal::SupportedStreamConfig, cpal::Error> {
    match direction {
        Direction::Input => device.default_input_config(),
        Direction::Output => device.default_output_config(),
    }
}

fn host_devices(direction: Direction) -> Result<(cpal::Host, Vec<cpal::Device>), AudioError> {
    let host = cpal::default_host();
    let devices = match direction {
        Direction::Input => host.input_devices().map(|d| d.collect()),
        Direction::Output => host.output_devices().map(|d| d.collect()),
    }
    .map_err(|e| AudioError::Device {
        device: host.id().name().to_string(),
        message: e.to_string(),
    })?;
    Ok((host, devices))
}

/// Lists the devices of one direction on the default host (ALSA on Linux).
pub fn list_devices(direction: Direction) -> Result<Vec<DeviceInfo>, AudioError> {
    let (host, devices) = host_devices(direction)?;
    let default_id = match direction {
        Direction::Input => host.default_input_device(),
        Direction::Output => host.default_output_device(),
    }
    .map(|d| device_id(&d));
    Ok(devices
        .iter()
        .enumerate()
        .map(|(index, device)| {
            let id = device_id(device);
            let default_format = default_config(device, direction).ok().map(|c| {
                (
                    StreamFormat::new(c.sample_rate(), c.channels()),
                    c.sample_format().to_string(),
                )
            });
            let ranges: Vec<cpal::SupportedStreamConfigRange> = match direction {
                Direction::Input => device.supported_input_configs().map(|r| r.collect()),
                Direction::Output => device.supported_output_configs().map(|r| r.collect()),
            }
            .unwrap_or_default();
            let supported = summarize_ranges(&ranges);
            DeviceInfo {
                index,
                name: device_name(device),
                description: device_description(device),
                is_default: default_id.as_deref() == Some(id.as_str()),
                id,
                default_format,
                supported,
            }
        })
        .collect())
}

/// One line per sample format and rate range, with the channel counts collapsed
/// ("8000-192000 Hz, 1-32 ch, i16"): ALSA plugins list every channel count separately.
fn summarize_ranges(ranges: &[cpal::SupportedStreamConfigRange]) -> Vec<String> {
    let mut groups: Vec<(u32, u32, SampleFormat, u16, u16)> = Vec::new();
    for r in ranges {
        let key = (r.min_sample_rate(), r.max_sample_rate(), r.sample_format());
        match groups.iter_mut().find(|g| (g.0, g.1, g.2) == key) {
            Some(g) => {
                g.3 = g.3.min(r.channels());
                g.4 = g.4.max(r.channels());
            }
            None => groups.push((key.0, key.1, key.2, r.channels(), r.channels())),
        }
    }
    groups
        .into_iter()
        .map(|(lo, hi, format, ch_lo, ch_hi)| {
            let rates = if lo == hi {
                format!("{lo} Hz")
            } else {
                format!("{lo}-{hi} Hz")
            };
            let channels = if ch_lo == ch_hi {
                format!("{ch_lo} ch")
            } else {
                format!("{ch_lo}-{ch_hi} ch")
            };
            format!("{rates}, {channels}, {format}")
        })
        .collect()
}

fn no_device_hint() -> String {
    "; is a sound card connected, or a sound server (PulseAudio, PipeWire) running? \
     `lfm2d devices` lists what is available"
        .to_string()
}

/// Finds the device a selector names.
pub fn find_device(
    direction: Direction,
    selector: &DeviceSelector,
) -> Result<(cpal::Device, String), AudioError> {
    let (host, devices) = host_devices(direction)?;
    let word = direction.word();
    let available = || {
        if devices.is_empty() {
            "none".to_string()
        } else {
            devices
                .iter()
                .enumerate()
                .map(|(i, d)| format!("#{i} {:?}", device_name(d)))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let found = match selector {
        DeviceSelector::Default => {
            let default = match direction {
                Direction::Input => host.default_input_device(),
                Direction::Output => host.default_output_device(),
            };
            return default
                .map(|d| {
                    let name = device_name(&d);
                    (d, name)
                })
                .ok_or_else(|| AudioError::NoDevice {
                    direction: word,
                    hint: no_device_hint(),
                });
        }
        DeviceSelector::Index(i) => devices.get(*i).cloned(),
        DeviceSelector::Name(wanted) => {
            let exact = devices
                .iter()
                .find(|d| device_name(d) == *wanted || device_id(d) == *wanted);
            match exact {
                Some(d) => Some(d.clone()),
                None => {
                    let lower = wanted.to_lowercase();
                    let mut matches = devices.iter().filter(|d| {
                        device_name(d).to_lowercase().contains(&lower)
                            || device_description(d).to_lowercase().contains(&lower)
                    });
                    match (matches.next(), matches.next()) {
                        (Some(d), None) => Some(d.clone()),
                        _ => None,
                    }
                }
            }
        }
    };
    if devices.is_empty() {
        return Err(AudioError::NoDevice {
            direction: word,
            hint: no_device_hint(),
        });
    }
    found
        .map(|d| {
            let name = device_name(&d);
            (d, name)
        })
        .ok_or_else(|| AudioError::DeviceNotFound {
            direction: word,
            wanted: selector.to_string(),
            available: available(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_parses_default_index_and_name() {
        assert_eq!(
            "".parse::<DeviceSelector>().unwrap(),
            DeviceSelector::Default
        );
        assert_eq!(
            "Default".parse::<DeviceSelector>().unwrap(),
            DeviceSelector::Default
        );
        assert_eq!(
            "3".parse::<DeviceSelector>().unwrap(),
            DeviceSelector::Index(3)
        );
        assert_eq!(
            "pulse".parse::<DeviceSelector>().unwrap(),
            DeviceSelector::Name("pulse".into())
        );
    }
}
