//! A token bucket per key: per fleet server, and per source address
//! (`PeerGate`).

use fleetd::admission::Source;
use std::collections::{BTreeMap, HashMap};
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
pub const MAX_BUCKETS: usize = 4096;

/// Sources remembered as having authenticated (fleet servers' addresses).
pub const MAX_KNOWN_SOURCES: usize = 256;

/// The first gate, before any signature is checked: a bucket per source.
/// Strangers share one bounded map that anyone with many addresses can
/// fill; a source that has made a request a registered server signed gets
/// its bucket in another map, which only authenticated requests enter, so
/// no flood of strangers can take a fleet server's admission away.
#[derive(Debug)]
pub struct PeerGate {
    strangers: RateLimiter,
    known: RateLimiter,
    /// When each known source last authenticated (the oldest goes first).
    known_sources: BTreeMap<Source, Instant>,
}

impl PeerGate {
    pub fn new(per_minute: u32, burst: u32) -> Self {
        Self {
            strangers: RateLimiter::new(per_minute, burst),
            known: RateLimiter::new(per_minute, burst),
            known_sources: BTreeMap::new(),
        }
    }

    /// Takes one token for a request from `source`.
    pub fn admit(&mut self, source: Source, now: Instant) -> bool {
        let key = source.to_string();
        if self.known_sources.contains_key(&source) {
            self.known.allow(&key, now)
        } else {
            self.strangers.allow(&key, now)
        }
    }

    /// `source` sent a request a registered server signed.
    pub fn authenticated(&mut self, source: Source, now: Instant) {
        if !self.known_sources.contains_key(&source) && self.known_sources.len() >= MAX_KNOWN_SOURCES {
            let oldest = self.known_sources.iter().min_by_key(|(_, at)| **at).map(|(s, _)| *s);
            if let Some(oldest) = oldest {
                self.known_sources.remove(&oldest);
                self.known.buckets.remove(&oldest.to_string());
            }
        }
        self.known_sources.insert(source, now);
    }
}

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

    fn src(i: u32) -> Source {
        Source::of(std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)))
    }

    /// The attack: strangers from more addresses than the map holds
    /// cannot take admission from a fleet server's address that has
    /// authenticated, even once its bucket has refilled.
    #[test]
    fn strangers_filling_the_map_leave_known_sources_alone() {
        let mut gate = PeerGate::new(60, 2);
        let t0 = Instant::now();
        let server = src(1);
        assert!(gate.admit(server, t0));
        gate.authenticated(server, t0);
        let later = t0 + Duration::from_secs(5);
        let strangers = (100..100 + 2 * MAX_BUCKETS as u32).filter(|i| gate.admit(src(*i), later)).count();
        assert_eq!(strangers, MAX_BUCKETS, "the strangers' map is full");
        assert!(!gate.admit(src(1_000_000), later), "a new stranger waits");
        assert!(gate.admit(server, later) && gate.admit(server, later), "the server keeps its burst");
        assert!(!gate.admit(server, later), "and its rate");
    }

    #[test]
    fn known_sources_stay_bounded_oldest_first() {
        let mut gate = PeerGate::new(60, 2);
        let t0 = Instant::now();
        for i in 0..=MAX_KNOWN_SOURCES as u32 {
            gate.authenticated(src(i), t0 + Duration::from_millis(u64::from(i)));
        }
        assert_eq!(gate.known_sources.len(), MAX_KNOWN_SOURCES);
        assert!(!gate.known_sources.contains_key(&src(0)));
        assert!(gate.known_sources.contains_key(&src(MAX_KNOWN_SOURCES as u32)));
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
