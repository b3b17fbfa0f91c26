//! The host's decoder of what a sandbox's agent sends ([`read_frame`], [`read_hello`]), on
//! any bytes: it returns a frame or an error, never panics, and takes in no more memory than
//! the bytes that came (whatever a length prefix or a length inside a frame claims).

#![no_main]

use libfuzzer_sys::fuzz_target;
use upstream_agent::protocol::{Response, read_frame, read_hello};

fuzz_target!(|data: &[u8]| {
    let _ = read_hello(&mut &data[..]);
    let mut rest = data;
    loop {
        match read_frame::<_, Response>(&mut rest) {
            Ok(Some(response)) => {
                // What the client does with an answer out of turn: names its kind.
                let _ = response.name();
            }
            Ok(None) => break,
            Err(e) => {
                assert!(e.to_string().len() < 1000, "{e}");
                break;
            }
        }
    }
});
