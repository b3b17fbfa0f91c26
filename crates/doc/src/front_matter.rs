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
    "disk",
    "network",
    "isolation",
    "artifacts",
    "workdir",
];

/// The image a document names when it names none.
pub const HOST_IMAGE: &str = "host";
/// The working directory of steps when the document names none.
pub const DEFAULT_WORKDIR: &str = "/workspace";

/// The longest duration upstream takes anywhere (a front matter `timeout`, a command line's
/// `--lifetime`, a request's timeout): a year. A turn that should run longer is a typo, and
/// a deadline this far away still fits every clock, so adding it to "now" cannot overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// The largest size upstream takes anywhere (a sandbox's memory, an output limit): 1 PiB,
/// more than any host has, and far enough below `u64::MAX` that arithmetic on a limit cannot
/// overflow.
pub const MAX_SIZE: u64 = 1 << 50;
/// The most CPUs a sandbox may be given.
pub const MAX_CPUS: f64 = 1024.0;
/// The fewest CPUs a sandbox may be given.
pub const MIN_CPUS: f64 = 0.01;
/// The least memory a sandbox may be given: below about 768 KiB its agent cannot start, and a
/// shell and a step's files in its /run (a sixteenth of the limit) need a little more.
pub const MIN_MEMORY: u64 = 4 << 20;
/// The most memory a sandbox may be given, in a document and through the API alike: 1 PiB.
pub const MAX_MEMORY: u64 = MAX_SIZE;
/// The least disk a sandbox may be given: room for its filesystem's own bookkeeping and a
/// few small files.
pub const MIN_DISK: u64 = 16 << 20;
/// The most disk a sandbox may be given: 8 TiB. A sandbox's disk is a file on the host, and
/// ext4 holds files of just under 16 TiB; formatting one of 8 TiB takes under a second.
pub const MAX_DISK: u64 = 8 << 40;

/// Separates the parts of a value error inside a serde error message (message, key, hint);
/// parsing splits them again ([`split_value_error`]). The parts are split from the right and
/// only the message holds text from the document, so a value quoted in it cannot forge the
/// key or the hint.
const MARK: &str = "\n\u{1f}";

/// A serde error for a bad value of front matter key `key`, with what to do about it.
fn value_error<E: de::Error>(key: &str, message: impl fmt::Display, hint: impl fmt::Display) -> E {
    E::custom(format!("{message}{MARK}{key}{MARK}{hint}"))
}

/// A value error's parts, as [`value_error`] joined them.
pub(crate) struct ValueError<'a> {
    pub message: &'a str,
    /// The front matter key at fault.
    pub key: &'a str,
    pub hint: &'a str,
}

/// Splits a message made by [`value_error`]; `None` for other messages.
pub(crate) fn split_value_error(message: &str) -> Option<ValueError<'_>> {
    let (rest, hint) = message.rsplit_once(MARK)?;
    let (message, key) = rest.rsplit_once(MARK)?;
    Some(ValueError { message, key, hint })
}

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
    #[serde(default, deserialize_with = "timeout")]
    pub timeout: Option<Duration>,
    /// Limit on each step.
    #[serde(default, deserialize_with = "step_timeout")]
    pub step_timeout: Option<Duration>,
    /// CPU quota, in CPUs (`0.5`, `2`).
    #[serde(default, deserialize_with = "cpus")]
    pub cpus: Option<f64>,
    /// Memory limit in bytes (`512M`, `2GiB`).
    #[serde(default, deserialize_with = "memory")]
    pub memory: Option<u64>,
    /// Disk limit in bytes (`2G`): what the sandbox may write to its root, /tmp and workspace.
    #[serde(default, deserialize_with = "disk")]
    pub disk: Option<u64>,
    /// `none` (only loopback) or `host`.
    #[serde(default)]
    pub network: Network,
    /// `namespaces` (the default: the host's kernel) or `vm` (a microVM with its own).
    #[serde(default)]
    pub isolation: Isolation,
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

/// What isolates a sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// Linux namespaces on the host's kernel.
    #[default]
    Namespaces,
    /// A microVM with a kernel of its own.
    Vm,
}

impl fmt::Display for Isolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Isolation::Namespaces => "namespaces",
            Isolation::Vm => "vm",
        })
    }
}

impl std::str::FromStr for Isolation {
    type Err = String;
    fn from_str(s: &str) -> Result<Isolation, String> {
        match s {
            "namespaces" => Ok(Isolation::Namespaces),
            "vm" => Ok(Isolation::Vm),
            other => Err(format!(
                "unknown isolation `{other}`: use `namespaces` or `vm`"
            )),
        }
    }
}

