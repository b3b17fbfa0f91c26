//! Turns on OCI images pulled from a registry the test starts on 127.0.0.1.

use std::fs;

use upstream_image::testing::{Registry, layer_of_host_programs};

use crate::util::{Env, code, result_block, stderr};

#[test]
fn a_step_runs_in_the_image_pulled_from_the_registry() {
    crate::require_sandbox!();
    let Some(registry) = Registry::start() else {
        crate::util::skip(
            "SKIPPED: no docker-registry on this machine (scripts/test installs it)".into(),
        );
        return;
    };
    let layer = layer_of_host_programs(
        &["/usr/bin/bash", "/usr/bin/cat"],
        &[("etc/image-marker", b"from the image\n")],
    );
    registry.push(
        "test/mini:1",
        vec![(layer, "application/vnd.oci.image.layer.v1.tar+gzip")],
        &["PATH=/usr/bin", "FROM_IMAGE=yes"],
    );
    let env = Env::new();
    let doc = format!(
        // The image says WorkingDir /app.
        "---\nimage: {}/test/mini:1\nenv:\n  MINE: doc\n---\n```bash\ncat /etc/image-marker\necho \"$FROM_IMAGE $MINE $PWD\"\ntest -e /usr/bin/python3 && echo HOST || echo image-only\n```\n",
        registry.host()
    );
    let path = env.write("img.md", &doc);
    let cache = env.path("cache");
    let out = env
        .command()
        .env("UPSTREAM_CACHE_DIR", &cache)
        .args(["run", "img.md"])
        .output()
        .unwrap();
    let block = result_block(&fs::read_to_string(&path).unwrap(), 1);
    assert_eq!(code(&out), 0, "{}\n{block}", stderr(&out));
    assert!(stderr(&out).contains("1 layer, pulled"), "{}", stderr(&out));
    assert!(
        block.contains("from the image\nyes doc /app\nimage-only"),
        "{block}"
    );

    // The image is cached: with the registry gone, it still runs.
    drop(registry);
    let out = env
        .command()
        .env("UPSTREAM_CACHE_DIR", &cache)
        .args(["run", "img.md"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stderr(&out).contains("cached"), "{}", stderr(&out));
}

#[test]
fn images_are_listed_pulled_removed_and_pruned() {
    let Some(registry) = Registry::start() else {
        crate::util::skip(
            "SKIPPED: no docker-registry on this machine (scripts/test installs it)".into(),
        );
        return;
    };
    let layer = layer_of_host_programs(&["/usr/bin/cat"], &[("etc/marker", b"x")]);
    registry.push(
        "test/cat:1",
        vec![(layer, "application/vnd.oci.image.layer.v1.tar+gzip")],
        &[],
    );
    let env = Env::new();
    let cache = env.path("cache");
    let images = |args: &[&str]| {
        env.command()
            .env("UPSTREAM_CACHE_DIR", &cache)
            .arg("images")
            .args(args)
            .output()
            .unwrap()
    };
    let reference = format!("{}/test/cat:1", registry.host());
    let out = images(&["pull", &reference]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(crate::util::stdout(&out).starts_with("sha256:"));
    let list = images(&["ls"]);
    let text = crate::util::stdout(&list);
    assert!(text.contains(&reference), "{text}");
    assert!(text.lines().next().unwrap().starts_with("IMAGE"), "{text}");
    let json: serde_json::Value =
        serde_json::from_slice(&images(&["ls", "--json"]).stdout).unwrap();
    assert_eq!(json[0]["layers"], 1);
    assert!(json[0]["rootfs_bytes"].as_u64().unwrap() > 0);

    let out = images(&["rm", &reference]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(code(&images(&["rm", &reference])), 1, "gone already");
    let json: serde_json::Value =
        serde_json::from_slice(&images(&["ls", "--json"]).stdout).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 0);
    let pruned: serde_json::Value =
        serde_json::from_slice(&images(&["prune", "--json"]).stdout).unwrap();
    assert_eq!(pruned["blobs"], 1, "the layer no image uses: {pruned}");
    assert_eq!(fs::read_dir(cache.join("blobs/sha256")).unwrap().count(), 0);
    let bad = images(&["pull", "Not A Reference"]);
    assert_eq!(code(&bad), 2);
}

/// What the image's python step runs: the test's python must find these modules.
const PYTHON_STEP: &str = "import os, sys\nprint(sys.executable, open('/etc/image-marker').read().strip())\nprint(os.getcwd())";

/// A layer of the host's python3, with the libraries it loads and the modules it imports to
/// run [`PYTHON_STEP`] at their paths: a python image made on this machine, from nothing
/// but its own files (tests never fetch from a mirror). `None` (the test skipped) when the
/// host has no python3 at /usr/bin.
fn host_python_layer() -> Option<Vec<u8>> {
    const PYTHON: &str = "/usr/bin/python3";
    let listed = std::process::Command::new(PYTHON)
        .args(["-u", "-c"])
        .arg(format!(
            "{}\nprint('\\n'.join(m.__file__ for m in list(sys.modules.values()) if getattr(m, '__file__', None)))",
            PYTHON_STEP.lines().next().unwrap()
        ))
        .output();
    let listed = match listed {
        Ok(out) if out.status.success() => String::from_utf8(out.stdout).unwrap(),
        _ => {
            crate::util::skip(format!("SKIPPED: no {PYTHON} on this machine"));
            return None;
        }
    };
    let mut files: Vec<(String, Vec<u8>)> = listed
        .lines()
        .filter(|path| path.starts_with('/'))
        .map(|path| {
            (
                path.trim_start_matches('/').to_string(),
                fs::read(path).unwrap(),
            )
        })
        .collect();
    files.push(("etc/image-marker".into(), b"from-the-image\n".to_vec()));
    let files: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(name, data)| (name.as_str(), data.as_slice()))
        .collect();
    Some(layer_of_host_programs(&[PYTHON], &files))
}

#[test]
fn python_steps_run_the_images_python() {
    crate::require_root_sandbox!();
    let Some(registry) = Registry::start() else {
        crate::util::skip(
            "SKIPPED: no docker-registry on this machine (scripts/test installs it)".into(),
        );
        return;
    };
    let env = Env::new();
    let Some(layer) = host_python_layer() else {
        return;
    };
    registry.push(
        "local/python:1",
        vec![(layer, "application/vnd.oci.image.layer.v1.tar+gzip")],
        &["PATH=/usr/local/bin:/usr/bin:/bin"],
    );
    let doc = format!(
        "---\nimage: {}/local/python:1\nworkdir: /work\n---\n```python\n{PYTHON_STEP}\n```\n",
        registry.host()
    );
    let path = env.write("py.md", &doc);
    let out = env
        .command()
        .env("UPSTREAM_CACHE_DIR", env.path("cache"))
        .args(["run", "py.md"])
        .output()
        .unwrap();
    let block = result_block(&fs::read_to_string(&path).unwrap(), 1);
    assert_eq!(code(&out), 0, "{}\n{block}", stderr(&out));
    assert!(
        block.contains("/usr/bin/python3 from-the-image\n/work"),
        "{block}"
    );
}

#[test]
fn steps_run_as_the_images_user_and_cannot_act_as_root() {
    crate::require_root_sandbox!();
    let Some(registry) = Registry::start() else {
        crate::util::skip(
            "SKIPPED: no docker-registry on this machine (scripts/test installs it)".into(),
        );
        return;
    };
    let layer = layer_of_host_programs(
        &[
            "/usr/bin/bash",
            "/usr/bin/id",
            "/usr/bin/stat",
            "/usr/bin/cat",
            "/usr/bin/grep",
        ],
        &[
            (
                "etc/passwd",
                b"root:x:0:0:root:/root:/bin/bash\napp:x:1000:1000::/home/app:/bin/bash\n",
            ),
            ("etc/group", b"root:x:0:\napp:x:1000:\nstaff:x:50:\n"),
        ],
    );
    registry.push_with_config(
        "test/user:1",
        vec![(layer, "application/vnd.oci.image.layer.v1.tar+gzip")],
        serde_json::json!({ "Env": ["PATH=/usr/bin"], "User": "app:staff" }),
    );
    let env = Env::new();
    let cache = env.path("cache");
    let reference = format!("{}/test/user:1", registry.host());
    let doc = |n: u32| {
        format!(
            "---\nimage: {reference}\ncontext: as-app\nartifacts: [made.txt]\n---\n\
             ```bash\n\
             echo \"ids $(id -u):$(id -g) $USER $HOME $PWD\"\n\
             grep CapEff /proc/self/status\n\
             test -f made.txt && echo \"restored owner $(stat -c %u:%g made.txt)\"\n\
             echo turn {n} > made.txt\n\
             if echo x > /etc/owned 2>/dev/null; then echo WROTE-ETC; fi\n\
             if echo x > /root/owned 2>/dev/null; then echo WROTE-ROOT; fi\n\
             ```\n"
        )
    };
    let run = |name: &str, n: u32| {
        let path = env.write(name, doc(n));
        let out = env
            .command()
            .env("UPSTREAM_CACHE_DIR", &cache)
            .args(["run", name])
            .output()
            .unwrap();
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        result_block(&fs::read_to_string(&path).unwrap(), 1)
    };
    let first = run("one.md", 1);
    assert!(
        first.contains("ids 1000:50 app /home/app /workspace"),
        "{first}"
    );
    assert!(first.contains("CapEff:\t0000000000000000"), "{first}");
    assert!(!first.contains("WROTE"), "{first}");
    assert!(!first.contains("restored"), "{first}");
    // The next turn finds the artifact where it was left, still the user's own.
    let second = run("two.md", 2);
    assert!(second.contains("restored owner 1000:50"), "{second}");

    // `exec` on the image runs as its user too.
    let out = env
        .command()
        .env("UPSTREAM_CACHE_DIR", &cache)
        .args(["exec", "--image", &reference, "--", "id", "-u"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(crate::util::stdout(&out).trim(), "1000");
}

#[test]
fn a_daemon_pulls_a_tenants_image_only_from_public_registries_and_those_it_is_told() {
    use serde_json::json;
    use upstream_image::testing::{Recorder, basic_challenge};

    use crate::serve::Daemon;
    crate::require_sandbox!();
    let Some(registry) = Registry::start() else {
        crate::util::skip(
            "SKIPPED: no docker-registry on this machine (scripts/test installs it)".into(),
        );
        return;
    };
    let layer = layer_of_host_programs(&["/usr/bin/cat"], &[("etc/image-marker", b"pulled\n")]);
    registry.push(
        "test/allowed:1",
        vec![(layer, "application/vnd.oci.image.layer.v1.tar+gzip")],
        &["PATH=/usr/bin"],
    );
    // Something on the daemon's loopback that a tenant would like to reach.
    let internal = Recorder::start(basic_challenge);
    let env = Env::new();
    let daemon = Daemon::start(&env, &[]);
    let api = daemon.client(&daemon.key("t", "tenant"));
    let allowed_image = format!("{}/test/allowed:1", registry.host());
    for image in [
        format!("{}/admin:1", internal.host()),
        format!("localhost:{}/admin:1", internal.port),
        "10.0.0.1:5000/x:1".to_string(),
        "169.254.169.254/latest:1".to_string(),
        allowed_image.clone(),
    ] {
        let (status, body) = api.post("/v1/sandboxes", json!({ "image": image }));
        assert_eq!(status, 403, "{image}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("not public") && message.contains("--registry HOST[:PORT]"),
            "{image}: {message}"
        );
        assert!(!message.contains("401"), "nothing of an answer: {message}");
    }
    // A document's image too.
    let document = format!(
        "---\nimage: {}/admin:1\n---\n```bash\ntrue\n```\n",
        internal.host()
    );
    let (status, body) = api.post("/v1/turns", json!({ "document": document }));
    assert_eq!(status, 403, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("not public"), "{body}");
    assert_eq!(
        internal.connections(),
        0,
        "the daemon connected to a loopback address for a tenant"
    );
    drop(daemon);

    // Positive control: told to, the daemon pulls from the same registry.
    let daemon = Daemon::start(&env, &["--registry", &registry.host()]);
    let api = daemon.client(&daemon.key("t", "tenant"));
    let (status, sandbox) = api.post("/v1/sandboxes", json!({ "image": allowed_image }));
    assert_eq!(status, 201, "{sandbox}");
    let ran = api.exec(
        sandbox["id"].as_str().unwrap(),
        &["cat", "/etc/image-marker"],
    );
    assert_eq!(ran["stdout"], "pulled\n", "{ran}");
}

#[test]
fn a_daemon_will_not_start_with_credentials_for_every_registry() {
    let env = Env::new();
    let out = env
        .command()
        .env("UPSTREAM_REGISTRY_AUTH", "ci:hunter2")
        .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(env.path("state"))
        .output()
        .unwrap();
    assert_ne!(code(&out), 0);
    let err = stderr(&out);
    assert!(
        err.contains("registry.example.com=user:password") && !err.contains("hunter2"),
        "{err}"
    );
}
