#!/bin/bash
# The systemd tier, guest side: run by fleetd-tier.service (see
# scripts/system/build-systemd-guest) from the FLEETD-TIER disk that
# tests/it/system_unit.rs writes, with `tier.env` beside it. Every line for
# the host starts with FLEETD-TIER; the last one is `RESULT pass|fail`.
#   fleetd.tier=1: install the package, adapt the config, start the unit;
#     the bus policy, the exposure, a stop and a watchdog kill during a
#     download; then fleetd finishes the install and reboots the guest.
#   fleetd.tier=2 (booted from slot B): the trial is committed, and the
#     journal lists the job's steps over both boots.
set -u
tier=/run/tier
SLOT_A=/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_fleetd-slot-a
SLOT_B=/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_fleetd-slot-b
# shellcheck source=/dev/null
. "$tier/tier.env"
phase=$(sed -n 's/.*fleetd\.tier=\([0-9]\).*/\1/p' /proc/cmdline)
started=$(date +%s)

say() { echo "FLEETD-TIER $*"; }
ok() { say "ok $* (at $(($(date +%s) - started)) s)"; }
diagnose() {
  systemctl status --no-pager -l fleetd 2>&1 | head -n 20
  journalctl -b -u fleetd --no-pager -n 60 -o short-monotonic 2>&1
  fleetd status 2>&1
}
fail() {
  say "FAIL $*"
  diagnose | sed 's/^/  /'
  say "RESULT fail"
  systemctl --no-block poweroff
  exit 1
}
# wait_for SECONDS CMD...: until CMD succeeds, at most SECONDS.
wait_for() {
  local end=$(($(date +%s) + $1))
  shift
  until "$@"; do
    [ "$(date +%s)" -lt "$end" ] || return 1
    sleep 0.5
  done
}
unit() { systemctl show -p "$1" --value fleetd; }
# fleetd status --json; a crash is reported, never passed over (its
# output is read whole: SIGPIPE, 141, is not a crash).
status_json() {
  local rc
  timeout 20 fleetd status --json 2> /root/status.err
  rc=$?
  [ $rc -lt 128 ] || [ $rc -eq 141 ] || say "CRASH fleetd status --json exited $rc: $(cat /root/status.err)"
  return $rc
}
field() { sed -n "s/^ *\"$1\": \"\\{0,1\\}\\([^\",]*\\)\"\\{0,1\\},\\{0,1\\}$/\\1/p" | head -n 1; }
job_step() { status_json | field step; }
job_fetched() { status_json | field bytes_fetched; }
job_committed() { [ "$(job_step)" = committed ]; }
# The job is downloading, past $1 bytes; an install that ended fails at once.
downloading_past() {
  local step
  step=$(job_step)
  case "$step" in
    failed | halted | rolled-back) fail "the install ended $step: $(status_json | field last_error)" ;;
  esac
  [ "$step" = downloading ] && [ "${1:-0}" -lt "$(job_fetched || echo 0)" ]
}
# A write to the wrong slot starts at its first byte; the host compares
# all of slot A after each boot.
running_slot_untouched() {
  [ "$(head -c 16M "$SLOT_A" | sha256sum | cut -d' ' -f1)" = "$SLOT_A_HEAD_SHA256" ]
}

