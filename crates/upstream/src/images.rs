//! `upstream images`: the image cache.

use std::io::{self, IsTerminal, Write};

use upstream_doc::format_size;
use upstream_image::{Reference, pull};

use crate::cli::ImagesCommand;
use crate::exit;
use crate::table::{Align, Table};

/// A pull's layers: bars on a terminal, a line each otherwise.
enum PullView {
    Bars(crate::layer_bars::LayerBars),
    Lines,
}

impl upstream_image::PullProgress for PullView {
    fn layer(&mut self, digest: &str, size: u64, cached: bool) {
        match self {
            PullView::Bars(bars) => bars.layer(digest, size, cached),
            PullView::Lines => {
                let short = digest.trim_start_matches("sha256:");
                let state = if cached { "cached" } else { "pulling" };
                eprintln!(
                    "  layer {} {} ({state})",
                    &short[..12.min(short.len())],
                    format_size(size)
                );
            }
        }
    }

    fn downloaded(&mut self, digest: &str, bytes: u64) {
        if let PullView::Bars(bars) = self {
            bars.downloaded(digest, bytes);
        }
    }

    fn unpacking(&mut self) {
        match self {
            PullView::Bars(bars) => bars.unpacking(),
            PullView::Lines => eprintln!("  unpacking"),
        }
    }
}

fn parse(text: &str) -> Result<Reference, u8> {
    Reference::parse(text).map_err(|e| {
        eprintln!("error: {e}");
        exit::BAD_INPUT
    })
}

pub fn images(command: ImagesCommand) -> u8 {
    match command {
        ImagesCommand::Ls { json } => {
            let source = crate::run::image_source(&[], false);
            let images = source.cache.list();
            if json {
                let _ = serde_json::to_writer_pretty(io::stdout().lock(), &images);
                println!();
                return exit::OK;
            }
            if images.is_empty() {
                eprintln!("No images in {}.", source.cache.dir().display());
                return exit::OK;
            }
            let mut table = Table::new(&[
                ("IMAGE", Align::Left),
                ("DIGEST", Align::Left),
                ("LAYERS", Align::Right),
                ("SIZE", Align::Right),
            ]);
            for image in &images {
                let name = if image.tags.is_empty() {
                    "(untagged)".to_string()
                } else {
                    image.tags.join(", ")
                };
                table.row(vec![
                    name,
                    image.digest[..19.min(image.digest.len())].to_string(),
                    image.layers.to_string(),
                    format_size(image.rootfs_bytes),
                ]);
            }
            let _ = table.print(&mut io::stdout().lock());
            exit::OK
        }
        ImagesCommand::Pull {
            reference,
            insecure_registry,
        } => {
            let parsed = match parse(&reference) {
                Ok(r) => r,
                Err(code) => return code,
            };
            let source = crate::run::image_source(&insecure_registry, true);
            eprintln!("Pulling {parsed}");
            let mut view = if io::stderr().is_terminal() {
                PullView::Bars(crate::layer_bars::LayerBars::new())
            } else {
                PullView::Lines
            };
            let pulled = pull(&parsed, &source.cache, &source.pull, &mut view);
            drop(view);
            match pulled {
                Ok(pulled) => {
                    let _ = writeln!(io::stdout().lock(), "{}", pulled.digest);
                    eprintln!(
                        "Pulled {parsed}: {} layer{}, {} downloaded",
                        pulled.layers,
                        if pulled.layers == 1 { "" } else { "s" },
                        format_size(pulled.downloaded)
                    );
                    exit::OK
                }
                Err(e) => {
                    eprintln!("error: cannot pull {parsed}: {e}");
                    exit::SANDBOX
                }
            }
        }
        ImagesCommand::Rm { reference } => {
            let parsed = match parse(&reference) {
                Ok(r) => r,
                Err(code) => return code,
            };
            let source = crate::run::image_source(&[], false);
            match source.cache.remove(&parsed) {
                Ok(true) => {
                    eprintln!("Removed {parsed}");
                    exit::OK
                }
                Ok(false) => {
                    eprintln!("error: {parsed} is not in the cache");
                    eprintln!("hint: `upstream images ls` lists what is");
                    exit::STEP_FAILED
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    exit::SANDBOX
                }
            }
        }
        ImagesCommand::Prune { json } => {
            let source = crate::run::image_source(&[], false);
            match source.cache.prune() {
                Ok(pruned) if json => {
                    let _ = serde_json::to_writer_pretty(io::stdout().lock(), &pruned);
                    println!();
                    exit::OK
                }
                Ok(pruned) => {
                    eprintln!(
                        "Removed {} image{} and {} layer{} ({})",
                        pruned.images,
                        if pruned.images == 1 { "" } else { "s" },
                        pruned.blobs,
                        if pruned.blobs == 1 { "" } else { "s" },
                        format_size(pruned.bytes)
                    );
                    exit::OK
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    exit::SANDBOX
                }
            }
        }
    }
}
