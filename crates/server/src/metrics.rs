//! Counters for `/metrics`, in Prometheus's text format. They are process-wide: one daemon
//! per process.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    const fn new() -> Histogram {
        Histogram {
            counts: [const { AtomicU64::new(0) }; BUCKETS.len()],
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            if seconds <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

static EXEC: Histogram = Histogram::new();
static CLAIM: Histogram = Histogram::new();
static ERRORS: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());
static FROM_POOL: AtomicU64 = AtomicU64::new(0);
static MADE: AtomicU64 = AtomicU64::new(0);

/// A sandbox was handed out (to the API or a turn): from a warm pool or made for it.
pub fn handed_out(from_pool: bool) {
    let counter = if from_pool { &FROM_POOL } else { &MADE };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// An exec ended after `took`.
pub fn exec(took: Duration) {
    EXEC.observe(took);
}

/// A sandbox was handed out after `took` (from the pool or made on the spot).
pub fn claim(took: Duration) {
    CLAIM.observe(took);
}

/// An error answer with this code was sent.
pub fn error(code: &'static str) {
    let mut errors = ERRORS.lock().unwrap_or_else(|e| e.into_inner());
    *errors.entry(code).or_default() += 1;
}

/// Gauges the daemon knows at the time of asking.
pub struct Gauges {
    /// Sandboxes handed out, by tenant.
    pub active: BTreeMap<String, usize>,
    /// Per pool: (ready, target).
    pub pools: BTreeMap<String, (usize, usize)>,
}

/// Everything, as Prometheus text.
pub fn render(gauges: &Gauges) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP upstream_sandboxes Sandboxes by state.\n# TYPE upstream_sandboxes gauge"
    );
    let active: usize = gauges.active.values().sum();
    let ready: usize = gauges.pools.values().map(|(r, _)| r).sum();
    let _ = writeln!(out, "upstream_sandboxes{{state=\"active\"}} {active}");
    let _ = writeln!(out, "upstream_sandboxes{{state=\"pooled\"}} {ready}");
    let _ = writeln!(
        out,
        "# HELP upstream_tenant_sandboxes Sandboxes handed out, by tenant.\n# TYPE upstream_tenant_sandboxes gauge"
    );
    for (tenant, n) in &gauges.active {
        let _ = writeln!(
            out,
            "upstream_tenant_sandboxes{{tenant=\"{}\"}} {n}",
            escape(tenant)
        );
    }
    let _ = writeln!(
        out,
        "# HELP upstream_pool_ready Ready sandboxes in each warm pool.\n# TYPE upstream_pool_ready gauge"
    );
    for (pool, (ready, _)) in &gauges.pools {
        let _ = writeln!(
            out,
            "upstream_pool_ready{{pool=\"{}\"}} {ready}",
            escape(pool)
        );
    }
    let _ = writeln!(
        out,
        "# HELP upstream_pool_target Target size of each warm pool.\n# TYPE upstream_pool_target gauge"
    );
    for (pool, (_, target)) in &gauges.pools {
        let _ = writeln!(
            out,
            "upstream_pool_target{{pool=\"{}\"}} {target}",
            escape(pool)
        );
    }
    EXEC.render(
        "upstream_exec_seconds",
        "Time from an exec request to the command's end.",
        &mut out,
    );
    CLAIM.render(
        "upstream_sandbox_claim_seconds",
        "Time to hand out a sandbox, from the pool or made on the spot.",
        &mut out,
    );
    let _ = writeln!(
        out,
        "# HELP upstream_sandboxes_handed_out_total Sandboxes handed out, by where they came from.\n# TYPE upstream_sandboxes_handed_out_total counter"
    );
    let _ = writeln!(
        out,
        "upstream_sandboxes_handed_out_total{{source=\"pool\"}} {}\nupstream_sandboxes_handed_out_total{{source=\"made\"}} {}",
        FROM_POOL.load(Ordering::Relaxed),
        MADE.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP upstream_errors_total Error answers, by code.\n# TYPE upstream_errors_total counter"
    );
    let errors = ERRORS.lock().unwrap_or_else(|e| e.into_inner());
    for (code, n) in errors.iter() {
        let _ = writeln!(out, "upstream_errors_total{{code=\"{code}\"}} {n}");
    }
    out
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
