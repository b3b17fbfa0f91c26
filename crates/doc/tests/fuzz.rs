//! Hostile documents, made to measure: front matter whose values are huge, negative, NaN or
//! infinite numbers, durations and sizes past every bound, YAML of unexpected types, long
//! strings, deep nesting and aliases; bodies of fences, result markers, lists and quotes in
//! one another. Whatever the input, parsing returns (never panics); an error about the
//! content names a line and column inside the document; a document that parses renders back
//! byte for byte, and results written into it are read back as results.

use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;
use upstream_doc::{Captured, Document, ErrorKind, Outcome, ParseError, ResultBlock};

/// Numbers as YAML may spell them, most of them out of every bound.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "1e300",
            "-1e300",
            "1e-300",
            "1e19",
            "18446744073709551615",
            "18446744073709551616",
            "99999999999999999999",
            "-99999999999999999999",
            "340282366920938463463374607431768211456",
            "-170141183460469231731687303715884105729",
            ".nan",
            ".NaN",
            ".inf",
            "-.inf",
            "+.Inf",
            "0",
            "-0",
            "-0.0",
            "0x7fffffffffffffff",
            "0o777",
            "1_000",
            "-1",
            "31536000",
            "31536001",
            "1024",
            "0.01",
            "0.009",
        ])
        .prop_map(str::to_string),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u128>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:e}")),
        any::<f64>().prop_map(|f| f.to_string()),
    ]
}

/// Durations and sizes as text, bare or quoted.
fn unit_value() -> impl Strategy<Value = String> {
    let units = prop::sample::select(vec![
        "", "ns", "us", "ms", "s", "m", "h", "d", "w", "M", "y", "years", "K", "KiB", "MB", "G",
        "GiB", "T", "TB", "P", " parsecs",
    ]);
    let plain = prop_oneof![
        prop::sample::select(vec![
            "1e300s",
            "99999999999999999999h",
            "18446744073709551615s",
            "1h 30m",
            "365d",
            "366d",
            "-5s",
            "0s",
            "1ns",
            "nan s",
            "infs",
            "1024T",
            "1025T",
            "1e30",
            "512M",
            "1.5g",
            "...",
        ])
        .prop_map(str::to_string),
        (number(), units).prop_map(|(n, u)| format!("{n}{u}")),
    ];
    (plain, 0..3usize).prop_map(|(text, quoting)| match quoting {
        0 => text,
        1 => format!("\"{text}\""),
        _ => format!("'{text}'"),
    })
}

/// Values of the types YAML has, and of none.
fn odd_value() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "~",
            "null",
            "true",
            "yes",
            "[]",
            "{}",
            "[1, [2, [3]]]",
            "[a, b]",
            "{a: {b: c}}",
            "!!binary aGVsbG8=",
            "!!str 5",
            "!!int 5",
            "!!float .nan",
            "!foo bar",
            "!foo",
            "&a [1, 2]",
            "*a",
            "*undefined",
            "|\n  block\n  text",
            ">-\n  folded\n  text",
            "'single ''quoted'''",
            "\"esc \\u0000 \\x1f \\n\"",
            "\"unterminated",
            "[unclosed",
            "{a: ",
            ": :",
            "- - -",
            "\t",
            "? complex\n: key",
            "\"\\u{1f}\"",
        ])
        .prop_map(str::to_string),
        (1..10_000usize).prop_map(|n| "a".repeat(n)),
        (1..300usize).prop_map(|d| format!("{}{}", "[".repeat(d), "]".repeat(d))),
        (1..200usize).prop_map(|d| format!("{}1{}", "{a: ".repeat(d), "}".repeat(d))),
        (1..100usize).prop_map(|d| {
            (0..d)
                .map(|i| format!("\n{}- ", "  ".repeat(i + 1)))
                .collect::<String>()
        }),
        "[ -~\u{e9}\u{4e2d}\u{1f600}]{0,30}",
    ]
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![number(), unit_value(), odd_value()]
}

/// One line (or block) of front matter.
fn entry() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
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
        "imgae",
        "\"timeout\"",
        "'memory'",
    ]);
    prop_oneof![
        4 => (key, value()).prop_map(|(k, v)| format!("{k}: {v}\n")),
        1 => prop::collection::vec(("[A-Z_=]{0,6}", value()), 0..4).prop_map(|vars| {
            let lines: String = vars.iter().map(|(n, v)| format!("  {n}: {v}\n")).collect();
            format!("env:\n{lines}")
        }),
        1 => prop::collection::vec(value(), 0..4).prop_map(|items| {
            let lines: String = items.iter().map(|v| format!("  - {v}\n")).collect();
            format!("artifacts:\n{lines}")
        }),
        // Aliases that multiply (a "billion laughs").
        1 => (1..8usize).prop_map(|depth| {
            let mut text = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n".to_string();
            for i in 1..depth {
                let refs = vec![format!("*a{}", i - 1); 10].join(", ");
                text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
            }
            text
        }),
        1 => Just("# a comment\n".to_string()),
        1 => Just("\n".to_string()),
    ]
}

fn front_matter() -> impl Strategy<Value = String> {
    let close = prop::sample::select(vec!["---\n", "...\n", "--- \n", ""]);
    (prop::collection::vec(entry(), 0..6), close, any::<bool>()).prop_map(
        |(entries, close, bom)| {
            let bom = if bom { "\u{feff}" } else { "" };
            format!("{bom}---\n{}{close}", entries.concat())
        },
    )
}

