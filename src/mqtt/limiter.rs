//! Progress reports: at most one a second, except that a new step is always
//! sent at once.

use std::time::Duration;
// tokio's clock: the MQTT task runs on it, and tests can pause it.
use tokio::time::Instant;

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

    /// On tokio's paused clock, as the MQTT task uses it: a burst of
    /// progress within a second goes out once; the step change at once.
    #[tokio::test(start_paused = true)]
    async fn on_the_task_clock_a_burst_goes_out_once_a_second() {
        let mut l = ProgressLimiter::new(Duration::from_secs(1));
        let mut sent = 0;
        for _ in 0..50 {
            if l.allow("downloading", Instant::now()) {
                sent += 1;
            }
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        assert_eq!(sent, 5, "50 reports over 5 s");
        assert!(l.allow("installing", Instant::now()));
    }
}
