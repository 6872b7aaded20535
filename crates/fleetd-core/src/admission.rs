//! Who gets a connection slot on a server that strangers can reach (the
//! provisioning portal, the co-signer). Pure: times are milliseconds passed
//! in, and the caller closes the connections this decides to drop.
//!
//! - Each source holds at most `max_per_source` connections; its next one
//!   replaces its own oldest idle connection, so one address cannot take
//!   the slots of another.
//! - Past `max_total`, a new connection replaces an idle one of the source
//!   that holds the most (the oldest of those first), so a newcomer with
//!   one connection gets in while an attacker holds many.
//! - A connection is idle from its accept, and again after each answer,
//!   until its next request head has arrived; idle longer than `idle_ms`,
//!   it is closed. Then it is reading that request's body, which the
//!   handler bounds (and answers by name when the client is too slow).
//!   Idle and reading connections may be taken; only connections whose
//!   request is being answered never are (that time is bounded by the
//!   handler, not by the client).

use std::collections::BTreeMap;
use std::net::IpAddr;

/// Where a connection or a guess comes from, as the limits count it: an
/// IPv4 address, or an IPv6 /64 (a host gets a whole /64 by SLAAC, so
/// counting addresses would give it 2^64 budgets). An IPv4-mapped IPv6
/// address counts as the IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Source(IpAddr);

impl Source {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Self(IpAddr::V6(prefix.into()))
                }
            },
        }
    }

    pub fn ip(&self) -> IpAddr {
        self.0
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotPolicy {
    pub max_total: usize,
    pub max_per_source: usize,
    /// How long a connection may wait for its client: from the accept, or
    /// from its last answer, to its next request read in full.
    pub idle_ms: u64,
}

pub type SlotId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Serve it; close `replaced` (already out of the table) first.
    Admitted { id: SlotId, replaced: Option<SlotId> },
    /// Every slot is answering a request: close the new connection.
    Refused,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle { since: u64 },
    Reading { since: u64 },
    Answering,
}

#[derive(Debug, Clone)]
struct Slot {
    source: Source,
    state: State,
}

