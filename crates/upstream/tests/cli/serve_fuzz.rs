//! A property test of the API's request bodies: structured but hostile JSON (numbers past
//! every bound, negative and fractional where whole ones belong, wrong types, deep nesting,
//! long strings, NUL bytes, unknown fields) and hostile documents, thrown at a real daemon.
//! Every answer must be a 2xx, or a 4xx whose body is the API's JSON error; never a 5xx,
//! never a dropped connection, and the daemon must still be up at the end.
//!
//! No case reaches the network: images are `host` or names no registry could hold.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Map, Value, json};

use crate::serve::{Api, Daemon, id};
use crate::util::Env;

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(1e19)),
        Just(json!(1e300)),
        Just(json!(-1e300)),
        Just(json!(f64::MAX)),
        Just(json!(f64::MIN_POSITIVE)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(-1)),
        Just(json!(0)),
        Just(json!(0.0001)),
        Just(json!(31_536_001)),
        Just(json!(4_294_967_305u64)),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("JSON has no NaN", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        (0u32..5).prop_map(|n| json!(n)),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("NaN".to_string()),
        Just("Infinity".to_string()),
        Just("1e300".to_string()),
        Just("-1".to_string()),
        Just("512M".to_string()),
        Just("18446744073709551616".to_string()),
        Just("a\u{0}b".to_string()),
        Just("../../../../etc".to_string()),
        "\\PC{0,24}",
        (1usize..300_000).prop_map(|n| "x".repeat(n)),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        text().prop_map(Value::String),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(text(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A map of strings, as `env` and `metadata` take, sometimes far too big.
fn string_map() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::collection::btree_map(text(), text(), 0..8)
            .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k, json!(v))).collect())),
        (60usize..200).prop_map(|n| {
            Value::Object((0..n).map(|i| (format!("k{i}"), json!("v"))).collect())
        }),
        value(),
    ]
}

/// An image that is never pulled: `host`, or what no registry could hold.
fn image() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!("host")),
        Just(json!("")),
        Just(json!("NOT A VALID NAME!")),
        Just(json!("UPPER/Case:tag")),
        Just(json!("x".repeat(5000))),
        number(),
        Just(json!(["host"])),
    ]
}

/// An object with some of `fields` (each from its strategy) and maybe a field no body has.
fn body(fields: Vec<(&'static str, BoxedStrategy<Value>)>) -> impl Strategy<Value = Value> {
    let parts: Vec<_> = fields
        .into_iter()
        .map(|(name, strategy)| prop::option::of(strategy).prop_map(move |v| (name, v)))
        .collect();
    (parts, prop::option::of((text(), leaf()))).prop_map(|(parts, unknown)| {
        let mut object = Map::new();
        for (name, value) in parts {
            if let Some(value) = value {
                object.insert(name.to_string(), value);
            }
        }
        if let Some((name, value)) = unknown {
            object.insert(format!("unknown_{name}"), value);
        }
        Value::Object(object)
    })
}

fn create_body() -> impl Strategy<Value = Value> {
    let limits = body(vec![
        (
            "memory",
            prop_oneof![number(), text().prop_map(Value::String)].boxed(),
        ),
        ("cpus", number().boxed()),
        ("pids", number().boxed()),
    ]);
    body(vec![
        ("image", image().boxed()),
        ("env", string_map().boxed()),
        ("limits", prop_oneof![limits, value()].boxed()),
        (
            "network",
            prop_oneof![Just(json!("none")), Just(json!("host")), leaf()].boxed(),
        ),
        ("timeout", number().boxed()),
        ("lifetime", number().boxed()),
        ("metadata", string_map().boxed()),
    ])
}

/// A command that ends at once, whatever its arguments.
fn command() -> impl Strategy<Value = Value> {
    let program = prop_oneof![
        Just("true"),
        Just("/bin/false"),
        Just("echo"),
        Just("no-such-program"),
        Just("")
    ];
    prop_oneof![
        (program, prop::collection::vec(text(), 0..4)).prop_map(|(p, args)| {
            let mut cmd = vec![json!(p)];
            cmd.extend(args.into_iter().map(Value::String));
            Value::Array(cmd)
        }),
        (3000usize..6000).prop_map(|n| json!(vec!["true"; n])),
        leaf(),
    ]
}

fn exec_body() -> impl Strategy<Value = Value> {
    body(vec![
        ("cmd", command().boxed()),
        ("stdin", leaf().boxed()),
        ("stdin_base64", leaf().boxed()),
        ("env", string_map().boxed()),
        ("cwd", prop_oneof![Just(json!("/tmp")), leaf()].boxed()),
        (
            "timeout",
            prop_oneof![Just(json!(5)), Just(json!(0.001)), number()].boxed(),
        ),
        ("stream", leaf().boxed()),
    ])
}

/// A document whose front matter holds hostile scalars, with one short step.
fn document() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("timeout"),
        Just("step_timeout"),
        Just("memory"),
        Just("cpus"),
        Just("network"),
        Just("env"),
        Just("context"),
        Just("workdir"),
        Just("artifacts"),
        Just("secrets"),
        Just("no_such_key"),
    ];
    let scalar = prop_oneof![
        Just("1e300".to_string()),
        Just("1e19".to_string()),
        Just("-1".to_string()),
        Just(".nan".to_string()),
        Just(".inf".to_string()),
        Just("18446744073709551616".to_string()),
        Just("[1, [2, [3]]]".to_string()),
        Just("{a: {b: {c: 1}}}".to_string()),
        Just("host".to_string()),
        Just("10s".to_string()),
        Just("\"\\0\"".to_string()),
        "[a-z0-9.]{0,12}",
    ];
    (prop::collection::vec((key, scalar), 0..4), any::<bool>()).prop_map(|(pairs, step)| {
        let mut doc = String::from("---\n");
        for (key, value) in pairs {
            doc.push_str(&format!("{key}: {value}\n"));
        }
        doc.push_str("---\n# Step\n");
        if step {
            doc.push_str("```bash\ntrue\n```\n");
        }
        doc
    })
}

