//! The turn engine on the in-memory backend: resume, timeouts, redaction, what a turn records
//! and what becomes of the document, in milliseconds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use upstream_backend_fake::{Behaviour, FakeBackend};
use upstream_doc::Document;
use upstream_sandbox::{Backend, SandboxError};
use upstream_store::{ArtifactKind, Store, TurnState};
use upstream_turn::{
    Cancel, Event, Observer, StepStatus, Turn, TurnError, TurnOptions, TurnStatus, WriteBack,
};

/// Warnings and the text of every event, to look at after a turn.
#[derive(Default)]
struct Seen {
    warnings: Vec<String>,
    output: Vec<u8>,
}

impl Observer for Seen {
    fn event(&mut self, event: Event<'_>) {
        match event {
            Event::Warning(text) => self.warnings.push(text.to_string()),
            Event::Output(_, data) => self.output.extend_from_slice(data),
            _ => {}
        }
    }
}

/// A directory with a document and the store beside it.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new() -> Project {
        Project {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn write(&self, text: &str) -> PathBuf {
        let path = self.dir.path().join("doc.md");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn store_dir(&self) -> PathBuf {
        self.dir.path().join(".upstream")
    }

    fn options(&self) -> TurnOptions {
        TurnOptions {
            store: Some(self.store_dir()),
            secrets: Some(BTreeMap::from([(
                "API_TOKEN".into(),
                "tok-5ecret-77".into(),
            )])),
            ..TurnOptions::default()
        }
    }

    fn run(&self, backend: &FakeBackend, resume: bool) -> (Result<Turn, TurnError>, Seen) {
        self.run_with(backend, resume, &Cancel::default())
    }

    fn run_with(
        &self,
        backend: &FakeBackend,
        resume: bool,
        cancel: &Cancel,
    ) -> (Result<Turn, TurnError>, Seen) {
        let path = self.dir.path().join("doc.md");
        let (document, source) = Document::read(&path).unwrap();
        let options = TurnOptions {
            resume,
            ..self.options()
        };
        let mut seen = Seen::default();
        let turn = upstream_turn::run(&document, &source, backend, &options, &mut seen, cancel);
        (turn, seen)
    }

    fn store(&self) -> Store {
        Store::open(&self.store_dir()).unwrap()
    }

    /// Runs the document and writes its results back, as the CLI does.
    fn run_and_write(&self, backend: &FakeBackend) -> (Turn, WriteBack) {
        let path = self.dir.path().join("doc.md");
        let (document, source) = Document::read(&path).unwrap();
        let mut seen = Seen::default();
        let turn = upstream_turn::run(
            &document,
            &source,
            backend,
            &self.options(),
            &mut seen,
            &Cancel::default(),
        )
        .unwrap();
        let written = upstream_turn::write_back(&path, &source, &turn.render(&document)).unwrap();
        (turn, written)
    }
}

fn document_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

const PIPELINE: &str = "---\ncontext: research\nartifacts: [results/]\n---\n\
# Search\n```bash\nsearch\n```\n# Summarize\n```bash\nsummarize\n```\n";

fn pipeline() -> FakeBackend {
    FakeBackend::new(|c| {
        if c.runs("search") {
            Behaviour::exits(0)
                .stdout("Found 847 records\n")
                .writes("results/records.txt", "847\n")
                .publishes("count", "847")
                .publishes("summary", "847 records")
        } else if c.runs("summarize") {
            // An earlier step's output arrives as UPSTREAM_CTX_*.
            match c.env("UPSTREAM_CTX_COUNT") {
                Some("847") => Behaviour::exits(0).stdout("summarized\n"),
                other => Behaviour::exits(9).stderr(&format!("count was {other:?}\n")),
            }
        } else {
            Behaviour::exits(0)
        }
    })
}

#[test]
fn a_turn_records_its_steps_outputs_and_artifacts_and_writes_its_results() {
    let project = Project::new();
    let path = project.write(PIPELINE);
    let backend = pipeline();
    let (turn, written) = project.run_and_write(&backend);
    assert_eq!(turn.record.status, TurnStatus::Passed, "{:?}", turn.record);
    assert_eq!(written, WriteBack::Written);

    // The steps ran as the engine runs them: the step's code in a script file, its outputs
    // file made and collected.
    let requests = backend.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].argv[0], "bash");
    assert_eq!(requests[0].files[0].data, b"search\n");
    assert_eq!(
        requests[0].collect.as_ref().map(|c| c.path.as_str()),
        requests[0]
            .env
            .iter()
            .find(|(k, _)| k == "UPSTREAM_OUTPUT")
            .map(|(_, v)| v.as_str())
    );

    let store = project.store();
    let detail = store.turn("1").unwrap();
    assert_eq!(detail.summary.status, TurnState::Passed);
    assert_eq!(detail.summary.context, "research");
    let steps = store.steps(1).unwrap();
    assert_eq!(
        steps
            .iter()
            .map(|s| (s.status.as_str(), s.exit_code))
            .collect::<Vec<_>>(),
        [("passed", Some(0)), ("passed", Some(0))]
    );
    assert_eq!(steps[0].outputs["count"], "847");
    let log = store.blobs().read(steps[0].log.as_ref().unwrap()).unwrap();
    assert!(String::from_utf8_lossy(&log).contains("Found 847 records"));
    let artifacts = store.artifacts_of(1).unwrap();
    let saved: Vec<(&str, ArtifactKind)> = artifacts
        .iter()
        .map(|a| (a.path.as_str(), a.kind))
        .collect();
    assert_eq!(
        saved,
        [
            ("results", ArtifactKind::Dir),
            ("results/records.txt", ArtifactKind::File)
        ]
    );
    let outputs = store.context_outputs("research").unwrap();
    assert!(
        outputs
            .iter()
            .any(|o| o.key == "summary" && o.value == "847 records")
    );
    // The document as run and as written are in the store.
    assert_eq!(
        store.blobs().read(detail.source.as_ref().unwrap()).unwrap(),
        PIPELINE.as_bytes()
    );
    let text = document_text(&path);
    assert_eq!(
        store.blobs().read(detail.result.as_ref().unwrap()).unwrap(),
        text.as_bytes()
    );
    assert!(text.contains("**Result:** exit 0"), "{text}");
    assert!(text.contains("Found 847 records"), "{text}");
    assert!(
        text.starts_with(
            "---\ncontext: research\nartifacts: [results/]\n---\n# Search\n```bash\nsearch\n```\n"
        ),
        "the document's own text stays as it was: {text}"
    );
    assert!(
        text.contains("# Summarize\n```bash\nsummarize\n```\n"),
        "{text}"
    );
}

