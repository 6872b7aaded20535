//! Failed proofs of possession are rate-limited with lock-out and back-off:
//! a few free attempts, then locked for a while, twice as long after each
//! further lock-out, up to a cap. An 80-bit secret needs no more to be safe
//! from guessing; the lock-out keeps a neighbour from even trying at speed.
//! Pure: time is passed in (milliseconds).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardPolicy {
    /// Failures allowed before the first lock-out.
    pub free_attempts: u32,
    pub first_lockout_ms: u64,
    pub max_lockout_ms: u64,
}

impl Default for GuardPolicy {
    fn default() -> Self {
        Self { free_attempts: 5, first_lockout_ms: 30_000, max_lockout_ms: 3_600_000 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("locked-out: too many wrong proofs of possession; try again in {retry_after_ms} ms")]
pub struct LockedOut {
    pub retry_after_ms: u64,
}

#[derive(Debug, Clone)]
pub struct Guard {
    policy: GuardPolicy,
    failures: u32,
    lockouts: u32,
    locked_until: u64,
}

impl Guard {
    pub fn new(policy: GuardPolicy) -> Self {
        Self { policy, failures: 0, lockouts: 0, locked_until: 0 }
    }

    /// Whether an attempt may be checked at all now.
    pub fn check(&self, now_ms: u64) -> Result<(), LockedOut> {
        if now_ms < self.locked_until {
            return Err(LockedOut { retry_after_ms: self.locked_until - now_ms });
        }
        Ok(())
    }

    /// Records a wrong proof; returns the lock-out it starts, if any (the
    /// caller logs it).
    pub fn failed(&mut self, now_ms: u64) -> Option<LockedOut> {
        self.failures += 1;
        if self.failures < self.policy.free_attempts {
            return None;
        }
        let doubling = 1u64 << self.lockouts.min(20);
        let lockout = self.policy.first_lockout_ms.saturating_mul(doubling).min(self.policy.max_lockout_ms);
        self.lockouts += 1;
        self.failures = 0;
        self.locked_until = now_ms.saturating_add(lockout);
        Some(LockedOut { retry_after_ms: lockout })
    }

    /// A right proof ends the back-off.
    pub fn succeeded(&mut self) {
        *self = Self::new(self.policy);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_attempts_then_lockouts_that_double_up_to_the_cap() {
        let mut g = Guard::new(GuardPolicy::default());
        for _ in 0..4 {
            assert!(g.check(0).is_ok());
            assert_eq!(g.failed(0), None);
        }
        assert_eq!(g.failed(0), Some(LockedOut { retry_after_ms: 30_000 }));
        assert_eq!(g.check(29_999), Err(LockedOut { retry_after_ms: 1 }));
        assert!(g.check(30_000).is_ok());
        let mut now = 30_000;
        let mut lockouts = vec![];
        for _ in 0..10 {
            for _ in 0..4 {
                let _ = g.failed(now);
            }
            let l = g.failed(now).unwrap();
            lockouts.push(l.retry_after_ms);
            now += l.retry_after_ms;
        }
        assert_eq!(&lockouts[..4], &[60_000, 120_000, 240_000, 480_000]);
        assert_eq!(*lockouts.last().unwrap(), 3_600_000, "capped at an hour");
        g.succeeded();
        assert!(g.check(now).is_ok());
        assert_eq!(g.failed(now), None, "a success resets the count");
    }

    /// 1,000 guesses as fast as a neighbour can send them, for an hour:
    /// almost all are refused before any comparison happens.
    #[test]
    fn a_thousand_fast_guesses_are_mostly_never_checked() {
        let mut g = Guard::new(GuardPolicy::default());
        let (mut checked, mut refused) = (0, 0);
        for i in 0..1000u64 {
            let now = i * 3_600; // 1,000 guesses spread over an hour
            match g.check(now) {
                Ok(()) => {
                    checked += 1;
                    let _ = g.failed(now);
                }
                Err(_) => refused += 1,
            }
        }
        // 5 free attempts, then windows of 5 after lock-outs of 30, 60, 120,
        // 240, 480 and 960 s: 7 × 5 checked in the hour (the next lock-out,
        // 1,920 s, ends after it).
        assert_eq!(checked, 35, "{checked} guesses were checked");
        assert_eq!(checked + refused, 1000);
    }
}
