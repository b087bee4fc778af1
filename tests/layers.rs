//! The layer rule of `docs/architecture.md`, held by CI: no import cycle between files of
//! `src/`, no import from a lower layer to a higher one, and the picture in the doc is current.

use std::process::Command;

fn layers(args: &[&str]) -> (bool, String) {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("python3")
        .arg(format!("{root}/scripts/layers.py"))
        .args(args)
        .current_dir(root)
        .output()
        .expect("python3 runs scripts/layers.py (install python3)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn src_has_no_import_cycle_and_no_upward_import() {
    let (ok, text) = layers(&["check"]);
    assert!(ok, "scripts/layers.py check:\n{text}");
}

#[test]
fn architecture_picture_is_current() {
    let (ok, text) = layers(&["check-docs", "docs/architecture.md"]);
    assert!(ok, "{text}");
}
