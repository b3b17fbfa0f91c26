//! A blocking client of `upstream serve`: over TCP with an API key, or over the daemon's
//! local socket without one. The `upstream` CLI uses it for `upstream sandbox …` and to run
//! turns on a daemon.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Errors talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon answered with an error.
    #[error("{message} ({status} {code})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("cannot reach the daemon at {url}: {source}")]
    Connect { url: String, source: reqwest::Error },
    #[error("the daemon's answer: {0}")]
    Answer(String),
    #[error("no daemon listens at {0}")]
    NoDaemon(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Where the daemon is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `http://host:port`, with an API key.
    Url { url: String, key: Option<String> },
    /// The daemon's local socket.
    Socket(PathBuf),
}

/// What to make a sandbox of (see the API's `CreateSandbox`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CreateSandbox {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<f64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Limits {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// Bytes of disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<u64>,
}

/// A sandbox as the daemon describes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sandbox {
    pub id: String,
    pub image: String,
    pub limits: Limits,
    pub network: String,
    pub metadata: BTreeMap<String, String>,
    pub created_at: u64,
    pub created_ms: f64,
    pub from_pool: bool,
    pub timeout: Option<f64>,
    pub expires_in: Option<f64>,
    pub workdir: String,
    /// `running`, or `gone` once its agent is gone (nothing more runs in it).
    #[serde(default = "running")]
    pub state: String,
    /// Why it is gone and what to do, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gone: Option<String>,
}

fn running() -> String {
    "running".to_string()
}

/// A command to run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Exec {
    pub cmd: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Standard input as bytes, base64 (instead of `stdin`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdin_base64: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<f64>,
}

/// How a command ended.
#[derive(Debug, Clone, Deserialize)]
pub struct Exit {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// The kernel killed a process of the sandbox for going over its memory limit.
    #[serde(default)]
    pub out_of_memory: bool,
    /// The command failed with the sandbox's disk full: the disk limit, in bytes.
    #[serde(default)]
    pub out_of_disk: Option<u64>,
    pub duration_ms: f64,
}

/// Which stream output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A document to run as a turn on the daemon (see the API's `RunTurn`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunTurn {
    /// The markdown document.
    pub document: String,
    /// Its file name, when no `path` is given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Its absolute path on the client's machine: the name the daemon's records give it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, String>,
    /// Resume the document's last turn on the daemon at the step that stopped it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub resume: bool,
}

/// A turn that ran on the daemon.
#[derive(Debug, Clone, Deserialize)]
pub struct TurnResult {
    /// The document with its results.
    pub document: String,
    /// The turn's record.
    pub turn: Value,
}

/// The error that ends a streamed answer (`{"code", "message"}`), with the status the daemon
/// would have answered before streaming.
fn streamed_error(error: &Value) -> ClientError {
    let code = error["code"].as_str().unwrap_or("error");
    ClientError::Api {
        status: match code {
            "bad_request" => 400,
            "not_found" => 404,
            _ => 500,
        },
        code: code.into(),
        message: error["message"].as_str().unwrap_or("").into(),
    }
}

/// A client of one daemon.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::blocking::Client,
    base: String,
    key: Option<String>,
    shown: String,
}

impl Client {
    pub fn new(endpoint: Endpoint) -> Result<Client, ClientError> {
        let builder = reqwest::blocking::Client::builder()
            .timeout(None::<Duration>)
            .connect_timeout(Duration::from_secs(10));
        let (builder, base, key, shown) = match endpoint {
            Endpoint::Url { url, key } => {
                let base = url.trim_end_matches('/').to_string();
                (builder, base.clone(), key, base)
            }
            Endpoint::Socket(path) => (
                builder.unix_socket(path.as_path()),
                "http://local".to_string(),
                None,
                format!("unix:{}", path.display()),
            ),
        };
        let http = builder.build().map_err(|source| ClientError::Connect {
            url: shown.clone(),
            source,
        })?;
        Ok(Client {
            http,
            base,
            key,
            shown,
        })
    }