fn context_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let Some(name) = text("context", d)? else {
        return Ok(None);
    };
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if !ok {
        return Err(value_error(
            "context",
            format!("`{name}` is not a context name"),
            CONTEXT_HINT,
        ));
    }
    Ok(Some(name))
}

const CONTEXT_HINT: &str = "a context name is up to 100 letters, digits, `-`, `_` and `.` \
     (not first), such as `research-pipeline`";

const ARTIFACTS_HINT: &str =
    "artifacts are paths or globs inside the working directory, such as `out/*.csv`";

fn artifact_patterns<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let patterns = match Plain::deserialize(d)? {
        Plain::Null => Vec::new(),
        Plain::Str(p) => vec![p],
        Plain::Strings(p) => p,
        Plain::List => {
            return Err(value_error(
                "artifacts",
                "every artifact must be a path or glob (a string)",
                ARTIFACTS_HINT,
            ));
        }
        other => {
            return Err(value_error(
                "artifacts",
                format!("artifacts cannot be {}", other.kind()),
                ARTIFACTS_HINT,
            ));
        }
    };
    for p in &patterns {
        check_artifact_pattern(p)
            .map_err(|message| value_error("artifacts", message, ARTIFACTS_HINT))?;
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
    let Some(dir) = text("workdir", d)? else {
        return Ok(None);
    };
    if !dir.starts_with('/') || dir.split('/').any(|c| c == "..") {
        return Err(value_error(
            "workdir",
            format!("workdir `{dir}` must be an absolute path inside the sandbox"),
            "name a directory such as `/workspace`; `..` is not allowed",
        ));
    }
    Ok(Some(dir))
}

/// A string value of `key`; `None` for `null`.
fn text<'de, D: Deserializer<'de>>(key: &str, d: D) -> Result<Option<String>, D::Error> {
    match Plain::deserialize(d)? {
        Plain::Null => Ok(None),
        Plain::Str(s) => Ok(Some(s)),
        other => Err(value_error(
            key,
            format!("{key} must be a string, not {}", other.kind()),
            format!("write {key} as text, quoted if it looks like something else"),
        )),
    }
}

/// A front matter value as YAML gave it, whatever its type: nothing YAML can hold fails to
/// be read as one, so each key's own check can say what is wrong with it.
#[derive(Debug)]
enum Plain {
    Null,
    Bool(bool),
    /// Any integer YAML holds, however large.
    Int(i128),
    Float(f64),
    Str(String),
    /// A list whose items are all strings.
    Strings(Vec<String>),
    /// A list holding something other than strings.
    List,
    /// A mapping or a tagged value.
    Other(&'static str),
}

impl Plain {
    /// What the value is, for messages.
    fn kind(&self) -> &'static str {
        match self {
            Plain::Null => "null",
            Plain::Bool(_) => "true/false",
            Plain::Int(_) | Plain::Float(_) => "a number",
            Plain::Str(_) => "a string",
            Plain::Strings(_) | Plain::List => "a list",
            Plain::Other(kind) => kind,
        }
    }
}

impl<'de> Deserialize<'de> for Plain {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Plain, D::Error> {
        d.deserialize_any(PlainVisitor)
    }
}

struct PlainVisitor;

