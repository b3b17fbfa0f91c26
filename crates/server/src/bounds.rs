//! Bounds on what a request may ask for, checked when it is read: durations, sizes, limits,
//! metadata, environments, command lines. A value out of bounds is a 400 that names the
//! field and the bound, so nothing later (a deadline, a cgroup value, the daemon's memory)
//! meets a number it cannot hold.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::error::ApiError;

/// The longest duration a request may name: 365 days, in seconds.
pub const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;
/// Memory a sandbox may ask for, as a document may: from what an agent, a shell and a
/// step's files in /run need, to 1 PiB.
pub const MIN_MEMORY: u64 = upstream_doc::front_matter::MIN_MEMORY;
pub const MAX_MEMORY: u64 = upstream_doc::front_matter::MAX_MEMORY;
/// Disk a sandbox may ask for, as a document may.
pub const MIN_DISK: u64 = upstream_doc::front_matter::MIN_DISK;
pub const MAX_DISK: u64 = upstream_doc::front_matter::MAX_DISK;
/// CPUs a sandbox may ask for.
pub const MIN_CPUS: f64 = 0.01;
pub const MAX_CPUS: f64 = 1024.0;
/// Processes a sandbox may ask for (the kernel's largest pid_max).
pub const MAX_PIDS: u64 = 1 << 22;

/// Metadata of one sandbox: entries, bytes of a key, of a value, of all of them.
pub const MAX_METADATA_ENTRIES: usize = 64;
pub const MAX_METADATA_KEY: usize = 128;
pub const MAX_METADATA_VALUE: usize = 1024;
pub const MAX_METADATA_TOTAL: usize = 16 << 10;

/// Environment variables of a sandbox or a command: entries, bytes of a name, of a value
/// (the kernel's own limit on one string given to a program, `MAX_ARG_STRLEN`), and of
/// all of them.
pub const MAX_ENV_ENTRIES: usize = 4096;
pub const MAX_ENV_NAME: usize = 1024;
pub const MAX_ENV_VALUE: usize = 128 << 10;
pub const MAX_ENV_TOTAL: usize = 1 << 20;

/// A command line: arguments, bytes of one, of all of them.
pub const MAX_ARGS: usize = 4096;
pub const MAX_ARG: usize = 128 << 10;
pub const MAX_ARGS_TOTAL: usize = 1 << 20;

/// A path in a sandbox (`cwd`), and an image's name.
pub const MAX_PATH: usize = 4096;
pub const MAX_IMAGE: usize = 1024;

/// Secrets given with a turn: entries, and bytes of a name and of a value.
pub const MAX_SECRETS: usize = 256;
pub const MAX_SECRET_NAME: usize = 256;
pub const MAX_SECRET_VALUE: usize = 64 << 10;

/// A number of seconds from 0 to [`MAX_SECONDS`]: `None` when absent, `Some(None)` for 0
/// (never), else the duration.
pub fn seconds(value: Option<f64>, field: &str) -> Result<Option<Option<Duration>>, ApiError> {
    match value {
        None => Ok(None),
        Some(s) if s.is_finite() && (0.0..=MAX_SECONDS).contains(&s) => {
            Ok(Some((s > 0.0).then(|| Duration::from_secs_f64(s))))
        }
        Some(s) => Err(ApiError::bad_request(format!(
            "`{field}` is {s}; give a number of seconds from 0 (none) to {MAX_SECONDS} (365 days)"
        ))),
    }
}

/// Bytes of memory within [`MIN_MEMORY`]..=[`MAX_MEMORY`].
pub fn memory(bytes: u64, field: &str) -> Result<u64, ApiError> {
    if (MIN_MEMORY..=MAX_MEMORY).contains(&bytes) {
        return Ok(bytes);
    }
    Err(ApiError::bad_request(format!(
        "`{field}` is {bytes} bytes; give from {} ({MIN_MEMORY} bytes) to {} ({MAX_MEMORY} bytes)",
        upstream_doc::front_matter::format_size(MIN_MEMORY),
        upstream_doc::front_matter::format_size(MAX_MEMORY),
    )))
}

