//! fleetd's integration tests, one binary (one link on 2 cores): each
//! module was a test file of its own. They run the real binaries against
//! real brokers, buses, bootloader tools and, as root, network namespaces.

mod common;

mod boot_grub;
mod boot_script;
mod boot_tryboot;
mod boot_uboot;
mod cli_trust;
mod dbus;
mod demo;
mod device_identity;
mod docs;
mod fleet;
mod hostapd;
mod image;
mod install_cycle;
mod install_faults;
mod interop;
mod logging;
mod mqtt_netns;
mod netns_broker;
mod networkmanager;
mod power_cut;
mod provision;
mod registrar;
mod rollout;
mod safety;
mod system_boot;
mod system_unit;
mod system_wifi;
mod systemd;
