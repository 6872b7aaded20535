//! One place lines go to the log. Today standard error (journald takes it
//! from there under systemd); structured journal fields come with the
//! system-integration work.

pub fn log(line: &str) {
    eprintln!("{line}");
}
