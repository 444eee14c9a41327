//! Sound cards through cpal, one module per job:
//! - `selection`: listing the devices ([`list_devices`]) and finding the one a
//!   [`DeviceSelector`] names;
//! - `stream`: opening and starting a cpal stream with a short period, and the error callback;
//! - `reopen`: noticing a stream that failed or stalled and reopening it with backoff, each step
//!   reported as a [`DeviceEvent`];
//! - `capture` and `playback`: [`DeviceCapture`] and [`DevicePlayback`], the two stream ends the
//!   rest of the crate uses.

mod capture;
mod playback;
mod reopen;
mod selection;
mod stream;

pub use capture::DeviceCapture;
pub use playback::DevicePlayback;
pub use reopen::DeviceEvent;
pub use selection::{find_device, list_devices, DeviceInfo, DeviceSelector, Direction};
pub use stream::DEVICE_PERIOD;