/// Bytes of disk within [`MIN_DISK`]..=[`MAX_DISK`].
pub fn disk(bytes: u64, field: &str) -> Result<u64, ApiError> {
    if (MIN_DISK..=MAX_DISK).contains(&bytes) {
        return Ok(bytes);
    }
    Err(ApiError::bad_request(format!(
        "`{field}` is {bytes} bytes; give from {} ({MIN_DISK} bytes) to {} ({MAX_DISK} bytes)",
        upstream_doc::front_matter::format_size(MIN_DISK),
        upstream_doc::front_matter::format_size(MAX_DISK),
    )))
}

/// CPUs within [`MIN_CPUS`]..=[`MAX_CPUS`].
pub fn cpus(cpus: f64, field: &str) -> Result<f64, ApiError> {
    if cpus.is_finite() && (MIN_CPUS..=MAX_CPUS).contains(&cpus) {
        return Ok(cpus);
    }
    Err(ApiError::bad_request(format!(
        "`{field}` is {cpus}; give a number of CPUs from {MIN_CPUS} to {MAX_CPUS}"
    )))
}

/// Processes within 1..=[`MAX_PIDS`].
pub fn pids(pids: u64, field: &str) -> Result<u64, ApiError> {
    if (1..=MAX_PIDS).contains(&pids) {
        return Ok(pids);
    }
    Err(ApiError::bad_request(format!(
        "`{field}` is {pids}; give a number of processes from 1 to {MAX_PIDS}"
    )))
}

/// Metadata within the bounds above.
pub fn metadata(metadata: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if metadata.len() > MAX_METADATA_ENTRIES {
        return Err(ApiError::bad_request(format!(
            "`metadata` has {} keys; a sandbox takes at most {MAX_METADATA_ENTRIES}",
            metadata.len()
        )));
    }
    let mut total = 0;
    for (key, value) in metadata {
        if key.is_empty() || key.len() > MAX_METADATA_KEY {
            return Err(ApiError::bad_request(format!(
                "`metadata` key `{}` is {} bytes; give keys of 1 to {MAX_METADATA_KEY} bytes",
                shorten(key),
                key.len()
            )));
        }
        if value.len() > MAX_METADATA_VALUE {
            return Err(ApiError::bad_request(format!(
                "`metadata.{key}` is {} bytes; a value takes at most {MAX_METADATA_VALUE}",
                value.len()
            )));
        }
        total += key.len() + value.len();
    }
    if total > MAX_METADATA_TOTAL {
        return Err(ApiError::bad_request(format!(
            "`metadata` is {total} bytes in all; a sandbox takes at most {MAX_METADATA_TOTAL}"
        )));
    }
    Ok(())
}

/// An environment within the bounds above, each name a valid variable name and no value
/// holding a NUL byte.
pub fn env(env: &BTreeMap<String, String>, field: &str) -> Result<(), ApiError> {
    if env.len() > MAX_ENV_ENTRIES {
        return Err(ApiError::bad_request(format!(
            "`{field}` has {} variables; give at most {MAX_ENV_ENTRIES}",
            env.len()
        )));
    }
    let mut total = 0;
    for (name, value) in env {
        if name.is_empty() || name.contains(['=', '\0']) || name.len() > MAX_ENV_NAME {
            return Err(ApiError::bad_request(format!(
                "`{field}` names `{}`, which is not a variable name (1 to {MAX_ENV_NAME} bytes, \
                 no `=` or NUL)",
                shorten(name)
            )));
        }
        if value.len() > MAX_ENV_VALUE || value.contains('\0') {
            return Err(ApiError::bad_request(format!(
                "`{field}.{name}` is {} bytes; a value takes at most {MAX_ENV_VALUE}, without NUL",
                value.len()
            )));
        }
        total += name.len() + value.len() + 2;
    }
    if total > MAX_ENV_TOTAL {
        return Err(ApiError::bad_request(format!(
            "`{field}` is {total} bytes in all; give at most {MAX_ENV_TOTAL}"
        )));
    }
    Ok(())
}

