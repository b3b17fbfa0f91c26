//! How documents are read: steps, titles, options, and errors that point at the fault.

use std::path::Path;

use upstream_doc::{Document, ErrorKind, Language, Network};

fn parse(text: &str) -> Document {
    Document::parse(Path::new("doc.md"), text.as_bytes()).expect("document parses")
}

fn error(text: &[u8]) -> upstream_doc::ParseError {
    Document::parse(Path::new("doc.md"), text).expect_err("document is rejected")
}

#[test]
fn steps_are_fenced_blocks_of_known_languages() {
    let doc = parse(
        "# Count\n\n```bash\nls | wc -l\n```\n\n```text\nnot a step\n```\n\n## Sum\n\n~~~python\nprint(1)\n~~~\n\n```sh continue_on_error\nfalse\n```\n",
    );
    let steps = doc.steps();
    assert_eq!(steps.len(), 3);
    assert_eq!(
        (steps[0].language, steps[0].title().as_str()),
        (Language::Bash, "Count")
    );
    assert_eq!(steps[0].code, "ls | wc -l\n");
    assert_eq!(
        (steps[1].language, steps[1].title().as_str()),
        (Language::Python, "Sum")
    );
    assert_eq!(steps[1].location.line, 13);
    assert!(steps[2].continue_on_error);
    assert!(!steps[0].continue_on_error);
}

#[test]
fn steps_inside_lists_and_block_quotes_are_found() {
    let doc =
        parse("> ```bash\n> echo quoted\n> ```\n\n- item\n\n  ```bash\n  echo listed\n  ```\n");
    let codes: Vec<&str> = doc.steps().iter().map(|s| s.code.as_str()).collect();
    assert_eq!(codes, ["echo quoted\n", "echo listed\n"]);
}

#[test]
fn a_step_without_heading_is_titled_by_its_first_line() {
    let doc = parse("```bash\n\n  echo hello world\n```\n");
    assert_eq!(doc.steps()[0].title(), "echo hello world");
}

#[test]
fn front_matter_is_read() {
    let doc = parse(
        "---\nimage: host\nmemory: 256M\ncpus: 0.5\ntimeout: 10m\nstep_timeout: 30s\nnetwork: host\nenv:\n  N: 3\n  NAME: x\nsecrets: [TOKEN]\nartifacts: [\"out/*.csv\"]\nworkdir: /data\ncontext: research\n---\n```bash\ntrue\n```\n",
    );
    let fm = doc.front_matter();
    assert_eq!(fm.memory, Some(256 << 20));
    assert_eq!(fm.cpus, Some(0.5));
    assert_eq!(fm.timeout, Some(std::time::Duration::from_secs(600)));
    assert_eq!(fm.step_timeout, Some(std::time::Duration::from_secs(30)));
    assert_eq!(fm.network, Network::Host);
    assert_eq!(fm.env.get("N").map(String::as_str), Some("3"));
    assert_eq!(fm.secrets, ["TOKEN"]);
    assert_eq!(fm.workdir(), "/data");
    assert_eq!(fm.context.as_deref(), Some("research"));
}

#[test]
fn unknown_front_matter_key_points_at_the_key() {
    let e = error(b"---\nimage: host\nimgae: python\n---\n```bash\ntrue\n```\n");
    assert!(
        matches!(e.kind, ErrorKind::FrontMatter(ref m) if m.contains("imgae")),
        "{e:?}"
    );
    let loc = e.location.unwrap();
    assert_eq!((loc.line, loc.column), (3, 1));
    assert!(e.to_string().starts_with("doc.md:3:1: "), "{e}");
    assert!(
        e.report().contains("hint: front matter keys are: image"),
        "{}",
        e.report()
    );
}

#[test]
fn malformed_yaml_points_into_the_front_matter() {
    let e = error(b"---\nenv: [unclosed\n---\n```bash\ntrue\n```\n");
    assert!(matches!(e.kind, ErrorKind::FrontMatter(_)));
    assert!(e.location.unwrap().line >= 2, "{e}");
}

#[test]
fn bad_values_are_errors() {
    for (text, word) in [
        ("memory: lots", "size"),
        ("timeout: soon", "duration"),
        ("network: wifi", "unknown variant"),
        ("cpus: -1", "cpus"),
    ] {
        let doc = format!("---\n{text}\n---\n```bash\ntrue\n```\n");
        let e = error(doc.as_bytes());
        assert!(e.to_string().contains(word), "{text}: {e}");
        assert_eq!(e.location.unwrap().line, 2, "{text}: {e}");
    }
}

