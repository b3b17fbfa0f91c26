//! The host's client of a sandbox's agent ([`AgentClient`], [`AgentFiles`]) against an agent
//! that answers with any bytes: the first byte picks the request, the rest is all the agent
//! says after its greeting and `Ready`. Whatever it says, the client returns, never panics,
//! and its error is a short sentence.

#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use upstream_agent::protocol::{Response, write_frame, write_hello};
use upstream_sandbox::files::At;
use upstream_sandbox::{AgentClient, AgentFiles, Collect, ExecRequest, Files};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, said)) = data.split_first() else {
        return;
    };
    let (host, mut agent) = UnixStream::pair().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut first = Vec::new();
    write_hello(&mut first).unwrap();
    write_frame(&mut first, &Response::Ready).unwrap();
    // All of it fits in the socket's buffer (libFuzzer's inputs are a few KiB): the agent
    // has said everything before the client asks, and closes.
    agent.write_all(&first).unwrap();
    agent.write_all(said).unwrap();
    agent.shutdown(std::net::Shutdown::Write).unwrap();
    let mut client = AgentClient::new(host);
    let at = At::Root("/f".into());
    let error = match pick % 9 {
        0 => {
            let request = ExecRequest {
                argv: vec!["true".into()],
                collect: Some(Collect {
                    path: "/out".into(),
                    limit: 64,
                }),
                ..Default::default()
            };
            client
                .exec(&request, &mut |_, _| {})
                .err()
                .map(|e| e.to_string())
        }
        1 => client.read_file("/f", 64).err().map(|e| e.to_string()),
        2 => client
            .wait(1, Some(Duration::ZERO))
            .err()
            .map(|e| e.to_string()),
        3 => client
            .spawn(&ExecRequest::default(), "/o", "/e")
            .err()
            .map(|e| e.to_string()),
        op => {
            let files = AgentFiles::new(vec![client]);
            let result = match op {
                4 => files.stat(&at, None).map(drop),
                5 => files.list(&at, None).map(drop),
                6 => files.read_link(&at, None).map(drop),
                7 => files.remove(&at, true, (0, 0)),
                _ => files
                    .open(&at, 0, None)
                    .and_then(|(mut file, _)| file.read_to_end(&mut Vec::new()).map(drop)),
            };
            result.err().map(|e| e.to_string())
        }
    };
    if let Some(error) = error {
        assert!(error.len() < 5000, "{error}");
    }
    drop(agent);
});
