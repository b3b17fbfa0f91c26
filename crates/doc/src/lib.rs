//! Turn documents: markdown whose front matter says where to run and whose fenced `bash`, `sh`
//! and `python` blocks are the steps.
//!
//! The crate promises two things. Parsing is lossless: [`Document::render`] with no new
//! results returns the source byte for byte, for any input. And bad input is reported with the
//! file, line and column at fault ([`ParseError`]), never silently accepted.

mod error;
pub mod front_matter;
pub mod output;
mod parse;
mod render;
pub mod terminal;

pub use error::{ErrorKind, Location, ParseError};
pub use front_matter::{FrontMatter, Isolation, Network};
pub use output::{Captured, Omitted, OutputCapture, OutputLimits, Redactor};
pub use parse::{Document, Language, Step};
pub use render::{Outcome, ResultBlock, clean_output, format_duration, format_size, signal_name};
