//! Progress reports: at most one a second, except that a new step is always
//! sent at once.

use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct ProgressLimiter {
    interval: Duration,
    last: Option<(Instant, String)>,
}

impl ProgressLimiter {
    pub fn new(interval: Duration) -> Self {
        Self { interval, last: None }
    }

    /// Whether a report of `step` at `now` should go out.
    pub fn allow(&mut self, step: &str, now: Instant) -> bool {
        let send = match &self.last {
            None => true,
            Some((at, last_step)) => last_step != step || now.saturating_duration_since(*at) >= self.interval,
        };
        if send {
            self.last = Some((now, step.to_string()));
        }
        send
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_per_interval_but_every_step_change() {
        let mut l = ProgressLimiter::new(Duration::from_secs(1));
        let t = Instant::now();
        assert!(l.allow("downloading", t));
        assert!(!l.allow("downloading", t + Duration::from_millis(300)));
        assert!(!l.allow("downloading", t + Duration::from_millis(999)));
        assert!(l.allow("downloading", t + Duration::from_millis(1000)));
        assert!(l.allow("installing", t + Duration::from_millis(1001)), "a new step goes out at once");
        assert!(!l.allow("installing", t + Duration::from_millis(1500)));
    }
}
