//! What the README and the CI scripts claim, checked against what the code
//! and the machine do.

use crate::common;
use common::*;

fn repo_file(name: &str) -> String {
    std::fs::read_to_string(crate::common::root().join(name)).unwrap()
}

/// `fleetd status --pop` prints the label: the access point, its
/// passphrase (and the Wi-Fi QR code), then the code. The README's example
/// shows each of those lines, and no sentence says the passphrase is never
/// printed.
#[test]
fn the_readme_shows_what_status_pop_prints() {
    let d = Device::new();
    let mut config = std::fs::read_to_string(d.config()).unwrap();
    config.push_str("\n[provision]\nbackend = \"none\"\nlisten = \"127.0.0.1:0\"\n");
    std::fs::write(d.config(), config).unwrap();
    let out = run(fleetd().args(["status", "--pop", "--config"]).arg(d.config()));
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = stdout(&out);
    assert!(printed.contains(", passphrase "), "{printed}");
    let readme = repo_file("README.md");
    let flat = readme.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(!flat.contains("passphrase is never printed"), "the README says the passphrase is never printed");
    let example = readme
        .split("$ fleetd status --pop\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the README has a `fleetd status --pop` example");
    for label in ["access point", "wifi qr"] {
        assert!(printed.lines().any(|l| l.starts_with(label)), "{printed}");
        assert!(
            example.lines().any(|l| l.starts_with(label)),
            "the README's example lacks {label:?}:\n{example}"
        );
    }
}

/// CI shares machines with other apt users: every package install or
/// removal in the scripts waits for dpkg's lock (apt's lock timeout)
/// instead of failing when another apt holds it.
#[test]
fn package_scripts_wait_for_the_dpkg_lock() {
    for script in ["scripts/test-package", "scripts/setup"] {
        let commands = repo_file(script);
        for line in commands.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.starts_with("echo "))
        {
            let words: Vec<&str> = line.split_whitespace().collect();
            let dpkg_changes = words.windows(2).any(|w| {
                w[0] == "dpkg" && ["-i", "--install", "--purge", "-P", "--remove", "-r"].contains(&w[1])
            });
            assert!(!dpkg_changes, "{script}: bare dpkg does not wait for the lock: {line}");
            let apt_changes = words.iter().any(|w| w.ends_with("apt-get") || *w == "apt")
                && words.iter().any(|w| ["install", "purge", "remove"].contains(w));
            if apt_changes {
                assert!(line.contains("DPkg::Lock::Timeout"), "{script}: apt without a lock timeout: {line}");
            }
        }
    }
}