#[test]
fn unclosed_front_matter_is_an_error() {
    let e = error(b"---\nimage: host\n```bash\ntrue\n```\n");
    assert_eq!(e.kind, ErrorKind::UnclosedFrontMatter);
    assert_eq!(e.location.unwrap().line, 1);
}

#[test]
fn unclosed_fence_points_at_its_opening() {
    let e = error(b"# T\n\n```bash\necho never closed\n");
    assert_eq!(
        e.kind,
        ErrorKind::UnclosedFence {
            fence: "```".into()
        }
    );
    let loc = e.location.unwrap();
    assert_eq!((loc.line, loc.column), (3, 1));
    assert!(
        e.report().contains("add a closing ``` line"),
        "{}",
        e.report()
    );
}

#[test]
fn empty_and_stepless_documents_are_errors() {
    assert_eq!(error(b"").kind, ErrorKind::Empty);
    assert_eq!(error(b" \n\n").kind, ErrorKind::Empty);
    assert_eq!(
        error(b"# Just prose\n\n```text\nhi\n```\n").kind,
        ErrorKind::NoSteps
    );
}

#[test]
fn non_utf8_points_at_the_first_bad_byte() {
    let e = error(b"# ok\nab\xffcd\n");
    assert_eq!(e.kind, ErrorKind::NotUtf8);
    let loc = e.location.unwrap();
    assert_eq!((loc.line, loc.column), (2, 3));
}

#[test]
fn unknown_step_option_is_an_error() {
    let e = error(b"```bash contineu_on_error\ntrue\n```\n");
    assert_eq!(
        e.kind,
        ErrorKind::UnknownStepOption {
            option: "contineu_on_error".into()
        }
    );
    assert_eq!(e.location.unwrap().column, 9);
}

#[test]
fn missing_file_and_directory_are_errors() {
    let dir = std::env::temp_dir();
    let e = Document::read(&dir).unwrap_err();
    assert_eq!(e.kind, ErrorKind::IsDirectory);
    let e = Document::read(&dir.join("upstream-no-such-file.md")).unwrap_err();
    assert!(matches!(e.kind, ErrorKind::Io(ref m) if m == "no such file"));
}

/// Every number front matter takes is bounded when the document is read: the value is
/// refused with its place, the bound and a hint, and nothing downstream ever sees it.
#[test]
fn huge_and_hostile_numbers_are_refused_with_their_place_and_the_bound() {
    for (line, column, bound) in [
        ("timeout: 1e300", 10, "at most 365 days"),
        ("timeout: \"1e300s\"", 10, "at most 365 days"),
        ("timeout: 99999999999999999999h", 10, "at most 365 days"),
        ("timeout: 99999999999999999999", 10, "at most 365 days"),
        ("timeout: 366d", 10, "at most 365 days"),
        ("timeout: .inf", 10, "at most 365 days"),
        ("timeout: .nan", 10, "not a duration"),
        ("timeout: -5", 10, "not a positive duration"),
        ("timeout: 1e-12", 10, "not a positive duration"),
        ("timeout: [1, 2]", 10, "not a list"),
        ("step_timeout: 1e300", 15, "at most 365 days"),
        (
            "step_timeout: 340282366920938463463374607431768211455",
            15,
            "at most 365 days",
        ),
        ("memory: 1e30", 9, "at most 1 PiB"),
        ("memory: 99999999999999999999T", 9, "at most 1 PiB"),
        ("memory: 2048T", 9, "at most 1 PiB"),
        ("memory: -1", 9, "not a positive size"),
        ("memory: {a: 1}", 9, "not a mapping"),
        ("memory: 4K", 9, "from 4M to 1024T"),
        ("memory: 1", 9, "from 4M to 1024T"),
        ("disk: 1K", 7, "from 16M to 8T"),
        ("disk: 9T", 7, "from 16M to 8T"),
        ("disk: -3", 7, "not a positive size"),
        ("disk: lots", 7, "not a size"),
        ("cpus: 1e9", 7, "from 0.01 to 1024"),
        ("cpus: 1e300", 7, "from 0.01 to 1024"),
        ("cpus: .nan", 7, "from 0.01 to 1024"),
        ("cpus: -.inf", 7, "from 0.01 to 1024"),
        ("cpus: 0", 7, "from 0.01 to 1024"),
        ("cpus: \"4096\"", 7, "from 0.01 to 1024"),
        ("cpus: true", 7, "not true/false"),
    ] {
        let doc = format!("---\nimage: host\n{line}\n---\n```bash\ntrue\n```\n");
        let e = error(doc.as_bytes());
        let loc = e
            .location
            .unwrap_or_else(|| panic!("{line}: no place: {e}"));
        assert_eq!((loc.line, loc.column), (3, column), "{line}: {e}");
        assert!(
            e.to_string()
                .starts_with(&format!("doc.md:3:{column}: invalid front matter: ")),
            "{line}: {e}"
        );
        assert!(e.to_string().contains(bound), "{line}: says `{bound}`: {e}");
        let report = e.report();
        assert!(report.contains(&format!("3 | {line}")), "{report}");
        let hint = e.hint().unwrap();
        assert!(
            !hint.contains("keys are") && hint.contains("such as"),
            "{line}: a hint about the value: {report}"
        );
    }
}

