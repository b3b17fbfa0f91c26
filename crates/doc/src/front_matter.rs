//! The YAML front matter of a document: where and how its steps run.
//!
//! Unknown keys are errors, so a typo never silently changes where a turn runs.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer};

/// Every key the front matter accepts, for hints.
pub const KEYS: &[&str] = &[
    "image",
    "context",
    "env",
    "secrets",
    "timeout",
    "step_timeout",
    "cpus",
    "memory",
    "network",
    "artifacts",
    "workdir",
];

/// The image a document names when it names none.
pub const HOST_IMAGE: &str = "host";
/// The working directory of steps when the document names none.
pub const DEFAULT_WORKDIR: &str = "/workspace";

/// Parsed front matter. Every field has a default, so an absent front matter is valid.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrontMatter {
    /// `host`, or an OCI image reference such as `python:3.12`.
    #[serde(default)]
    pub image: Option<String>,
    /// The named chain of turns this one belongs to.
    #[serde(default, deserialize_with = "context_name")]
    pub context: Option<String>,
    /// Environment variables for every step.
    #[serde(default, deserialize_with = "env_map")]
    pub env: BTreeMap<String, String>,
    /// Names of host environment variables passed in and redacted from every output.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Limit on the whole turn.
    #[serde(default, deserialize_with = "duration")]
    pub timeout: Option<Duration>,
    /// Limit on each step.
    #[serde(default, deserialize_with = "duration")]
    pub step_timeout: Option<Duration>,
    /// CPU quota, in CPUs (`0.5`, `2`).
    #[serde(default, deserialize_with = "cpus")]
    pub cpus: Option<f64>,
    /// Memory limit in bytes (`512M`, `2GiB`).
    #[serde(default, deserialize_with = "memory")]
    pub memory: Option<u64>,
    /// `none` (only loopback) or `host`.
    #[serde(default)]
    pub network: Network,
    /// Paths or globs under the working directory saved after the turn.
    #[serde(default, deserialize_with = "artifact_patterns")]
    pub artifacts: Vec<String>,
    /// Working directory of every step.
    #[serde(default, deserialize_with = "workdir")]
    pub workdir: Option<String>,
}

impl FrontMatter {
    /// The image to run in, `host` when none is named.
    pub fn image(&self) -> &str {
        self.image.as_deref().unwrap_or(HOST_IMAGE)
    }

    /// The working directory of steps.
    pub fn workdir(&self) -> &str {
        self.workdir.as_deref().unwrap_or(DEFAULT_WORKDIR)
    }
}

/// Which network a sandbox gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// A network namespace of its own with only loopback.
    #[default]
    None,
    /// The host's network.
    Host,
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Network::None => "none",
            Network::Host => "host",
        })
    }
}

impl std::str::FromStr for Network {
    type Err = String;
    fn from_str(s: &str) -> Result<Network, String> {
        match s {
            "none" => Ok(Network::None),
            "host" => Ok(Network::Host),
            other => Err(format!("unknown network `{other}`: use `none` or `host`")),
        }
    }
}

fn context_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let name = String::deserialize(d)?;
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if !ok {
        return Err(de::Error::custom(format!(
            "`{name}` is not a context name: use letters, digits, `-`, `_` and `.` (up to 100), such as `research-pipeline`"
        )));
    }
    Ok(Some(name))
}

fn artifact_patterns<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let patterns = match OneOrMany::deserialize(d)? {
        OneOrMany::One(p) => vec![p],
        OneOrMany::Many(p) => p,
    };
    for p in &patterns {
        check_artifact_pattern(p).map_err(de::Error::custom)?;
    }
    Ok(patterns)
}

/// Checks an `artifacts:` entry: a path or glob relative to the working directory that does
/// not leave it.
pub fn check_artifact_pattern(raw: &str) -> Result<(), String> {
    let text: Vec<&str> = raw
        .trim()
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if text.is_empty() {
        return Err(
            "an artifact path is empty: name a file, directory or glob such as `out/*.csv`".into(),
        );
    }
    if raw.trim_start().starts_with('/') {
        return Err(format!(
            "artifact `{raw}` is absolute: artifact paths are relative to the working directory (`workdir`)"
        ));
    }
    if text.contains(&"..") {
        return Err(format!(
            "artifact `{raw}` leaves the working directory: artifacts must be inside it"
        ));
    }
    let joined = text.join("/");
    if joined.contains(['*', '?', '[', '{']) {
        globset::Glob::new(&joined)
            .map_err(|e| format!("artifact `{raw}` is not a valid glob: {}", e.kind()))?;
    }
    Ok(())
}

