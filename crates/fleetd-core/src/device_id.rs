//! The device id from the hardware: `[device] id = "auto"` reads the
//! device-tree `serial-number`, else DMI's `product_serial` (junk values
//! skipped), else `/etc/machine-id`; `id_file` (a factory-written id, its
//! first line) overrides `id`. Pure: the files are read through the
//! caller's `read`, so tests hand in a table of paths.

use std::path::Path;

/// Where the device tree exposes the board's serial number.
pub const DEVICE_TREE_SERIALS: [&str; 2] =
    ["/proc/device-tree/serial-number", "/sys/firmware/devicetree/base/serial-number"];
/// DMI's (SMBIOS) system serial number.
pub const DMI_SERIAL: &str = "/sys/class/dmi/id/product_serial";
/// systemd's machine id (`machine-id(5)`).
pub const MACHINE_ID: &str = "/etc/machine-id";

/// What firmware writes when nobody set a serial number: never an id.
const DMI_JUNK: &[&str] = &[
    "to be filled by o.e.m.",
    "default string",
    "system serial number",
    "not specified",
    "not applicable",
    "none",
    "0",
    "00000000",
    "0123456789",
    "123456789",
];

/// Where the id came from: `fleetd status` shows it (`device_id_source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdSource {
    /// `[device] id_file`.
    IdFile,
    /// `[device] id`, written out.
    #[default]
    Config,
    /// The device tree's `serial-number`.
    DeviceTree,
    /// DMI's `product_serial`.
    Dmi,
    /// `/etc/machine-id`.
    MachineId,
}

impl IdSource {
    /// The status document's `device_id_source`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::IdFile => "id_file",
            Self::Config => "config",
            Self::DeviceTree => "device-tree",
            Self::Dmi => "dmi",
            Self::MachineId => "machine-id",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Self::IdFile, Self::Config, Self::DeviceTree, Self::Dmi, Self::MachineId]
            .into_iter()
            .find(|s| s.as_str() == name)
    }

    /// For people (`fleetd status`).
    pub fn describe(self) -> &'static str {
        match self {
            Self::IdFile => "id_file",
            Self::Config => "config",
            Self::DeviceTree => "device-tree serial-number",
            Self::Dmi => "DMI product_serial",
            Self::MachineId => "machine-id",
        }
    }
}

