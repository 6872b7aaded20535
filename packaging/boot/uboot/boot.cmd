# fleetd A/B boot script for U-Boot (hush shell).
#
# The counting half of fleetd's boot chooser, on RAUC's variables:
#   BOOT_ORDER       slots to try, first to last ("A B")
#   BOOT_A_LEFT      attempts left for slot A (BOOT_B_LEFT for B)
# Each boot spends one attempt of the first slot in BOOT_ORDER that has any;
# fleetd restores the attempts when the slot proves healthy (mark-good), at
# every start outside a trial (so power cuts never drain the running slot),
# and removes the slot from BOOT_ORDER when it gives up on it (mark-bad);
# fleetd never empties BOOT_ORDER.
#
# Build: mkimage -A arm -T script -C none -d boot.cmd boot.scr
# Needs: CONFIG_HUSH_PARSER, CONFIG_CMD_SETEXPR, a writable environment.
#
# tests/common/bootsim_uboot.rs mirrors this script step by step; change
# both together. The defaults below (slots A and B, 3 attempts) must match
# fleetd.toml ([slots.A], [slots.B], boot.attempts).

# --- Board specifics: adapt. Hush locals (name=value) are never saved. ---
# (scripts/test-system runs this file on real U-Boot with only the two
# board sections replaced.)
# --- fleetd: board section begin ---
slot_A_root=/dev/mmcblk0p2
slot_A_dev="mmc 0:2"
slot_B_root=/dev/mmcblk0p3
slot_B_dev="mmc 0:3"
# --- fleetd: board section end ---

# --- Missing variables take the defaults (fleetd reads them the same way). ---
test -n "${BOOT_ORDER}" || setenv BOOT_ORDER "A B"
test -n "${BOOT_A_LEFT}" || setenv BOOT_A_LEFT 3
test -n "${BOOT_B_LEFT}" || setenv BOOT_B_LEFT 3

# --- Choose: the first slot in BOOT_ORDER with attempts left spends one. ---
# setexpr works in hex; attempts stay single digits, so hex and decimal agree.
fleetd_slot=
for BOOT_SLOT in "${BOOT_ORDER}"; do
  if test -n "${fleetd_slot}"; then
    # a slot is chosen; skip the rest
  elif test "x${BOOT_SLOT}" = "xA"; then
    if test ${BOOT_A_LEFT} -gt 0; then
      setexpr BOOT_A_LEFT ${BOOT_A_LEFT} - 1
      echo "fleetd: booting slot A, ${BOOT_A_LEFT} attempts left after this one"
      fleetd_slot=A
      fleetd_root=${slot_A_root}
      fleetd_dev=${slot_A_dev}
    fi
  elif test "x${BOOT_SLOT}" = "xB"; then
    if test ${BOOT_B_LEFT} -gt 0; then
      setexpr BOOT_B_LEFT ${BOOT_B_LEFT} - 1
      echo "fleetd: booting slot B, ${BOOT_B_LEFT} attempts left after this one"
      fleetd_slot=B
      fleetd_root=${slot_B_root}
      fleetd_dev=${slot_B_dev}
    fi
  fi
done

# --- Nothing bootable: the slots in BOOT_ORDER get their attempts back. ---
# As in RAUC's example, BOOT_ORDER itself is never reset: a slot fleetd
# removed from it (half-written, or given up after a failed trial) must not
# come back. Only the slots still listed are tried again.
if test -z "${fleetd_slot}"; then
  echo "fleetd: no slot in BOOT_ORDER has attempts left; restoring their attempts and resetting"
  for BOOT_SLOT in "${BOOT_ORDER}"; do
    if test "x${BOOT_SLOT}" = "xA"; then
      setenv BOOT_A_LEFT 3
    elif test "x${BOOT_SLOT}" = "xB"; then
      setenv BOOT_B_LEFT 3
    fi
  done
  saveenv
  reset
fi

# Save the spent attempt before loading anything: a crash from here on
# counts against the slot. bootargs is set after saveenv so it is not saved.
saveenv
setenv bootargs "${bootargs} root=${fleetd_root} rootwait rauc.slot=${fleetd_slot} fleetd.slot=${fleetd_slot}"

# --- Load and boot: adapt to the board (kernel name, FIT image, fdt). ---
# --- fleetd: board section begin ---
load ${fleetd_dev} ${kernel_addr_r} /boot/Image
load ${fleetd_dev} ${fdt_addr_r} /boot/${fdtfile}
booti ${kernel_addr_r} - ${fdt_addr_r}
# --- fleetd: board section end ---

# Reached only if booting failed; the attempt stays spent.
echo "fleetd: booting slot ${fleetd_slot} failed; resetting"
reset
