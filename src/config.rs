//! `/etc/fleetd/fleetd.toml`: typed and validated when it loads. Every error
//! names the file, the key and what is wrong; unknown keys are errors too, so
//! a typo never silently falls back to a default.

pub use crate::device_id::IdSource;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/fleetd/fleetd.toml";
pub const CONFIG_ENV: &str = "FLEETD_CONFIG";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: key `{key}`: {message}")]
    Invalid { path: PathBuf, key: String, message: String },
    #[error("{path}: key `{key}`: cannot load {file}: {message}")]
    KeyFile { path: PathBuf, key: String, file: PathBuf, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub device: Device,
    pub trust: Trust,
    pub slots: BTreeMap<String, Slot>,
    pub boot: Boot,
    #[serde(default)]
    pub mqtt: Option<Mqtt>,
    #[serde(default)]
    pub update: Update,
    #[serde(default)]
    pub health: Health,
    /// Present: an unprovisioned device raises an access point and a portal.
    #[serde(default)]
    pub provision: Option<Provision>,
    #[serde(default)]
    pub dbus: Dbus,
    #[serde(default)]
    pub log: Log,
    /// Where the file was loaded from; relative paths in it resolve against its directory.
    #[serde(skip)]
    pub source: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// The id as resolved at load: `"auto"` and `id_file` are replaced by
    /// what they name (`device_id::resolve`); `id_source` says which.
    pub id: String,
    /// A factory-written id (its first line); overrides `id`.
    #[serde(default)]
    pub id_file: Option<PathBuf>,
    #[serde(skip)]
    pub id_source: IdSource,
    pub project: String,
    pub hardware: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trust {
    #[serde(default)]
    pub allow_http: bool,
    #[serde(default = "default_leeway")]
    pub leeway_s: u64,
    #[serde(default = "default_max_validity")]
    pub max_validity_s: u64,
    /// kid → public key file. Every kid listed is required.
    pub keys: BTreeMap<String, PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slot {
    pub device: PathBuf,
    /// Overrides the size read from the device (for image-size checks).
    #[serde(default)]
    pub size: Option<u64>,
    /// The partition number the bootloader knows this slot by (tryboot);
    /// defaults to the device name's trailing digits (`mmcblk0p2` → 2).
    #[serde(default)]
    pub boot_partition: Option<u32>,
}

/// `[boot]`: the keys every backend shares, and the backend with its own
/// keys, checked once at load. The TOML is one flat table with
/// `backend = "..."` (`BootKeys`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boot {
    pub backend: BootBackend,
    pub booted_slot: String,
    pub attempts: u32,
    /// Changes at every boot; tells a reboot from a daemon restart.
    pub boot_id_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootBackend {
    Uboot {
        env_config: PathBuf,
        /// Accept a single-copy U-Boot environment that can only be written
        /// in place (inside a block device): not crash-safe, so never the default.
        single_copy_in_place: bool,
    },
    Grub {
        grubenv: PathBuf,
    },
    RpiTryboot {
        autoboot_txt: PathBuf,
        /// Where the Pi firmware says which partition it booted.
        partition_file: PathBuf,
    },
    Script {
        script: PathBuf,
    },
}

impl BootBackend {
    /// The name `backend = "..."` gives it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Uboot { .. } => "uboot",
            Self::Grub { .. } => "grub",
            Self::RpiTryboot { .. } => "rpi-tryboot",
            Self::Script { .. } => "script",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum BackendName {
    Uboot,
    Grub,
    RpiTryboot,
    Script,
}

impl<'de> Deserialize<'de> for Boot {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let keys = BootKeys::deserialize(deserializer)?;
        let required = |value: Option<PathBuf>, key: &str| {
            value.ok_or_else(|| {
                serde::de::Error::custom(format!("`boot.{key}` is required by this boot.backend"))
            })
        };
        let backend = match keys.backend {
            BackendName::Uboot => BootBackend::Uboot {
                env_config: keys.env_config.unwrap_or_else(|| PathBuf::from("/etc/fw_env.config")),
                single_copy_in_place: keys.uboot_single_copy_in_place,
            },
            BackendName::Grub => BootBackend::Grub { grubenv: required(keys.grubenv, "grubenv")? },
            BackendName::RpiTryboot => BootBackend::RpiTryboot {
                autoboot_txt: required(keys.autoboot_txt, "autoboot_txt")?,
                partition_file: keys.tryboot_partition_file,
            },
            BackendName::Script => BootBackend::Script { script: required(keys.script, "script")? },
        };
        Ok(Self {
            backend,
            booted_slot: keys.booted_slot,
            attempts: keys.attempts,
            boot_id_file: keys.boot_id_file,
        })
    }
}

/// `[boot]` as written: every backend's keys in one table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct BootKeys {
    backend: BackendName,
    #[serde(default = "default_booted_slot")]
    booted_slot: String,
    #[serde(default = "default_attempts")]
    attempts: u32,
    #[serde(default)]
    env_config: Option<PathBuf>,
    #[serde(default)]
    uboot_single_copy_in_place: bool,
    #[serde(default)]
    grubenv: Option<PathBuf>,
    #[serde(default)]
    autoboot_txt: Option<PathBuf>,
    #[serde(default)]
    script: Option<PathBuf>,
    #[serde(default = "default_boot_id_file")]
    boot_id_file: PathBuf,
    #[serde(default = "default_tryboot_partition_file")]
    tryboot_partition_file: PathBuf,
}

fn default_boot_id_file() -> PathBuf {
    PathBuf::from("/proc/sys/kernel/random/boot_id")
}
fn default_tryboot_partition_file() -> PathBuf {
    PathBuf::from("/proc/device-tree/chosen/bootloader/partition")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum MqttProfile {
    #[default]
    Native,
    AwsIotJobs,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mqtt {
    /// Absent: the broker provisioning stored (with a `[provision]` section).
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    #[serde(default)]
    pub profile: MqttProfile,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
    /// The first reconnect after losing the broker waits a delay below
    /// this, drawn once from the device id (`backoff::ReconnectPacer`); so
    /// does the first download of a group message without a `rollout`. A
    /// broker restart must not bring the fleet back at once.
    #[serde(default = "default_reconnect_spread")]
    pub reconnect_spread_s: u64,
}

/// The broker to connect to: `[mqtt]`, with what provisioning stored for
/// the keys it leaves out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    pub host: String,
    pub port: u16,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub profile: MqttProfile,
    pub keep_alive_s: u64,
    pub reconnect_spread_s: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ProvisionBackend {
    #[default]
    Networkmanager,
    Hostapd,
    /// No access point: the portal only, on `listen` (wired, USB gadget, tests).
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provision {
    #[serde(default)]
    pub backend: ProvisionBackend,
    #[serde(default = "default_wifi_interface")]
    pub interface: String,
    /// `{id}` is replaced by the device id.
    #[serde(default = "default_ap_ssid")]
    pub ssid: String,
    /// "auto" (the access point's address, port 80) or "ADDR:PORT".
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Default: `state_dir/pop`.
    #[serde(default)]
    pub pop_file: Option<PathBuf>,
    /// 0: no timeout.
    #[serde(default = "default_ap_timeout")]
    pub ap_timeout_s: u64,
    /// The access point's address for the `hostapd` backend, whose DHCP
    /// server is the image's (NetworkManager's shared mode picks its own).
    #[serde(default = "default_ap_address")]
    pub ap_address: std::net::Ipv4Addr,
    /// hostapd's control socket directory (`ctrl_interface`).
    #[serde(default = "default_hostapd_ctrl")]
    pub hostapd_ctrl_dir: PathBuf,
    /// wpa_supplicant's control socket directory, for joining the Wi-Fi
    /// with the `hostapd` backend.
    #[serde(default = "default_supplicant_ctrl")]
    pub wpa_supplicant_ctrl_dir: PathBuf,
    /// The image's registrar (`https://…`): the portal then asks only for
    /// the PoP, the Wi-Fi and a claim code.
    #[serde(default)]
    pub registrar: Option<String>,
    /// The CA the registrar's TLS certificate chains to (the only one
    /// trusted for it); required with an https `registrar`.
    #[serde(default)]
    pub registrar_ca: Option<PathBuf>,
}

impl Provision {
    pub fn ap_ssid(&self, device_id: &str) -> String {
        self.ssid.replace("{id}", device_id)
    }

    /// `Some(addr)` for an explicit `listen`; `None` for "auto".
    pub fn listen_addr(&self) -> Option<std::net::SocketAddr> {
        self.listen.parse().ok()
    }
}

fn default_wifi_interface() -> String {
    "wlan0".into()
}
fn default_ap_ssid() -> String {
    "fleetd-{id}".into()
}
fn default_listen() -> String {
    "auto".into()
}
fn default_ap_timeout() -> u64 {
    900
}
fn default_ap_address() -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(192, 168, 4, 1)
}
fn default_hostapd_ctrl() -> PathBuf {
    PathBuf::from("/run/hostapd")
}
fn default_supplicant_ctrl() -> PathBuf {
    PathBuf::from("/run/wpa_supplicant")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RebootMethod {
    #[default]
    Systemd,
    Command,
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Update {
    #[serde(default)]
    pub reboot: RebootMethod,
    /// Run with `sh -c`; `$FLEETD_REBOOT_ARG` holds the backend's argument (tryboot).
    #[serde(default)]
    pub reboot_command: Option<String>,
    /// Trust only this CA for https image URLs (default: the system roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_stall_timeout")]
    pub stall_timeout_s: u64,
    /// Bytes per second a download must average over each minute, and over
    /// the whole download once `give_up_after_s` has passed (0: no minimum).
    /// The second bound is what no server can reset by dripping bytes.
    #[serde(default = "default_min_rate")]
    pub min_rate_bps: u64,
    /// Consecutive download attempts without progress before giving up.
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default = "default_retry_base_ms")]
    pub retry_base_ms: u64,
    /// A download gives up after `retries` fruitless attempts and at least
    /// this many seconds without progress.
    #[serde(default = "default_give_up_after")]
    pub give_up_after_s: u64,
    /// fsync and record progress every this many MiB.
    #[serde(default = "default_checkpoint_mib")]
    pub checkpoint_mib: u64,
    /// Use a message's block index to fetch only the blocks the slots lack.
    #[serde(default = "default_true")]
    pub adaptive: bool,
    /// An adaptive plan may fetch at most this percent of the image (index
    /// included); above it, `adaptive_fallback` decides.
    #[serde(default = "default_adaptive_max_fetch")]
    pub adaptive_max_fetch: u8,
    #[serde(default)]
    pub adaptive_fallback: AdaptiveFallback,
}

/// `[update] adaptive_fallback`: over budget, or with a server that ignores
/// `Range`, download the whole image (`full`) or fail by name (`fail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdaptiveFallback {
    #[default]
    Full,
    Fail,
}

impl AdaptiveFallback {
    pub fn plan(self) -> crate::image::plan::Fallback {
        match self {
            Self::Full => crate::image::plan::Fallback::Full,
            Self::Fail => crate::image::plan::Fallback::Fail,
        }
    }
}

impl Default for Update {
    fn default() -> Self {
        Self {
            reboot: RebootMethod::Systemd,
            reboot_command: None,
            ca_file: None,
            stall_timeout_s: default_stall_timeout(),
            min_rate_bps: default_min_rate(),
            retries: default_retries(),
            retry_base_ms: default_retry_base_ms(),
            give_up_after_s: default_give_up_after(),
            checkpoint_mib: default_checkpoint_mib(),
            adaptive: true,
            adaptive_max_fetch: default_adaptive_max_fetch(),
            adaptive_fallback: AdaptiveFallback::Full,
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_adaptive_max_fetch() -> u8 {
    100
}

fn default_stall_timeout() -> u64 {
    30
}
fn default_min_rate() -> u64 {
    1024
}
fn default_retries() -> u32 {
    8
}
fn default_retry_base_ms() -> u64 {
    1000
}
fn default_give_up_after() -> u64 {
    300
}
fn default_checkpoint_mib() -> u64 {
    64
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    #[serde(default)]
    pub command: Option<PathBuf>,
    #[serde(default = "default_health_timeout")]
    pub timeout_s: u64,
}

/// The D-Bus API on the system bus. Without a bus (a container) the
/// daemon logs it and runs on; `enabled = false` does not try.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dbus {
    #[serde(default = "yes")]
    pub enabled: bool,
}

impl Default for Dbus {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// `[log]`: how much fleetd itself logs (`RUST_LOG` goes on top; see
/// `logging`). Other crates log warnings and errors only, unless `RUST_LOG`
/// says otherwise.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Self { level: default_log_level() }
    }
}

impl Log {
    /// The level (checked when the config loaded).
    pub fn level(&self) -> crate::logging::LevelFilter {
        crate::logging::parse_level(&self.level).unwrap_or(crate::logging::LevelFilter::INFO)
    }
}

fn default_log_level() -> String {
    "info".into()
}

fn yes() -> bool {
    true
}

impl Default for Health {
    fn default() -> Self {
        Self { command: None, timeout_s: default_health_timeout() }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/fleetd")
}
fn default_leeway() -> u64 {
    60
}
fn default_max_validity() -> u64 {
    DEFAULT_MAX_VALIDITY_S
}

pub use crate::trust::DEFAULT_MAX_VALIDITY_S;
fn default_booted_slot() -> String {
    "auto".into()
}
fn default_attempts() -> u32 {
    3
}
fn default_mqtt_port() -> u16 {
    8883
}
fn default_keep_alive() -> u64 {
    30
}
fn default_reconnect_spread() -> u64 {
    30
}
fn default_health_timeout() -> u64 {
    300
}

/// The config path: `--config`, else `$FLEETD_CONFIG`, else the default.
pub fn resolve_path(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    match std::env::var_os(CONFIG_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_CONFIG_PATH),
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Self::parse_with(text, path, &read_id_source)
    }

    /// `parse` with the device-id sources read through `read` (tests hand
    /// in a table of files).
    pub fn parse_with(
        text: &str,
        path: &Path,
        read: &dyn Fn(&Path) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::new(text);
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let mut message = inner.message().to_string();
            if let Some(span) = inner.span() {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                message = format!("{message} (line {line})");
            }
            ConfigError::Invalid {
                path: path.to_path_buf(),
                key: if key == "." { "<root>".into() } else { key },
                message,
            }
        })?;
        config.source = path.to_path_buf();
        config.resolve_relative_paths();
        config.resolve_device_id(read)?;
        config.validate()?;
        Ok(config)
    }

    fn invalid(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { path: self.source.clone(), key: key.into(), message: message.into() }
    }

    /// `[device] id` / `id_file` → the id and its source.
    fn resolve_device_id(&mut self, read: &dyn Fn(&Path) -> Option<String>) -> Result<(), ConfigError> {
        let key = if self.device.id_file.is_some() { "device.id_file" } else { "device.id" };
        let (id, source) = crate::device_id::resolve(&self.device.id, self.device.id_file.as_deref(), read)
            .map_err(|e| self.invalid(key, e.to_string()))?;
        self.device.id = id;
        self.device.id_source = source;
        Ok(())
    }

    fn resolve_relative_paths(&mut self) {
        let base = self.source.parent().map(Path::to_path_buf).unwrap_or_default();
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.device.state_dir);
        self.device.id_file.iter_mut().for_each(fix);
        fix(&mut self.boot.boot_id_file);
        match &mut self.boot.backend {
            BootBackend::Uboot { env_config: path, .. }
            | BootBackend::Grub { grubenv: path }
            | BootBackend::Script { script: path } => fix(path),
            BootBackend::RpiTryboot { autoboot_txt, partition_file } => {
                fix(autoboot_txt);
                fix(partition_file);
            }
        }
        self.trust.keys.values_mut().for_each(fix);
        self.slots.values_mut().for_each(|s| fix(&mut s.device));
        for p in [&mut self.health.command, &mut self.update.ca_file].into_iter().flatten() {
            fix(p);
        }
        if let Some(p) = &mut self.provision {
            p.pop_file.iter_mut().for_each(fix);
            p.registrar_ca.iter_mut().for_each(fix);
            fix(&mut p.hostapd_ctrl_dir);
            fix(&mut p.wpa_supplicant_ctrl_dir);
        }
        if let Some(m) = &mut self.mqtt {
            m.ca_file.iter_mut().for_each(fix);
            m.cert_file.iter_mut().for_each(fix);
            m.key_file.iter_mut().for_each(fix);
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("device.id", &self.device.id),
            ("device.project", &self.device.project),
            ("device.hardware", &self.device.hardware),
        ] {
            if !is_identifier(value) {
                return Err(self.invalid(key, format!("{value:?} must be 1-64 characters of [A-Za-z0-9._-]")));
            }
        }
        for (i, g) in self.device.groups.iter().enumerate() {
            if !is_identifier(g) {
                return Err(self.invalid(
                    format!("device.groups[{i}]"),
                    format!("{g:?} must be 1-64 characters of [A-Za-z0-9._-]"),
                ));
            }
        }
        if crate::logging::parse_level(&self.log.level).is_none() {
            return Err(self.invalid(
                "log.level",
                format!("{:?} is not a level: one of off, error, warn, info, debug, trace", self.log.level),
            ));
        }
        if self.trust.keys.is_empty() {
            return Err(
                self.invalid("trust.keys", "at least one key is required (normally fleet and cosigner)")
            );
        }
        if self.trust.max_validity_s == 0 {
            return Err(self.invalid("trust.max_validity_s", "must be positive"));
        }
        if self.slots.len() != 2 {
            return Err(self.invalid(
                "slots",
                format!("exactly two slots are needed for A/B updates, found {}", self.slots.len()),
            ));
        }
        for name in self.slots.keys() {
            if !name.bytes().all(|b| b.is_ascii_alphanumeric()) || name.is_empty() || name.len() > 8 {
                return Err(self.invalid(format!("slots.{name}"), "slot names are 1-8 letters or digits"));
            }
        }
        let devices: Vec<_> = self.slots.values().map(|s| &s.device).collect();
        if devices[0] == devices[1] {
            return Err(self.invalid("slots", "both slots name the same device"));
        }
        if self.boot.booted_slot != "auto" && !self.slots.contains_key(&self.boot.booted_slot) {
            return Err(self.invalid(
                "boot.booted_slot",
                format!("{:?} is neither \"auto\" nor a slot name", self.boot.booted_slot),
            ));
        }
        // The shipped U-Boot script counts with setexpr (hex) and compares with
        // test (decimal): both agree only on single digits.
        if !(1..=9).contains(&self.boot.attempts) {
            return Err(self.invalid("boot.attempts", "must be between 1 and 9"));
        }
        if self.update.adaptive_max_fetch == 0 || self.update.adaptive_max_fetch > 100 {
            return Err(self.invalid("update.adaptive_max_fetch", "a percentage from 1 to 100"));
        }
        if self.update.checkpoint_mib == 0 || self.update.stall_timeout_s == 0 || self.update.retries == 0 {
            return Err(
                self.invalid("update", "checkpoint_mib, stall_timeout_s and retries must be positive")
            );
        }
        if self.update.reboot == RebootMethod::Command && self.update.reboot_command.is_none() {
            return Err(self.invalid("update.reboot_command", "required when update.reboot = \"command\""));
        }
        if let Some(p) = &self.provision {
            if p.listen != "auto" && p.listen_addr().is_none() {
                return Err(self.invalid(
                    "provision.listen",
                    format!("{:?} is neither \"auto\" nor ADDR:PORT", p.listen),
                ));
            }
            if p.interface.is_empty() || p.interface.contains('/') {
                return Err(self.invalid("provision.interface", "must be an interface name"));
            }
            if let Some(url) = &p.registrar {
                let https = fleetd_core::provision::request::check_registrar_url(url)
                    .map_err(|e| self.invalid("provision.registrar", e.to_string()))?;
                if https && p.registrar_ca.is_none() {
                    return Err(self.invalid(
                        "provision.registrar_ca",
                        "required with an https registrar (the only CA trusted for it)",
                    ));
                }
            } else if p.registrar_ca.is_some() {
                return Err(self.invalid("provision.registrar_ca", "needs provision.registrar"));
            }
        }
        if let Some(m) = &self.mqtt {
            if m.host.as_deref() == Some("") {
                return Err(self.invalid("mqtt.host", "must not be empty"));
            }
            if m.port == Some(0) {
                return Err(self.invalid("mqtt.port", "must not be 0"));
            }
            if self.provision.is_none() {
                for (key, missing) in [("mqtt.host", m.host.is_none()), ("mqtt.ca_file", m.ca_file.is_none())]
                {
                    if missing {
                        return Err(self.invalid(
                            key,
                            "required (or a [provision] section, whose provisioning stores it)",
                        ));
                    }
                }
            }
            if m.cert_file.is_some() != m.key_file.is_some() {
                return Err(self.invalid("mqtt.key_file", "cert_file and key_file go together"));
            }
        }
        Ok(())
    }

    /// The broker: `[mqtt]` keys first, provisioning's (`host`, `port`) for
    /// the keys left out; the CA and identity default to the provisioned
    /// files. `None` when there is nothing to connect to.
    pub fn broker(&self, provisioned: Option<(&str, u16)>) -> Option<Broker> {
        if self.mqtt.is_none() && (self.provision.is_none() || provisioned.is_none()) {
            return None;
        }
        let m = self.mqtt.clone().unwrap_or(Mqtt {
            host: None,
            port: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            profile: MqttProfile::Native,
            keep_alive_s: default_keep_alive(),
            reconnect_spread_s: default_reconnect_spread(),
        });
        let identity = self.device.state_dir.join("identity");
        Some(Broker {
            host: m.host.or_else(|| provisioned.map(|p| p.0.to_string()))?,
            port: m.port.or(provisioned.map(|p| p.1)).unwrap_or_else(default_mqtt_port),
            ca_file: m.ca_file.unwrap_or_else(|| identity.join("ca.pem")),
            cert_file: m.cert_file.unwrap_or_else(|| identity.join("cert.pem")),
            key_file: m.key_file.unwrap_or_else(|| identity.join("key.pem")),
            profile: m.profile,
            keep_alive_s: m.keep_alive_s,
            reconnect_spread_s: m.reconnect_spread_s,
        })
    }

    /// `[mqtt] reconnect_spread_s`, or its default.
    pub fn reconnect_spread_s(&self) -> u64 {
        self.mqtt.as_ref().map_or_else(default_reconnect_spread, |m| m.reconnect_spread_s)
    }

    /// The proof-of-possession file: `provision.pop_file`, else `state_dir/pop`.
    pub fn pop_file(&self) -> PathBuf {
        self.provision
            .as_ref()
            .and_then(|p| p.pop_file.clone())
            .unwrap_or_else(|| self.device.state_dir.join("pop"))
    }

    /// The smallest size among slots whose size is configured or readable.
    pub fn smallest_slot_size(&self) -> Option<u64> {
        self.slots.values().filter_map(slot_size).min()
    }
}

