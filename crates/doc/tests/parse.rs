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