/// Pieces of a body, the awkward ones above all.
fn body_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "# Heading\n",
            "Title\n===\n",
            "# ```bash\n",
            "```bash\necho hi\n```\n",
            "```bash continue_on_error\nfalse\n```\n",
            "```bash bogus\ntrue\n```\n",
            "```bash\necho never closed\n",
            "``````python\n```\nprint(1)\n```\n``````\n",
            "~~~ sh\nls\n~~~\n",
            "~~~~python\nprint('~~~')\n~~~~\n",
            "\t```bash\n\ttabbed\n\t```\n",
            "   ```bash\n   three spaces\n   ```\n",
            "> ```bash\n> echo quoted\n> ```\n",
            "> > ```sh\n> > echo deep\n> > ```\n",
            "> - > ```bash\n> - > echo mixed\n> - > ```\n",
            "- item\n\n  ```bash\n  echo listed\n  ```\n",
            "1. one\n   - two\n     ```python\n     x = 2\n     ```\n",
            "- a\n  - b\n    - c\n      > ```bash\n      > nested\n      > ```\n",
            "<div>\n```bash\nnot a step\n```\n</div>\n",
            "<!-- upstream:result -->\n**Result:** exit 0 (0.01s)\n<!-- /upstream:result -->\n",
            "<!-- upstream:result -->\n",
            "<!-- /upstream:result -->\n",
            "> <!-- upstream:result -->\n> **Result:** exit 1\n> <!-- /upstream:result -->\n",
            "```text\n<!-- upstream:result -->\n```\n",
            "    indented code\n",
            "---\n",
            "\r\n",
            "\n",
            "\u{feff}",
        ])
        .prop_map(str::to_string),
        "[ -~\t\r\n\u{e9}\u{4e2d}\u{1f600}`~#>*-]{0,40}",
    ]
}

fn body() -> impl Strategy<Value = String> {
    prop::collection::vec(body_piece(), 0..12).prop_map(|p| p.concat())
}

/// A document with front matter that may be anything.
fn document() -> impl Strategy<Value = String> {
    (prop::option::of(front_matter()), body(), any::<bool>()).prop_map(|(fm, body, crlf)| {
        let text = format!("{}{}", fm.unwrap_or_default(), body);
        if crlf {
            text.replace('\n', "\r\n")
        } else {
            text
        }
    })
}

/// An error about content names a place inside the document, and shows it.
fn check_error(text: &str, e: &ParseError) -> Result<(), TestCaseError> {
    let report = e.report();
    let placed = !matches!(
        e.kind,
        ErrorKind::Empty | ErrorKind::NoSteps | ErrorKind::Io(_) | ErrorKind::IsDirectory
    );
    prop_assert_eq!(e.location.is_some(), placed, "{}", report);
    if let Some(loc) = e.location {
        let lines: Vec<&str> = text.split('\n').collect();
        prop_assert!(
            loc.line >= 1 && loc.line <= lines.len(),
            "line {} of {}: {}",
            loc.line,
            lines.len(),
            report
        );
        let width = lines[loc.line - 1].chars().count();
        prop_assert!(
            loc.column >= 1 && loc.column <= width + 1,
            "column {} of a line of {}: {}",
            loc.column,
            width,
            report
        );
        let place = format!("prop.md:{}:{}: ", loc.line, loc.column);
        prop_assert!(e.to_string().starts_with(&place), "{}", e);
        prop_assert!(e.source_line.is_some(), "{}", report);
    }
    prop_assert!(e.hint().is_some_and(|h| !h.is_empty()), "{}", report);
    Ok(())
}

fn result() -> ResultBlock {
    ResultBlock {
        outcome: Outcome::Exited(0),
        duration: Some(Duration::from_millis(1400)),
        output: Captured {
            head: b"```\n<!-- /upstream:result -->\nout\n".to_vec(),
            ..Captured::default()
        },
        outputs: vec![("summary".into(), "`x`".into())],
        full_output: None,
    }
}

/// Parses `text` and checks what the crate promises of the outcome.
fn check(text: &str) -> Result<(), TestCaseError> {
    let doc = match Document::parse(Path::new("prop.md"), text.as_bytes()) {
        Ok(doc) => doc,
        Err(e) => return check_error(text, &e),
    };
    let unchanged = vec![None; doc.steps().len()];
    prop_assert_eq!(&doc.render(&unchanged), text);
    // Results written in are read back as the steps' results, and a re-run replaces them.
    let results = vec![Some(result()); doc.steps().len()];
    let once = doc.render(&results);
    let again = Document::parse(Path::new("prop.md"), once.as_bytes());
    let again = match again {
        Ok(d) => d,
        Err(e) => return Err(TestCaseError::fail(format!("{}\n{once}", e.report()))),
    };
    let codes = |d: &Document| d.steps().iter().map(|s| s.code.clone()).collect::<Vec<_>>();
    prop_assert_eq!(codes(&again), codes(&doc), "{}", once);
    prop_assert!(again.steps().iter().all(|s| s.has_result()), "{}", once);
    prop_assert_eq!(&again.render(&results), &once);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 3000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn hostile_front_matter_never_panics_and_errors_point_inside(
        fm in front_matter(),
        steps in prop::sample::select(vec!["```bash\ntrue\n```\n", "", "```python\n"]),
    ) {
        check(&format!("{fm}{steps}"))?;
    }

    #[test]
    fn hostile_documents_parse_or_point_inside_and_round_trip(text in document()) {
        check(&text)?;
    }

    #[test]
    fn one_hostile_value_at_any_key(key in prop::sample::select(upstream_doc::front_matter::KEYS), v in value()) {
        let text = format!("---\nimage: host\n{key}: {v}\n---\n```bash\ntrue\n```\n");
        check(&text)?;
    }
}