#[test]
fn the_next_turn_of_the_context_starts_from_the_artifacts_and_outputs_of_the_last() {
    let project = Project::new();
    project.write(PIPELINE);
    let backend = pipeline();
    project.run_and_write(&backend);
    project.write("---\ncontext: research\n---\n```bash\nreport\n```\n");
    let backend = FakeBackend::new(|c| {
        let records = c.files.read("/workspace/results/records.txt");
        let history = c.files.read("/context/turns.json").unwrap_or_default();
        let history = String::from_utf8_lossy(&history);
        if records.as_deref() == Some(b"847\n")
            && c.env("UPSTREAM_CTX_SUMMARY") == Some("847 records")
            && history.contains("\"research\"")
        {
            Behaviour::exits(0)
        } else {
            Behaviour::exits(1).stderr("not started from the last turn")
        }
    });
    let (turn, _) = project.run(&backend, false);
    let turn = turn.unwrap();
    assert_eq!(
        turn.record.status,
        TurnStatus::Passed,
        "{:?}",
        turn.record.steps
    );

    // Another context starts with nothing.
    project.write("---\ncontext: other\n---\n```bash\nreport\n```\n");
    let (turn, _) = project.run(&backend, false);
    assert_eq!(turn.unwrap().record.status, TurnStatus::Failed);
}

