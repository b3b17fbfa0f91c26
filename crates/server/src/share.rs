//! Each tenant's share of the daemon's blocking threads.
//!
//! Everything the daemon does for a tenant that blocks a thread — a command, a file
//! transfer, a background command's start or wait, a sandbox made on the spot, a turn, a
//! read of the tenant's store — runs on tokio's blocking threads, of which there are
//! [`BLOCKING_THREADS`]. Without a bound, one tenant's slow work (a command that sleeps, a
//! turn that runs for hours) could take every thread, and every other tenant's requests
//! would wait for one. So each tenant holds at most `--max-concurrent-per-tenant` threads
//! at once, and tenants together at most [`TENANT_THREADS`], which leaves threads for the
//! daemon's own work (tearing sandboxes down, reaping, filling warm pools).
//!
//! A request over its tenant's share waits for one of the tenant's own operations to end
//! rather than failing: the work is legitimate, a burst of it is normal for a client with
//! many parallel commands, and a waiting request holds no thread — only its connection,
//! as a request that is slow to arrive does. Other tenants' requests do not wait behind it.
//!
//! A permit is held by the blocking work itself, not by the request that asked for it: a
//! client that goes away while its command runs does not free its place before the thread
//! is free.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

/// Blocking threads of the daemon's runtime.
pub const BLOCKING_THREADS: usize = 1024;

/// Blocking threads tenants' work may hold, all tenants together.
pub const TENANT_THREADS: usize = BLOCKING_THREADS - 256;

/// Blocking work that did not return.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// The work panicked; the panic's message is for the log.
    #[error("blocking work panicked: {0}")]
    Panicked(String),
    /// The runtime is shutting down.
    #[error("the daemon is stopping")]
    Stopped,
}

/// Every tenant's share, made on first use.
pub struct Shares {
    per_tenant: usize,
    all: Arc<Semaphore>,
    tenants: Mutex<HashMap<String, Share>>,
}

impl Shares {
    /// Shares of `per_tenant` threads each (at least 1).
    pub fn new(per_tenant: usize) -> Shares {
        Shares {
            per_tenant: per_tenant.clamp(1, TENANT_THREADS),
            all: Arc::new(Semaphore::new(TENANT_THREADS)),
            tenants: Mutex::new(HashMap::new()),
        }
    }

    /// The share of `tenant`.
    pub fn of(&self, tenant: &str) -> Share {
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        tenants
            .entry(tenant.to_string())
            .or_insert_with(|| Share {
                mine: Arc::new(Semaphore::new(self.per_tenant)),
                all: self.all.clone(),
            })
            .clone()
    }
}

/// One tenant's share: see the module's description.
#[derive(Clone)]
pub struct Share {
    mine: Arc<Semaphore>,
    all: Arc<Semaphore>,
}

impl Share {
    /// Runs `f` on a blocking thread once the tenant has a thread to spare.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ShareError> {
        // The tenant's own place first: a tenant over its share queues behind its own work
        // and never holds a place in the common bound while it waits.
        let mine = self
            .mine
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ShareError::Stopped)?;
        let all = self
            .all
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ShareError::Stopped)?;
        // The work is the request's: its id and its place in the log go with it.
        let f = crate::request::carry(f);
        let handle = tokio::task::spawn_blocking(move || {
            let _held = (mine, all);
            f()
        });
        handle.await.map_err(|e| match e.try_into_panic() {
            Ok(panic) => ShareError::Panicked(panic_message(panic.as_ref())),
            Err(_) => ShareError::Stopped,
        })
    }

    /// Threads the tenant holds now.
    #[cfg(test)]
    fn in_use(&self, per_tenant: usize) -> usize {
        per_tenant - self.mine.available_permits()
    }
}

/// The message a panic carried, if it was text.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tenant_over_its_share_waits_and_others_do_not() {
        let shares = Shares::new(2);
        let (release, held) = std::sync::mpsc::channel::<()>();
        let held = Arc::new(Mutex::new(held));
        let busy = shares.of("busy");
        let mut pinned = Vec::new();
        for _ in 0..2 {
            let (busy, held) = (busy.clone(), held.clone());
            pinned.push(tokio::spawn(async move {
                busy.run(move || {
                    let _ = held.lock().unwrap().recv();
                })
                .await
            }));
        }
        while busy.in_use(2) < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The busy tenant's third operation waits for one of its own to end...
        let third = {
            let busy = busy.clone();
            tokio::spawn(async move { busy.run(|| "third").await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !third.is_finished(),
            "the third ran past the tenant's share"
        );
        // ...while another tenant's runs at once.
        let other = tokio::time::timeout(Duration::from_secs(5), shares.of("other").run(|| 7))
            .await
            .expect("another tenant waited");
        assert_eq!(other.unwrap(), 7);
        release.send(()).unwrap();
        assert_eq!(third.await.unwrap().unwrap(), "third");
        release.send(()).unwrap();
        for p in pinned {
            p.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn a_panic_in_blocking_work_is_an_error_and_frees_the_place() {
        let shares = Shares::new(1);
        let share = shares.of("t");
        let failed = share.run(|| panic!("boom")).await;
        assert!(matches!(failed, Err(ShareError::Panicked(m)) if m == "boom"));
        assert_eq!(
            share.run(|| 1).await.unwrap(),
            1,
            "the place was given back"
        );
    }
}