/// The largest values inside the bounds are taken as written.
#[test]
fn values_at_the_bounds_are_taken() {
    let doc = parse(
        "---\ntimeout: 365d\nstep_timeout: 31536000\nmemory: 1024T\ncpus: 1024\ndisk: 8T\n---\n```bash\ntrue\n```\n",
    );
    let fm = doc.front_matter();
    assert_eq!(fm.timeout, Some(upstream_doc::front_matter::MAX_DURATION));
    assert_eq!(
        fm.step_timeout,
        Some(upstream_doc::front_matter::MAX_DURATION)
    );
    assert_eq!(fm.memory, Some(upstream_doc::front_matter::MAX_SIZE));
    assert_eq!(fm.cpus, Some(1024.0));
    assert_eq!(fm.disk, Some(upstream_doc::front_matter::MAX_DISK));
    let doc =
        parse("---\ntimeout: 1.5\nmemory: 4M\ncpus: 0.01\ndisk: 16M\n---\n```bash\ntrue\n```\n");
    let fm = doc.front_matter();
    assert_eq!(fm.timeout, Some(std::time::Duration::from_millis(1500)));
    assert_eq!((fm.memory, fm.cpus), (Some(4 << 20), Some(0.01)));
    assert_eq!(fm.disk, Some(16 << 20));
}

/// A key's value on the lines below it is pointed at by the key; values of other types
/// than the key takes are named as such.
#[test]
fn wrong_types_are_named_at_their_key() {
    let e = error(b"---\nimage: host\ntimeout:\n  - 1\n---\n```bash\ntrue\n```\n");
    let loc = e.location.unwrap();
    assert_eq!((loc.line, loc.column), (3, 1), "{e}");
    assert!(e.to_string().contains("not a list"), "{e}");
    let e = error(b"---\nenv:\n  A: [1]\n---\n```bash\ntrue\n```\n");
    assert!(e.to_string().contains("env `A` is a list"), "{e}");
    assert_eq!(e.location.unwrap().line, 2, "{e}");
    let e = error(b"---\nworkdir: [a]\n---\n```bash\ntrue\n```\n");
    assert!(e.to_string().contains("workdir must be a string"), "{e}");
    let e = error(b"---\nartifacts: [1, {a: b}]\n---\n```bash\ntrue\n```\n");
    assert!(e.to_string().contains("path or glob"), "{e}");
    // The value quoted in a message cannot pass for its hint.
    let e = error(b"---\nworkdir: \"rel\\n\\x1fworkdir\\n\\x1fforged\"\n---\n```bash\ntrue\n```\n");
    assert!(e.hint().unwrap().contains("/workspace"), "{}", e.report());
}

/// A line that only looks like a closing fence (inside a quote the fence is not in, or
/// indented past a fence's place) does not close the step: the block runs on unclosed, so
/// no result is written into it.
#[test]
fn a_fence_is_not_closed_by_a_quoted_or_deeply_indented_fence_line() {
    for text in [
        "```bash\necho never closed\n> ```bash\n> echo quoted\n> ```\n",
        "```bash\necho never closed\n1. one\n   - two\n     ```python\n     x = 2\n     ```\n",
    ] {
        let e = error(text.as_bytes());
        assert!(
            matches!(e.kind, ErrorKind::UnclosedFence { .. }),
            "{text:?}: {e}"
        );
        assert_eq!(e.location.unwrap().line, 1, "{e}");
    }
}

