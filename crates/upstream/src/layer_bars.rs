//! A pull's layers on a terminal: one progress bar per layer, filled as its bytes arrive.

use std::collections::HashMap;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The bars of one pull. They go when it is dropped.
pub struct LayerBars {
    multi: MultiProgress,
    bars: HashMap<String, ProgressBar>,
}

impl LayerBars {
    pub fn new() -> LayerBars {
        LayerBars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10)),
            bars: HashMap::new(),
        }
    }

    /// A layer of the pull; a cached one is drawn full.
    pub fn layer(&mut self, digest: &str, size: u64, cached: bool) {
        let short = digest.trim_start_matches("sha256:");
        let bar = self.multi.add(ProgressBar::new(size));
        let template = if cached {
            "  layer {prefix} {bytes:>10} cached"
        } else {
            "  layer {prefix} [{bar:30}] {bytes:>10} / {total_bytes:<10} {bytes_per_sec}"
        };
        bar.set_style(
            ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(short[..12.min(short.len())].to_string());
        if cached {
            bar.set_position(size);
        } else {
            bar.enable_steady_tick(Duration::from_millis(200));
        }
        self.bars.insert(digest.to_string(), bar);
    }

    pub fn downloaded(&mut self, digest: &str, bytes: u64) {
        if let Some(bar) = self.bars.get(digest) {
            bar.set_position(bytes);
            if Some(bytes) >= bar.length() && !bar.is_finished() {
                bar.finish();
            }
        }
    }

    /// Every layer is in: a spinner while the rootfs is made.
    pub fn unpacking(&mut self) {
        let bar = self.multi.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("  unpacking {spinner} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(100));
        self.bars.insert(String::new(), bar);
    }
}

impl Drop for LayerBars {
    fn drop(&mut self) {
        for bar in self.bars.values() {
            bar.finish_and_clear();
        }
        let _ = self.multi.clear();
    }
}
