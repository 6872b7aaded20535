//! A/B slots, typed: a slot's name, and the pair of slots with what each
//! has (its size, its boot partition), where "the other slot" is a field,
//! not a search. Pure; the names are the configuration's (`[slots.A]` → `A`).

use serde::{Deserialize, Serialize};

/// A slot's name as the configuration gives it. Serialized as the bare name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Slot(String);

impl Slot {
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for Slot {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

/// The two slots of an A/B device, each with its `T`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair<T>([(Slot, T); 2]);

impl<T> Pair<T> {
    /// Exactly two slots with distinct, non-empty names.
    pub fn new(slots: Vec<(Slot, T)>) -> Result<Self, String> {
        let count = slots.len();
        let Ok([a, b]) = <[(Slot, T); 2]>::try_from(slots) else {
            return Err(format!("exactly two slots are needed, found {count}"));
        };
        if a.0.as_str().is_empty() || a.0 == b.0 {
            return Err(format!("slot names {:?} and {:?}", a.0.as_str(), b.0.as_str()));
        }
        Ok(Self([a, b]))
    }

    /// The slot that is not `slot`, with its `T`; None when `slot` is
    /// neither of the two.
    pub fn other(&self, slot: &str) -> Option<&(Slot, T)> {
        let [a, b] = &self.0;
        if a.0 == *slot {
            Some(b)
        } else if b.0 == *slot {
            Some(a)
        } else {
            None
        }
    }

    /// `slot`'s `T`.
    pub fn get(&self, slot: &str) -> Option<&T> {
        self.0.iter().find(|(name, _)| name == slot).map(|(_, value)| value)
    }

    /// The slot whose `T` matches.
    pub fn find(&self, mut matches: impl FnMut(&T) -> bool) -> Option<&Slot> {
        self.0.iter().find(|(_, value)| matches(value)).map(|(name, _)| name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &(Slot, T)> {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> Pair<u32> {
        Pair::new(vec![(Slot::new("A"), 2), (Slot::new("B"), 3)]).unwrap()
    }

    #[test]
    fn the_other_slot_is_the_one_that_is_not_given() {
        let p = pair();
        assert_eq!(p.other("A"), Some(&(Slot::new("B"), 3)));
        assert_eq!(p.other("B"), Some(&(Slot::new("A"), 2)));
        assert_eq!(p.other("C"), None);
        assert_eq!((p.get("B"), p.get("C")), (Some(&3), None));
        assert_eq!(p.find(|n| *n == 2), Some(&Slot::new("A")));
    }

    #[test]
    fn a_pair_is_two_distinct_names() {
        assert!(Pair::new(vec![(Slot::new("A"), 1)]).is_err());
        assert!(Pair::new(vec![(Slot::new("A"), 1), (Slot::new("A"), 2)]).is_err());
        assert!(Pair::new(vec![(Slot::new(""), 1), (Slot::new("B"), 2)]).is_err());
        assert_eq!(serde_json::to_string(&Slot::new("A")).unwrap(), r#""A""#);
    }
}