phase1() {
  # The hardware: slots are virtio-scsi disks (block-sd, as the unit's
  # DeviceAllow= names them). The kernel names them sda and sdb in either
  # order, so the config names them by the serials the host gave them.
  for slot in "$SLOT_A" "$SLOT_B"; do
    [ -b "$slot" ] || fail "no $slot: $(ls -l /dev/disk/by-id/)"
  done
  mountpoint -q /boot/firmware || fail "the boot partition is not mounted at /boot/firmware"

  # The package, as users install it (its Recommends are in the image).
  cp "$tier"/fleetd_*.deb /root/ && cd /root || fail "cannot copy the package"
  local deb
  deb=$(ls fleetd_*.deb)
  timeout 300 apt-get install -y -q "./$deb" > /root/apt.log 2>&1 || fail "apt-get install ./$deb: $(tail -n 5 /root/apt.log)"
  [ "$(systemctl is-enabled fleetd)" = enabled ] || fail "the package did not enable fleetd.service"
  ok "apt-get install ./$deb"

  # The board's files, as an image build writes them: the fleet's keys,
  # the Pi's fw_env.config, the identity provisioning would have stored.
  install -d -m 0755 /etc/fleetd/keys
  install -m 0644 "$tier/fleet.pub.pem" "$tier/cosigner.pub.pem" /etc/fleetd/keys/
  install -m 0644 "$tier/fw_env.config" /etc/fw_env.config
  install -m 0644 "$tier/mqtt-ca.pem" /etc/fleetd/mqtt-ca.pem
  install -d -m 0700 /var/lib/fleetd/identity
  install -m 0644 "$tier/cert.pem" /var/lib/fleetd/identity/cert.pem
  install -m 0600 "$tier/key.pem" /var/lib/fleetd/identity/key.pem
  echo "$BROKER_ADDRESS $BROKER_HOST" >> /etc/hosts
  # The shipped config, adapted where this machine differs from a Pi: the
  # slot devices; provisioned by hand ([mqtt] instead of [provision]: no
  # Wi-Fi here); the test's image server speaks plain HTTP.
  cp /etc/fleetd/fleetd.toml /root/fleetd.toml.shipped
  sed -e "s|\"/dev/mmcblk0p2\"|\"$SLOT_A\"|; s|\"/dev/mmcblk0p3\"|\"$SLOT_B\"|" \
    -e 's|^allow_http = false|allow_http = true|' \
    -e '/^\[provision\]/,/^\[/{/^\[provision\]/d;/^\[/!d}' \
    /root/fleetd.toml.shipped > /etc/fleetd/fleetd.toml
  printf '\n[mqtt]\nhost = "%s"\nport = %s\nca_file = "/etc/fleetd/mqtt-ca.pem"\n' \
    "$BROKER_HOST" "$BROKER_PORT" >> /etc/fleetd/fleetd.toml
  say "the config, against the shipped one:"
  diff -u /root/fleetd.toml.shipped /etc/fleetd/fleetd.toml | sed -n '3,$s/^/  /p'

  # Type=notify: `systemctl start` returns once READY=1 came.
  systemctl start fleetd || fail "systemctl start fleetd"
  [ "$(unit ActiveState)/$(unit SubState)" = active/running ] || fail "not active (running)"
  wait_for 60 sh -c 'systemctl show -p StatusText --value fleetd | grep -q "^connected"' ||
    fail "StatusText never said connected: '$(unit StatusText)'"
  ok "active (running) after READY=1; StatusText=$(unit StatusText)"

  local fragment live offline
  fragment=$(unit FragmentPath)
  live=$(systemd-analyze security --no-pager fleetd | sed -n 's/.*Overall exposure level for fleetd.service: \([0-9.]*\).*/\1/p')
  offline=$(systemd-analyze security --no-pager --offline=true "$fragment" | sed -n 's/.*Overall exposure level for fleetd.service: \([0-9.]*\).*/\1/p')
  [ -n "$live" ] && [ "$live" = "$offline" ] || fail "exposure: running $live, offline $offline"
  ok "systemd-analyze security fleetd: $live, as offline"

  # The bus policy (packaging/dbus): root and group fleetd are answered.
  useradd -m -G fleetd alice && useradd -m mallory || fail "useradd"
  [[ $(status_json) == *'"source": "daemon"'* ]] || fail "fleetd status as root did not come from the daemon"
  [[ $(runuser -u alice -- fleetd status --json 2>/dev/null) == *'"source": "daemon"'* ]] ||
    fail "fleetd status as a member of group fleetd: $(runuser -u alice -- fleetd status 2>&1 | head -n 3)"
  local refused
  if refused=$(runuser -u mallory -- fleetd status 2>&1); then
    fail "fleetd status as a user outside group fleetd succeeded: $refused"
  fi
  echo "$refused" | grep -q "access-denied" || fail "the outsider was not refused by the bus: $refused"
  ok "fleetd status over the system bus: root and group fleetd answered, an outsider refused ($(echo "$refused" | head -n 1 | cut -c1-100))"

  # An install through the daemon (D-Bus), stopped during its download.
  fleetd install "$tier/update.json" > /root/install-1.log 2>&1 &
  local client=$!
  wait_for 60 downloading_past 0 || fail "the install never started downloading: $(cat /root/install-1.log)"
  local fetched t0 took timeout_us
  t0=$(date +%s%N)
  systemctl stop fleetd
  took=$((($(date +%s%N) - t0) / 1000000))
  timeout_us=$(unit TimeoutStopUSec)
  [ "$(unit Result)" = success ] && [ "$(unit ExecMainCode)" = 1 ] && [ "$(unit ExecMainStatus)" = 0 ] ||
    fail "systemctl stop: Result=$(unit Result) code=$(unit ExecMainCode) status=$(unit ExecMainStatus)"
  wait_for 30 sh -c "! kill -0 $client 2>/dev/null" || fail "fleetd install hung after the daemon stopped"
  wait "$client" && fail "fleetd install succeeded although the daemon stopped: $(cat /root/install-1.log)"
  fetched=$(job_fetched)
  [ "$(job_step)" = downloading ] || fail "after the stop the job is '$(job_step)', not downloading"
  running_slot_untouched || fail "the running slot A was written"
  ok "systemctl stop during the download: exited 0 in $took ms (TimeoutStopSec=$timeout_us); the install said: $(tail -n 1 /root/install-1.log)"

  # Started again, the daemon resumes the job; wedged (SIGSTOP: the
  # package's release build has no test hooks), the watchdog kills it and
  # Restart=on-failure starts it again, which resumes the job once more.
  # It is wedged past its first checkpoint, so the restart after the
  # watchdog resumes with a ranged request (the host checks).
  systemctl start fleetd || fail "systemctl start fleetd (after the stop)"
  wait_for 60 downloading_past "$fetched" || fail "the job did not resume after the restart"
  wait_for 120 downloading_past "$WEDGE_AFTER_BYTES" || fail "the download never passed its first checkpoint"
  local pid restarts wedged
  pid=$(unit MainPID)
  restarts=$(unit NRestarts)
  wedged=$(date +%s)
  kill -STOP "$pid"
  wait_for 180 sh -c "[ \$(systemctl show -p NRestarts --value fleetd) -gt $restarts ] &&
    [ \$(systemctl show -p MainPID --value fleetd) != $pid ] && systemctl is-active -q fleetd" ||
    fail "the watchdog did not restart the wedged daemon"
  journalctl -b -u fleetd -o cat | grep -q "Watchdog timeout" || fail "no watchdog timeout in the journal"
  running_slot_untouched || fail "the running slot A was written"
  ok "wedged daemon killed by the watchdog and restarted after $(($(date +%s) - wedged)) s ($(journalctl -b -u fleetd -o cat | grep -m1 "Watchdog timeout"))"

  # The resumed job finishes: slot B written, the boot environment
  # switched, and `systemctl reboot` from the unit ends this boot. The host
  # checks the slots and the environment.
  local step end=$(($(date +%s) + INSTALL_BOUND_S))
  while :; do
    step=$(job_step)
    case "$step" in
      failed | halted | rolled-back) fail "the resumed install ended $step: $(status_json | field last_error)" ;;
    esac
    [ "$(date +%s)" -lt "$end" ] || fail "the install did not end within $INSTALL_BOUND_S s (step $step)"
    sleep 1
  done
}

