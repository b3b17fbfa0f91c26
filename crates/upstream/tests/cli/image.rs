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
