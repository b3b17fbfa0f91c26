//! Bad input: a one-line error naming file:line:column with a hint, exit 2, the file untouched.

use std::fs;

use crate::util::{Env, code, stderr};

fn assert_rejected(env: &Env, name: &str, bytes: &[u8], place: &str, words: &str) {
    let path = env.write(name, bytes);
    let out = env.upstream(&["run", path.to_str().unwrap()]);
    let err = stderr(&out);
    assert_eq!(code(&out), 2, "{name}: {err}");
    let first = err.lines().next().unwrap_or("");
    assert!(
        first.starts_with("error: ") && first.contains(place),
        "{name}: first line names {place}: {err}"
    );
    assert!(err.contains(words), "{name}: says `{words}`: {err}");
    assert!(err.contains("hint: "), "{name}: gives a hint: {err}");
    assert_eq!(
        fs::read(&path).unwrap(),
        bytes,
        "{name}: the file is unchanged"
    );
    assert!(!env.path(".upstream").exists(), "{name}: nothing ran");
}

#[test]
fn malformed_yaml() {
    let env = Env::new();
    assert_rejected(
        &env,
        "doc.md",
        b"---\nenv: [unclosed\n---\n```bash\ntrue\n```\n",
        "doc.md:2:",
        "invalid front matter",
    );
}

#[test]
fn unknown_front_matter_key() {
    let env = Env::new();
    assert_rejected(
        &env,
        "doc.md",
        b"---\nimage: host\nmemroy: 1G\n---\n```bash\ntrue\n```\n",
        "doc.md:3:1",
        "unknown front matter key `memroy`",
    );
}

#[test]
fn unclosed_fence() {
    let env = Env::new();
    assert_rejected(
        &env,
        "doc.md",
        b"# Title\n\n```bash\necho never closed\n",
        "doc.md:3:1",
        "never closed",
    );
}

#[test]
fn empty_document() {
    let env = Env::new();
    assert_rejected(&env, "doc.md", b"", "doc.md", "empty");
}

#[test]
fn no_steps() {
    let env = Env::new();
    assert_rejected(
        &env,
        "doc.md",
        b"# Only prose\n\n```text\nnot a step\n```\n",
        "doc.md",
        "no steps",
    );
}

#[test]
fn non_utf8_bytes() {
    let env = Env::new();
    assert_rejected(
        &env,
        "doc.md",
        b"# Title\n\n```bash\necho \xff\xfe\n```\n",
        "doc.md:4:6",
        "not valid UTF-8",
    );
}

#[test]
fn missing_file() {
    let env = Env::new();
    let out = env.upstream(&["run", "nope.md"]);
    assert_eq!(code(&out), 2);
    let err = stderr(&out);
    assert!(
        err.starts_with("error: nope.md: cannot read the document: no such file"),
        "{err}"
    );
    assert!(err.contains("hint: "), "{err}");
}

#[test]
fn unreadable_file() {
    if crate::util::is_root() {
        // Root reads any file; run the check as nobody.
        let env = Env::new();
        let path = env.write("secret.md", "```bash\ntrue\n```\n");
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let dir_mode = std::os::unix::fs::PermissionsExt::from_mode(0o755);
        fs::set_permissions(env.dir.path(), dir_mode).unwrap();
        let out = std::process::Command::new(crate::util::binary_for_nobody(&env))
            .args(["run", path.to_str().unwrap()])
            .current_dir("/")
            .env("UPSTREAM_RUNTIME_DIR", "/nonexistent")
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        assert_eq!(code(&out), 2, "{}", stderr(&out));
        assert!(
            stderr(&out).contains("permission denied"),
            "{}",
            stderr(&out)
        );
        assert!(stderr(&out).contains("hint: "));
    } else {
        let env = Env::new();
        let path = env.write("secret.md", "```bash\ntrue\n```\n");
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
        let out = env.upstream(&["run", "secret.md"]);
        assert_eq!(code(&out), 2);
        assert!(
            stderr(&out).contains("permission denied"),
            "{}",
            stderr(&out)
        );
    }
}

use std::os::unix::process::CommandExt;

#[test]
fn directory_instead_of_file() {
    let env = Env::new();
    fs::create_dir(env.path("docs")).unwrap();
    let out = env.upstream(&["run", "docs"]);
    assert_eq!(code(&out), 2);
    assert!(
        stderr(&out).contains("docs: this is a directory"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_input_in_any_document_runs_none() {
    let env = Env::new();
    let good = b"```bash\ntrue\n```\n";
    let good_path = env.write("good.md", good);
    env.write("bad.md", b"---\nbogus: 1\n---\n```bash\ntrue\n```\n");
    let out = env.upstream(&["run", "good.md", "bad.md"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert_eq!(
        fs::read(good_path).unwrap(),
        good,
        "the good document did not run either"
    );
}

#[test]
fn missing_secret_is_bad_input() {
    crate::require_sandbox!();
    let env = Env::new();
    let text = b"---\nsecrets: [UPSTREAM_TEST_NO_SUCH_SECRET]\n---\n```bash\ntrue\n```\n";
    let path = env.write("doc.md", text);
    let out = env.upstream(&["run", "doc.md"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("UPSTREAM_TEST_NO_SUCH_SECRET"));
    assert_eq!(fs::read(path).unwrap(), text);
}

/// `timeout: 1e300` once panicked `upstream run` (exit 101); every number in front matter is
/// bounded when the document is read.
#[test]
fn huge_numbers_in_front_matter() {
    let env = Env::new();
    for (i, (line, column, words)) in [
        ("timeout: 1e300", 10, "at most 365 days"),
        (
            "step_timeout: \"99999999999999999999h\"",
            15,
            "at most 365 days",
        ),
        ("memory: 1e30", 9, "at most 1 PiB"),
        ("cpus: .nan", 7, "from 0.01 to 1024"),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("huge-{i}.md");
        let doc = format!("---\nimage: host\n{line}\n---\n```bash\ntrue\n```\n");
        assert_rejected(
            &env,
            &name,
            doc.as_bytes(),
            &format!("{name}:3:{column}: invalid front matter"),
            words,
        );
    }
}
