//! A token bucket per fleet server.

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
}