#[test]
fn secrets_are_redacted_from_results_records_and_the_store() {
    let project = Project::new();
    let path = project.write("---\nsecrets: [API_TOKEN]\n---\n```bash\nuse-token\n```\n");
    let backend = FakeBackend::new(|c| {
        let token = c.env("API_TOKEN").unwrap_or("missing").to_string();
        Behaviour::exits(0)
            .stdout(&format!("token is {token}\n"))
            .stderr(&format!("split {}", &token[..4]))
            .stderr(&format!("{} across chunks\n", &token[4..]))
            .publishes("leak", &token)
    });
    let (turn, written) = project.run_and_write(&backend);
    // The positive control: the step had the secret.
    assert!(
        backend.requests()[0]
            .env
            .contains(&("API_TOKEN".into(), "tok-5ecret-77".into()))
    );
    assert_eq!(written, WriteBack::Written);
    let step = &turn.record.steps[0];
    assert!(step.stdout.contains("token is "), "{}", step.stdout);
    for text in [
        step.stdout.clone(),
        step.stderr.clone(),
        format!("{:?}", step.outputs),
        document_text(&path),
    ] {
        assert!(!text.contains("tok-5ecret-77"), "{text}");
        assert!(
            !text.contains("5ecret"),
            "a secret split across chunks: {text}"
        );
    }
    let store = project.store();
    let row = &store.steps(1).unwrap()[0];
    let log = store.blobs().read(row.log.as_ref().unwrap()).unwrap();
    assert!(!String::from_utf8_lossy(&log).contains("5ecret"));
    assert!(String::from_utf8_lossy(&log).contains("token is "));
    assert!(!format!("{:?}", row.outputs).contains("5ecret"));
    let outputs = store
        .context_outputs(upstream_store::DEFAULT_CONTEXT)
        .unwrap();
    assert!(outputs.iter().all(|o| !o.value.contains("5ecret")));
}

#[test]
fn a_step_past_step_timeout_times_out_and_stops_the_turn() {
    let project = Project::new();
    let path =
        project.write("---\nstep_timeout: 2s\n---\n```bash\nslow\n```\n```bash\nnever\n```\n");
    let backend = FakeBackend::new(|c| {
        if c.runs("slow") {
            Behaviour::exits(0)
                .stdout("working\n")
                .taking(Duration::from_secs(60))
        } else {
            Behaviour::exits(0)
        }
    });
    let (turn, _) = project.run_and_write(&backend);
    assert_eq!(
        backend.requests().len(),
        1,
        "the step after the timeout ran"
    );
    assert_eq!(backend.requests()[0].timeout_ms, Some(2000));
    let steps = &turn.record.steps;
    assert_eq!(turn.record.status, TurnStatus::Failed);
    assert_eq!(steps[0].status, StepStatus::TimedOut);
    assert_eq!(
        steps[0].message.as_deref(),
        Some("the step ran past step_timeout")
    );
    assert_eq!(steps[0].duration_ms, Some(2000));
    assert_eq!(steps[1].status, StepStatus::NotRun);
    let text = document_text(&path);
    assert!(text.contains("working"), "what it printed is kept: {text}");
    assert!(text.contains("**Result:** not run"), "{text}");
}

#[test]
fn the_turn_timeout_bounds_every_step() {
    let project = Project::new();
    project.write("---\ntimeout: 10m\nstep_timeout: 1h\n---\n```bash\nslow\n```\n");
    let backend = FakeBackend::new(|_| Behaviour::exits(0).taking(Duration::from_secs(7200)));
    let (turn, _) = project.run(&backend, false);
    let turn = turn.unwrap();
    let given = backend.requests()[0].timeout_ms.unwrap();
    assert!(
        (590_000..=600_000).contains(&given),
        "a step gets what is left of the turn, not its step_timeout: {given} ms"
    );
    assert_eq!(turn.record.steps[0].status, StepStatus::TimedOut);
    assert_eq!(
        turn.record.steps[0].message.as_deref(),
        Some("the turn's timeout ran out")
    );
}

#[test]
fn an_out_of_memory_step_says_so() {
    let project = Project::new();
    project.write("---\nmemory: 64MB\n---\n```bash\nhungry\n```\n");
    let backend = FakeBackend::new(|_| Behaviour::exits(0).out_of_memory());
    let (turn, _) = project.run(&backend, false);
    let turn = turn.unwrap();
    assert_eq!(turn.record.steps[0].status, StepStatus::OutOfMemory);
    assert_eq!(turn.record.status, TurnStatus::Failed);
}

