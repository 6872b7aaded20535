//! Exponential backoff with full jitter: a random delay up to
//! `min(cap, base * 2^attempt)`, so a fleet that lost its broker does not
//! come back in lockstep.

use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, random_u64())
    }

    /// `delay` with the random draw given: `random` spread over `[0, ceiling]`.
    pub fn delay_with(&self, attempt: u32, random: u64) -> Duration {
        let ceiling = self.base.saturating_mul(1u32 << attempt.min(16)).min(self.cap);
        let millis = ceiling.as_millis().max(1) as u64;
        Duration::from_millis(random % (millis + 1))
    }
}

/// Never start connection attempts closer together than this: EMQX bans a
/// client id that connects 15 times within a minute, and a flapping device
/// must not lock itself out.
pub const MIN_RECONNECT_INTERVAL: Duration = Duration::from_secs(4);

/// When to reconnect to the broker (sans-IO: the caller gives the time, as
/// a `Duration` since any fixed origin, and the random draws).
///
/// - The first reconnect after a lost connection waits a delay in
///   `[0, spread)` drawn once per device (`stable_draw` of its id): a broker
///   restart drops the whole fleet at once, and without it the whole fleet
///   would come back at once. A stable draw spreads a fleet as evenly as a
///   random one, and the same device comes back at the same point of the
///   spread every time.
/// - Each further failure backs off with full jitter (`Backoff`).
/// - Attempts never start less than `MIN_RECONNECT_INTERVAL` apart.
/// - `restart_backoff` (a network change, a renewed identity: this
///   device's own reason) skips the spread: the next failure waits as after
///   a first failed attempt.
#[derive(Debug, Clone)]
pub struct ReconnectPacer {
    backoff: Backoff,
    spread: Duration,
    /// Where in the spread this device reconnects first.
    spread_draw: u64,
    /// `None` while connected (or never connected); else failures since.
    failures: Option<u32>,
    last_attempt: Option<Duration>,
}

impl ReconnectPacer {
    pub fn new(backoff: Backoff, spread: Duration, spread_draw: u64) -> Self {
        Self { backoff, spread, spread_draw, failures: Some(0), last_attempt: None }
    }

    /// A connection attempt starts at `now`.
    pub fn attempting(&mut self, now: Duration) {
        self.last_attempt = Some(now);
    }

    /// The broker accepted the connection.
    pub fn connected(&mut self) {
        self.failures = None;
    }

    /// The connection was lost, or an attempt failed, at `now`: how long to
    /// wait before the next attempt.
    pub fn delay(&mut self, now: Duration, random: u64) -> Duration {
        let wanted = match self.failures {
            None => {
                let millis = self.spread.as_millis() as u64;
                Duration::from_millis(if millis == 0 { 0 } else { self.spread_draw % millis })
            }
            Some(n) => self.backoff.delay_with(n, random),
        };
        self.failures = Some(self.failures.map_or(0, |n| n.saturating_add(1)));
        wanted.max(self.floor(now))
    }

    /// How long from `now` until an attempt is allowed.
    pub fn floor(&self, now: Duration) -> Duration {
        self.last_attempt.map_or(Duration::ZERO, |at| (at + MIN_RECONNECT_INTERVAL).saturating_sub(now))
    }

    /// The next failure backs off from the start, without the spread.
    pub fn restart_backoff(&mut self) {
        self.failures = Some(0);
    }
}

/// A draw that stays the same for `id` (the first 8 bytes of
/// SHA-256(label, 0, id)): where a device falls within a spread.
pub fn stable_draw(label: &str, id: &str) -> u64 {
    stable_draws(label, id).0
}

/// Two independent stable draws from SHA-256(label, 0, id): its first 8
/// bytes and the next 8 (a rollout's bucket and offset).
pub fn stable_draws(label: &str, id: &str) -> (u64, u64) {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(label.as_bytes());
    ctx.update(&[0]);
    ctx.update(id.as_bytes());
    let digest = ctx.finish();
    let word = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&digest.as_ref()[at..at + 8]);
        u64::from_be_bytes(w)
    };
    (word(0), word(8))
}

