//! A token bucket per key: per fleet server, and per peer address.

use std::collections::HashMap;
use std::time::Instant;

#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: HashMap<String, (f64, Instant)>,
}

impl RateLimiter {
    pub fn new(per_minute: u32, burst: u32) -> Self {
        Self { per_second: f64::from(per_minute) / 60.0, burst: f64::from(burst), buckets: HashMap::new() }
    }

    /// Takes one token for `who` at `now`; false when the bucket is empty.
    pub fn allow(&mut self, who: &str, now: Instant) -> bool {
        if self.buckets.len() >= MAX_BUCKETS && !self.buckets.contains_key(who) {
            self.forget_full(now);
            if self.buckets.len() >= MAX_BUCKETS {
                // Saturated by keys that are all spending: refuse newcomers
                // rather than grow, or forget a bucket that is still empty.
                return false;
            }
        }
        let (tokens, last) = self.buckets.entry(who.to_string()).or_insert((self.burst, now));
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * self.per_second).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Keys are peer addresses too: a bounded map, pruned of buckets that have
/// refilled (forgetting those changes nobody's allowance); when every bucket
/// is still spending, a new key is refused.
const MAX_BUCKETS: usize = 4096;

impl RateLimiter {
    fn forget_full(&mut self, now: Instant) {
        let (per_second, burst) = (self.per_second, self.burst);
        self.buckets.retain(|_, (tokens, last)| {
            *tokens + now.saturating_duration_since(*last).as_secs_f64() * per_second < burst
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill_per_server() {
        let mut rl = RateLimiter::new(60, 3);
        let t0 = Instant::now();
        assert!(rl.allow("a", t0) && rl.allow("a", t0) && rl.allow("a", t0));
        assert!(!rl.allow("a", t0), "burst used up");
        assert!(rl.allow("b", t0), "buckets are per server");
        assert!(!rl.allow("a", t0 + Duration::from_millis(500)));
        assert!(rl.allow("a", t0 + Duration::from_millis(1600)), "one token per second");
    }

    #[test]
    fn the_map_of_buckets_stays_bounded() {
        let mut rl = RateLimiter::new(60, 1);
        let t0 = Instant::now();
        assert!(rl.allow("early", t0));
        let later = t0 + Duration::from_secs(10);
        let allowed = (0..3 * MAX_BUCKETS).filter(|i| rl.allow(&format!("peer-{i}"), later)).count();
        assert!(rl.buckets.len() <= MAX_BUCKETS, "{}", rl.buckets.len());
        // "early" had refilled and made room for one more; the rest wait.
        assert_eq!(allowed, MAX_BUCKETS);
        assert!(rl.allow("peer-0", later + Duration::from_secs(2)), "known keys keep their bucket");
        // An empty bucket is never forgotten early.
        let mut rl = RateLimiter::new(1, 1);
        assert!(rl.allow("x", t0));
        rl.forget_full(t0 + Duration::from_secs(1));
        assert!(!rl.allow("x", t0 + Duration::from_secs(1)));
    }
}
