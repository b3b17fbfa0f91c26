//! Assembled rootfs against stacked layers, for an image's pull (the unpack part) and for
//! sandbox start.
//!
//! Reads an OCI image layout (`bench/make-image.py` writes one) from `$UPSTREAM_BENCH_LAYOUT`
//! and compares, interleaved so that machine drift hits both sides:
//! - unpack: every layer in order into one rootfs (what upstream does) against every layer
//!   into a directory of its own, all at once on threads (what stacking allows);
//! - start: create a sandbox on the image and run `/usr/bin/true` in it, with the one rootfs
//!   as the overlay's lower layer against the layers stacked as lowers.
//!
//! Without the variable it says so and does nothing (`bench/run` sets it). Needs root, as
//! sandboxes on images do.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use upstream_image::{Compression, Owners, unpack_layer};
use upstream_sandbox::{ExecRequest, Image, SandboxSpec};

fn main() {
    let Some(layout) = std::env::var_os("UPSTREAM_BENCH_LAYOUT").map(PathBuf::from) else {
        eprintln!("layers: UPSTREAM_BENCH_LAYOUT names no image layout; nothing measured");
        return;
    };
    let runs: usize = std::env::var("UPSTREAM_BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(30);
    let layers = layer_blobs(&layout);
    let work = tempfile::tempdir_in(layout.parent().unwrap_or(Path::new("/tmp"))).unwrap();
    let owners = Owners::Shifted(upstream_backend_ns::STORED_ID_BASE);

    // Unpack: five rounds, alternating which goes first.
    let (mut assembled_ms, mut stacked_ms) = (Vec::new(), Vec::new());
    for round in 0..5 {
        let assembled = |dir: &Path| {
            let start = Instant::now();
            fs::create_dir_all(dir).unwrap();
            for blob in &layers {
                let file = fs::File::open(blob).unwrap();
                unpack_layer(
                    std::io::BufReader::new(file),
                    Compression::Gzip,
                    dir,
                    owners,
                )
                .unwrap();
            }
            start.elapsed()
        };
        let stacked = |dir: &Path| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for (i, blob) in layers.iter().enumerate() {
                    let target = dir.join(i.to_string());
                    s.spawn(move || {
                        fs::create_dir_all(&target).unwrap();
                        let file = fs::File::open(blob).unwrap();
                        unpack_layer(
                            std::io::BufReader::new(file),
                            Compression::Gzip,
                            &target,
                            owners,
                        )
                        .unwrap();
                    });
                }
            });
            start.elapsed()
        };
        let (a, s) = (work.path().join("assembled"), work.path().join("stacked"));
        for dir in [&a, &s] {
            let _ = fs::remove_dir_all(dir);
        }
        sync();
        if round % 2 == 0 {
            assembled_ms.push(ms(assembled(&a)));
            sync();
            stacked_ms.push(ms(stacked(&s)));
        } else {
            stacked_ms.push(ms(stacked(&s)));
            sync();
            assembled_ms.push(ms(assembled(&a)));
        }
        sync();
    }
    let (a, s) = (median(&mut assembled_ms), median(&mut stacked_ms));
    println!(
        "unpack {} layers: assembled {a:.0} ms, stacked (parallel) {s:.0} ms: stacked/assembled {:.2}",
        layers.len(),
        s / a
    );

    // Start: the rootfs as one lower against the layers as lowers.
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_upstream"));
    let backend = upstream_backend_ns::open(exe).unwrap();
    let one = vec![work.path().join("assembled")];
    let many: Vec<PathBuf> = (0..layers.len())
        .map(|i| work.path().join("stacked").join(i.to_string()))
        .collect();
    let start = |lowers: &[PathBuf]| {
        let spec = SandboxSpec {
            image: Image::Layers {
                reference: "bench".into(),
                layers: lowers.to_vec(),
            },
            scratch_in_memory: true,
            ..SandboxSpec::default()
        };
        let begin = Instant::now();
        let mut sandbox = backend.create(&spec).unwrap();
        let outcome = sandbox
            .exec(
                &ExecRequest {
                    argv: vec!["/usr/bin/true".into()],
                    env: vec![("PATH".into(), "/usr/bin".into())],
                    cwd: "/".into(),
                    timeout_ms: Some(10_000),
                    files: Vec::new(),
                    collect: None,
                    user: None,
                    ..Default::default()
                },
                &mut |_, _| {},
            )
            .unwrap();
        assert!(outcome.status.success(), "{outcome:?}");
        sandbox.destroy().unwrap();
        begin.elapsed()
    };
    let (mut one_ms, mut many_ms) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        start(&one);
        start(&many);
    }
    for round in 0..runs {
        if round % 2 == 0 {
            one_ms.push(ms(start(&one)));
            many_ms.push(ms(start(&many)));
        } else {
            many_ms.push(ms(start(&many)));
            one_ms.push(ms(start(&one)));
        }
    }
    let (o, m) = (median(&mut one_ms), median(&mut many_ms));
    println!(
        "start on the image: assembled {o:.2} ms, stacked {m:.2} ms: stacked/assembled {:.2}",
        m / o
    );
}

/// The layer blobs of the layout's first manifest, bottom first.
fn layer_blobs(layout: &Path) -> Vec<PathBuf> {
    let json = |path: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&fs::read(&path).unwrap()).unwrap()
    };
    let blob = |digest: &str| {
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let index = json(layout.join("index.json"));
    let manifest = json(blob(index["manifests"][0]["digest"].as_str().unwrap()));
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| blob(l["digest"].as_str().unwrap()))
        .collect()
}

fn sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
