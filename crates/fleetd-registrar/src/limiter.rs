//! Login attempts per source address, in memory (each instance its own):
//! a token bucket per address, the map capped so a flood of addresses
//! cannot grow it without bound.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

pub const MAX_BUCKETS: usize = 10_000;

#[derive(Debug)]
pub struct Limiter {
    per_minute: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl Limiter {
    pub fn new(per_minute: u32, burst: u32) -> Self {
        Limiter {
            per_minute: f64::from(per_minute),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::default(),
        }
    }

    /// Whether `ip` may try now (takes one token).
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&ip) {
            // Forget the full buckets (they hold nothing back), then refuse if still full.
            let (per_minute, burst) = (self.per_minute, self.burst);
            buckets.retain(|_, (tokens, at)| refill(*tokens, *at, now, per_minute, burst) < burst);
            if buckets.len() >= MAX_BUCKETS {
                return false;
            }
        }
        let (tokens, at) = buckets.entry(ip).or_insert((self.burst, now));
        let available = refill(*tokens, *at, now, self.per_minute, self.burst);
        *at = now;
        if available >= 1.0 {
            *tokens = available - 1.0;
            true
        } else {
            *tokens = available;
            false
        }
    }
}

fn refill(tokens: f64, at: Instant, now: Instant, per_minute: f64, burst: f64) -> f64 {
    (tokens + now.saturating_duration_since(at).as_secs_f64() * per_minute / 60.0).min(burst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_rate() {
        let limiter = Limiter::new(60, 3);
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let steps = [
            (0, a, true),
            (0, a, true),
            (0, a, true),
            (0, a, false),
            (0, b, true),
            (1000, a, true),
            (1000, a, false),
        ];
        for (i, (ms, ip, allowed)) in steps.into_iter().enumerate() {
            assert_eq!(limiter.allow(ip, t0 + Duration::from_millis(ms)), allowed, "step {i}");
        }
    }
}
