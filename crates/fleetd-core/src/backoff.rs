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
        let ceiling = self.base.saturating_mul(1u32 << attempt.min(16)).min(self.cap);
        let millis = ceiling.as_millis().max(1) as u64;
        Duration::from_millis(random_u64() % (millis + 1))
    }
}

fn random_u64() -> u64 {
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
}
