//! A private dbus-daemon for tests: its own socket in a temp dir, a policy
//! that lets anyone own names and call anyone (the stand-ins' bus, never
//! the machine's). Killed on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub const DBUS_DAEMON: &str = "/usr/bin/dbus-daemon";

pub struct PrivateBus {
    child: Child,
    pub address: String,
    pub socket: PathBuf,
}

/// The default policy of Debian's system bus (`/usr/share/dbus-1/system.conf`):
/// nobody owns names or calls methods unless a service's policy says so.
const SYSTEM_DEFAULT_POLICY: &str = r#"
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
"#;

/// A bus config: listen on `socket`, EXTERNAL auth, then `policies`.
fn bus_config(socket: &Path, policies: &str) -> String {
    format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>custom</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
{policies}
</busconfig>
"#,
        socket.display()
    )
}

impl PrivateBus {
    /// `None` where dbus-daemon is not installed.
    pub fn start(dir: &Path) -> Option<PrivateBus> {
        if !Path::new(DBUS_DAEMON).exists() {
            return None;
        }
        let socket = dir.join("system_bus_socket");
        let config = dir.join("bus.conf");
        let open = r#"  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>"#;
        std::fs::write(&config, bus_config(&socket, open)).ok()?;
        let mut daemon = Command::new(DBUS_DAEMON);
        daemon.arg(format!("--config-file={}", config.display())).args(["--nofork", "--print-address=1"]);
        Self::spawn(daemon, socket)
    }

    /// A bus with the system bus's default policy plus `service_policy`
    /// (a shipped `system.d` file), run in its own mount namespace where
    /// `/etc/group` also holds `group` with `gid`, so the machine's groups
    /// are never changed. Needs root; `None` without it.
    pub fn system_like(dir: &Path, service_policy: &Path, group: &str, gid: u32) -> Option<PrivateBus> {
        if !Path::new(DBUS_DAEMON).exists() || unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let socket = dir.join("system_bus_socket");
        let config = dir.join("bus.conf");
        let policies = format!("{SYSTEM_DEFAULT_POLICY}\n  <include>{}</include>", service_policy.display());
        std::fs::write(&config, bus_config(&socket, &policies)).ok()?;
        // The machine may have the group already (an installed package):
        // this bus sees only the test's.
        let mut groups: String = std::fs::read_to_string("/etc/group")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.split(':').next() != Some(group))
            .map(|l| format!("{l}\n"))
            .collect();
        groups.push_str(&format!("{group}:x:{gid}:\n"));
        let group_file = dir.join("group");
        std::fs::write(&group_file, groups).ok()?;
        let mut daemon = Command::new("unshare");
        daemon
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(format!(
                "mount --bind \"$0\" /etc/group && exec {DBUS_DAEMON} --config-file=\"$1\" --nofork --print-address=1"
            ))
            .arg(&group_file)
            .arg(&config);
        Self::spawn(daemon, socket)
    }

    /// Starts `daemon` (a dbus-daemon with `--print-address=1`) and reads
    /// the address it listens on.
    fn spawn(mut daemon: Command, socket: PathBuf) -> Option<PrivateBus> {
        let mut child = daemon.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().ok()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take()?).read_line(&mut line).ok()?;
        let address = line.trim().to_string();
        assert!(address.starts_with("unix:"), "dbus-daemon printed {address:?}");
        Some(PrivateBus { child, address, socket })
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
