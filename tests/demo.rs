//! `fleetd demo` runs with no setup and tells the story it promises.

mod common;
use common::*;

#[test]
fn the_demo_runs_and_shows_acceptance_and_refusals() {
    let out = run(fleetd().arg("demo"));
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(text.contains("accepted: 2026.11-demo v8"), "{text}");
    assert!(text.contains("refused: signature-missing"), "{text}");
    assert!(text.contains("(403)") && text.contains("revoked"), "{text}");
    assert!(text.contains("Demo finished"), "{text}");
}
