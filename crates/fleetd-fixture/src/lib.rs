//! One device configuration, as TOML text: the demo, the tests and the
//! examples all start from it and change only what they need, so the
//! configuration they run is never four copies drifting apart.
//!
//! The defaults are the documented example device (gw-0042 of
//! acme-gateways, two file slots, GRUB), with paths relative to the
//! configuration file's folder.
//!
//! `broker` is the demo's embedded MQTT broker; `images` makes synthetic
//! images for the image tests and benchmarks.

pub mod broker;
pub mod images;

/// A device's `fleetd.toml`, field by field; `to_toml` writes it.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub id: String,
    pub project: String,
    pub hardware: String,
    pub groups: Vec<String>,
    pub state_dir: String,
    /// Extra lines of `[trust]` (e.g. `allow_http = true`).
    pub trust: String,
    /// kid → public key file.
    pub keys: Vec<(String, String)>,
    /// name, device, and the Pi boot partition where the backend needs it.
    pub slots: Vec<(String, String, Option<u32>)>,
    /// The lines of `[boot]`.
    pub boot: String,
    /// The lines of `[mqtt]`, when there is one.
    pub mqtt: Option<String>,
    /// The lines of `[update]`, when there is one.
    pub update: Option<String>,
    /// The lines of `[health]`, when there is one.
    pub health: Option<String>,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            id: "gw-0042".into(),
            project: "acme-gateways".into(),
            hardware: "rpi4-gw".into(),
            groups: vec!["pilot".into()],
            state_dir: "state".into(),
            trust: String::new(),
            keys: vec![
                ("fleet".into(), "keys/fleet.pub.pem".into()),
                ("cosigner".into(), "keys/cosigner.pub.pem".into()),
            ],
            slots: vec![("A".into(), "slot-a.img".into(), None), ("B".into(), "slot-b.img".into(), None)],
            boot: "backend = \"grub\"\ngrubenv = \"grubenv\"\nbooted_slot = \"A\"".into(),
            mqtt: None,
            update: None,
            health: None,
        }
    }
}

impl DeviceConfig {
    pub fn to_toml(&self) -> String {
        let quoted = |s: &str| format!("{s:?}");
        let mut out = String::new();
        out += "[device]\n";
        out += &format!("id = {}\n", quoted(&self.id));
        out += &format!("project = {}\n", quoted(&self.project));
        out += &format!("hardware = {}\n", quoted(&self.hardware));
        let groups: Vec<String> = self.groups.iter().map(|g| quoted(g)).collect();
        out += &format!("groups = [{}]\n", groups.join(", "));
        out += &format!("state_dir = {}\n\n", quoted(&self.state_dir));
        out += "[trust]\n";
        if !self.trust.is_empty() {
            out += self.trust.trim_end();
            out += "\n";
        }
        out += "[trust.keys]\n";
        for (kid, path) in &self.keys {
            out += &format!("{kid} = {}\n", quoted(path));
        }
        for (name, device, partition) in &self.slots {
            out += &format!("\n[slots.{name}]\ndevice = {}\n", quoted(device));
            if let Some(p) = partition {
                out += &format!("boot_partition = {p}\n");
            }
        }
        out += "\n[boot]\n";
        out += self.boot.trim_end();
        out += "\n";
        for (table, lines) in [("mqtt", &self.mqtt), ("update", &self.update), ("health", &self.health)] {
            if let Some(lines) = lines {
                out += &format!("\n[{table}]\n{}\n", lines.trim_end());
            }
        }
        out
    }
}
