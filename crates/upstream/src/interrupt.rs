//! Ctrl-C and termination signals: the running turn is cancelled and its sandbox torn down.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use upstream_sandbox::Interrupter;
use upstream_turn::Cancel;

/// Cancels `cancel` on SIGINT, SIGTERM or SIGHUP. A second signal ends the process at once.
/// Only the first call installs anything.
///
/// It starts a thread, so it is called once the first sandbox exists: a single-threaded
/// process makes its sandbox init by a plain fork, which is faster than re-executing.
pub fn install(cancel: &Cancel) {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    let mut first = false;
    INSTALLED.call_once(|| first = true);
    if !first {
        return;
    }
    let Ok(mut signals) = Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
        return;
    };
    let cancel = cancel.clone();
    std::thread::spawn(move || {
        let mut seen = false;
        for _ in signals.forever() {
            if seen {
                std::process::exit(crate::exit::INTERRUPTED.into());
            }
            seen = true;
            cancel.cancel();
        }
    });
}

/// Stops `sandbox` on SIGINT, SIGTERM or SIGHUP, from the signal handler itself: no thread
/// (for `exec`, which runs one sandbox). A second signal ends the process at once.
pub fn stop_on_signal(sandbox: Arc<dyn Interrupter>) {
    let seen = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM, SIGHUP] {
        let sandbox = sandbox.clone();
        let seen = seen.clone();
        // SAFETY: the handler only touches an atomic, calls `Interrupter::interrupt` (which
        // promises to be async-signal-safe) and `_exit`; it allocates nothing and takes no lock.
        let registered = unsafe {
            signal_hook::low_level::register(signal, move || {
                if seen.swap(true, Ordering::SeqCst) {
                    libc::_exit(crate::exit::INTERRUPTED.into());
                }
                sandbox.interrupt();
            })
        };
        // Without a handler, the default action ends upstream, and the sandbox dies with it.
        let _ = registered;
    }
}
