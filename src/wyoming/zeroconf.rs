//! The mDNS announcement (`_wyoming._tcp.local.`) by which Home Assistant discovers the server.
//!
//! A server on a loopback address is announced on the loopback interfaces only (a Home
//! Assistant on the same machine can use it; others could not reach it anyway); one on a
//! specific address with that address; one on all addresses (0.0.0.0) with every address of the
//! machine, kept up to date.

use std::net::{IpAddr, SocketAddr};

use mdns_sd::{IfKind, ServiceDaemon, ServiceInfo};

/// The service type Home Assistant's wyoming integration browses for.
pub const SERVICE_TYPE: &str = "_wyoming._tcp.local.";

/// A running announcement; dropping it withdraws it.
pub struct Announcement {
    daemon: ServiceDaemon,
    fullname: String,
    instance: String,
}

impl Announcement {
    /// The instance name shown in Home Assistant.
    pub fn instance(&self) -> &str {
        &self.instance
    }
}

impl Drop for Announcement {
    fn drop(&mut self) {
        let _ = self.daemon.unregister(&self.fullname);
        let _ = self.daemon.shutdown();
    }
}

fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let clean: String = raw
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let clean = clean.trim_matches('-');
    if clean.is_empty() {
        "lfm2d".into()
    } else {
        clean.to_owned()
    }
}

/// Announces the server listening at `addr` on the standard mDNS port.
pub fn announce(addr: SocketAddr) -> anyhow::Result<Announcement> {
    announce_on(addr, mdns_sd::MDNS_PORT)
}

/// Announces with the mDNS traffic on `mdns_port` (5353 but in tests).
pub fn announce_on(addr: SocketAddr, mdns_port: u16) -> anyhow::Result<Announcement> {
    let daemon = ServiceDaemon::new_with_port(mdns_port)
        .map_err(|e| anyhow::anyhow!("starting mDNS: {e}"))?;
    let host = host_name();
    let instance = format!("lfm2d-{host}");
    let host_domain = format!("{host}.local.");
    let ip = addr.ip();
    let info = if ip.is_unspecified() {
        ServiceInfo::new(SERVICE_TYPE, &instance, &host_domain, "", addr.port(), None)
            .map(ServiceInfo::enable_addr_auto)
    } else {
        if ip.is_loopback() {
            let _ = daemon.disable_interface(IfKind::All);
            let _ = daemon.enable_interface(match ip {
                IpAddr::V4(_) => IfKind::LoopbackV4,
                IpAddr::V6(_) => IfKind::LoopbackV6,
            });
        } else {
            let _ = daemon.disable_interface(IfKind::All);
            let _ = daemon.enable_interface(IfKind::Addr(ip));
        }
        ServiceInfo::new(SERVICE_TYPE, &instance, &host_domain, ip, addr.port(), None)
    }
    .map_err(|e| anyhow::anyhow!("describing the service: {e}"))?;
    let fullname = info.get_fullname().to_owned();
    daemon
        .register(info)
        .map_err(|e| anyhow::anyhow!("announcing {fullname}: {e}"))?;
    Ok(Announcement {
        daemon,
        fullname,
        instance,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// The announcement starts; where multicast works (it may not in a sandbox) a browser on the
    /// same machine finds it with the right port. A private mDNS port keeps the test off the
    /// network's real mDNS.
    #[test]
    fn the_announcement_starts_and_is_found_where_multicast_works() {
        let port = 47_000 + (std::process::id() % 1000) as u16;
        let addr: SocketAddr = "127.0.0.1:10355".parse().unwrap();
        let announcement = match announce_on(addr, port) {
            Ok(a) => a,
            Err(e) => {
                eprintln!(
                    "*** SKIPPED: mDNS cannot start here ({e:#}); the announcement is not checked"
                );
                return;
            }
        };
        assert!(announcement.instance().starts_with("lfm2d-"));
        let browser = ServiceDaemon::new_with_port(port).unwrap();
        let _ = browser.disable_interface(IfKind::All);
        let _ = browser.enable_interface(IfKind::LoopbackV4);
        let events = browser.browse(SERVICE_TYPE).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut found = None;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match events.recv_timeout(left) {
                Ok(mdns_sd::ServiceEvent::ServiceResolved(info)) => {
                    found = Some(info.get_port());
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let _ = browser.shutdown();
        match found {
            Some(p) => assert_eq!(p, 10355),
            None => eprintln!(
                "*** NOT VERIFIED: the announcement started, but no mDNS answer came back over loopback multicast here"
            ),
        }
    }
}