const RESUMABLE: &str = "# Prepare\n```bash\nprepare\n```\n# Analyse\n```bash\nanalyse v1\n```\n";

fn resumable() -> FakeBackend {
    FakeBackend::new(|c| {
        if c.runs("prepare") {
            Behaviour::exits(0)
                .writes("data.txt", "prepared\n")
                .publishes("rows", "12")
        } else if c.runs("analyse v1") {
            Behaviour::exits(1)
                .writes("partial.txt", "half\n")
                .stderr("bug\n")
        } else if c.runs("analyse v2") {
            let data = c.files.read("/workspace/data.txt");
            let partial = c.files.node("/workspace/partial.txt");
            match (data.as_deref(), partial, c.env("UPSTREAM_CTX_ROWS")) {
                (Some(b"prepared\n"), None, Some("12")) => Behaviour::exits(0),
                other => Behaviour::exits(2).stderr(&format!("{other:?}\n")),
            }
        } else {
            Behaviour::exits(0)
        }
    })
}

#[test]
fn resume_runs_from_the_failed_step_with_the_workspace_before_it() {
    let project = Project::new();
    project.write(RESUMABLE);
    let backend = resumable();
    let (turn, _) = project.run(&backend, false);
    assert_eq!(turn.unwrap().record.status, TurnStatus::Failed);
    assert_eq!(
        backend.kept().len(),
        1,
        "the failed turn kept its workspace"
    );

    project.write(&RESUMABLE.replace("analyse v1", "analyse v2"));
    let (turn, seen) = project.run(&backend, true);
    let turn = turn.unwrap();
    assert_eq!(
        turn.record.status,
        TurnStatus::Passed,
        "{:?}",
        turn.record.steps
    );
    assert_eq!(turn.record.resumed_from, Some(1));
    assert_eq!(turn.record.steps[0].status, StepStatus::Kept);
    assert_eq!(turn.record.steps[0].outputs["rows"], "12");
    let ran: Vec<String> = backend
        .requests()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.files[0].data).trim().to_string())
        .collect();
    assert_eq!(
        ran,
        ["prepare", "analyse v1", "analyse v2"],
        "step 1 ran once"
    );
    assert!(
        turn.results[0].is_none(),
        "a kept step keeps its result block"
    );
    assert!(seen.warnings.is_empty(), "{:?}", seen.warnings);
    assert!(
        backend.kept().is_empty(),
        "a turn that passed keeps nothing"
    );

    // Nothing is left to resume now.
    let (again, _) = project.run(&backend, true);
    assert!(matches!(again, Err(TurnError::Resume(_))));
}

#[test]
fn resume_refuses_when_an_earlier_step_changed() {
    let project = Project::new();
    let path = project.write(RESUMABLE);
    let backend = resumable();
    project.run(&backend, false).0.unwrap();
    let changed = RESUMABLE
        .replace("prepare\n", "prepare --other\n")
        .replace("analyse v1", "analyse v2");
    project.write(&changed);
    let (turn, _) = project.run(&backend, true);
    match turn {
        Err(TurnError::Resume(why)) => {
            assert!(why.contains("step 1 changed since turn 1 ran it"), "{why}")
        }
        other => panic!("{:?}", other.map(|t| t.record.status)),
    }
    assert_eq!(backend.requests().len(), 2, "nothing ran");
    assert_eq!(document_text(&path), changed);
    // The positive control: unchanged before the step that failed, it resumes.
    project.write(&RESUMABLE.replace("analyse v1", "analyse v2"));
    let (turn, _) = project.run(&backend, true);
    assert_eq!(turn.unwrap().record.status, TurnStatus::Passed);
}

