//! Rollouts across a fleet of real daemons (`common::fleet`), in network
//! namespaces (root; CI runs as root):
//!
//! - waves: the first wave's devices finish before a second-wave device
//!   starts downloading, and `fleetctl rollout watch` exits 0;
//! - a bad version (its health check fails): `watch` halts it after the
//!   first wave, and no second-wave device downloads;
//! - a broker restart: the first reconnects spread over the
//!   `reconnect_spread_s`, and every device is back within a bound.
//!
//! `simulation` runs the same scenarios for `scripts/fleet-sim --devices N`
//! and prints the figures.

use crate::common::fleet::*;
use crate::common::gateway::image_bytes;
use crate::common::*;
use fleetd::status::UpdateState;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A rollout's plan: cumulative percents, the first wave `lead_s` from
/// now and each next one `gap_s` later, and each device's offset in
/// `[0, spread_s)`.
struct Plan {
    percents: Vec<u8>,
    lead_s: u64,
    gap_s: u64,
    spread_s: u64,
}

impl Plan {
    fn rollout(&self, opens: u64) -> fleetd::trust::Rollout {
        let waves = self
            .percents
            .iter()
            .enumerate()
            .map(|(i, p)| fleetd::trust::Wave { percent: *p, not_before: opens + i as u64 * self.gap_s })
            .collect();
        fleetd::trust::Rollout { waves, spread_s: self.spread_s }
    }

    /// The first jti from `prefix-0`, `prefix-1`, ... whose first wave has
    /// between `min` and `max` of `ids` (waves are by hash: with a few
    /// devices, an unlucky jti leaves a wave empty).
    fn jti(&self, prefix: &str, ids: &[String], min: usize, max: usize) -> String {
        let rollout = self.rollout(0);
        (0..10_000)
            .map(|k| format!("{prefix}-{k:04}"))
            .find(|jti| {
                let first = ids
                    .iter()
                    .filter(|id| fleetd::update::rollout::schedule(jti, id, &rollout).wave == 0)
                    .count();
                (min..=max).contains(&first)
            })
            .expect("a jti with such a first wave")
    }

    fn wave_args(&self, opens: u64) -> Vec<String> {
        self.rollout(opens).waves.iter().map(|w| format!("{}@{}", w.percent, w.not_before)).collect()
    }
}

fn epoch_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// An epoch second as an `Instant` of this process.
fn instant_of(epoch: u64) -> Instant {
    let (now, at) = (Instant::now(), epoch_now());
    if epoch as f64 >= at {
        now + Duration::from_secs_f64(epoch as f64 - at)
    } else {
        now - Duration::from_secs_f64(at - epoch as f64)
    }
}

fn wave_of(jti: &str, id: &str, rollout: &fleetd::trust::Rollout) -> usize {
    fleetd::update::rollout::schedule(jti, id, rollout).wave
}

struct WaveFigures {
    devices: usize,
    /// Image requests being answered at once, at most.
    peak_downloads: usize,
    bytes_served: u64,
}

struct GoodRun {
    jti: String,
    waves: Vec<WaveFigures>,
    all_committed_after: Duration,
    /// The last first-wave device ended before the first second-wave
    /// device started downloading (by this much).
    wave_margin: Option<Duration>,
    watch: std::process::Output,
    committed: usize,
}

struct BadRun {
    jti: String,
    first_wave: usize,
    /// Devices that downloaded any of it (began before the halt).
    tried: usize,
    tried_outside_first_wave: usize,
    /// Devices by the state their job ended in.
    ended: std::collections::BTreeMap<String, usize>,
    halted_after: Duration,
    watch: std::process::Output,
}

struct RestartRun {
    all_back_after: Duration,
    /// Between the shortest and the longest wait each device chose before
    /// its first reconnect (its log: "reconnecting in N ms").
    first_waits_spread: Duration,
    /// Between the first and the last device's first reconnect.
    first_reconnects_spread: Duration,
    peak_attempts_per_second: usize,
    attempt_seconds: usize,
}

