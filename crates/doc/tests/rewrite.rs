//! Golden files for the rewriter: each `rewrite/<case>/in.md` is rendered with made-up results
//! and compared with `rewrite/<case>/out.md`. `UPDATE_GOLDEN=1 cargo test` rewrites the
//! expected files. Each case is also rendered twice, to show a re-run replaces, not appends.
//!
//! The made-up result of a step depends on its code: `FAIL` exits 1, `LONG` prints 500 lines
//! (cut to 20 by the limits used here), `TICKS` prints backtick fences, `SECRET` prints a
//! secret that must be redacted; any other step prints one line.

use std::fs;
use std::path::Path;
use std::time::Duration;

use upstream_doc::{Document, Outcome, OutputCapture, OutputLimits, Redactor, ResultBlock};

fn made_up_result(code: &str, number: usize) -> ResultBlock {
    let limits = OutputLimits {
        max_lines: 20,
        max_bytes: 4096,
    };
    let mut capture = OutputCapture::new(limits);
    let mut redactor = Redactor::new(["hunter2"]);
    let text: String = if code.contains("LONG") {
        (1..=500).map(|n| format!("line {n}\n")).collect()
    } else if code.contains("TICKS") {
        "```bash\nnot a step\n````\n".to_string()
    } else if code.contains("SECRET") {
        "token is hunter2\n".to_string()
    } else {
        format!("\x1b[32moutput of step {number}\x1b[0m\n")
    };
    let mut redacted = Vec::new();
    redactor.push(text.as_bytes(), &mut redacted);
    redactor.finish(&mut redacted);
    capture.push(&redacted);
    let output = capture.finish();
    ResultBlock {
        outcome: if code.contains("FAIL") {
            Outcome::Exited(1)
        } else {
            Outcome::Exited(0)
        },
        duration: Some(Duration::from_millis(100 * number as u64)),
        full_output: output
            .omitted
            .map(|_| format!("the whole output: .upstream/runs/TURN/step-{number}.log")),
        outputs: if code.contains("OUTPUTS") {
            vec![("count".into(), "847".into())]
        } else {
            Vec::new()
        },
        output,
    }
}

fn render(text: &str) -> String {
    let doc = Document::parse(Path::new("in.md"), text.as_bytes()).expect("case parses");
    let results: Vec<Option<ResultBlock>> = doc
        .steps()
        .iter()
        .map(|s| {
            if s.code.contains("KEEP") {
                None
            } else {
                Some(made_up_result(&s.code, s.number))
            }
        })
        .collect();
    doc.render(&results)
}

#[test]
fn rewrite_golden_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/rewrite");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut cases = 0;
    let mut failures = Vec::new();
    for entry in fs::read_dir(&root).expect("rewrite cases") {
        let case = entry.unwrap().path();
        let input = fs::read_to_string(case.join("in.md")).expect("in.md");
        let once = render(&input);
        let twice = render(&once);
        assert_eq!(
            once,
            twice,
            "{}: a second run must replace the results, not add to them",
            case.display()
        );
        let expected_path = case.join("out.md");
        if update {
            fs::write(&expected_path, &once).unwrap();
        } else {
            let expected = fs::read_to_string(&expected_path).unwrap_or_default();
            if expected != once {
                failures.push(format!(
                    "{}:\n--- expected\n{expected}\n--- got\n{once}",
                    case.display()
                ));
            }
        }
        cases += 1;
    }
    assert!(cases >= 8, "expected the rewrite cases, found {cases}");
    assert!(
        failures.is_empty(),
        "golden files differ (UPDATE_GOLDEN=1 to accept):\n{}",
        failures.join("\n")
    );
}