/// A draw from the system's CSPRNG.
pub fn random_u64() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_under_the_growing_ceiling_and_the_cap() {
        let b = Backoff { base: Duration::from_secs(1), cap: Duration::from_secs(300) };
        for attempt in 0..20 {
            let ceiling = Duration::from_secs((1u64 << attempt.min(16)).min(300));
            for _ in 0..50 {
                assert!(b.delay(attempt) <= ceiling);
            }
        }
        // Full jitter really spreads: not all the same.
        let samples: std::collections::HashSet<_> = (0..50).map(|_| b.delay(8)).collect();
        assert!(samples.len() > 10);
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn pacer(spread_s: u64) -> ReconnectPacer {
        pacer_drawn(spread_s, 7_000)
    }

    fn pacer_drawn(spread_s: u64, draw: u64) -> ReconnectPacer {
        ReconnectPacer::new(Backoff { base: S(1), cap: S(60) }, S(spread_s), draw)
    }

    #[test]
    fn the_first_reconnect_after_a_loss_is_spread_then_backs_off() {
        // (the device's draw, expected delay) after a connection of an hour
        // is lost; the random draw of the call plays no part.
        for (draw, expected) in [(0, S(0)), (14_999, Duration::from_millis(14_999)), (15_000, S(0))] {
            let mut p = pacer_drawn(15, draw);
            p.attempting(S(0));
            p.connected();
            assert_eq!(p.delay(S(3600), 123_456), expected, "draw {draw}");
        }
        // Draws spread a fleet evenly: 10,000 ids over 15 s, none of the 15
        // seconds with more than 1.2 times its share.
        let mut per_second = [0u32; 15];
        for i in 0..10_000 {
            let mut p = pacer_drawn(15, stable_draw("reconnect", &format!("gw-{i}")));
            p.connected();
            per_second[p.delay(S(100), 0).as_secs() as usize] += 1;
        }
        assert!(per_second.iter().all(|&n| n < 10_000 / 15 * 12 / 10), "{per_second:?}");
        assert_eq!(stable_draw("reconnect", "gw-1"), stable_draw("reconnect", "gw-1"));
        assert_ne!(stable_draw("reconnect", "gw-1"), stable_draw("reconnect", "gw-2"));
        // Then the backoff's ceilings, 1 s, 2 s, 4 s, ..., each at least 4 s after its attempt.
        let mut p = pacer(15);
        p.attempting(S(0));
        p.connected();
        let mut now = S(3600);
        p.delay(now, 7_000);
        for (attempt, ceiling_ms) in [(0u32, 1_000u64), (1, 2_000), (2, 4_000), (3, 8_000), (6, 60_000)] {
            let mut q = p.clone();
            q.failures = Some(attempt);
            q.attempting(now);
            assert_eq!(
                q.delay(now, ceiling_ms),
                Duration::from_millis(ceiling_ms).max(MIN_RECONNECT_INTERVAL)
            );
            assert_eq!(q.delay(now, 0), MIN_RECONNECT_INTERVAL, "attempt {attempt}: the floor");
        }
        now += S(10);
        p.attempting(now);
        assert_eq!(p.delay(now + S(1), 0), S(3), "4 s after the attempt's start, not after its end");
    }

    #[test]
    fn attempts_are_never_closer_than_the_floor() {
        // A connection that drops right after it came up, spread 0: the
        // next attempt still waits for the floor.
        let mut p = pacer(0);
        p.attempting(S(100));
        p.connected();
        assert_eq!(p.delay(S(101), 123), S(3));
        // Over many flaps with every random draw at 0, no more than 15
        // attempts fit in a minute (EMQX's ban).
        let mut p = pacer(0);
        let (mut now, mut starts) = (S(0), vec![]);
        while now < S(60) {
            p.attempting(now);
            starts.push(now);
            p.connected();
            now += p.delay(now, 0);
        }
        assert!(starts.len() <= 15, "{} attempts in a minute", starts.len());
        assert!(starts.windows(2).all(|w| w[1] - w[0] >= MIN_RECONNECT_INTERVAL));
    }

    #[test]
    fn a_restarted_backoff_skips_the_spread() {
        let mut p = pacer(30);
        p.attempting(S(0));
        p.connected();
        p.restart_backoff();
        assert_eq!(
            p.delay(S(100), 999),
            Duration::from_millis(999),
            "not from [0, 30 s), and past the floor"
        );
        assert_eq!(p.floor(S(100)), S(0));
        // The very first connection is not spread either: a boot is no storm.
        let mut fresh = pacer(30);
        assert_eq!(fresh.floor(S(0)), S(0));
        assert!(fresh.delay(S(0), 29_999) <= S(1));
    }
}