/// Requests for `path` per wave window: how many at once at most, and bytes.
fn served_per_wave(fleet: &Fleet, path: &str, opens: &[Instant], devices: &[usize]) -> Vec<WaveFigures> {
    let log: Vec<_> = fleet.server.log().into_iter().filter(|s| s.path == path).collect();
    (0..opens.len())
        .map(|i| {
            let from = opens[i];
            let to = opens.get(i + 1).copied();
            let inside: Vec<_> =
                log.iter().filter(|s| s.at >= from && to.map_or(true, |t| s.at < t)).collect();
            // Most requests in flight at once: sweep the starts and ends.
            let mut events: Vec<(Instant, i32)> = inside.iter().map(|s| (s.at, 1)).collect();
            events.extend(inside.iter().map(|s| (s.finished.unwrap_or(s.at), -1)));
            events.sort();
            let (mut now, mut peak) = (0i32, 0i32);
            for (_, d) in events {
                now += d;
                peak = peak.max(now);
            }
            WaveFigures {
                devices: devices[i],
                peak_downloads: peak as usize,
                bytes_served: inside.iter().map(|s| s.body_bytes).sum(),
            }
        })
        .collect()
}

fn good_rollout(fleet: &Fleet, plan: &Plan, version: u64, first_wave: (usize, usize)) -> GoodRun {
    let ids = fleet.ids();
    let jti = plan.jti("good", &ids, first_wave.0, first_wave.1);
    let opens = epoch_now() as u64 + plan.lead_s;
    let image = image_bytes(256 << 10, version);
    let name = format!("v{version}");
    let message = fleet.rollout_message(&name, &jti, version, &image, &plan.wave_args(opens), plan.spread_s);
    let started = Instant::now();
    ok(fleet.rollout(&["start", "--group", GROUP]).arg(&message));
    let bound =
        plan.lead_s + plan.gap_s * plan.percents.len() as u64 + plan.spread_s + 60 + ids.len() as u64 / 5;
    let watch = fleet
        .rollout(&["watch", "--jti", &jti, "--timeout", &bound.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read as it prints, so a full pipe never holds it up.
    let watch = std::thread::spawn(move || watch.wait_with_output().unwrap());
    let jobs = fleet.wait_all_ended(&jti, Duration::from_secs(bound));
    let all_committed_after = started.elapsed();
    let watch = watch.join().unwrap();
    let rollout = plan.rollout(opens);
    let mut per_wave = vec![0usize; plan.percents.len()];
    for id in &ids {
        per_wave[wave_of(&jti, id, &rollout)] += 1;
    }
    let ended_of_wave = |w: usize| {
        jobs.iter().filter(|(id, _)| wave_of(&jti, id, &rollout) == w).filter_map(|(_, j)| j.ended_at).max()
    };
    let started_of_wave = |w: usize| {
        jobs.iter()
            .filter(|(id, _)| wave_of(&jti, id, &rollout) == w)
            .filter_map(|(_, j)| j.downloading_at)
            .min()
    };
    let wave_margin = match (ended_of_wave(0), started_of_wave(1)) {
        (Some(end), Some(start)) => start.checked_duration_since(end),
        _ => None,
    };
    let wave_opens: Vec<Instant> = rollout.waves.iter().map(|w| instant_of(w.not_before)).collect();
    GoodRun {
        waves: served_per_wave(fleet, &format!("/{name}.img"), &wave_opens, &per_wave),
        committed: jobs.values().filter(|j| j.state == Some(UpdateState::Committed)).count(),
        jti,
        all_committed_after,
        wave_margin,
        watch,
    }
}

fn bad_rollout(fleet: &Fleet, plan: &Plan, version: u64, first_wave: (usize, usize)) -> BadRun {
    let ids = fleet.ids();
    let jti = plan.jti("bad", &ids, first_wave.0, first_wave.1);
    let opens = epoch_now() as u64 + plan.lead_s;
    let mut image = image_bytes(256 << 10, version);
    image[..BAD_MARKER.len()].copy_from_slice(BAD_MARKER);
    let name = format!("v{version}-bad");
    let message = fleet.rollout_message(&name, &jti, version, &image, &plan.wave_args(opens), plan.spread_s);
    let started = Instant::now();
    ok(fleet.rollout(&["start", "--group", GROUP]).arg(&message));
    let bound = plan.lead_s + plan.gap_s * plan.percents.len() as u64 + plan.spread_s + 60;
    let watch = fleet
        .rollout(&["watch", "--jti", &jti, "--max-failures", "10", "--min-devices", "1"])
        .args(["--timeout", &bound.to_string()])
        .output()
        .unwrap();
    let halted_after = started.elapsed();
    let jobs = fleet.wait_all_ended(&jti, Duration::from_secs(60 + ids.len() as u64 / 10));
    let rollout = plan.rollout(opens);
    let in_first = |id: &str| wave_of(&jti, id, &rollout) == 0;
    let tried: Vec<&String> =
        jobs.iter().filter(|(_, j)| j.downloading_at.is_some()).map(|(id, _)| id).collect();
    BadRun {
        first_wave: ids.iter().filter(|id| in_first(id)).count(),
        tried: tried.len(),
        tried_outside_first_wave: tried.iter().filter(|id| !in_first(id)).count(),
        ended: jobs.values().fold(Default::default(), |mut by, j| {
            *by.entry(j.state.map_or("none".to_string(), |s| s.to_string())).or_default() += 1;
            by
        }),
        halted_after,
        jti,
        watch,
    }
}

fn broker_restart(fleet: &mut Fleet, all_back_within: Duration) -> RestartRun {
    let logged_before: Vec<(String, usize)> = fleet
        .ids()
        .into_iter()
        .map(|id| {
            let len = fleet.device_log(&id).len();
            (id, len)
        })
        .collect();
    let since = Instant::now();
    let since_epoch = epoch_now() as u64;
    fleet.broker.restart_cleanly();
    fleet.wait_all_connected(all_back_within);
    let all_back_after = since.elapsed();
    let firsts: Vec<Instant> =
        fleet.connects_since(since).values().filter_map(|c| c.first().copied()).collect();
    let first_reconnects_spread = match (firsts.iter().min(), firsts.iter().max()) {
        (Some(a), Some(b)) => *b - *a,
        _ => Duration::ZERO,
    };
    let attempts = fleet.connection_attempts_per_second(since_epoch);
    let first_waits: Vec<u64> = logged_before
        .iter()
        .filter_map(|(id, len)| {
            let log = fleet.device_log(id);
            let after = log.get(*len..)?;
            let at = after.find("reconnecting in ")? + "reconnecting in ".len();
            after[at..].split(' ').next()?.parse().ok()
        })
        .collect();
    assert_eq!(
        first_waits.len(),
        logged_before.len(),
        "every device logged the wait before its first reconnect"
    );
    let first_waits_spread = Duration::from_millis(
        first_waits.iter().max().unwrap_or(&0) - first_waits.iter().min().unwrap_or(&0),
    );
    RestartRun {
        all_back_after,
        first_waits_spread,
        first_reconnects_spread,
        peak_attempts_per_second: attempts.values().copied().max().unwrap_or(0),
        attempt_seconds: attempts.len(),
    }
}

fn stdout_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn twenty_devices_waves_a_halt_and_a_broker_restart() {
    if !can_run_netns() {
        return;
    }
    const SPREAD: u64 = 15;
    let mut fleet =
        Fleet::start(FleetOptions { devices: 20, reconnect_spread_s: SPREAD, image_rate: Some(512 << 10) });

    // Waves of 10 % and 100 %: the first wave ends before the second starts.
    let plan = Plan { percents: vec![10, 100], lead_s: 5, gap_s: 30, spread_s: 3 };
    let good = good_rollout(&fleet, &plan, 2, (1, 4));
    assert_eq!(good.committed, 20, "every device committed v2");
    assert!(
        good.wave_margin.is_some(),
        "a second-wave device started downloading before the first wave ended ({})",
        good.jti
    );
    assert!(good.watch.status.success(), "watch: {}", stdout_of(&good.watch));
    assert!(stdout_of(&good.watch).contains("every targeted device ended"), "{}", stdout_of(&good.watch));

    // A bad version: the first wave rolls back, watch halts, no second-wave device downloads.
    let bad = bad_rollout(&fleet, &plan, 3, (1, 4));
    assert_eq!(bad.watch.status.code(), Some(1), "watch: {}", stdout_of(&bad.watch));
    assert!(stdout_of(&bad.watch).contains("halted"), "{}", stdout_of(&bad.watch));
    assert_eq!(
        bad.tried_outside_first_wave, 0,
        "second-wave devices downloaded the bad version ({})",
        bad.jti
    );
    assert!(
        bad.tried >= 1 && bad.tried <= bad.first_wave,
        "{} tried, first wave {}",
        bad.tried,
        bad.first_wave
    );
    assert_eq!(
        bad.ended.get("halted").copied().unwrap_or(0) + bad.ended.get("rolled-back").copied().unwrap_or(0),
        20,
        "every device rolled back or was halted: {:?}",
        bad.ended
    );
    assert!(bad.ended.get("rolled-back").is_some_and(|&n| n >= 1 && n <= bad.tried), "{:?}", bad.ended);
    // A watch started again finds the halt in its database and says so at once.
    let again = fleet.rollout(&["watch", "--jti", &bad.jti, "--timeout", "5"]).output().unwrap();
    assert_eq!(again.status.code(), Some(1), "{}", stdout_of(&again));
    assert!(stdout_of(&again).contains("halted before"), "{}", stdout_of(&again));
    // Halting again publishes the halt it has.
    let out = fleet.rollout(&["halt", "--jti", &bad.jti]).output().unwrap();
    assert!(out.status.success() && stdout_of(&out).contains("failed or rolled back"), "{}", stdout_of(&out));
    for id in fleet.ids() {
        let state =
            std::fs::read(fleet.dir.path().join("devices").join(&id).join("state/state.json")).unwrap();
        let state: fleetd::update::State = serde_json::from_slice(&state).unwrap();
        assert_eq!(state.installed_version, 2, "{id} runs v2\n{}", fleet.device_log(&id));
    }

    // A broker restart: the first reconnects spread over at least 10 s
    // (the waits the devices chose: when they came back also depends on
    // when the broker was ready), and all are back within 60 s.
    let restart = broker_restart(&mut fleet, Duration::from_secs(60));
    assert!(
        restart.first_waits_spread >= Duration::from_secs(10),
        "first reconnects within {:?} (reconnect_spread_s = {SPREAD})",
        restart.first_waits_spread
    );
    eprintln!(
        "20 devices: good rollout {:?}, bad halted after {:?} ({} of {} first-wave devices tried), \
         restart: all back after {:?}, first waits over {:?}, first reconnects over {:?}, peak {} attempts/s",
        good.all_committed_after,
        bad.halted_after,
        bad.tried,
        bad.first_wave,
        restart.all_back_after,
        restart.first_waits_spread,
        restart.first_reconnects_spread,
        restart.peak_attempts_per_second
    );
}

/// `scripts/fleet-sim --devices N`: the three scenarios at scale, their
/// figures printed as a table (and written to `FLEET_SIM_REPORT` when set).
#[test]
#[ignore = "run by scripts/fleet-sim"]
fn simulation() {
    if !can_run_netns() {
        eprintln!("fleet-sim: SKIP (needs root for network namespaces)");
        return;
    }
    let n: usize = std::env::var("FLEET_SIM_DEVICES").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let spread = 30;
    let began = Instant::now();
    let mut fleet =
        Fleet::start(FleetOptions { devices: n, reconnect_spread_s: spread, image_rate: Some(512 << 10) });
    let ready_after = began.elapsed();
    let rss = fleet.daemons_rss();
    // Each wave's devices start within a spread that grows with the fleet,
    // so reboots (a daemon restarted each) come at a pace two cores keep.
    let wave_spread = (n as u64 / 20).max(5);
    let first = ((n * 5).div_ceil(100)).max(1);
    let good_plan =
        Plan { percents: vec![5, 30, 100], lead_s: 5, gap_s: wave_spread + 30, spread_s: wave_spread };
    let good = good_rollout(&fleet, &good_plan, 2, (first.saturating_sub(first / 2).max(1), first * 2));
    let bad_plan = Plan { percents: vec![5, 100], lead_s: 5, gap_s: 60, spread_s: 10 };
    let bad = bad_rollout(&fleet, &bad_plan, 3, (first.saturating_sub(first / 2).max(1), first * 2));
    let restart = broker_restart(&mut fleet, Duration::from_secs(spread + 120));

    let mut table = String::new();
    let mut line = |l: String| {
        table.push_str(&l);
        table.push('\n');
    };
    line(format!("fleet-sim: {n} devices, ready (all connected) after {:.1} s", ready_after.as_secs_f64()));
    line(format!(
        "good rollout (5/30/100 %, waves {} s apart, spread {} s): {} of {n} committed, all after {:.1} s; watch exit {:?}",
        good_plan.gap_s,
        good_plan.spread_s,
        good.committed,
        good.all_committed_after.as_secs_f64(),
        good.watch.status.code()
    ));
    for (i, w) in good.waves.iter().enumerate() {
        line(format!(
            "  wave {}: {:>5} devices, peak concurrent downloads {:>4}, served {:>8.1} MiB",
            i + 1,
            w.devices,
            w.peak_downloads,
            w.bytes_served as f64 / (1 << 20) as f64
        ));
    }
    line(format!(
        "bad rollout (5/100 %): watch halted after {:.1} s (exit {:?}); {} devices tried it, first wave {} ({} outside it); ended: {:?}",
        bad.halted_after.as_secs_f64(),
        bad.watch.status.code(),
        bad.tried,
        bad.first_wave,
        bad.tried_outside_first_wave,
        bad.ended
    ));
    line(format!(
        "broker restart (reconnect_spread_s {spread}): all back after {:.1} s; first waits over {:.1} s, \
         first reconnects over {:.1} s; connection attempts per second: peak {} ({:.1} % of the fleet), over {} seconds",
        restart.all_back_after.as_secs_f64(),
        restart.first_waits_spread.as_secs_f64(),
        restart.first_reconnects_spread.as_secs_f64(),
        restart.peak_attempts_per_second,
        restart.peak_attempts_per_second as f64 * 100.0 / n as f64,
        restart.attempt_seconds
    ));
    line(format!(
        "daemons' RSS, summed: {:.1} MiB ({:.1} MiB each)",
        rss as f64 / (1 << 20) as f64,
        rss as f64 / n as f64 / (1 << 20) as f64
    ));
    line(format!("whole run: {:.1} s", began.elapsed().as_secs_f64()));
    print!("{table}");
    if let Some(path) = std::env::var("FLEET_SIM_REPORT").ok().filter(|p| !p.is_empty()) {
        std::fs::write(path, &table).unwrap();
    }
    let watched = stdout_of(&good.watch);
    println!("watch's last table (good rollout):\n{}", last_table(&watched));
    println!("watch (bad rollout):\n{}", stdout_of(&bad.watch));
    assert_eq!(good.committed, n, "all committed in the good rollout");
    assert!(good.watch.status.success(), "{watched}");
    assert_eq!(bad.watch.status.code(), Some(1), "{}", stdout_of(&bad.watch));
    assert_eq!(bad.tried_outside_first_wave, 0, "only the first wave tried the bad version");
    assert!(
        restart.peak_attempts_per_second * 10 <= n.max(10),
        "{} connection attempts in one second",
        restart.peak_attempts_per_second
    );
}

/// The last table `watch` printed.
fn last_table(out: &str) -> String {
    let lines: Vec<&str> = out.lines().collect();
    let start = lines.iter().rposition(|l| l.starts_with("wave ")).unwrap_or(0);
    lines[start..].join("\n")
}
