//! Counters for `/metrics`, in Prometheus's text format. They are process-wide: one daemon
//! per process.
//!
//! Each figure is kept for the daemon and for the tenant it was for. The operator (the
//! local socket, or a key of a `--operator-tenant`) sees the daemon's, with every tenant's
//! sandboxes by name; a tenant's key sees its own tenant's figures only, and no other
//! tenant's name.

use std::collections::BTreeMap;
// The figures are written into a `String`, which never refuses a write: the results of
// `writeln!` below are dropped for that reason.
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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

/// The counters of the daemon, or of one tenant.
struct Figures {
    exec: Histogram,
    claim: Histogram,
    from_pool: AtomicU64,
    made: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

impl Figures {
    const fn new() -> Figures {
        Figures {
            exec: Histogram::new(),
            claim: Histogram::new(),
            from_pool: AtomicU64::new(0),
            made: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
        }
    }
}

static DAEMON: Figures = Figures::new();
static TENANTS: Mutex<BTreeMap<String, Arc<Figures>>> = Mutex::new(BTreeMap::new());

/// The figures of `tenant`, made on first use (tenants are the keys' tenants, which the
/// operator makes).
fn of(tenant: &str) -> Arc<Figures> {
    TENANTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(tenant.to_string())
        .or_insert_with(|| Arc::new(Figures::new()))
        .clone()
}

/// Counts in the daemon's figures and the tenant's.
fn record(tenant: &str, f: impl Fn(&Figures)) {
    f(&DAEMON);
    f(&of(tenant));
}

/// A sandbox was handed out to `tenant` (through the API or for a turn): from a warm pool
/// or made for it.
pub fn handed_out(tenant: &str, from_pool: bool) {
    record(tenant, |f| {
        let counter = if from_pool { &f.from_pool } else { &f.made };
        counter.fetch_add(1, Ordering::Relaxed);
    });
}

/// An exec of `tenant` ended after `took`.
pub fn exec(tenant: &str, took: Duration) {
    record(tenant, |f| f.exec.observe(took));
}

/// A sandbox was handed out to `tenant` after `took` (from the pool or made on the spot).
pub fn claim(tenant: &str, took: Duration) {
    record(tenant, |f| f.claim.observe(took));
}

/// An error answer with this code was sent (counted in the daemon's figures).
pub fn error(code: &'static str) {
    count_error(&DAEMON, code);
}

/// An error answer with this code was sent to `tenant` (counted in its figures).
pub fn tenant_error(tenant: &str, code: &'static str) {
    count_error(&of(tenant), code);
}

fn count_error(figures: &Figures, code: &'static str) {
    let mut errors = figures.errors.lock().unwrap_or_else(|e| e.into_inner());
    *errors.entry(code).or_default() += 1;
}

/// Whose figures an answer shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// The daemon's, every tenant's sandboxes by name, the warm pools: the operator's view.
    Daemon,
    /// One tenant's own.
    Tenant(&'a str),
}

/// Gauges the daemon knows at the time of asking.
pub struct Gauges {
    /// Sandboxes handed out, by tenant.
    pub active: BTreeMap<String, usize>,
    /// Per pool: (ready, target).
    pub pools: BTreeMap<String, (usize, usize)>,
}

/// The figures `scope` may see, as Prometheus text.
pub fn render(gauges: &Gauges, scope: Scope<'_>) -> String {
    let mut out = String::new();
    let tenant_figures;
    let figures: &Figures = match scope {
        Scope::Daemon => &DAEMON,
        Scope::Tenant(tenant) => {
            tenant_figures = TENANTS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(tenant)
                .cloned()
                .unwrap_or_else(|| Arc::new(Figures::new()));
            &tenant_figures
        }
    };
    let _ = writeln!(
        out,
        "# HELP upstream_sandboxes Sandboxes by state.\n# TYPE upstream_sandboxes gauge"
    );
    let active: usize = match scope {
        Scope::Daemon => gauges.active.values().sum(),
        Scope::Tenant(tenant) => gauges.active.get(tenant).copied().unwrap_or(0),
    };
    let _ = writeln!(out, "upstream_sandboxes{{state=\"active\"}} {active}");
    if scope == Scope::Daemon {
        let ready: usize = gauges.pools.values().map(|(r, _)| r).sum();
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
    }
    figures.exec.render(
        "upstream_exec_seconds",
        "Time from an exec request to the command's end.",
        &mut out,
    );
    figures.claim.render(
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
        figures.from_pool.load(Ordering::Relaxed),
        figures.made.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP upstream_errors_total Error answers, by code.\n# TYPE upstream_errors_total counter"
    );
    let errors = figures.errors.lock().unwrap_or_else(|e| e.into_inner());
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
