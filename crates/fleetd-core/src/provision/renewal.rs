//! When the device renews its certificate, without IO: at two thirds of its
//! life, spread by a random ±5 % of the life so a fleet enrolled together
//! does not renew together, never later than a margin before `not_after`;
//! after a failure, again after a backoff while the certificate lasts, or
//! never again when the registrar refused for good. Times are Unix
//! seconds; randomness and delays come in as arguments.

/// The spread around two thirds of the life, in per mille of the life.
pub const JITTER_PERMILLE: u64 = 50;
/// The latest a renewal starts: this long before `not_after` (or a tenth
/// of the life, for short-lived certificates).
pub const MARGIN_S: u64 = 3600;

/// What became of a renewal attempt that gave no certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The registrar could not be reached or answered 5xx: try again.
    Retryable,
    /// The registrar refused by name (`revoked`, `device-retired`, …), or
    /// its answer was not a usable identity: renewing again would not help.
    Final(String),
}

/// The next step after a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Try again at this time.
    At(u64),
    /// Stop renewing, for this named reason.
    Stop(String),
}

/// How long before `not_after` a renewal must have started.
pub fn margin(not_before: u64, not_after: u64) -> u64 {
    (not_after.saturating_sub(not_before) / 10).min(MARGIN_S)
}

/// When to renew a certificate valid from `not_before` to `not_after`:
/// two thirds into its life, plus or minus `JITTER_PERMILLE` of the life
/// (picked by `random`), but within `[not_before, not_after - margin]`.
pub fn renew_at(not_before: u64, not_after: u64, random: u64) -> u64 {
    let life = not_after.saturating_sub(not_before);
    let target = not_before + life / 3 * 2 + (life % 3) * 2 / 3;
    let spread = life * JITTER_PERMILLE / 1000;
    let jittered = target.saturating_sub(spread) + random % (2 * spread + 1);
    let latest = not_after.saturating_sub(margin(not_before, not_after)).max(not_before);
    jittered.clamp(not_before, latest)
}

/// After a failed attempt at `now`: a retryable failure tries again after
/// `delay_s` (the caller's capped, jittered backoff), the last time just
/// before `not_after`; once the certificate has expired, or for a final
/// refusal, renewing stops.
pub fn after_failure(now: u64, not_after: u64, failure: &Failure, delay_s: u64) -> Next {
    match failure {
        Failure::Final(reason) => Next::Stop(reason.clone()),
        Failure::Retryable if now >= not_after => {
            Next::Stop("identity-expired: the certificate expired before it could be renewed".into())
        }
        Failure::Retryable => {
            Next::At(now.saturating_add(delay_s.max(1)).min(not_after.saturating_sub(1)).max(now + 1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;
    const T0: u64 = 1_800_000_000;

    /// (not_before, not_after, random) → renew at.
    #[test]
    fn renewal_time_table() {
        let table: &[(u64, u64, u64, u64, &str)] = &[
            (T0, T0 + 30 * DAY, 0, T0 + 20 * DAY - 36 * 3600, "30 days, earliest: 2/3 - 5 %"),
            (T0, T0 + 30 * DAY, 36 * 3600, T0 + 20 * DAY, "30 days, middle: 2/3"),
            (T0, T0 + 30 * DAY, 72 * 3600, T0 + 20 * DAY + 36 * 3600, "30 days, latest: 2/3 + 5 %"),
            (T0, T0 + 30 * DAY, 72 * 3600 + 1, T0 + 20 * DAY - 36 * 3600, "random wraps"),
            (T0, T0 + 300, 0, T0 + 185, "5 minutes: 200 - 15"),
            (T0, T0 + 300, 30, T0 + 215, "5 minutes: 200 + 15"),
            (T0, T0 + 60, 3, T0 + 40, "1 minute: 40 ± 3"),
            (T0, T0 + 3, 0, T0 + 2, "3 seconds"),
            (T0, T0, 5, T0, "no life: at once"),
            (T0, T0 - 10, 5, T0, "inverted: at once"),
        ];
        for &(nb, na, random, expected, why) in table {
            assert_eq!(renew_at(nb, na, random), expected, "{why}");
        }
    }

    /// Whatever the randomness: within ±5 % of two thirds, before the margin.
    #[test]
    fn renewal_stays_in_its_window() {
        for life in [1, 2, 10, 59, 60, 3600, 7 * DAY, 30 * DAY, 397 * DAY] {
            for random in [0, 1, 7, 1 << 20, u64::MAX / 3, u64::MAX] {
                let at = renew_at(T0, T0 + life, random);
                assert!(at >= T0 + life * 2 / 3 - life / 20, "life {life} random {random}: {at}");
                assert!(at <= T0 + life * 2 / 3 + life / 20 + 1, "life {life} random {random}: {at}");
                assert!(at <= T0 + life - margin(T0, T0 + life), "life {life}: margin");
            }
        }
    }

    #[test]
    fn failures_retry_until_expiry_or_stop_by_name() {
        let na = T0 + 30 * DAY;
        let table: &[(u64, Failure, u64, Next)] = &[
            (T0 + 20 * DAY, Failure::Retryable, 60, Next::At(T0 + 20 * DAY + 60)),
            (T0 + 20 * DAY, Failure::Retryable, 0, Next::At(T0 + 20 * DAY + 1)),
            // Close to the end: the last attempt just before expiry.
            (na - 1000, Failure::Retryable, 3600, Next::At(na - 1)),
            (na - 1000, Failure::Retryable, 60, Next::At(na - 940)),
            (na - 1, Failure::Retryable, 3600, Next::At(na)),
            (
                na,
                Failure::Retryable,
                60,
                Next::Stop("identity-expired: the certificate expired before it could be renewed".into()),
            ),
            (
                T0 + 20 * DAY,
                Failure::Final("revoked: by the operator".into()),
                60,
                Next::Stop("revoked: by the operator".into()),
            ),
            (
                T0 + 20 * DAY,
                Failure::Final("device-retired: gone".into()),
                60,
                Next::Stop("device-retired: gone".into()),
            ),
        ];
        for (now, failure, delay, expected) in table {
            assert_eq!(&after_failure(*now, na, failure, *delay), expected, "{now} {failure:?}");
        }
    }
}
