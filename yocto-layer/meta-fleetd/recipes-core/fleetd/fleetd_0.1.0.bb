SUMMARY = "Provisioning, co-signed A/B updates and rollback for Linux gateways"
DESCRIPTION = "fleetd raises a provisioning access point on a new device, \
               connects it to an MQTT broker with mutual TLS, and installs co-signed \
               updates into the inactive A/B slot, committing or rolling back after a \
               trial boot."
HOMEPAGE = "https://github.com/fleetd/fleetd"
BUGTRACKER = "https://github.com/fleetd/fleetd/issues"
SECTION = "admin"
LICENSE = "Apache-2.0"
CVE_PRODUCT = "fleetd"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

# Point FLEETD_GIT_URI and SRCREV at your fleetd checkout (a release tag's
# commit) in a bbappend or local.conf.
FLEETD_GIT_URI ??= "git://github.com/fleetd/fleetd.git;protocol=https;branch=main"
SRC_URI = "${FLEETD_GIT_URI} \
           file://fleetd.toml \
"
SRCREV ??= "0000000000000000000000000000000000000000"
S = "${WORKDIR}/git"
# styhead and later set UNPACKDIR; scarthgap unpacks into WORKDIR.
UNPACKDIR ??= "${WORKDIR}"

inherit cargo cargo-update-recipe-crates systemd useradd

require ${BPN}-crates.inc

# The device build: the fleetd package alone. The fleet side (co-signer,
# publish/watch, fleetctl, the demo) is another crate of the workspace.
CARGO_BUILD_FLAGS:append = " -p fleetd --bin fleetd"

# The provisioning backends: NetworkManager (default) or hostapd with
# wpa_supplicant and a DHCP server. Both are chosen at run time by
# provision.backend; these only pull the daemons in.
PACKAGECONFIG ??= "networkmanager"
PACKAGECONFIG[networkmanager] = ",,,networkmanager"
PACKAGECONFIG[hostapd] = ",,,hostapd wpa-supplicant dnsmasq"

SYSTEMD_SERVICE:${PN} = "fleetd.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

# The group the D-Bus policy lets read fleetd's state and call its API.
FLEETD_DBUS_GROUP ??= "fleetd"
USERADD_PACKAGES = "${PN}"
GROUPADD_PARAM:${PN} = "--system ${FLEETD_DBUS_GROUP}"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/systemd/fleetd.service ${D}${systemd_system_unitdir}/
    install -d -m 0755 ${D}${sysconfdir}/fleetd
    install -m 0644 ${UNPACKDIR}/fleetd.toml ${D}${sysconfdir}/fleetd/fleetd.toml
    install -d ${D}${datadir}/dbus-1/system.d
    sed 's/group="fleetd"/group="${FLEETD_DBUS_GROUP}"/' ${S}/packaging/dbus/org.fleetd.Daemon1.conf \
        > ${D}${datadir}/dbus-1/system.d/org.fleetd.Daemon1.conf
    chmod 0644 ${D}${datadir}/dbus-1/system.d/org.fleetd.Daemon1.conf
    install -d ${D}${nonarch_libdir}/tmpfiles.d
    install -m 0644 ${S}/packaging/tmpfiles.d/fleetd.conf ${D}${nonarch_libdir}/tmpfiles.d/
    install -d -m 0755 ${D}${datadir}/fleetd/boot
    install -m 0644 ${S}/packaging/boot/uboot/boot.cmd ${D}${datadir}/fleetd/boot/
    install -m 0644 ${S}/packaging/boot/grub/grub.cfg ${D}${datadir}/fleetd/boot/
    if ${@bb.utils.contains('PACKAGECONFIG', 'networkmanager', 'true', 'false', d)}; then
        install -d ${D}${sysconfdir}/NetworkManager/dnsmasq-shared.d
        install -m 0644 ${S}/packaging/networkmanager/dnsmasq-shared.d/fleetd-captive.conf \
            ${D}${sysconfdir}/NetworkManager/dnsmasq-shared.d/
    fi
    if ${@bb.utils.contains('PACKAGECONFIG', 'hostapd', 'true', 'false', d)}; then
        install -d ${D}${datadir}/fleetd/hostapd
        install -m 0644 ${S}/packaging/hostapd/hostapd.conf ${S}/packaging/hostapd/dnsmasq.conf \
            ${D}${datadir}/fleetd/hostapd/
    fi
}

FILES:${PN} += "${systemd_system_unitdir}/fleetd.service \
                ${sysconfdir}/fleetd \
                ${datadir}/dbus-1/system.d \
                ${nonarch_libdir}/tmpfiles.d \
                ${sysconfdir}/NetworkManager/dnsmasq-shared.d \
"
CONFFILES:${PN} = "${sysconfdir}/fleetd/fleetd.toml"

# fleetd writes U-Boot's environment itself, through /etc/fw_env.config,
# which libubootenv (and this layer's bbappend) provides.
RRECOMMENDS:${PN} += "libubootenv"
