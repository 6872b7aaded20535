//! Where a device stands in a rollout (`rollout` in `update-message-v1.md`):
//! its bucket, its wave and the moment it may start. Pure and stable: the
//! same (jti, device id) gives the same answer on every boot, so a restart
//! while scheduled keeps the time, and no coordinator is needed.

use crate::trust::Rollout;

/// Buckets are basis points: 0..10,000.
pub const BUCKETS: u32 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// 0..10,000, from SHA-256(jti ‖ 0 ‖ device id).
    pub bucket: u32,
    /// Index of the device's wave.
    pub wave: usize,
    /// Stable, in `[0, spread_s)`.
    pub offset_s: u64,
    /// The wave's `not_before` plus the offset.
    pub start_at: u64,
}

impl Schedule {
    /// When the job may start, given the time now: the scheduled moment, or
    /// now for a device that came online after it.
    pub fn due(&self, now: u64) -> bool {
        now >= self.start_at
    }
}

/// Two independent numbers from SHA-256(jti ‖ 0 ‖ device id): the bucket
/// from its first 8 bytes, the offset from the next 8.
fn digest(jti: &str, device_id: &str) -> (u64, u64) {
    crate::backoff::stable_draws(jti, device_id)
}

/// The device's place in `rollout` (already checked: waves ending at 100 %).
pub fn schedule(jti: &str, device_id: &str, rollout: &Rollout) -> Schedule {
    let (a, b) = digest(jti, device_id);
    let bucket = (a % u64::from(BUCKETS)) as u32;
    let wave = rollout
        .waves
        .iter()
        .position(|w| bucket < u32::from(w.percent) * (BUCKETS / 100))
        .unwrap_or(rollout.waves.len().saturating_sub(1));
    let offset_s = if rollout.spread_s == 0 { 0 } else { b % rollout.spread_s };
    let not_before = rollout.waves.get(wave).map_or(0, |w| w.not_before);
    Schedule { bucket, wave, offset_s, start_at: not_before.saturating_add(offset_s) }
}

/// A stable delay in `[0, spread_s)` for a group message without a
/// `rollout`, so a whole group does not start downloading in one second.
pub fn spread_offset(jti: &str, device_id: &str, spread_s: u64) -> u64 {
    if spread_s == 0 {
        0
    } else {
        digest(jti, device_id).1 % spread_s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::Wave;

    fn rollout(waves: &[(u8, u64)], spread_s: u64) -> Rollout {
        Rollout {
            waves: waves.iter().map(|&(percent, not_before)| Wave { percent, not_before }).collect(),
            spread_s,
        }
    }

    #[test]
    fn membership_is_stable_and_close_to_the_percentages_over_10000_ids() {
        let r = rollout(&[(1, 1000), (5, 2000), (25, 3000), (100, 4000)], 600);
        let mut counts = [0usize; 4];
        for i in 0..10_000 {
            let id = format!("gw-{i:05}");
            let s = schedule("jti-rollout-01", &id, &r);
            assert_eq!(s, schedule("jti-rollout-01", &id, &r), "stable for {id}");
            assert!(s.offset_s < 600);
            assert_eq!(s.start_at, r.waves[s.wave].not_before + s.offset_s);
            counts[s.wave] += 1;
        }
        // Expected 100, 400, 2,000 and 7,500 of 10,000; binomial σ ≤ 44.
        for (got, want) in counts.iter().zip([100usize, 400, 2000, 7500]) {
            let tolerance = 4.0 * ((want as f64) * (1.0 - want as f64 / 10_000.0)).sqrt() + 1.0;
            assert!((*got as f64 - want as f64).abs() <= tolerance, "{counts:?}");
        }
        // Another rollout draws other buckets: the same devices do not always go first.
        let first: Vec<bool> =
            (0..10_000).map(|i| schedule("jti-rollout-02", &format!("gw-{i:05}"), &r).wave == 0).collect();
        let again: Vec<bool> =
            (0..10_000).map(|i| schedule("jti-rollout-01", &format!("gw-{i:05}"), &r).wave == 0).collect();
        let both = first.iter().zip(&again).filter(|(a, b)| **a && **b).count();
        assert!(both < 10, "the first wave repeats across rollouts: {both}");
    }

    #[test]
    fn a_late_device_starts_at_once_and_an_early_one_waits() {
        let r = rollout(&[(100, 5000)], 0);
        let s = schedule("jti-late-0001", "gw-1", &r);
        assert_eq!(s.start_at, 5000);
        // (now, due)
        for (now, due) in [(0, false), (4999, false), (5000, true), (90_000, true)] {
            assert_eq!(s.due(now), due, "at {now}");
        }
        assert_eq!(spread_offset("j", "d", 0), 0);
        assert!(spread_offset("jti-x", "gw-1", 30) < 30);
        assert_eq!(spread_offset("jti-x", "gw-1", 30), spread_offset("jti-x", "gw-1", 30));
    }

    #[test]
    fn rollout_rules_by_table() {
        // (waves, spread, accepted)
        type Case = (Vec<(u8, u64)>, u64, bool);
        let cases: Vec<Case> = vec![
            (vec![(10, 1), (100, 2)], 60, true),
            (vec![(100, 1)], 0, true),
            (vec![], 0, false),
            (vec![(10, 1), (90, 2)], 0, false),
            (vec![(50, 1), (50, 2), (100, 3)], 0, false),
            (vec![(10, 5), (100, 4)], 0, false),
            (vec![(0, 1), (100, 2)], 0, false),
            (vec![(100, 1)], crate::trust::MAX_SPREAD_S + 1, false),
        ];
        for (waves, spread, ok) in cases {
            let r = rollout(&waves, spread);
            assert_eq!(r.check().is_ok(), ok, "{waves:?} spread {spread}: {:?}", r.check());
        }
    }
}
