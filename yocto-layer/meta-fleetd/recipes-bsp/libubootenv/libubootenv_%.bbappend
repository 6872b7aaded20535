# fleetd writes U-Boot's environment itself, through fw_env.config as
# fw_printenv does: ship one that matches the board. This example is the
# Raspberry Pi layout (ENV_IS_IN_FAT: uboot.env on the boot partition),
# for meta-raspberrypi's machines (the `rpi` override); copy it with your
# MACHINE's override for another board.
FILESEXTRAPATHS:prepend:rpi := "${THISDIR}/files:"
UNPACKDIR:rpi ??= "${WORKDIR}"
SRC_URI:append:rpi = " file://fw_env.config"

do_install:append:rpi() {
    install -d ${D}${sysconfdir}
    install -m 0644 ${UNPACKDIR}/fw_env.config ${D}${sysconfdir}/fw_env.config
}

FILES:${PN}:append:rpi = " ${sysconfdir}/fw_env.config"
CONFFILES:${PN}:append:rpi = " ${sysconfdir}/fw_env.config"
