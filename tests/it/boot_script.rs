//! The custom script backend against small shell scripts: one keeping its
//! state in a file as a real one would, and misbehaving ones.

use fleetd::boot::script::ScriptBoot;
use fleetd::boot::{BootControl, BootError, SlotState};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Keeps `key=value` lines in `state` next to itself and logs every call.
const STATEFUL: &str = r#"#!/bin/sh
set -eu
dir=$(dirname "$0")
echo "$*" >> "$dir/calls"
get() { sed -n "s/^$1=//p" "$dir/state"; }
put() {
    grep -v "^$1=" "$dir/state" > "$dir/state.new" || true
    echo "$1=$2" >> "$dir/state.new"
    mv "$dir/state.new" "$dir/state"
}
case "$1" in
    get-primary) get primary ;;
    set-primary) put primary "$2" ;;
    get-state) get "$2" ;;
    set-state) put "$2" "$3" ;;
    get-current) get current ;;
    *) echo "unknown verb $1" >&2; exit 2 ;;
esac
"#;

const INITIAL: &str = "primary=A\nA=good\nB=good\ncurrent=A\n";

struct Setup {
    dir: tempfile::TempDir,
    boot: ScriptBoot,
}

fn slots() -> Vec<String> {
    vec!["A".into(), "B".into()]
}

/// Writes an executable script through a child process, so that no fork
/// of another test thread inherits a write handle (exec would fail with
/// "text file busy").
fn write_script(path: &Path, text: &str) {
    let status = Command::new("sh")
        .args(["-c", "printf '%s' \"$1\" > \"$2\" && chmod 755 \"$2\"", "sh"])
        .arg(text)
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

fn setup(script: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("boot.sh");
    write_script(&path, script);
    std::fs::write(dir.path().join("state"), INITIAL).unwrap();
    let boot = ScriptBoot::new(path, &slots()).unwrap();
    Setup { dir, boot }
}

impl Setup {
    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    fn script(&self) -> PathBuf {
        self.dir.path().join("boot.sh")
    }
}

/// The error's detail, asserting it is a boot-command error.
fn command_detail(err: BootError) -> String {
    assert_eq!(err.name(), "boot-command", "{err}");
    err.to_string()
}

#[test]
fn backend_name() {
    assert_eq!(setup(STATEFUL).boot.backend(), "script");
}

#[test]
fn queries_call_the_get_verbs() {
    let s = setup(STATEFUL);
    assert_eq!(s.boot.primary().unwrap(), Some("A".into()));
    assert_eq!(s.boot.state("B").unwrap(), SlotState::Good);
    assert_eq!(s.boot.booted_hint().unwrap(), Some("A".into()));
    assert_eq!(s.boot.trial_reboot_arg(), None);
    assert_eq!(s.read("calls"), "get-primary\nget-state B\nget-current\n");
    assert_eq!(s.read("state"), INITIAL);
}

#[test]
fn set_primary_for_trial_calls_set_primary() {
    let mut s = setup(STATEFUL);
    s.boot.set_primary_for_trial("B").unwrap();
    assert_eq!(s.read("calls"), "set-primary B\n");
    assert_eq!(s.read("state"), "A=good\nB=good\ncurrent=A\nprimary=B\n");
    assert_eq!(s.boot.primary().unwrap(), Some("B".into()));
}

#[test]
fn mark_good_and_bad_call_set_state() {
    let mut s = setup(STATEFUL);
    s.boot.mark_bad("B").unwrap();
    assert_eq!(s.read("state"), "primary=A\nA=good\ncurrent=A\nB=bad\n");
    assert_eq!(s.boot.state("B").unwrap(), SlotState::Bad);
    s.boot.mark_good("B").unwrap();
    assert_eq!(s.read("state"), "primary=A\nA=good\ncurrent=A\nB=good\n");
    assert_eq!(s.read("calls"), "set-state B bad\nget-state B\nset-state B good\n");
}

#[test]
fn unknown_slot_never_reaches_the_script() {
    let mut s = setup(STATEFUL);
    assert_eq!(s.boot.state("C").unwrap_err().name(), "unknown-slot");
    assert_eq!(s.boot.mark_good("C").unwrap_err().name(), "unknown-slot");
    assert_eq!(s.boot.mark_bad("C").unwrap_err().name(), "unknown-slot");
    assert_eq!(s.boot.set_primary_for_trial("C").unwrap_err().name(), "unknown-slot");
    assert_eq!(s.read("calls"), "");
}

#[test]
fn failing_script_reports_verb_status_and_stderr() {
    let mut s = setup("#!/bin/sh\necho 'env is locked' >&2\nexit 3\n");
    let detail = command_detail(s.boot.mark_good("A").unwrap_err());
    assert!(detail.contains("set-state A good"), "{detail}");
    assert!(detail.contains("exit status: 3"), "{detail}");
    assert!(detail.contains("env is locked"), "{detail}");
    let detail = command_detail(s.boot.primary().unwrap_err());
    assert!(detail.contains("get-primary"), "{detail}");
}

#[test]
fn garbage_output_is_refused() {
    for (output, what) in [
        ("C", "unknown slot"),
        ("A B", "two words"),
        ("A\\nB", "two lines"),
        ("", "nothing"),
        ("good", "a state where a slot is expected"),
    ] {
        let s = setup(&format!("#!/bin/sh\nprintf '{output}\\n'\n"));
        let detail = command_detail(s.boot.primary().unwrap_err());
        assert!(detail.contains("get-primary"), "{what}: {detail}");
        command_detail(s.boot.booted_hint().unwrap_err());
    }
    for output in ["trying", "GOOD", "A", "good bad", ""] {
        let s = setup(&format!("#!/bin/sh\nprintf '{output}\\n'\n"));
        let detail = command_detail(s.boot.state("A").unwrap_err());
        assert!(detail.contains("get-state A"), "{output:?}: {detail}");
    }
}

#[test]
fn surrounding_whitespace_is_tolerated() {
    let s = setup("#!/bin/sh\nprintf '  bad \\n'\n");
    assert_eq!(s.boot.state("A").unwrap(), SlotState::Bad);
}

#[test]
fn hanging_script_is_killed() {
    let s = setup("#!/bin/sh\nexec sleep 30\n");
    let boot = ScriptBoot::new(s.script(), &slots()).unwrap().with_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let detail = command_detail(boot.primary().unwrap_err());
    assert!(detail.contains("timed out"), "{detail}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn script_that_cannot_run_is_a_command_error() {
    let s = setup(STATEFUL);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(s.script(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let detail = command_detail(s.boot.primary().unwrap_err());
    assert!(detail.contains("cannot run"), "{detail}");
}

#[test]
fn missing_script_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = ScriptBoot::new(dir.path().join("nope.sh"), &slots()).unwrap_err();
    assert_eq!(err.name(), "boot-config");
}