impl<'de> de::Visitor<'de> for PlainVisitor {
    type Value = Plain;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_unit<E>(self) -> Result<Plain, E> {
        Ok(Plain::Null)
    }
    fn visit_none<E>(self) -> Result<Plain, E> {
        Ok(Plain::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Plain, D::Error> {
        Plain::deserialize(d)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Plain, E> {
        Ok(Plain::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Plain, E> {
        Ok(Plain::Int(n.into()))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Plain, E> {
        Ok(Plain::Int(n.into()))
    }
    fn visit_i128<E>(self, n: i128) -> Result<Plain, E> {
        Ok(Plain::Int(n))
    }
    fn visit_u128<E>(self, n: u128) -> Result<Plain, E> {
        // Past i128: as a float, which every bound then refuses.
        Ok(i128::try_from(n).map_or(Plain::Float(n as f64), Plain::Int))
    }
    fn visit_f64<E>(self, f: f64) -> Result<Plain, E> {
        Ok(Plain::Float(f))
    }
    fn visit_str<E>(self, s: &str) -> Result<Plain, E> {
        Ok(Plain::Str(s.to_string()))
    }
    fn visit_string<E>(self, s: String) -> Result<Plain, E> {
        Ok(Plain::Str(s))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Plain, A::Error> {
        let mut strings = Vec::new();
        let mut all_strings = true;
        while let Some(item) = seq.next_element::<Plain>()? {
            match item {
                Plain::Str(s) if all_strings => strings.push(s),
                _ => all_strings = false,
            }
        }
        Ok(match all_strings {
            true => Plain::Strings(strings),
            false => Plain::List,
        })
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Plain, A::Error> {
        while map
            .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
            .is_some()
        {}
        Ok(Plain::Other("a mapping"))
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<Plain, A::Error> {
        use de::VariantAccess;
        let (de::IgnoredAny, variant) = data.variant()?;
        variant.newtype_variant::<de::IgnoredAny>()?;
        Ok(Plain::Other("a tagged value"))
    }
}

/// A number as a person wrote it, near enough.
fn float_text(f: f64) -> String {
    if f.abs() >= 1e16 || (f != 0.0 && f.abs() < 1e-6) {
        format!("{f:e}")
    } else {
        f.to_string()
    }
}

fn env_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let raw: Option<BTreeMap<String, Plain>> = Option::deserialize(d)?;
    let mut env = BTreeMap::new();
    for (name, value) in raw.unwrap_or_default() {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(value_error(
                "env",
                format!("`{name}` is not a valid environment variable name"),
                "a name is not empty and holds no `=`, such as `DATA_DIR`",
            ));
        }
        let value = match value {
            Plain::Str(s) => s,
            Plain::Bool(b) => b.to_string(),
            Plain::Int(n) => n.to_string(),
            Plain::Float(f) => f.to_string(),
            other => {
                return Err(value_error(
                    "env",
                    format!("env `{name}` is {}, not a value", other.kind()),
                    "give each variable a string, a number or true/false (`\"\"` for empty)",
                ));
            }
        };
        env.insert(name, value);
    }
    Ok(env)
}

fn timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration("timeout", d)
}

fn step_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration("step_timeout", d)
}

const DURATION_HINT: &str =
    "a duration is positive and at most 365 days, such as `30s`, `10m`, `1h 30m` or `2d`";

fn duration<'de, D: Deserializer<'de>>(key: &str, d: D) -> Result<Option<Duration>, D::Error> {
    let parsed = match Plain::deserialize(d)? {
        Plain::Null => return Ok(None),
        Plain::Int(n) => match u64::try_from(n) {
            Ok(secs) => whole_seconds(secs, &n.to_string()),
            Err(_) if n < 0 => Err(format!("`{n}` is not a positive duration")),
            Err(_) => Err(too_long(&n.to_string())),
        },
        Plain::Float(f) => seconds(f, &float_text(f)),
        Plain::Str(s) => parse_duration(&s),
        other => Err(format!("{key} must be a duration, not {}", other.kind())),
    };
    parsed
        .map(Some)
        .map_err(|message| value_error(key, message, DURATION_HINT))
}

fn too_long(text: &str) -> String {
    format!("`{text}` is too long: a duration is at most 365 days")
}

fn whole_seconds(secs: u64, text: &str) -> Result<Duration, String> {
    match secs {
        0 => Err(format!("`{text}` is not a positive duration")),
        s if s > MAX_DURATION.as_secs() => Err(too_long(text)),
        s => Ok(Duration::from_secs(s)),
    }
}

/// `secs` seconds, bounded: never panics, whatever the number.
fn seconds(secs: f64, text: &str) -> Result<Duration, String> {
    if secs.is_nan() {
        return Err(format!("`{text}` is not a duration"));
    }
    if secs > MAX_DURATION.as_secs_f64() {
        return Err(too_long(text));
    }
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(format!("`{text}` is not a positive duration")),
    }
}

/// Parses `30s`, `10m`, `1h30m`, `1.5s`, `2d` or a bare number of seconds: positive and at
/// most [`MAX_DURATION`], whatever the text.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    let number = text
        .parse::<f64>()
        .ok()
        .or_else(|| text.strip_suffix('s')?.parse::<f64>().ok());
    if let Some(secs) = number {
        return seconds(secs, text);
    }
    match humantime::parse_duration(text) {
        Ok(d) if d > MAX_DURATION => Err(too_long(text)),
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(format!("`{text}` is not a positive duration")),
        Err(humantime::DurationError::NumberOverflow) => Err(too_long(text)),
        Err(_) => Err(format!(
            "`{text}` is not a duration: write one such as `30s`, `10m` or `1h 30m`"
        )),
    }
}

const CPUS_HINT: &str = "cpus is a number of CPUs from 0.01 to 1024, such as `0.5` or `2`";

fn cpus<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    let fail = |message: String| value_error("cpus", message, CPUS_HINT);
    let (cpus, text) = match Plain::deserialize(d)? {
        Plain::Null => return Ok(None),
        Plain::Int(n) => (n as f64, n.to_string()),
        Plain::Float(f) => (f, float_text(f)),
        Plain::Str(s) => match s.trim().parse::<f64>() {
            Ok(f) => (f, s.trim().to_string()),
            Err(_) => return Err(fail(format!("`{s}` is not a number of CPUs"))),
        },
        other => return Err(fail(format!("cpus must be a number, not {}", other.kind()))),
    };
    if !(MIN_CPUS..=MAX_CPUS).contains(&cpus) {
        return Err(fail(format!(
            "cpus `{text}` is out of range: cpus must be from 0.01 to 1024"
        )));
    }
    Ok(Some(cpus))
}

const MEMORY_HINT: &str = "memory is a size from 4M to 1 PiB, such as `512M`, `2GiB` or `1500MB`";

fn memory<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    size_value(d, "memory", MIN_MEMORY, MAX_MEMORY, MEMORY_HINT)
}

const DISK_HINT: &str = "disk is a size from 16M to 8T, such as `2G` or `500M` (default 10G)";

fn disk<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    size_value(d, "disk", MIN_DISK, MAX_DISK, DISK_HINT)
}