/// A result block in another container than its step (here a quote after a listed step) is
/// not taken for the step's result: replacing it would move what follows into the list.
#[test]
fn a_result_block_in_another_container_is_not_the_steps() {
    // Not the step's, and no other step's either: debris a rewrite would leave stale.
    let e = error(
        b"- item\n\n  ```bash\n  echo listed\n  ```\n> <!-- upstream:result -->\n> **Result:** exit 1\n> <!-- /upstream:result -->\n",
    );
    assert_eq!(
        (e.kind, e.location.map(|l| (l.line, l.column))),
        (ErrorKind::OrphanResult, Some((6, 3)))
    );
    let doc = parse(
        "- item\n\n  ```bash\n  echo listed\n  ```\n\n  <!-- upstream:result -->\n  **Result:** exit 1\n  <!-- /upstream:result -->\n",
    );
    assert!(doc.steps()[0].has_result());
}

const STEP: &str = "# One\n\n```bash\necho one\n```\n";
const RESULT: &str = "<!-- upstream:result -->\n**Result:** exit 0 (0.01s)\n\n```text\none\n```\n<!-- /upstream:result -->\n";

fn place(e: &upstream_doc::ParseError) -> (ErrorKind, Option<(usize, usize)>) {
    (e.kind.clone(), e.location.map(|l| (l.line, l.column)))
}

/// What is left of a result block whose opening marker was deleted is an error at the
/// marker that closes nothing, not debris a rewrite leaves under the new result.
#[test]
fn a_result_block_without_its_opening_marker_is_an_error_at_its_closing_one() {
    let damaged = format!(
        "{STEP}{}",
        RESULT.replacen("<!-- upstream:result -->\n", "", 1)
    );
    let e = error(damaged.as_bytes());
    assert_eq!(place(&e), (ErrorKind::StrayResultEnd, Some((11, 1))));
    assert!(e.report().contains("doc.md:11:1"), "{}", e.report());
    assert!(e.hint().unwrap().contains("delete what is left"));
}

#[test]
fn a_stray_closing_marker_is_an_error() {
    let e = error(format!("{STEP}{RESULT}\nProse.\n\n<!-- /upstream:result -->\n").as_bytes());
    assert_eq!(place(&e), (ErrorKind::StrayResultEnd, Some((16, 1))));
    // And one before any result block at all.
    let e = error(format!("<!-- /upstream:result -->\n\n{STEP}").as_bytes());
    assert_eq!(place(&e), (ErrorKind::StrayResultEnd, Some((1, 1))));
}

/// A block pasted twice under its step is taken whole with the first, so a rewrite leaves one.
#[test]
fn a_duplicated_result_block_is_replaced_with_the_first() {
    let doc = parse(&format!("{STEP}{RESULT}\n{RESULT}\nAfter.\n"));
    assert!(doc.steps()[0].has_result());
    let unchanged = vec![None; 1];
    assert_eq!(
        doc.render(&unchanged),
        format!("{STEP}{RESULT}\n{RESULT}\nAfter.\n")
    );
    let rerun = vec![Some(upstream_doc::ResultBlock::not_run())];
    let rendered = doc.render(&rerun);
    assert_eq!(
        rendered.matches("<!-- upstream:result -->").count(),
        1,
        "{rendered}"
    );
    assert!(
        rendered.ends_with("<!-- /upstream:result -->\n\nAfter.\n"),
        "{rendered}"
    );
    assert!(!rendered.contains("exit 0"), "{rendered}");
}

/// A result block moved away from its step (above it, or past prose) follows no step.
#[test]
fn a_moved_result_block_is_an_error_at_its_opening_marker() {
    let e = error(format!("{RESULT}\n{STEP}").as_bytes());
    assert_eq!(place(&e), (ErrorKind::OrphanResult, Some((1, 1))));
    let e = error(format!("{STEP}\nSome prose.\n\n{RESULT}").as_bytes());
    assert_eq!(place(&e), (ErrorKind::OrphanResult, Some((9, 1))));
    assert!(e.hint().unwrap().contains("move it back"));
    // The result of a step that is no longer one (its fence now says `text`).
    let e = error(format!("{STEP}{RESULT}\n```text\nnot a step\n```\n{RESULT}").as_bytes());
    assert_eq!(place(&e), (ErrorKind::OrphanResult, Some((17, 1))));
}

#[test]
fn a_result_block_opened_twice_is_unclosed() {
    let damaged = format!("{STEP}<!-- upstream:result -->\n**Result:** exit 0\n\n{RESULT}");
    let e = error(damaged.as_bytes());
    assert_eq!(place(&e), (ErrorKind::UnclosedResult, Some((6, 1))));
}