impl Slot {
    /// Since when the connection has waited for its client, if it does.
    fn waiting_since(&self) -> Option<u64> {
        match self.state {
            State::Idle { since } | State::Reading { since } => Some(since),
            State::Answering => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Slots {
    policy: SlotPolicy,
    next_id: SlotId,
    open: BTreeMap<SlotId, Slot>,
}

impl Slots {
    pub fn new(policy: SlotPolicy) -> Self {
        Self { policy, next_id: 0, open: BTreeMap::new() }
    }

    pub fn policy(&self) -> SlotPolicy {
        self.policy
    }

    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    pub fn held_by(&self, source: Source) -> usize {
        self.open.values().filter(|s| s.source == source).count()
    }

    /// A new connection from `source`.
    pub fn admit(&mut self, source: Source, now_ms: u64) -> Admission {
        let replaced = if self.held_by(source) >= self.policy.max_per_source {
            match self.oldest_idle(|s| s.source == source) {
                Some(id) => Some(id),
                None => return Admission::Refused,
            }
        } else if self.open.len() >= self.policy.max_total {
            match self.idle_of_the_largest_holder() {
                Some(id) => Some(id),
                None => return Admission::Refused,
            }
        } else {
            None
        };
        if let Some(id) = replaced {
            self.open.remove(&id);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.open.insert(id, Slot { source, state: State::Idle { since: now_ms } });
        Admission::Admitted { id, replaced }
    }

    fn set(&mut self, id: SlotId, state: State) {
        if let Some(slot) = self.open.get_mut(&id) {
            slot.state = state;
        }
    }

    /// A request head has arrived; its body is being read.
    pub fn reading(&mut self, id: SlotId, now_ms: u64) {
        self.set(id, State::Reading { since: now_ms });
    }

    /// Its request has been read in full and is being answered.
    pub fn busy(&mut self, id: SlotId) {
        self.set(id, State::Answering);
    }

    /// Answered: waiting for the client again.
    pub fn idle(&mut self, id: SlotId, now_ms: u64) {
        self.set(id, State::Idle { since: now_ms });
    }

    pub fn close(&mut self, id: SlotId) {
        self.open.remove(&id);
    }

    /// When this connection is to be closed for idling: `None` while a
    /// request is read or answered, or once it is gone.
    pub fn idle_deadline(&self, id: SlotId) -> Option<u64> {
        match self.open.get(&id)?.state {
            State::Idle { since } => Some(since.saturating_add(self.policy.idle_ms)),
            State::Reading { .. } | State::Answering => None,
        }
    }

    pub fn is_open(&self, id: SlotId) -> bool {
        self.open.contains_key(&id)
    }

    fn oldest_idle(&self, which: impl Fn(&Slot) -> bool) -> Option<SlotId> {
        self.open
            .iter()
            .filter(|(_, s)| which(s))
            .filter_map(|(id, s)| s.waiting_since().map(|since| (since, *id)))
            .min()
            .map(|(_, id)| id)
    }

    /// An idle connection of the source holding the most connections (its
    /// oldest idle one); among equal holders, the one idle the longest.
    fn idle_of_the_largest_holder(&self) -> Option<SlotId> {
        let mut held: BTreeMap<Source, usize> = BTreeMap::new();
        for slot in self.open.values() {
            *held.entry(slot.source).or_default() += 1;
        }
        self.open
            .iter()
            .filter_map(|(id, s)| {
                s.waiting_since().map(|since| (std::cmp::Reverse(held[&s.source]), since, *id))
            })
            .min()
            .map(|(_, _, id)| id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(last: u8) -> Source {
        Source::of(IpAddr::from([10, 42, 0, last]))
    }

    fn admitted(a: Admission) -> (SlotId, Option<SlotId>) {
        match a {
            Admission::Admitted { id, replaced } => (id, replaced),
            Admission::Refused => panic!("refused"),
        }
    }

    const POLICY: SlotPolicy = SlotPolicy { max_total: 6, max_per_source: 3, idle_ms: 1_000 };

    #[test]
    fn sources_are_addresses_and_ipv6_hosts_are_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Source::of(a), Source::of(b));
        assert_ne!(Source::of(a), Source::of(c));
        assert_eq!(Source::of(a).to_string(), "2001:db8:1:2::/64");
        let mapped: IpAddr = "::ffff:10.42.0.7".parse().unwrap();
        assert_eq!(Source::of(mapped), src(7));
        assert_eq!(src(7).to_string(), "10.42.0.7");
    }

    /// One address opening connections without end only ever replaces its
    /// own: the others keep theirs and newcomers get in.
    #[test]
    fn a_source_over_its_share_replaces_its_own_oldest_idle_connection() {
        let mut slots = Slots::new(POLICY);
        let (installer, _) = admitted(slots.admit(src(1), 0));
        let mut attacker = Vec::new();
        for t in 0..100 {
            let (id, replaced) = admitted(slots.admit(src(66), t));
            if let Some(r) = replaced {
                assert!(attacker.contains(&r), "only the attacker's own connections go");
            }
            attacker.push(id);
        }
        assert_eq!(slots.held_by(src(66)), POLICY.max_per_source);
        assert!(slots.is_open(installer));
        let (_, replaced) = admitted(slots.admit(src(2), 100));
        assert_eq!(replaced, None, "room for another source");
    }

    #[test]
    fn when_full_the_largest_holder_gives_up_an_idle_connection() {
        let mut slots = Slots::new(POLICY);
        // Two attackers take every slot.
        let mut ids = Vec::new();
        for (t, s) in [(0, 66), (1, 66), (2, 66), (3, 77), (4, 77), (5, 77)] {
            ids.push(admitted(slots.admit(src(s), t)).0);
        }
        // 66's first is answering a request: it is never taken.
        slots.busy(ids[0]);
        let (installer, replaced) = admitted(slots.admit(src(1), 10));
        assert_eq!(replaced, Some(ids[1]), "66's oldest idle (66 and 77 hold 3 each; 66's idled first)");
        // The attackers come back: they take from each other, not from the
        // installer, who holds one.
        for t in 11..50 {
            let s = if t % 2 == 0 { 66 } else { 77 };
            let (_, replaced) = admitted(slots.admit(src(s), t));
            assert_ne!(replaced, Some(installer), "at {t}");
            assert_ne!(replaced, Some(ids[0]), "busy at {t}");
        }
        assert!(slots.is_open(installer));
        assert_eq!(slots.len(), POLICY.max_total);
    }

    #[test]
    fn many_sources_with_one_connection_each_give_up_the_oldest() {
        let mut slots = Slots::new(POLICY);
        for s in 0..6u8 {
            admitted(slots.admit(src(100 + s), u64::from(s)));
        }
        let (installer, replaced) = admitted(slots.admit(src(1), 6));
        assert!(replaced.is_some());
        // The installer's connection is the newest: the next
        // `max_total - 1` newcomers take older ones first.
        for t in 0..(POLICY.max_total as u64 - 1) {
            admitted(slots.admit(src(200 + t as u8), 7 + t));
            assert!(slots.is_open(installer), "after {} newcomers", t + 1);
        }
    }

    #[test]
    fn a_connection_reading_a_slow_body_may_still_be_taken() {
        let mut slots = Slots::new(POLICY);
        let (slow, _) = admitted(slots.admit(src(66), 0));
        slots.reading(slow, 1);
        for t in 0..2 {
            admitted(slots.admit(src(66), 2 + t));
        }
        let (_, replaced) = admitted(slots.admit(src(66), 10));
        assert_eq!(replaced, Some(slow), "its oldest waiting connection");
    }

    #[test]
    fn busy_connections_are_never_taken_and_a_full_busy_table_refuses() {
        let mut slots = Slots::new(POLICY);
        for t in 0..6 {
            let (id, _) = admitted(slots.admit(src(t as u8), t));
            slots.busy(id);
        }
        assert_eq!(slots.admit(src(9), 10), Admission::Refused);
        let mut slots = Slots::new(POLICY);
        for t in 0..3 {
            let (id, _) = admitted(slots.admit(src(5), t));
            slots.busy(id);
        }
        assert_eq!(slots.admit(src(5), 10), Admission::Refused, "its own share is busy");
        assert!(matches!(slots.admit(src(6), 10), Admission::Admitted { replaced: None, .. }));
    }

    #[test]
    fn idle_deadlines_start_at_accept_and_after_each_answer() {
        let mut slots = Slots::new(POLICY);
        let (id, _) = admitted(slots.admit(src(1), 100));
        assert_eq!(slots.idle_deadline(id), Some(1_100));
        slots.busy(id);
        assert_eq!(slots.idle_deadline(id), None, "no deadline while answering");
        slots.idle(id, 5_000);
        assert_eq!(slots.idle_deadline(id), Some(6_000));
        slots.reading(id, 5_500);
        assert_eq!(slots.idle_deadline(id), None, "the handler bounds the body");
        slots.close(id);
        assert_eq!(slots.idle_deadline(id), None);
        assert!(slots.is_empty());
    }
}
