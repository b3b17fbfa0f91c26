//! Ctrl-C and termination signals: the running turn is cancelled and its sandbox torn down.

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
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
