//! The Wyoming event reader: any bytes give events, "need more", or an error that makes
//! progress, never a panic, a hang or a runaway allocation. The module is included by path (the
//! lfm2d package is a binary crate; the reader depends on nothing of it but serde_json).
#![no_main]

#[allow(dead_code, clippy::all)]
#[path = "../../src/wyoming/protocol.rs"]
mod protocol;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Small limits, so that the oversize paths are reached by short inputs too.
    let limits = protocol::Limits {
        max_header: 512,
        max_data: 1024,
        max_payload: 4096,
    };
    let mut rest = data;
    // Read events one after another as the server does; each step must consume input or stop.
    for _ in 0..64 {
        match protocol::parse_event(rest, &limits) {
            Ok(Some((event, used))) => {
                assert!(used > 0 && used <= rest.len());
                let _ = event.encode();
                rest = &rest[used..];
            }
            Ok(None) => break,
            Err(e) => match e.resync {
                protocol::Resync::Skip(n) => {
                    // An error that consumed nothing would stall the connection.
                    assert!(n > 0, "{e}");
                    if n >= rest.len() {
                        break;
                    }
                    rest = &rest[n..];
                }
                protocol::Resync::Close => break,
            },
        }
    }
});