/// A slot's size: the configured one, else the file's or block device's length.
pub fn slot_size(slot: &Slot) -> Option<u64> {
    use std::io::{Seek, SeekFrom};
    if let Some(size) = slot.size {
        return Some(size);
    }
    // Seeking to the end works for regular files and block devices alike.
    let mut f = std::fs::File::open(&slot.device).ok()?;
    f.seek(SeekFrom::End(0)).ok()
}

fn is_identifier(s: &str) -> bool {
    crate::device_id::is_identifier(s)
}

/// The largest id source read (sysfs reports its files as one page).
const MAX_ID_SOURCE_BYTES: usize = 4096;

/// Reads an id source: a regular file, capped, never blocking.
fn read_id_source(path: &Path) -> Option<String> {
    let bytes = crate::fsutil::read_file_capped(path, MAX_ID_SOURCE_BYTES).ok()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configuration the Debian package installs parses as it stands,
    /// and says what its comments say.
    #[test]
    fn the_packaged_default_config_parses() {
        let text = include_str!("../packaging/fleetd.toml");
        let c = Config::parse(text, Path::new("/etc/fleetd/fleetd.toml")).expect("packaging/fleetd.toml");
        assert_eq!(c.device.state_dir, Path::new("/var/lib/fleetd"));
        assert_eq!(c.slots.len(), 2);
        assert!(c.mqtt.is_none() && c.provision.is_some() && c.dbus.enabled);
        assert_eq!(c.log.level, "info");
        assert_eq!(c.pop_file(), Path::new("/var/lib/fleetd/pop"));
    }

    /// The documented example device, on U-Boot with real partitions.
    fn good() -> String {
        fleetd_fixture::DeviceConfig {
            trust: "leeway_s = 30".into(),
            keys: vec![
                ("fleet".into(), "keys/fleet.pub.pem".into()),
                ("cosigner".into(), "/etc/fleetd/keys/cosigner.pub.pem".into()),
            ],
            slots: vec![
                ("A".into(), "/dev/mmcblk0p2".into(), None),
                ("B".into(), "/dev/mmcblk0p3".into(), None),
            ],
            boot: "backend = \"uboot\"".into(),
            ..Default::default()
        }
        .to_toml()
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/fleetd/fleetd.toml"))
    }

    #[test]
    fn parses_the_documented_example_and_resolves_paths() {
        let c = parse(&good()).unwrap();
        assert_eq!(c.device.id, "gw-0042");
        assert_eq!(c.trust.leeway_s, 30);
        assert!(!c.trust.allow_http);
        assert_eq!(c.device.state_dir, PathBuf::from("/etc/fleetd/state"));
        assert_eq!(c.trust.keys["fleet"], PathBuf::from("/etc/fleetd/keys/fleet.pub.pem"));
        let env_config = PathBuf::from("/etc/fw_env.config");
        assert_eq!(c.boot.backend, BootBackend::Uboot { env_config, single_copy_in_place: false });
        assert_eq!(c.boot.attempts, 3);
        assert_eq!(c.update.reboot, RebootMethod::Systemd);
    }

    /// Each backend's keys become its variant, paths resolved; a key no
    /// backend knows is still refused by name.
    #[test]
    fn each_boot_backend_is_checked_at_load() {
        let with = |boot: &str| parse(&good().replace("backend = \"uboot\"", boot)).map(|c| c.boot.backend);
        let path = |p: &str| PathBuf::from("/etc/fleetd").join(p);
        assert_eq!(
            with("backend = \"grub\"\ngrubenv = \"grubenv\"").unwrap(),
            BootBackend::Grub { grubenv: path("grubenv") }
        );
        assert_eq!(
            with("backend = \"rpi-tryboot\"\nautoboot_txt = \"autoboot.txt\"").unwrap(),
            BootBackend::RpiTryboot {
                autoboot_txt: path("autoboot.txt"),
                partition_file: "/proc/device-tree/chosen/bootloader/partition".into()
            }
        );
        assert_eq!(
            with("backend = \"script\"\nscript = \"boot.sh\"").unwrap(),
            BootBackend::Script { script: path("boot.sh") }
        );
        assert_eq!(
            with("backend = \"uboot\"\nenv_config = \"fw_env.config\"\nuboot_single_copy_in_place = true")
                .unwrap(),
            BootBackend::Uboot { env_config: path("fw_env.config"), single_copy_in_place: true }
        );
        for (boot, key) in
            [("backend = \"script\"", "`boot.script`"), ("backend = \"rpi-tryboot\"", "`boot.autoboot_txt`")]
        {
            let e = with(boot).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("required"), "{e}");
        }
        let e = with("backend = \"grub\"\ngrubenvv = \"grubenv\"").unwrap_err().to_string();
        assert!(e.contains("`boot.grubenvv`") && e.contains("unknown field"), "{e}");
    }

    fn error_of(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let e = error_of(&good().replace("leeway_s = 30", "leeway_s = \"soon\""));
        assert!(e.starts_with("/etc/fleetd/fleetd.toml: key `trust.leeway_s`"), "{e}");

        let e = error_of(&good().replace("leeway_s = 30", "leway_s = 30"));
        assert!(e.contains("`trust.leway_s`") && e.contains("unknown field"), "{e}");

        let e = error_of(&good().replace("backend = \"uboot\"", "backend = \"lilo\""));
        assert!(e.contains("`boot.backend`") && e.contains("lilo"), "{e}");

        let e = error_of(&good().replace("id = \"gw-0042\"", "id = \"gw 42\""));
        assert!(e.contains("`device.id`"), "{e}");

        let e = error_of(&good().replace("[slots.B]\ndevice = \"/dev/mmcblk0p3\"", ""));
        assert!(e.contains("`slots`") && e.contains("two slots"), "{e}");

        let e = error_of(&format!("{}booted_slot = \"C\"\n", good()));
        assert!(e.contains("`boot.booted_slot`"), "{e}");

        let e = error_of(&good().replace("backend = \"uboot\"", "backend = \"grub\""));
        assert!(e.contains("`boot.grubenv`"), "{e}");
        assert_eq!(
            e,
            "/etc/fleetd/fleetd.toml: key `boot`: `boot.grubenv` is required by this boot.backend (line 20)"
        );

        let e = error_of(&good().replace("[device]", "[devise]"));
        assert!(e.contains("devise"), "{e}");

        let e = error_of("this is = = not toml");
        assert!(e.starts_with("/etc/fleetd/fleetd.toml: key"), "{e}");

        let e = error_of(&format!("{}\n[provision]\nlisten = \"0.0.0.0\"\n", good()));
        assert!(e.contains("`provision.listen`") && e.contains("ADDR:PORT"), "{e}");
        let e = error_of(&format!("{}\n[provision]\nbackend = \"wext\"\n", good()));
        assert!(e.contains("`provision.backend`"), "{e}");
        let e = error_of(&format!("{}\n[provision]\nregistrar = \"http://reg.example\"\n", good()));
        assert!(e.contains("`provision.registrar`") && e.contains("enroll-url-invalid"), "{e}");
        let e = error_of(&format!("{}\n[provision]\nregistrar = \"https://reg.example\"\n", good()));
        assert!(e.contains("`provision.registrar_ca`"), "{e}");
        let c = parse(&format!(
            "{}\n[provision]\nregistrar = \"https://reg.example\"\nregistrar_ca = \"reg-ca.pem\"\n",
            good()
        ))
        .unwrap();
        assert_eq!(c.provision.unwrap().registrar_ca.unwrap(), Path::new("/etc/fleetd/reg-ca.pem"));
        let e = error_of(&format!("{}\n[log]\nlevel = \"loud\"\n", good()));
        assert!(e.contains("`log.level`") && e.contains("\"loud\" is not a level"), "{e}");
    }

    /// `id = "auto"` and `id_file` resolve at load, through the reader
    /// given; a missing or bad id is refused with its key and name.
    #[test]
    fn the_device_id_comes_from_id_file_or_the_hardware() {
        let files = |p: &Path| match p.to_str()? {
            "/etc/fleetd/device-id" => Some("gw-9\n".to_string()),
            "/etc/machine-id" => Some("abc123\n".to_string()),
            _ => None,
        };
        let path = Path::new("/etc/fleetd/fleetd.toml");
        let with = |id: &str| good().replace("id = \"gw-0042\"", id);
        let c = Config::parse_with(&with("id = \"auto\"\nid_file = \"device-id\""), path, &files).unwrap();
        assert_eq!((c.device.id.as_str(), c.device.id_source), ("gw-9", IdSource::IdFile));
        let c = Config::parse_with(&with("id = \"auto\""), path, &files).unwrap();
        assert_eq!((c.device.id.as_str(), c.device.id_source), ("abc123", IdSource::MachineId));
        let c = Config::parse_with(&good(), path, &files).unwrap();
        assert_eq!((c.device.id.as_str(), c.device.id_source), ("gw-0042", IdSource::Config));
        let e = Config::parse_with(&with("id = \"auto\""), path, &|_| None).unwrap_err().to_string();
        assert!(e.contains("`device.id`") && e.contains("device-id-unavailable"), "{e}");
        let e = Config::parse_with(&with("id = \"x\"\nid_file = \"nope\""), path, &files)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`device.id_file`") && e.contains("/etc/fleetd/nope"), "{e}");
    }

    #[test]
    fn the_log_level_defaults_to_info() {
        assert_eq!(parse(&good()).unwrap().log.level(), crate::logging::LevelFilter::INFO);
        let c = parse(&format!("{}\n[log]\nlevel = \"Debug\"\n", good())).unwrap();
        assert_eq!(c.log.level(), crate::logging::LevelFilter::DEBUG);
    }

    // The shared device configuration parses as documented.
    #[test]
    fn the_default_parses_as_the_documented_example() {
        let config = Config::parse(
            &fleetd_fixture::DeviceConfig::default().to_toml(),
            std::path::Path::new("/etc/fleetd/fleetd.toml"),
        )
        .unwrap();
        assert_eq!(config.device.id, "gw-0042");
        assert_eq!(config.device.groups, ["pilot"]);
        assert_eq!(config.slots["B"].device, std::path::Path::new("/etc/fleetd/slot-b.img"));
        assert!(config.mqtt.is_none());
    }

    #[test]
    fn every_table_is_written_when_given() {
        let text = fleetd_fixture::DeviceConfig {
            trust: "allow_http = true".into(),
            mqtt: Some("host = \"h\"\nport = 1\nca_file = \"ca.pem\"".into()),
            update: Some("reboot = \"none\"".into()),
            health: Some("timeout_s = 5".into()),
            slots: vec![("A".into(), "a".into(), Some(2)), ("B".into(), "b".into(), Some(3))],
            ..fleetd_fixture::DeviceConfig::default()
        }
        .to_toml();
        let config = Config::parse(&text, std::path::Path::new("/f.toml")).unwrap();
        assert!(config.trust.allow_http);
        assert_eq!(config.mqtt.unwrap().port, Some(1));
        assert_eq!(config.health.timeout_s, 5);
        assert_eq!(config.slots["A"].boot_partition, Some(2));
    }
}