/// A command line within the bounds above, without NUL bytes.
pub fn argv(argv: &[String]) -> Result<(), ApiError> {
    if argv.is_empty() {
        return Err(ApiError::bad_request(
            "`cmd` is empty; give the program and its arguments",
        ));
    }
    if argv.len() > MAX_ARGS {
        return Err(ApiError::bad_request(format!(
            "`cmd` has {} arguments; give at most {MAX_ARGS}",
            argv.len()
        )));
    }
    let mut total = 0;
    for (i, arg) in argv.iter().enumerate() {
        if arg.len() > MAX_ARG || arg.contains('\0') {
            return Err(ApiError::bad_request(format!(
                "`cmd[{i}]` is {} bytes; an argument takes at most {MAX_ARG}, without NUL",
                arg.len()
            )));
        }
        total += arg.len() + 1;
    }
    if total > MAX_ARGS_TOTAL {
        return Err(ApiError::bad_request(format!(
            "`cmd` is {total} bytes in all; give at most {MAX_ARGS_TOTAL}"
        )));
    }
    Ok(())
}

/// A path of the sandbox, such as a working directory.
pub fn path(path: &str, field: &str) -> Result<(), ApiError> {
    if path.is_empty() || path.len() > MAX_PATH || path.contains('\0') {
        return Err(ApiError::bad_request(format!(
            "`{field}` is not a path of 1 to {MAX_PATH} bytes without NUL"
        )));
    }
    Ok(())
}

/// An image's name, before it is parsed.
pub fn image(image: &str) -> Result<(), ApiError> {
    if image.is_empty() || image.len() > MAX_IMAGE {
        return Err(ApiError::bad_request(format!(
            "`image` is {} bytes; name an image in 1 to {MAX_IMAGE}",
            image.len()
        )));
    }
    Ok(())
}

/// Secrets given with a turn.
pub fn secrets(secrets: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if secrets.len() > MAX_SECRETS {
        return Err(ApiError::bad_request(format!(
            "`secrets` has {} entries; give at most {MAX_SECRETS}",
            secrets.len()
        )));
    }
    for (name, value) in secrets {
        if name.is_empty() || name.len() > MAX_SECRET_NAME {
            return Err(ApiError::bad_request(format!(
                "`secrets` names `{}`; a name takes 1 to {MAX_SECRET_NAME} bytes",
                shorten(name)
            )));
        }
        if value.len() > MAX_SECRET_VALUE {
            return Err(ApiError::bad_request(format!(
                "`secrets.{name}` is {} bytes; a value takes at most {MAX_SECRET_VALUE}",
                value.len()
            )));
        }
    }
    Ok(())
}

/// A signal number of Linux: 1 to 64.
pub fn signal(n: i64) -> Option<i32> {
    (1..=64).contains(&n).then_some(n as i32)
}