fn turn_body() -> impl Strategy<Value = Value> {
    body(vec![
        ("document", document().prop_map(Value::String).boxed()),
        ("name", leaf().boxed()),
        ("secrets", string_map().boxed()),
        ("stream", leaf().boxed()),
    ])
}

/// A raw body nested far deeper than any request has reason to be.
fn deep() -> impl Strategy<Value = String> {
    (100usize..3000, any::<bool>()).prop_map(|(depth, objects)| {
        if objects {
            format!(
                "{}1{}",
                r#"{"metadata":{"a":"#.repeat(depth),
                "}}".repeat(depth)
            )
        } else {
            format!(
                "{{\"cmd\":{}\"true\"{}}}",
                "[".repeat(depth),
                "]".repeat(depth)
            )
        }
    })
}

/// Sends `body` and checks the answer: a 2xx, or a 4xx with the API's error body.
fn check(
    api: &Api,
    method: reqwest::Method,
    path: &str,
    body: Option<String>,
) -> Result<(u16, Value), TestCaseError> {
    let mut request = api.request(method, path);
    if let Some(body) = body {
        request = request
            .header("Content-Type", "application/json")
            .body(body);
    }
    let response = request
        .send()
        .map_err(|e| TestCaseError::fail(format!("{path}: no answer: {e}")))?;
    let status = response.status().as_u16();
    let text = response
        .text()
        .map_err(|e| TestCaseError::fail(format!("{path}: the answer broke off: {e}")))?;
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if (200..300).contains(&status) {
        // A streamed answer ends with its result or an error of the request's own.
        prop_assert!(!text.contains(r#""code":"internal""#), "{path}: {text}");
        return Ok((status, value));
    }
    prop_assert!((400..500).contains(&status), "{path}: {status} {text}");
    prop_assert!(
        value["error"]["code"].is_string() && value["error"]["message"].is_string(),
        "{path}: {status} is not the API's error body: {text}"
    );
    Ok((status, value))
}

#[test]
fn hostile_request_bodies_get_a_2xx_or_a_4xx_never_a_5xx() {
    crate::require_root_sandbox!();
    let started = Instant::now();
    let env = Env::new();
    let mut daemon = Daemon::start(&env, &["--max-per-tenant", "1000", "--max-body", "4M"]);
    let api = daemon.client(&daemon.key("f", "fuzz"));
    let sandbox = id(&api.create(json!({ "timeout": 0 })));
    let (_, process) = api.post(
        &format!("/v1/sandboxes/{sandbox}/processes"),
        json!({ "cmd": ["sleep", "600"] }),
    );
    let pid = process["pid"].as_i64().unwrap();
    let config = |cases| Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 64,
        ..Config::default()
    };

    let mut runner = TestRunner::new(config(256));
    runner
        .run(&create_body(), |body| {
            let (status, made) = check(
                &api,
                reqwest::Method::POST,
                "/v1/sandboxes",
                Some(body.to_string()),
            )?;
            if status == 201 {
                let path = format!("/v1/sandboxes/{}", id(&made));
                let _ = api.delete(&path);
            }
            Ok(())
        })
        .unwrap();

    let mut runner = TestRunner::new(config(192));
    let exec = format!("/v1/sandboxes/{sandbox}/exec");
    let start = format!("/v1/sandboxes/{sandbox}/processes");
    runner
        .run(&exec_body(), |body| {
            check(&api, reqwest::Method::POST, &exec, Some(body.to_string()))?;
            // A background command: only ones that end at once are started.
            let mut background = body;
            if let Some(object) = background.as_object_mut() {
                object.remove("timeout");
                object.remove("stream");
            }
            check(
                &api,
                reqwest::Method::POST,
                &start,
                Some(background.to_string()),
            )?;
            Ok(())
        })
        .unwrap();

    let mut runner = TestRunner::new(config(128));
    // Timeouts are set on a sandbox of their own: a short one is kept to, and reaps it.
    let reaped = id(&api.create(json!({ "timeout": 0 })));
    let timeout = format!("/v1/sandboxes/{reaped}/timeout");
    let signal = format!("/v1/sandboxes/{sandbox}/processes/{pid}/signal");
    let others = (
        body(vec![("timeout", number().boxed())]),
        body(vec![(
            "signal",
            prop_oneof![
                number(),
                Just(json!("CONT")),
                Just(json!("SIGNOPE")),
                leaf()
            ]
            .boxed(),
        )]),
        number(),
        text(),
    );
    runner
        .run(&others, |(set, signalled, wait, path)| {
            check(&api, reqwest::Method::POST, &timeout, Some(set.to_string()))?;
            // Keep the command alive: no signal that would end it is sent.
            let ends = signalled["signal"].as_i64().is_some_and(|n| {
                (1..=64).contains(&n) && ![17, 18, 20, 21, 22, 23, 28].contains(&n)
            });
            if !ends {
                check(
                    &api,
                    reqwest::Method::POST,
                    &signal,
                    Some(signalled.to_string()),
                )?;
            }
            // A wait within the bounds waits as long as it says: only short ones are sent.
            let long_wait = wait.as_f64().is_some_and(|s| s > 0.2 && s <= 31_536_000.0);
            if !long_wait {
                let wait = format!("/v1/sandboxes/{sandbox}/processes/{pid}?timeout={wait}");
                check(&api, reqwest::Method::GET, &wait, None)?;
            }
            let path: String = path.chars().take(1000).collect();
            let encoded: String = path.bytes().map(|b| format!("%{b:02X}")).collect();
            check(
                &api,
                reqwest::Method::GET,
                &format!("/v1/sandboxes/{sandbox}/files?path={encoded}"),
                None,
            )?;
            check(
                &api,
                reqwest::Method::GET,
                &format!("/v1/sandboxes/{sandbox}/files/list?path={encoded}"),
                None,
            )?;
            let put = format!("/v1/sandboxes/{sandbox}/files?path=%2Ftmp%2Ffuzz%2F{encoded}");
            check(&api, reqwest::Method::PUT, &put, Some("data".to_string()))?;
            Ok(())
        })
        .unwrap();

    let mut runner = TestRunner::new(config(48));
    runner
        .run(&turn_body(), |body| {
            check(
                &api,
                reqwest::Method::POST,
                "/v1/turns",
                Some(body.to_string()),
            )?;
            Ok(())
        })
        .unwrap();

    let mut runner = TestRunner::new(config(16));
    runner
        .run(&deep(), |raw| {
            check(
                &api,
                reqwest::Method::POST,
                "/v1/sandboxes",
                Some(raw.clone()),
            )?;
            check(&api, reqwest::Method::POST, &exec, Some(raw))?;
            Ok(())
        })
        .unwrap();

    // The daemon is still up, and still serves.
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the daemon died"
    );
    assert_eq!(api.exec(&sandbox, &["echo", "still"])["stdout"], "still\n");
    let (_, state) = api.get(&format!("/v1/sandboxes/{sandbox}/processes/{pid}"));
    assert_eq!(state["state"], "running", "{state}");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(90),
        "the property test took {took:?}"
    );
}