/// A size of front matter key `key`, from `min` to `max` bytes.
fn size_value<'de, D: Deserializer<'de>>(
    d: D,
    key: &str,
    min: u64,
    max: u64,
    hint: &str,
) -> Result<Option<u64>, D::Error> {
    let (bytes, text) = match Plain::deserialize(d)? {
        Plain::Null => return Ok(None),
        Plain::Int(n) if n <= 0 => (
            Err(format!("{key} `{n}` is not a positive size")),
            n.to_string(),
        ),
        Plain::Int(n) => (
            match u64::try_from(n) {
                Ok(b) if b <= MAX_SIZE => Ok(b),
                _ => Err(too_large(&n.to_string())),
            },
            n.to_string(),
        ),
        Plain::Float(f) if f > MAX_SIZE as f64 => (Err(too_large(&float_text(f))), float_text(f)),
        Plain::Float(f) => (
            Err(format!(
                "{key} `{}` is not a whole number of bytes",
                float_text(f)
            )),
            float_text(f),
        ),
        Plain::Str(s) => (parse_size(&s), s.trim().to_string()),
        other => (
            Err(format!("{key} must be a size, not {}", other.kind())),
            String::new(),
        ),
    };
    let bytes = bytes.and_then(|b| {
        if (min..=max).contains(&b) {
            Ok(b)
        } else {
            Err(format!(
                "{key} `{text}` is out of range: {key} must be from {} to {}",
                format_size(min),
                format_size(max)
            ))
        }
    });
    bytes
        .map(Some)
        .map_err(|message| value_error(key, message, hint))
}

/// A size in the units [`parse_size`] reads, for messages: `4M`, `16T`, `1536K`.
pub fn format_size(bytes: u64) -> String {
    for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
        if bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

fn too_large(text: &str) -> String {
    format!("`{text}` is too large: a size is at most 1 PiB (`1024T`)")
}

/// Parses a size: a number with an optional unit. `K`, `M`, `G`, `T` and their `KiB` forms are
/// powers of 1024 (as docker and systemd read them); `KB`, `MB`, `GB`, `TB` are powers of 1000.
/// A size is at least one byte and at most [`MAX_SIZE`].
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
    if !bytes.is_finite() || bytes < 1.0 {
        return Err(err());
    }
    if bytes > MAX_SIZE as f64 {
        return Err(too_large(text));
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
    fn sizes_are_bounded() {
        assert_eq!(parse_size("1024T"), Ok(MAX_SIZE));
        for text in [
            "1025T",
            "99999999999999999999T",
            "1e30",
            "18446744073709551616",
        ] {
            let e = parse_size(text).unwrap_err();
            assert!(
                e.contains("at most 1 PiB") || e.contains("not a size"),
                "{text}: {e}"
            );
        }
        assert!(
            parse_size("99999999999999999999T")
                .unwrap_err()
                .contains("1 PiB")
        );
    }

    #[test]
    fn durations_are_bounded_whatever_the_text() {
        assert_eq!(parse_duration("365d"), Ok(MAX_DURATION));
        assert_eq!(parse_duration("31536000"), Ok(MAX_DURATION));
        for text in [
            "1e300",
            "1e300s",
            "99999999999999999999h",
            "99999999999999999999999999999999999999999s",
            "inf",
            "366d",
            "31536001",
            "1000000000years",
        ] {
            let e = parse_duration(text).unwrap_err();
            assert!(e.contains("at most 365 days"), "{text}: {e}");
        }
        for text in ["nan", "-inf", "-5", "-0", "0", "1e-12", "0.0000000001s", ""] {
            assert!(parse_duration(text).is_err(), "{text}");
        }
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
