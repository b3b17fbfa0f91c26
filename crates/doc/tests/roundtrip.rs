//! Parsing and rendering with no new results reproduces every byte of any input.

use std::path::Path;

use proptest::prelude::*;
use upstream_doc::Document;

/// Pieces documents are made of, including the awkward ones.
fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("---\nimage: host\n---\n".to_string()),
        Just("# Heading\n".to_string()),
        Just("## Étape ünïcode ✓\r\n".to_string()),
        Just("```bash\necho hi\n```\n".to_string()),
        Just("~~~~python\nprint('~~~')\n~~~~\n".to_string()),
        Just("````sh\n```\nnested\n```\n````\n".to_string()),
        Just("> ```bash\n> echo quoted\n> ```\n".to_string()),
        Just("- item\n\n  ```bash\n  echo listed\n  ```\n".to_string()),
        Just("<div>\n```bash\nnot a step\n```\n</div>\n".to_string()),
        Just(
            "<!-- upstream:result -->\n**Result:** exit 0 (0.01s)\n<!-- /upstream:result -->\n"
                .to_string()
        ),
        Just("```text\nplain\n```\n".to_string()),
        Just("    indented code\n".to_string()),
        Just("\r\n".to_string()),
        Just("\n".to_string()),
        "[ -~\t\r\n\u{00e9}\u{4e2d}\u{1f600}`~#>-]{0,40}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn parse_then_render_reproduces_every_byte(pieces in prop::collection::vec(piece(), 0..12)) {
        let text: String = pieces.concat();
        if let Ok(doc) = Document::parse(Path::new("prop.md"), text.as_bytes()) {
            let unchanged = vec![None; doc.steps().len()];
            prop_assert_eq!(doc.render(&unchanged), text);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(doc) = Document::parse(Path::new("prop.md"), &bytes) {
            let unchanged = vec![None; doc.steps().len()];
            let rendered = doc.render(&unchanged);
            prop_assert_eq!(rendered.as_bytes(), &bytes[..]);
        }
    }
}