#[test]
fn a_turn_interrupted_mid_step_is_recorded_so_and_renders_nothing() {
    let project = Project::new();
    let path = project.write("```bash\nfirst\n```\n```bash\nstuck\n```\n```bash\nlast\n```\n");
    let cancel = Cancel::default();
    let stop = cancel.clone();
    let backend = FakeBackend::new(move |c| {
        if c.runs("stuck") {
            // Ctrl-C while the step runs.
            stop.cancel();
        }
        Behaviour::exits(0).stdout("ran\n")
    });
    let (turn, _) = project.run_with(&backend, false, &cancel);
    let turn = turn.unwrap();
    assert_eq!(turn.record.status, TurnStatus::Interrupted);
    assert_eq!(
        turn.record
            .steps
            .iter()
            .map(|s| s.status)
            .collect::<Vec<_>>(),
        [StepStatus::Passed, StepStatus::NotRun, StepStatus::NotRun]
    );
    assert_eq!(backend.requests().len(), 2);
    let detail = project.store().turn("1").unwrap();
    assert_eq!(detail.summary.status, TurnState::Interrupted);
    assert_eq!(
        detail.result, None,
        "an interrupted turn has no document to show"
    );
    assert_eq!(
        document_text(&path),
        "```bash\nfirst\n```\n```bash\nstuck\n```\n```bash\nlast\n```\n"
    );
}

#[test]
fn a_document_edited_during_the_turn_is_left_alone_and_its_results_kept() {
    let project = Project::new();
    let path = project.write("```bash\necho done\n```\n");
    let edit = path.clone();
    let backend = FakeBackend::new(move |_| {
        std::fs::write(&edit, "```bash\necho done\n```\n\nEdited meanwhile.\n").unwrap();
        Behaviour::exits(0).stdout("done\n")
    });
    let (turn, written) = project.run_and_write(&backend);
    assert_eq!(written, WriteBack::Conflict);
    assert_eq!(
        document_text(&path),
        "```bash\necho done\n```\n\nEdited meanwhile.\n"
    );
    let store = project.store();
    let result = store
        .turn(&turn.record.number.to_string())
        .unwrap()
        .result
        .unwrap();
    let kept = String::from_utf8(store.blobs().read(&result).unwrap()).unwrap();
    assert!(
        kept.contains("**Result:** exit 0") && kept.contains("done"),
        "{kept}"
    );
}

#[test]
fn a_turn_whose_sandbox_cannot_be_made_fails_and_leaves_the_document() {
    let project = Project::new();
    let text = "```bash\ntrue\n```\n";
    let path = project.write(text);
    let backend = FakeBackend::refusing("no sandboxes here");
    let (turn, _) = project.run(&backend, false);
    assert!(
        matches!(turn, Err(TurnError::Sandbox(SandboxError::Setup { .. }))),
        "{:?}",
        turn.map(|t| t.record.status)
    );
    assert_eq!(document_text(&path), text);
    assert_eq!(
        project.store().turn("1").unwrap().summary.status,
        TurnState::Failed
    );
}

#[test]
fn a_failed_step_stops_the_turn_unless_told_to_continue_and_only_passed_turns_hand_on() {
    let project = Project::new();
    let path = project.write(
        "---\ncontext: c\nartifacts: [out.txt]\n---\n```bash continue_on_error\nflaky\n```\n```bash\nbreaks\n```\n```bash\nlater\n```\n",
    );
    let backend = FakeBackend::new(|c| {
        if c.runs("flaky") {
            Behaviour::exits(3).writes("out.txt", "x")
        } else if c.runs("breaks") {
            Behaviour::exits(4)
        } else {
            Behaviour::exits(0)
        }
    });
    let (turn, written) = project.run_and_write(&backend);
    assert_eq!(
        written,
        WriteBack::Written,
        "a failed turn's results are written"
    );
    assert_eq!(
        turn.record
            .steps
            .iter()
            .map(|s| s.status)
            .collect::<Vec<_>>(),
        [StepStatus::Failed, StepStatus::Failed, StepStatus::NotRun]
    );
    let text = document_text(&path);
    assert!(
        text.contains("**Result:** exit 3") && text.contains("**Result:** exit 4"),
        "{text}"
    );
    let store = project.store();
    assert_eq!(store.artifacts_of(1).unwrap().len(), 1, "recorded");
    assert!(
        store.context_artifacts("c").unwrap().is_empty(),
        "but not handed on"
    );
}