/// The first 40 characters of a name, for a message.
fn shorten(text: &str) -> String {
    let mut short: String = text.chars().take(40).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    short
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_past_the_bound_are_refused_with_the_field_and_the_bound() {
        for bad in [
            1e19,
            1e300,
            f64::INFINITY,
            f64::NAN,
            -1.0,
            MAX_SECONDS + 1.0,
        ] {
            let e = seconds(Some(bad), "lifetime").unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
            assert!(
                e.message.contains("`lifetime`") && e.message.contains("31536000"),
                "{}",
                e.message
            );
        }
        assert_eq!(seconds(Some(0.0), "t").unwrap(), Some(None));
        assert_eq!(
            seconds(Some(MAX_SECONDS), "t").unwrap(),
            Some(Some(Duration::from_secs(31_536_000)))
        );
        assert_eq!(seconds(None, "t").unwrap(), None);
    }

    #[test]
    fn limits_are_bounded() {
        assert!(memory(0, "m").is_err());
        assert!(memory(u64::MAX, "m").is_err());
        assert_eq!(memory(512 << 20, "m").unwrap(), 512 << 20);
        assert!(memory(4 << 10, "m").is_err(), "too little for an agent");
        assert!(disk(1 << 10, "d").is_err());
        assert!(disk((8 << 40) + 1, "d").is_err());
        assert_eq!(disk(1 << 30, "d").unwrap(), 1 << 30);
        assert!(cpus(0.0, "c").is_err());
        assert!(cpus(1e300, "c").is_err());
        assert!(cpus(f64::NAN, "c").is_err());
        assert_eq!(cpus(1.5, "c").unwrap(), 1.5);
        assert!(pids(0, "p").is_err());
        assert!(pids(u64::MAX, "p").is_err());
        assert_eq!(pids(64, "p").unwrap(), 64);
        assert_eq!(signal(9), Some(9));
        assert_eq!(signal((1 << 32) + 9), None, "no wrapping into SIGKILL");
        assert_eq!(signal(0), None);
    }

    /// A document's `memory:` and the API's `limits.memory` take the same range: each end
    /// is taken in both places, and one byte past it refused in both.
    #[test]
    fn memory_has_one_range_in_documents_and_requests() {
        let document = |memory: String| {
            let text = format!("---\nmemory: {memory}\n---\n```bash\ntrue\n```\n");
            upstream_doc::Document::parse(std::path::Path::new("t.md"), text.as_bytes())
                .map(|d| d.front_matter().memory)
        };
        for (bytes, taken) in [
            (MIN_MEMORY, true),
            (MAX_MEMORY, true),
            (MIN_MEMORY - 1, false),
            (MAX_MEMORY + 1, false),
        ] {
            assert_eq!(memory(bytes, "m").is_ok(), taken, "the API, {bytes} bytes");
            match document(bytes.to_string()) {
                Ok(m) => assert!(taken && m == Some(bytes), "the document, {bytes} bytes"),
                Err(e) => assert!(!taken, "the document, {bytes} bytes: {e}"),
            }
        }
        // The same ends in the words both take them in.
        let (low, high) = ("4M", "1024T");
        assert_eq!(document(low.into()).unwrap(), Some(MIN_MEMORY));
        assert_eq!(document(high.into()).unwrap(), Some(MAX_MEMORY));
        let refused = memory(MAX_MEMORY + 1, "limits.memory").unwrap_err().message;
        assert!(refused.contains(low) && refused.contains(high), "{refused}");
        // A pool's memory is bounded the same way.
        assert!(crate::daemon::Shape::parse("host,memory=1024T").is_ok());
        assert!(crate::daemon::Shape::parse("host,memory=1025T").is_err());
    }

    #[test]
    fn metadata_is_capped_in_keys_key_and_value_length_and_total() {
        let many: BTreeMap<String, String> =
            (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
        assert!(metadata(&many).unwrap_err().message.contains("at most 64"));
        let long_key = BTreeMap::from([("k".repeat(129), "v".to_string())]);
        assert!(metadata(&long_key).unwrap_err().message.contains("128"));
        let long_value = BTreeMap::from([("k".to_string(), "v".repeat(1025))]);
        assert!(metadata(&long_value).unwrap_err().message.contains("1024"));
        let total: BTreeMap<String, String> = (0..20)
            .map(|i| (format!("k{i}"), "v".repeat(1000)))
            .collect();
        assert!(metadata(&total).unwrap_err().message.contains("16384"));
        let fine: BTreeMap<String, String> = (0..64)
            .map(|i| (format!("k{i}"), "v".repeat(200)))
            .collect();
        metadata(&fine).unwrap();
    }

    #[test]
    fn environments_and_command_lines_are_capped_and_checked() {
        let bad_name = BTreeMap::from([("A=B".to_string(), "v".to_string())]);
        assert!(env(&bad_name, "env").is_err());
        let nul = BTreeMap::from([("A".to_string(), "v\0".to_string())]);
        assert!(env(&nul, "env").is_err());
        let huge = BTreeMap::from([("A".to_string(), "v".repeat(MAX_ENV_VALUE + 1))]);
        assert!(env(&huge, "env").unwrap_err().message.contains("`env.A`"));
        env(&BTreeMap::from([("A".to_string(), "b".to_string())]), "env").unwrap();
        assert!(argv(&[]).is_err());
        assert!(argv(&["a\0b".to_string()]).is_err());
        assert!(argv(&vec!["x".to_string(); MAX_ARGS + 1]).is_err());
        argv(&["echo".to_string(), "hi".to_string()]).unwrap();
    }
}
