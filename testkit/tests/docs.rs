//! docs/ARCHITECTURE.md stays true: every repository path it names exists.

use std::path::Path;

#[test]
fn every_path_named_in_the_architecture_doc_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let mut checked = 0;
    for (n, part) in doc.split('`').enumerate() {
        // Odd parts are inside backticks.
        let looks_like_path = n % 2 == 1
            && !part.contains(' ')
            && !part.starts_with("../")
            && (part.ends_with(".rs")
                || part.ends_with(".proto")
                || part.ends_with(".md")
                || part.ends_with(".toml"))
            && part.contains('/');
        if looks_like_path {
            assert!(
                root.join(part).exists(),
                "docs/ARCHITECTURE.md names {part}, which does not exist"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 15,
        "only {checked} paths found: did the doc lose its code map?"
    );
}