    /// The daemon named by `$UPSTREAM_URL` (with `$UPSTREAM_API_KEY`), else the local socket
    /// at `socket` if a daemon listens there; `None` when there is neither.
    pub fn from_env(socket: &Path) -> Result<Option<Client>, ClientError> {
        if let Some(url) = std::env::var("UPSTREAM_URL").ok().filter(|u| !u.is_empty()) {
            let key = std::env::var("UPSTREAM_API_KEY")
                .ok()
                .filter(|k| !k.is_empty());
            return Client::new(Endpoint::Url { url, key }).map(Some);
        }
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Client::new(Endpoint::Socket(socket.to_path_buf())).map(Some);
        }
        Ok(None)
    }

    /// The daemon a command was asked to use: `url` (`--url`), else the local socket at
    /// `socket` when `local` (`--daemon`), else `$UPSTREAM_URL` when `env` allows it; `None`
    /// when none was asked for. A daemon that merely listens on this machine is never
    /// chosen: where a context's turns go must not change because a socket appeared.
    pub fn chosen(
        url: Option<&str>,
        local: bool,
        env: bool,
        socket: &Path,
    ) -> Result<Option<Client>, ClientError> {
        let key = || {
            std::env::var("UPSTREAM_API_KEY")
                .ok()
                .filter(|k| !k.is_empty())
        };
        if let Some(url) = url {
            let url = url.to_string();
            return Client::new(Endpoint::Url { url, key: key() }).map(Some);
        }
        if local {
            if std::os::unix::net::UnixStream::connect(socket).is_err() {
                return Err(ClientError::NoDaemon(format!("unix:{}", socket.display())));
            }
            return Client::new(Endpoint::Socket(socket.to_path_buf())).map(Some);
        }
        match std::env::var("UPSTREAM_URL").ok().filter(|u| !u.is_empty()) {
            Some(url) if env => Client::new(Endpoint::Url { url, key: key() }).map(Some),
            _ => Ok(None),
        }
    }

    /// Where the daemon is, for messages.
    pub fn endpoint(&self) -> &str {
        &self.shown
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::blocking::RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(key) => builder.bearer_auth(key),
            None => builder,
        }
    }

    fn send(
        &self,
        request: reqwest::blocking::RequestBuilder,
    ) -> Result<reqwest::blocking::Response, ClientError> {
        let response = request.send().map_err(|source| ClientError::Connect {
            url: self.shown.clone(),
            source,
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let body: Value = response
            .json()
            .unwrap_or_else(|e| serde_json::json!({ "error": { "message": e.to_string() } }));
        Err(ClientError::Api {
            status,
            code: body["error"]["code"]
                .as_str()
                .unwrap_or("error")
                .to_string(),
            message: body["error"]["message"]
                .as_str()
                .unwrap_or("the daemon gave no reason")
                .to_string(),
        })
    }

    fn json<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::blocking::RequestBuilder,
    ) -> Result<T, ClientError> {
        self.send(request)?
            .json()
            .map_err(|e| ClientError::Answer(e.to_string()))
    }

    pub fn create(&self, request: &CreateSandbox) -> Result<Sandbox, ClientError> {
        self.json(
            self.request(reqwest::Method::POST, "/v1/sandboxes")
                .json(request),
        )
    }

    pub fn list(&self) -> Result<Vec<Sandbox>, ClientError> {
        #[derive(Deserialize)]
        struct List {
            sandboxes: Vec<Sandbox>,
        }
        let list: List = self.json(self.request(reqwest::Method::GET, "/v1/sandboxes"))?;
        Ok(list.sandboxes)
    }

    pub fn get(&self, id: &str) -> Result<Sandbox, ClientError> {
        self.json(self.request(reqwest::Method::GET, &format!("/v1/sandboxes/{id}")))
    }

    pub fn delete(&self, id: &str) -> Result<(), ClientError> {
        self.send(self.request(reqwest::Method::DELETE, &format!("/v1/sandboxes/{id}")))?;
        Ok(())
    }

    /// Runs a command, passing output to `on_output` as it comes.
    pub fn exec(
        &self,
        id: &str,
        exec: &Exec,
        on_output: &mut dyn FnMut(Stream, &str),
    ) -> Result<Exit, ClientError> {
        let response = self.send(
            self.request(reqwest::Method::POST, &format!("/v1/sandboxes/{id}/exec"))
                .header("Accept", "application/x-ndjson")
                .json(exec),
        )?;
        for line in BufReader::new(response).lines() {
            let line = line?;
            let event: Value =
                serde_json::from_str(&line).map_err(|e| ClientError::Answer(e.to_string()))?;
            if let Some(text) = event["stdout"].as_str() {
                on_output(Stream::Stdout, text);
            } else if let Some(text) = event["stderr"].as_str() {
                on_output(Stream::Stderr, text);
            } else if !event["exit"].is_null() {
                return serde_json::from_value(event["exit"].clone())
                    .map_err(|e| ClientError::Answer(e.to_string()));
            } else if !event["error"].is_null() {
                return Err(streamed_error(&event["error"]));
            }
        }
        Err(ClientError::Answer(
            "the output ended before the command's exit".into(),
        ))
    }

    /// Writes `path` in the sandbox from `data`, streamed; returns the bytes written.
    pub fn upload(
        &self,
        id: &str,
        path: &str,
        data: impl Read + Send + 'static,
    ) -> Result<u64, ClientError> {
        let written: Value = self.json(
            self.request(reqwest::Method::PUT, &format!("/v1/sandboxes/{id}/files"))
                .query(&[("path", path)])
                .body(reqwest::blocking::Body::new(data)),
        )?;
        Ok(written["size"].as_u64().unwrap_or(0))
    }

    /// Copies `path` of the sandbox into `out`, streamed; returns the bytes copied.
    pub fn download(&self, id: &str, path: &str, out: &mut dyn Write) -> Result<u64, ClientError> {
        let mut response = self.send(
            self.request(reqwest::Method::GET, &format!("/v1/sandboxes/{id}/files"))
                .query(&[("path", path)]),
        )?;
        Ok(std::io::copy(&mut response, out)?)
    }

    /// Runs a document as a turn on the daemon, passing each line of its progress (one
    /// event, see the API's `POST /v1/turns`) to `on_event` as it comes. Dropping the
    /// connection (ending the process) stops the turn.
    pub fn run_turn_streamed(
        &self,
        turn: &RunTurn,
        on_event: &mut dyn FnMut(Value),
    ) -> Result<TurnResult, ClientError> {
        let response = self.send(
            self.request(reqwest::Method::POST, "/v1/turns")
                .header("Accept", "application/x-ndjson")
                .json(turn),
        )?;
        for line in BufReader::new(response).lines() {
            let line = line?;
            let mut event: Value =
                serde_json::from_str(&line).map_err(|e| ClientError::Answer(e.to_string()))?;
            if !event["result"].is_null() {
                return serde_json::from_value(event["result"].take())
                    .map_err(|e| ClientError::Answer(e.to_string()));
            }
            if !event["error"].is_null() {
                return Err(streamed_error(&event["error"]));
            }
            on_event(event);
        }
        Err(ClientError::Answer(
            "the daemon's answer ended before the turn's result".into(),
        ))
    }

    /// Runs a document as a turn on the daemon.
    pub fn run_turn(&self, turn: &RunTurn) -> Result<TurnResult, ClientError> {
        self.json(self.request(reqwest::Method::POST, "/v1/turns").json(turn))
    }

    /// The tenant's turns, oldest first (the API's `GET /v1/turns`): each a JSON object as
    /// `upstream log --json` prints it.
    pub fn turns(&self, context: Option<&str>, last: Option<u64>) -> Result<Value, ClientError> {
        let mut query = Vec::new();
        if let Some(context) = context {
            query.push(("context", context.to_string()));
        }
        if let Some(last) = last {
            query.push(("last", last.to_string()));
        }
        let mut list: Value = self.json(
            self.request(reqwest::Method::GET, "/v1/turns")
                .query(&query),
        )?;
        Ok(list["turns"].take())
    }

    /// A turn (by number, id or the start of its id), with its steps and artifacts.
    pub fn turn(&self, selector: &str) -> Result<Value, ClientError> {
        let mut body: Value = self.json(self.request(
            reqwest::Method::GET,
            &format!("/v1/turns/{}", path_segment(selector)),
        ))?;
        Ok(body["turn"].take())
    }

    /// The tenant's contexts.
    pub fn contexts(&self) -> Result<Value, ClientError> {
        let mut list: Value = self.json(self.request(reqwest::Method::GET, "/v1/contexts"))?;
        Ok(list["contexts"].take())
    }

    /// The artifacts a new turn of `context` would start with.
    pub fn context_artifacts(&self, context: &str) -> Result<Value, ClientError> {
        let mut list: Value = self.json(
            self.request(reqwest::Method::GET, "/v1/artifacts")
                .query(&[("context", context)]),
        )?;
        Ok(list["artifacts"].take())
    }

    /// The content of a blob of the tenant's store, by the name a record gives it, as it
    /// streams in (the daemon checked it against its name before sending it).
    pub fn blob(&self, name: &str) -> Result<impl Read + use<>, ClientError> {
        self.send(self.request(
            reqwest::Method::GET,
            &format!("/v1/blobs/{}", path_segment(name)),
        ))
    }
}

/// `text` as one segment of a URL's path: everything but unreserved characters escaped.
fn path_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