crate::error_name::named_error! {
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum IdError {
        #[name = "device-id-invalid"]
        #[error("{name}: {value:?} (from {from}) must be 1-64 characters of [A-Za-z0-9._-]")]
        Invalid { value: String, from: &'static str },
        #[name = "device-id-unavailable"]
        #[error("{name}: {0}")]
        Unavailable(String),
    }
}

/// Ids, groups, project and hardware names: what MQTT topics and the trust
/// policy accept.
pub fn is_identifier(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The device id and its source. `configured` is `[device] id` (`"auto"`
/// or an id), `id_file` the `[device] id_file` path; `read` returns a
/// file's text, or `None` when it cannot be read.
pub fn resolve(
    configured: &str,
    id_file: Option<&Path>,
    read: &dyn Fn(&Path) -> Option<String>,
) -> Result<(String, IdSource), IdError> {
    let (value, source) = if let Some(path) = id_file {
        let text = read(path)
            .ok_or_else(|| IdError::Unavailable(format!("id_file {} cannot be read", path.display())))?;
        let first = text.lines().next().map(clean).unwrap_or_default();
        if first.is_empty() {
            return Err(IdError::Unavailable(format!("id_file {} is empty", path.display())));
        }
        (first, IdSource::IdFile)
    } else if configured != "auto" {
        (configured.to_string(), IdSource::Config)
    } else {
        from_hardware(read)?
    };
    if !is_identifier(&value) {
        return Err(IdError::Invalid { value, from: source.describe() });
    }
    Ok((value, source))
}

fn from_hardware(read: &dyn Fn(&Path) -> Option<String>) -> Result<(String, IdSource), IdError> {
    for path in DEVICE_TREE_SERIALS {
        if let Some(serial) = read(Path::new(path)).map(|t| clean(&t)).filter(|s| !s.is_empty()) {
            return Ok((serial, IdSource::DeviceTree));
        }
    }
    if let Some(serial) = read(Path::new(DMI_SERIAL))
        .map(|t| clean(&t))
        .filter(|s| !s.is_empty() && !DMI_JUNK.contains(&s.to_ascii_lowercase().as_str()))
    {
        return Ok((serial, IdSource::Dmi));
    }
    if let Some(id) = read(Path::new(MACHINE_ID)).map(|t| clean(&t)).filter(|s| !s.is_empty()) {
        return Ok((id, IdSource::MachineId));
    }
    Err(IdError::Unavailable(format!(
        "id = \"auto\" found no device-tree serial-number, no DMI product_serial and no {MACHINE_ID}; \
         set [device] id or id_file"
    )))
}

/// Device-tree strings end in NUL; files end in a newline.
fn clean(text: &str) -> String {
    text.trim_matches(|c: char| c == '\0' || c.is_whitespace()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    type Outcome = Result<(String, &'static str), &'static str>;

    fn run(
        configured: &str,
        id_file: Option<&str>,
        files: &[(&str, &str)],
    ) -> Result<(String, &'static str), &'static str> {
        let files: HashMap<String, String> =
            files.iter().map(|(p, t)| (p.to_string(), t.to_string())).collect();
        let read = move |p: &Path| files.get(p.to_str().unwrap()).cloned();
        resolve(configured, id_file.map(Path::new), &read)
            .map(|(id, s)| (id, s.as_str()))
            .map_err(|e| e.name())
    }

    #[test]
    fn each_source_in_its_order() {
        let dt = ("/proc/device-tree/serial-number", "10000000abcd1234\0");
        let dt_sys = ("/sys/firmware/devicetree/base/serial-number", "sys-serial\0");
        let dmi = ("/sys/class/dmi/id/product_serial", "PF2XYZ01\n");
        let mid = ("/etc/machine-id", "0123456789abcdef0123456789abcdef\n");
        let file = ("/etc/fleetd/device-id", "  gw-0042 \nsecond line\n");
        let long = "a".repeat(65);
        let ok = |id: &str, s: &'static str| Ok((id.to_string(), s));
        type Row<'a> = (&'a str, Option<&'a str>, Vec<(&'a str, &'a str)>, Outcome);
        let table: Vec<Row> = vec![
            ("gw-7", None, vec![dt, dmi, mid], ok("gw-7", "config")),
            ("gw-7", Some("/etc/fleetd/device-id"), vec![file, dt], ok("gw-0042", "id_file")),
            ("auto", Some("/etc/fleetd/device-id"), vec![file, dt], ok("gw-0042", "id_file")),
            ("auto", None, vec![dt, dt_sys, dmi, mid], ok("10000000abcd1234", "device-tree")),
            ("auto", None, vec![dt_sys, dmi, mid], ok("sys-serial", "device-tree")),
            (
                "auto",
                None,
                vec![("/proc/device-tree/serial-number", "\0\n"), dmi, mid],
                ok("PF2XYZ01", "dmi"),
            ),
            ("auto", None, vec![dmi, mid], ok("PF2XYZ01", "dmi")),
            ("auto", None, vec![mid], ok("0123456789abcdef0123456789abcdef", "machine-id")),
            ("auto", None, vec![], Err("device-id-unavailable")),
            ("auto", None, vec![("/proc/device-tree/serial-number", "has space")], Err("device-id-invalid")),
            ("auto", None, vec![("/etc/machine-id", &long)], Err("device-id-invalid")),
            ("gw 7", None, vec![], Err("device-id-invalid")),
            ("x", Some("/missing"), vec![dt], Err("device-id-unavailable")),
            (
                "x",
                Some("/etc/fleetd/device-id"),
                vec![("/etc/fleetd/device-id", "\n\nlater")],
                Err("device-id-unavailable"),
            ),
            (
                "x",
                Some("/etc/fleetd/device-id"),
                vec![("/etc/fleetd/device-id", "gw/../x\n")],
                Err("device-id-invalid"),
            ),
        ];
        for (configured, id_file, files, expected) in table {
            assert_eq!(run(configured, id_file, &files), expected, "{configured} {id_file:?} {files:?}");
        }
    }

    #[test]
    fn firmware_junk_is_skipped() {
        let mid = ("/etc/machine-id", "feedface\n");
        for junk in [
            "To be filled by O.E.M.",
            "Default string",
            "0",
            "None",
            "System Serial Number",
            "  ",
            "Not Specified",
        ] {
            let files = [("/sys/class/dmi/id/product_serial", junk), mid];
            assert_eq!(run("auto", None, &files), Ok(("feedface".into(), "machine-id")), "{junk:?}");
        }
    }
}