fn workdir<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let dir = String::deserialize(d)?;
    if !dir.starts_with('/') || dir.split('/').any(|c| c == "..") {
        return Err(de::Error::custom(format!(
            "workdir `{dir}` must be an absolute path inside the sandbox, such as `/workspace`"
        )));
    }
    Ok(Some(dir))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    Bool(bool),
    Int(i64),
    Float(f64),
    String(String),
}

impl Scalar {
    fn into_string(self) -> String {
        match self {
            Scalar::Bool(b) => b.to_string(),
            Scalar::Int(i) => i.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::String(s) => s,
        }
    }
}

fn env_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let raw: BTreeMap<String, Scalar> = BTreeMap::deserialize(d)?;
    let mut env = BTreeMap::new();
    for (name, value) in raw {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(de::Error::custom(format!(
                "`{name}` is not a valid environment variable name"
            )));
        }
        env.insert(name, value.into_string());
    }
    Ok(env)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let Some(value) = Option::<Scalar>::deserialize(d)? else {
        return Ok(None);
    };
    let parsed = match value {
        Scalar::Int(secs) if secs > 0 => Ok(Duration::from_secs(secs as u64)),
        Scalar::Float(secs) if secs > 0.0 && secs.is_finite() => Ok(Duration::from_secs_f64(secs)),
        Scalar::String(s) => parse_duration(&s),
        _ => Err("a duration must be positive, such as `30s`, `10m` or `1h 30m`".to_string()),
    };
    parsed.map(Some).map_err(de::Error::custom)
}

/// Parses `30s`, `10m`, `1h30m`, `1.5s` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        if secs > 0.0 && secs.is_finite() {
            return Ok(Duration::from_secs_f64(secs));
        }
    }
    if let Some(secs) = s.strip_suffix('s').and_then(|n| n.parse::<f64>().ok()) {
        if secs > 0.0 && secs.is_finite() {
            return Ok(Duration::from_secs_f64(secs));
        }
    }
    match humantime::parse_duration(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(format!(
            "`{s}` is not a duration: write one such as `30s`, `10m` or `1h 30m`"
        )),
    }
}

fn cpus<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    let Some(value) = Option::<Scalar>::deserialize(d)? else {
        return Ok(None);
    };
    let cpus = match value {
        Scalar::Int(n) => n as f64,
        Scalar::Float(f) => f,
        Scalar::String(s) => s.trim().parse::<f64>().map_err(|_| {
            de::Error::custom(format!(
                "`{s}` is not a number of CPUs, such as `1` or `0.5`"
            ))
        })?,
        Scalar::Bool(_) => return Err(de::Error::custom("cpus must be a number, such as `2`")),
    };
    if !(cpus.is_finite() && cpus >= 0.01) {
        return Err(de::Error::custom("cpus must be at least 0.01"));
    }
    Ok(Some(cpus))
}

fn memory<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let Some(value) = Option::<Scalar>::deserialize(d)? else {
        return Ok(None);
    };
    let bytes = match value {
        Scalar::Int(n) if n > 0 => Ok(n as u64),
        Scalar::String(s) => parse_size(&s),
        _ => Err("memory must be a size such as `512M` or `2GiB`".to_string()),
    };
    bytes.map(Some).map_err(de::Error::custom)
}

/// Parses a size: a number with an optional unit. `K`, `M`, `G`, `T` and their `KiB` forms are
/// powers of 1024 (as docker and systemd read them); `KB`, `MB`, `GB`, `TB` are powers of 1000.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let text = s.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let err = || format!("`{s}` is not a size: write one such as `512M`, `2GiB` or `1500MB`");
    let number: f64 = number.parse().map_err(|_| err())?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(err()),
    };
    let bytes = number * multiplier as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(err());
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_binary_units_for_single_letters() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1500MB"), Ok(1_500_000_000));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("12 parsecs").is_err());
    }

    #[test]
    fn artifact_patterns_stay_inside_the_working_directory() {
        assert!(check_artifact_pattern("out/report.md").is_ok());
        assert!(check_artifact_pattern("./out/").is_ok());
        assert!(check_artifact_pattern("data/**/*.csv").is_ok());
        assert!(
            check_artifact_pattern("/etc/passwd")
                .unwrap_err()
                .contains("absolute")
        );
        assert!(
            check_artifact_pattern("../secret")
                .unwrap_err()
                .contains("leaves")
        );
        assert!(
            check_artifact_pattern("a/../../b")
                .unwrap_err()
                .contains("leaves")
        );
        assert!(
            check_artifact_pattern("[unclosed")
                .unwrap_err()
                .contains("glob")
        );
        assert!(check_artifact_pattern(" ").is_err());
    }

    #[test]
    fn durations_accept_units_and_bare_seconds() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