phase2() {
  wait_for 120 job_committed ||
    fail "the trial of slot B was not committed"
  local doc
  doc=$(status_json)
  [ "$(echo "$doc" | field booted_slot)" = B ] && [ "$(echo "$doc" | field installed_version)" = "$VERSION" ] ||
    fail "booted $(echo "$doc" | field booted_slot), version $(echo "$doc" | field installed_version)"
  ok "booted slot B, version $VERSION committed; StatusText=$(unit StatusText)"

  local steps boots
  steps=$(journalctl -u fleetd "FLEETD_JOB=$JTI" -o cat --no-pager)
  boots=$(journalctl -u fleetd "FLEETD_JOB=$JTI" -o export --no-pager | grep -c '^_BOOT_ID=' || true)
  echo "$steps" | sed 's/^/  /'
  for want in "downloading: accepted" "downloading: resuming" installing reboot-pending testing committed; do
    echo "$steps" | grep -q "^$want" || fail "journalctl FLEETD_JOB=$JTI lists no '$want' step"
  done
  [ "$(journalctl -u fleetd "FLEETD_JOB=$JTI" -o export | sed -n 's/^_BOOT_ID=//p' | sort -u | wc -l)" -eq 2 ] ||
    fail "the job's steps are not from both boots"
  ok "journalctl -u fleetd FLEETD_JOB=$JTI: $(echo "$steps" | wc -l) steps over 2 boots ($boots entries)"
  say "boot 1's stops and restarts, from the journal:"
  journalctl -b -1 -u fleetd -o cat --no-pager | grep -E "Watchdog|Stopp|Started|Failed|resum|Scheduled restart" | sed 's/^/  /'
  # The unit is ordered after dbus.service: the bus outlived fleetd at the
  # reboot, so fleetd never saw it go.
  ! journalctl -b -1 -u fleetd -o cat --no-pager | grep -q "NameLost" ||
    fail "the system bus went away before fleetd stopped at the reboot"


  local env
  env=$(fw_printenv)
  echo "$env" | grep -qx 'BOOT_ORDER=B A' && echo "$env" | grep -qx "BOOT_B_LEFT=3" ||
    fail "fw_printenv after the commit: $env"
  ok "fw_printenv: $(echo "$env" | tr '\n' ' ')"
  [ "$(unit NRestarts)" = 0 ] && systemctl is-active -q fleetd || fail "fleetd restarted in the second boot"
}

say "phase $phase: started $(cut -d' ' -f1 /proc/uptime) s after boot"
case "$phase" in
  1) phase1 ;;
  2) phase2 ;;
  *) fail "no fleetd.tier= on the kernel command line" ;;
esac
say "RESULT pass"
systemctl --no-block poweroff
