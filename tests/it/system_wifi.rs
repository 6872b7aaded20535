//! Provisioning over real Wi-Fi: a QEMU guest (software emulation) with
//! Debian's kernel and three mac80211_hwsim radios, real NetworkManager,
//! wpa_supplicant, hostapd, dnsmasq and mosquitto. Radio 0 is the device's,
//! radio 1 (moved into the netns `phone`) is the phone, radio 2 (netns
//! `home`) is the home Wi-Fi: hostapd, a DHCP server and the broker.
//!
//! This file is both sides. On the host (`FLEETD_SYSTEM_TESTS=1`, run by
//! `scripts/test-system networkmanager`) it boots the guest with this very
//! test binary, fleetd and fleetctl appended to the initramfs at their own
//! paths, and reads the verdict from the serial console. In the guest
//! (`FLEETD_IN_GUEST=1`) the same test runs the scenario.

use crate::common;
use common::*;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const HOME_SSID: &str = "home";
const HOME_PSK: &str = "home-secret-1";
const HOME_IP: &str = "192.168.77.1";
/// A whole guest run takes under a minute under TCG; this catches a hang.
const GUEST_DEADLINE: Duration = Duration::from_secs(600);
const RESULT: &str = "FLEETD-GUEST-RESULT";

#[test]
fn networkmanager_provisioning_on_mac80211_hwsim() {
    tier("networkmanager_provisioning_on_mac80211_hwsim", Backend::NetworkManager);
}

#[test]
fn hostapd_provisioning_on_mac80211_hwsim() {
    tier("hostapd_provisioning_on_mac80211_hwsim", Backend::Hostapd);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Backend {
    NetworkManager,
    Hostapd,
}

impl Backend {
    /// The access point's address: NM's shared mode, or the hostapd
    /// backend's `ap_address` (packaging/hostapd/dnsmasq.conf).
    fn ap_ip(self) -> &'static str {
        match self {
            Self::NetworkManager => "10.42.0.1",
            Self::Hostapd => "192.168.4.1",
        }
    }
}

fn tier(name: &str, backend: Backend) {
    if std::env::var_os("FLEETD_IN_GUEST").is_some() {
        return in_guest(backend);
    }
    if std::env::var_os("FLEETD_SYSTEM_TESTS").is_none() {
        eprintln!("SKIP: the real-radio tier runs from scripts/test-system");
        return;
    }
    on_host(&crate::common::test_name(module_path!(), name));
}

// ---------------------------------------------------------------- host side

fn on_host(test: &str) {
    let guest =
        PathBuf::from(std::env::var("FLEETD_GUEST_DIR").expect("FLEETD_GUEST_DIR (scripts/test-system)"));
    let dir = tempfile::tempdir().unwrap();
    // The overlay: /init, and this binary, fleetd and fleetctl at the paths
    // they were built at (the test finds them by those paths; /tmp too:
    // nothing is mounted over the initramfs root's /tmp).
    let overlay = dir.path().join("overlay");
    let me = std::env::current_exe().unwrap();
    let policy = crate::common::root().join("packaging/dbus/org.fleetd.Daemon1.conf");
    let manifest = crate::common::root();
    let hostapd_conf = manifest.join("packaging/hostapd/hostapd.conf");
    let dnsmasq_conf = manifest.join("packaging/hostapd/dnsmasq.conf");
    let files: [(PathBuf, PathBuf); 6] = [
        // The shipped hostapd-backend configs, where the guest looks for them.
        (hostapd_conf.clone(), hostapd_conf),
        (dnsmasq_conf.clone(), dnsmasq_conf),
        (me.clone(), me.clone()),
        (crate::common::fleetd_bin(), crate::common::fleetd_bin()),
        (crate::common::fleetctl_bin(), crate::common::fleetctl_bin()),
        // As the package installs it: the daemon owns its name on the guest's bus.
        (policy, "/usr/share/dbus-1/system.d/org.fleetd.Daemon1.conf".into()),
    ];
    for (from, at) in files {
        let to = overlay.join(at.strip_prefix("/").unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&from, &to).unwrap();
    }
    // The guest's root is a RAM filesystem of half its memory, and debug
    // info is most of a debug build's bytes: the three binaries would fill
    // it. Panic messages keep their locations without it.
    for bin in [me.clone(), crate::common::fleetd_bin(), crate::common::fleetctl_bin()] {
        let copy = overlay.join(bin.strip_prefix("/").unwrap());
        let status = Command::new("strip").arg("--strip-debug").arg(&copy).status().unwrap();
        assert!(status.success(), "strip --strip-debug {}", copy.display());
    }
    let init = format!(
        "#!/bin/sh\n\
         mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n\
         mkdir -p /dev/pts /run /tmp\nmount -t tmpfs tmpfs /run\n\
         ip link set lo up\nhostname guest\n\
         export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root\n\
         FLEETD_IN_GUEST=1 RUST_BACKTRACE=1 {me} --exact {test} --nocapture --test-threads=1\n\
         echo \"{RESULT} $?\"\n\
         echo o > /proc/sysrq-trigger\nsleep 30\n",
        me = me.display()
    );
    std::fs::write(overlay.join("init"), init).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(overlay.join("init"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cpio = dir.path().join("overlay.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("cd {} && find . | cpio -o -H newc --quiet > {}", overlay.display(), cpio.display()))
        .status()
        .unwrap();
    assert!(status.success());
    let initrd = dir.path().join("initrd");
    let mut bytes = std::fs::read(guest.join("root.cpio.gz")).unwrap();
    // The kernel takes an uncompressed archive after a compressed one only
    // at a 4-byte boundary (zeros between are skipped).
    bytes.resize(bytes.len().next_multiple_of(4), 0);
    bytes.extend(std::fs::read(&cpio).unwrap());
    std::fs::write(&initrd, bytes).unwrap();

    let serial = dir.path().join("serial.log");
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", "2048"])
        .arg("-kernel")
        .arg(guest.join("vmlinuz"))
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 rdinit=/init panic=-1 quiet loglevel=3"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&serial).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > GUEST_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = String::from_utf8_lossy(&std::fs::read(&serial).unwrap()).replace('\r', "");
    eprintln!("{text}");
    eprintln!("guest run: {} s", started.elapsed().as_secs());
    let code = text.lines().find_map(|l| l.trim().strip_prefix(RESULT)).map(str::trim);
    assert_eq!(code, Some("0"), "the guest's test did not pass (serial console above)");
}

// --------------------------------------------------------------- guest side

fn until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What the radios, NM and the phone say, for a failure's report.
fn diagnose() {
    for cmd in [
        "iw dev",
        "ip link show wlan0",
        "iw dev wlan0 info",
        "nmcli -t device",
        "nmcli -t connection show --active",
        "ip -n phone link show",
        "ip netns exec phone wpa_cli -p /run/phone-wpa -i wlan1 status",
        "wpa_cli -p /run/wpa_supplicant -i wlan0 status",
        "hostapd_cli -p /run/hostapd -i wlan0 status",
        "tail -n 30 /tmp/wifi/hostapd.log",
        "grep -v p2p /tmp/wifi/wpa.log | tail -n 30",
        "ip netns exec phone iw dev wlan1 scan | grep -E 'SSID|freq|BSS '",
        "tail -n 40 /tmp/wifi/phone-wpa.log",
        "tail -n 40 /tmp/wifi/fleetd.log",
        "tail -n 20 /tmp/wifi/mosquitto.log",
        "sed -n '/starting connection .fleetd-hotspot/,$p' /tmp/wifi/nm.log | grep -iE 'state change|fail|timeout|Activation|Config:|secrets|supplicant|error|warn' | grep -v p2p | head -n 50",
        "grep -iE 'wlan0: (State|CTRL-EVENT|AP-|Setup|interface state)|ap_|Failed|fail' /tmp/wifi/wpa.log | grep -v p2p | head -n 60",
    ] {
        let out = Command::new("sh").arg("-c").arg(cmd).output();
        let text = out.map(|o| format!("{}{}", stdout(&o), stderr(&o))).unwrap_or_default();
        eprintln!("guest diagnose: {cmd}\n{text}");
    }
}

fn step(what: &str) {
    eprintln!("guest: {what}");
}

/// `nmcli -t connection show NAME` as key → value.
fn connection_settings(name: &str) -> BTreeMap<String, String> {
    sh(&format!("nmcli -t --show-secrets connection show '{name}'"))
        .lines()
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

fn in_guest(backend: Backend) {
    // Any failure first shows what the radios, the daemons and fleetd say.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        diagnose();
        report(info)
    }));
    let dir = PathBuf::from("/tmp/wifi");
    std::fs::create_dir_all(&dir).unwrap();

    step("radios, udev, the system bus");
    sh("modprobe mac80211_hwsim radios=3");
    sh("/usr/lib/systemd/systemd-udevd --daemon && udevadm trigger --action=add && udevadm settle");
    sh("mkdir -p /run/dbus && dbus-daemon --system --fork");
    // The phone's and the home network's radios leave the device's namespace.
    let phys = sh("iw dev");
    let mut iface_phy = BTreeMap::new();
    let mut phy = String::new();
    for line in phys.lines() {
        let line = line.trim();
        if let Some(p) = line.strip_prefix("phy#") {
            phy = format!("phy{p}");
        } else if let Some(i) = line.strip_prefix("Interface ") {
            iface_phy.insert(i.to_string(), phy.clone());
        }
    }
    assert_eq!(iface_phy.len(), 3, "{phys}");
    for (ns, iface) in [("phone", "wlan1"), ("home", "wlan2")] {
        sh(&format!("ip netns add {ns} && iw phy {} set netns name {ns}", iface_phy[iface]));
        sh(&format!("ip -n {ns} link set lo up"));
    }

    step("the home network: hostapd, DHCP, mosquitto over mutual TLS");
    let pki = common::cloud::Pki::new(&dir.join("pki"), HOME_IP.parse().unwrap());
    std::fs::write(
        dir.join("home-hostapd.conf"),
        format!(
            "interface=wlan2\ndriver=nl80211\nssid={HOME_SSID}\nhw_mode=g\nchannel=6\nwpa=2\n\
             wpa_key_mgmt=WPA-PSK\nrsn_pairwise=CCMP\nwpa_passphrase={HOME_PSK}\n"
        ),
    )
    .unwrap();
    sh(&format!(
        "ip netns exec home hostapd -B -P /run/home-hostapd.pid {}",
        dir.join("home-hostapd.conf").display()
    ));
    sh(&format!("ip -n home addr add {HOME_IP}/24 dev wlan2"));
    sh("ip netns exec home dnsmasq --no-resolv --no-hosts --interface=wlan2 --bind-interfaces \
        --dhcp-range=192.168.77.10,192.168.77.50,1h --pid-file=/run/home-dnsmasq.pid --dhcp-leasefile=/run/home.leases");
    std::fs::write(
        dir.join("mosquitto.conf"),
        format!(
            "user root\nlistener 8883 {HOME_IP}\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n\
             use_identity_as_username true\nallow_anonymous false\npersistence false\n",
            pki.ca_pem.display(),
            pki.broker_cert.display(),
            pki.broker_key.display()
        ),
    )
    .unwrap();
    let mut broker = Command::new("ip")
        .args(["netns", "exec", "home", "mosquitto", "-c"])
        .arg(dir.join("mosquitto.conf"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("mosquitto.log")).unwrap())
        .spawn()
        .unwrap();
    until("the broker to listen", Duration::from_secs(30), || {
        common::cloud::run_in_netns("home", || {
            let addr = std::net::SocketAddr::new(HOME_IP.parse().unwrap(), 8883);
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
        })
    });

    let mut network_manager = None;
    let reference = match backend {
        Backend::NetworkManager => {
            step("wpa_supplicant (D-Bus) and NetworkManager");
            sh("wpa_supplicant -u -B -P /run/wpa_supplicant.pid -d -f /tmp/wifi/wpa.log");
            let nm_log = std::fs::File::create(dir.join("nm.log")).unwrap();
            network_manager = Some(
                Command::new("NetworkManager")
                    .args([
                        "--no-daemon",
                        "--debug",
                        "--log-level=DEBUG",
                        "--log-domains=WIFI,SUPPLICANT,DEVICE,CORE,WIFI_SCAN",
                    ])
                    .stdout(Stdio::null())
                    .stderr(nm_log)
                    .spawn()
                    .unwrap(),
            );
            until("NetworkManager to manage wlan0", Duration::from_secs(60), || {
                Command::new("nmcli")
                    .args(["-t", "-f", "DEVICE,STATE", "device"])
                    .output()
                    .map(|o| stdout(&o).lines().any(|l| l == "wlan0:disconnected"))
                    .unwrap_or(false)
            });
            step("what `nmcli dev wifi hotspot` makes, for reference");
            sh("nmcli dev wifi hotspot ifname wlan0 con-name reference ssid reference password reference-pass");
            let reference = connection_settings("reference");
            sh("nmcli connection delete reference");
            reference
        }
        Backend::Hostapd => {
            // What an image with the hostapd backend sets up (packaging/hostapd/):
            // the AP's address, hostapd (started disabled), its DHCP server,
            // and wpa_supplicant on the same radio for the join.
            step("the image's hostapd, dnsmasq and wpa_supplicant on wlan0");
            let root = crate::common::root().join("packaging/hostapd");
            sh(&format!("ip addr add {}/24 dev wlan0 && ip link set wlan0 up", backend.ap_ip()));
            // wpa_supplicant first: it will not start on a radio hostapd holds.
            std::fs::write(
                dir.join("wpa_supplicant.conf"),
                "ctrl_interface=/run/wpa_supplicant\nupdate_config=1\n",
            )
            .unwrap();
            sh(&format!(
                "wpa_supplicant -B -i wlan0 -c {} -f /tmp/wifi/wpa.log -P /run/wpa_supplicant.pid || (cat /tmp/wifi/wpa.log; false)",
                dir.join("wpa_supplicant.conf").display()
            ));
            sh(&format!("mkdir -p /run/hostapd && hostapd -B -P /run/hostapd.pid -f /tmp/wifi/hostapd.log {} || (cat /tmp/wifi/hostapd.log; false)", root.join("hostapd.conf").display()));
            sh(&format!(
                "dnsmasq -C {} --pid-file=/run/ap-dnsmasq.pid --dhcp-leasefile=/run/ap.leases --no-resolv --no-hosts",
                root.join("dnsmasq.conf").display()
            ));
            BTreeMap::new()
        }
    };

    step("fleetd raises its hotspot");
    let dev = Device::with_slot_size(1 << 20);
    fleetd::boot::grub::GrubEnv::initialize(&dev.path().join("grubenv"), &["A".into(), "B".into()]).unwrap();
    let config =
        fleetd_fixture::DeviceConfig { update: Some("reboot = \"none\"".into()), ..Default::default() }
            .to_toml()
            + &format!(
            "\n[provision]\nbackend = \"{}\"\ninterface = \"wlan0\"\nlisten = \"auto\"\nap_timeout_s = 0\n",
            match backend {
                Backend::NetworkManager => "networkmanager",
                Backend::Hostapd => "hostapd",
            }
        );
    std::fs::write(dev.config(), config).unwrap();
    let log = dir.join("fleetd.log");
    let system_bus = ("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/run/dbus/system_bus_socket");
    let daemon = Daemon::start(&dev.config(), None, &[system_bus], &log);
    let pop_out =
        run(fleetd().env(system_bus.0, system_bus.1).args(["status", "--pop", "--config"]).arg(dev.config()));
    let pop_text = stdout(&pop_out);
    let pop = pop_text.lines().last().unwrap().trim().to_string();
    let passphrase = pop_text
        .lines()
        .find_map(|l| {
            l.strip_prefix("access point").map(|r| r.split("passphrase ").nth(1).unwrap().trim().to_string())
        })
        .unwrap();
    let ssid = "fleetd-gw-0042";
    // Whether fleetd's access point is up, as the backend itself says.
    let ap_up = || match backend {
        Backend::NetworkManager => sh("nmcli -t -f NAME,DEVICE connection show --active")
            .lines()
            .any(|l| l.ends_with(":wlan0") && !l.starts_with("reference:")),
        // hostapd says ENABLED even when it sends no beacons (seen: after
        // a DISABLE with `start_disabled=1`); the kernel's view of the
        // interface shows whether the access point really runs.
        Backend::Hostapd => Command::new("iw").args(["dev", "wlan0", "info"]).output().is_ok_and(|o| {
            let info = stdout(&o);
            info.contains("type AP") && info.contains(&format!("ssid {ssid}\n"))
        }),
    };
    until("fleetd's access point", Duration::from_secs(90), ap_up);
    if backend == Backend::NetworkManager {
        let name = sh("nmcli -t -f NAME,DEVICE connection show --active")
            .lines()
            .find(|l| l.ends_with(":wlan0"))
            .map(|l| l.trim_end_matches(":wlan0").to_string())
            .unwrap();
        let hotspot = connection_settings(&name);
        // Key by key as nmcli makes it. The differences are fleetd's, by design
        // (src/net/networkmanager.rs, `hotspot_settings`); any other is a failure.
        let by_design: BTreeMap<&str, &str> = BTreeMap::from([
            // 2.4 GHz, which every phone and IoT client reaches; nmcli leaves
            // the band to the driver.
            ("802-11-wireless.band", "bg"),
            // A channel every regulatory domain opens to an access point.
            ("802-11-wireless.channel", "1"),
            // PMF disabled: Raspberry Pi (brcmfmac) clients fail to join with
            // it; nmcli leaves it at the default.
            ("802-11-wireless-security.pmf", "1"),
        ]);
        let mut differences = BTreeMap::new();
        for key in [
            "802-11-wireless.mode",
            "802-11-wireless.band",
            "802-11-wireless.channel",
            "802-11-wireless-security.key-mgmt",
            "802-11-wireless-security.proto",
            "802-11-wireless-security.pairwise",
            "802-11-wireless-security.group",
            "802-11-wireless-security.pmf",
            "ipv4.method",
            "ipv6.method",
            "connection.autoconnect",
        ] {
            let (ours, nmcli) = (
                hotspot.get(key).cloned().unwrap_or_default(),
                reference.get(key).cloned().unwrap_or_default(),
            );
            eprintln!("guest: hotspot {key}: fleetd {ours:?}, nmcli {nmcli:?}");
            if ours != nmcli {
                differences.insert(key, ours);
            }
        }
        let expected: BTreeMap<&str, String> = by_design.iter().map(|(k, v)| (*k, v.to_string())).collect();
        assert_eq!(
            differences, expected,
            "fleetd's hotspot differs from nmcli's beyond its documented differences"
        );
        assert_eq!(hotspot.get("802-11-wireless.ssid").map(String::as_str), Some(ssid));
        assert_eq!(hotspot.get("802-11-wireless-security.psk"), Some(&passphrase));
        assert!(
            !std::fs::read_to_string(&log).unwrap_or_default().contains(&passphrase),
            "the passphrase is logged"
        );
    }
    step("the phone joins with the PoP-derived passphrase and gets a lease");
    std::fs::write(
        dir.join("phone.conf"),
        format!("ctrl_interface=/run/phone-wpa\nnetwork={{\n ssid=\"{ssid}\"\n psk=\"{passphrase}\"\n key_mgmt=WPA-PSK\n}}\n"),
    )
    .unwrap();
    sh(&format!(
        "ip netns exec phone wpa_supplicant -B -i wlan1 -c {} -f {}",
        dir.join("phone.conf").display(),
        dir.join("phone-wpa.log").display()
    ));
    until("the phone to associate", Duration::from_secs(60), || {
        Command::new("sh")
            .arg("-c")
            .arg("ip netns exec phone wpa_cli -p /run/phone-wpa -i wlan1 status")
            .output()
            .map(|o| stdout(&o).contains("wpa_state=COMPLETED"))
            .unwrap_or(false)
    });
    std::fs::write(
        dir.join("udhcpc.sh"),
        "#!/bin/sh\ncase \"$1\" in bound|renew) ip addr flush dev \"$interface\"; ip addr add \"$ip/$mask\" dev \"$interface\" ;; esac\n",
    )
    .unwrap();
    sh(&format!(
        "chmod +x {0} && ip netns exec phone busybox udhcpc -i wlan1 -n -q -t 20 -s {0}",
        dir.join("udhcpc.sh").display()
    ));
    let phone_addr = sh("ip -n phone -4 -o addr show dev wlan1");
    let ap_prefix = backend.ap_ip().rsplit_once('.').unwrap().0;
    assert!(phone_addr.contains(&format!("{ap_prefix}.")), "a lease from the access point: {phone_addr}");

    let provision = |psk: &str, wait_s: &str| {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", "phone"])
            .arg(crate::common::fleetctl_bin())
            .arg("provision")
            .args([
                "--url",
                &format!("http://{}", backend.ap_ip()),
                "--pop",
                &pop,
                "--ssid",
                HOME_SSID,
                "--psk",
                psk,
            ])
            .args(["--broker", &format!("{HOME_IP}:8883"), "--broker-ca"])
            .arg(&pki.ca_pem)
            .arg("--ca-cert")
            .arg(&pki.ca_pem)
            .arg("--ca-key")
            .arg(pki.ca_key())
            .args(["--wait-s", wait_s]);
        run(&mut cmd)
    };

    step("a wrong passphrase for the home Wi-Fi: back to the access point, with the reason");
    let out = provision("not-the-home-psk", "120");
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
    eprintln!("guest: fleetctl said: {}", stderr(&out).trim());
    assert!(stderr(&out).contains("could not join"), "{}", stderr(&out));
    // The reason as each backend names a wrong passphrase: NM's device-state
    // reason, wpa_supplicant's WRONG_KEY.
    let reason = match backend {
        Backend::NetworkManager => "no-secrets",
        Backend::Hostapd => "wrong-key",
    };
    assert!(stderr(&out).contains(reason), "the reason {reason}: {}", stderr(&out));
    until("the access point back", Duration::from_secs(60), ap_up);

    step("the right one: fleetd hands over to the home Wi-Fi and reaches the broker");
    let out = provision(HOME_PSK, "30");
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    if backend == Backend::Hostapd {
        // The image's DHCP client on the station side (dhcpcd or networkd on
        // a device), started once wpa_supplicant has joined.
        until("wpa_supplicant to join the home Wi-Fi", Duration::from_secs(60), || {
            Command::new("wpa_cli")
                .args(["-p", "/run/wpa_supplicant", "-i", "wlan0", "status"])
                .output()
                .is_ok_and(|o| {
                    stdout(&o).contains("wpa_state=COMPLETED")
                        && stdout(&o).contains(&format!("\nssid={HOME_SSID}\n"))
                })
        });
        sh(&format!("busybox udhcpc -i wlan0 -n -q -t 20 -s {}", dir.join("udhcpc.sh").display()));
    }
    let connection = dev.state_dir().join("connection.json");
    until("MQTT over mutual TLS from the home network", Duration::from_secs(120), || {
        std::fs::read(&connection)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|c| c["connected"] == true)
    });
    if backend == Backend::NetworkManager {
        let station = sh("nmcli -t -f NAME,DEVICE connection show --active");
        assert!(station.lines().any(|l| l.contains(HOME_SSID) && l.ends_with(":wlan0")), "{station}");
    }
    assert!(sh("ip -4 -o addr show dev wlan0").contains("192.168.77."), "a lease from the home network");
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    for secret in [HOME_PSK, passphrase.as_str(), pop.as_str()] {
        assert!(!log_text.contains(secret), "a secret in fleetd's log");
    }
    drop(daemon);
    for child in std::iter::once(&mut broker).chain(network_manager.as_mut()) {
        let _ = child.kill();
        let _ = child.wait();
    }
    step("passed");
}
