//! An ordered set of disjoint, non-adjacent inclusive ranges over one address family's integer
//! space (`u128`; IPv4 uses the low 32 bits).
//!
//! Contract: every operation is O(log n) in the number of ranges, independent of how many
//! addresses the ranges cover, so a /8 or /64 pool costs the same as a /24. `len()` is kept as
//! a running count and is exact (a /64 holds 2^64 addresses, more than `u64`).

use std::collections::BTreeMap;

/// Disjoint inclusive ranges, merged on insert so no two are adjacent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start -> end (inclusive).
    ranges: BTreeMap<u128, u128>,
    len: u128,
}

impl RangeSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of addresses in the set.
    pub fn len(&self) -> u128 {
        self.len
    }

    /// True when the set holds no address.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Number of disjoint ranges (the `n` of the complexity bounds).
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }

    /// The ranges, in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = (u128, u128)> + '_ {
        self.ranges.iter().map(|(s, e)| (*s, *e))
    }

    /// The range holding `v`, if any.
    fn containing(&self, v: u128) -> Option<(u128, u128)> {
        self.ranges
            .range(..=v)
            .next_back()
            .filter(|(_, e)| **e >= v)
            .map(|(s, e)| (*s, *e))
    }

    /// True when `v` is in the set.
    pub fn contains(&self, v: u128) -> bool {
        self.containing(v).is_some()
    }

    /// True when any address of `[start, end]` is in the set.
    pub fn intersects(&self, start: u128, end: u128) -> bool {
        if self.contains(start) {
            return true;
        }
        // The first range starting after `start` must start beyond `end`.
        self.ranges
            .range((std::ops::Bound::Excluded(start), std::ops::Bound::Unbounded))
            .next()
            .is_some_and(|(s, _)| *s <= end)
    }

    /// The lowest address in the set.
    pub fn first(&self) -> Option<u128> {
        self.ranges.keys().next().copied()
    }

    /// Adds `[start, end]`, merging with neighbours. Addresses already present are not counted
    /// twice.
    pub fn insert(&mut self, start: u128, end: u128) {
        debug_assert!(start <= end);
        // Remove what is already there first so the count stays exact, then insert whole.
        self.remove(start, end);
        let mut s = start;
        let mut e = end;
        // After the removal, a range holding start - 1 ends exactly there: merge it.
        if let Some((ps, _)) = s.checked_sub(1).and_then(|p| self.containing(p)) {
            self.ranges.remove(&ps);
            s = ps;
        }
        if let Some(next) = e.checked_add(1)
            && let Some(ne) = self.ranges.remove(&next)
        {
            e = ne;
        }
        self.ranges.insert(s, e);
        self.len += end - start + 1;
    }

    /// Removes every address of `[start, end]` that is present; returns how many were removed.
    pub fn remove(&mut self, start: u128, end: u128) -> u128 {
        debug_assert!(start <= end);
        let mut removed = 0;
        // A range that begins before `start` and reaches into it: split it.
        if let Some((s, e)) = self.containing(start)
            && s < start
        {
            self.ranges.insert(s, start - 1);
            self.ranges.insert(start, e);
        }
        // Now every overlapping range starts within [start, end].
        let keys: Vec<u128> = self.ranges.range(start..=end).map(|(s, _)| *s).collect();
        for s in keys {
            let Some(e) = self.ranges.remove(&s) else { continue };
            if e > end {
                self.ranges.insert(end + 1, e);
                removed += end - s + 1;
            } else {
                removed += e - s + 1;
            }
        }
        self.len -= removed;
        removed
    }

    /// Removes one address; returns whether it was present. (The general `remove` collects
    /// the keys it touches into a `Vec`; one address touches at most one range.)
    pub fn take(&mut self, v: u128) -> bool {
        let Some((s, e)) = self.containing(v) else {
            return false;
        };
        if s == v {
            self.ranges.remove(&s);
        } else {
            self.ranges.insert(s, v - 1);
        }
        if e > v {
            self.ranges.insert(v + 1, e);
        }
        self.len -= 1;
        true
    }

    /// Removes and returns the lowest address.
    pub fn take_first(&mut self) -> Option<u128> {
        let v = self.first()?;
        self.take(v);
        Some(v)
    }

    /// Number of addresses of `[start, end]` in the set. O(k log n) for k ranges overlapped.
    pub fn count_within(&self, start: u128, end: u128) -> u128 {
        let mut n = 0;
        if let Some((s, e)) = self.containing(start)
            && s < start
        {
            n += e.min(end) - start + 1;
        }
        for (s, e) in self.ranges.range(start..=end) {
            n += (*e).min(end) - s + 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn merge_and_split() {
        let mut s = RangeSet::new();
        s.insert(10, 20);
        s.insert(21, 30);
        assert_eq!(s.range_count(), 1);
        assert_eq!(s.len(), 21);
        assert!(s.take(15));
        assert_eq!(s.range_count(), 2);
        assert!(!s.take(15));
        s.insert(15, 15);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(10, 30)]);
        assert_eq!(s.take_first(), Some(10));
        assert_eq!(s.first(), Some(11));
    }

    #[test]
    fn huge_ranges_count_exactly() {
        let mut s = RangeSet::new();
        s.insert(0, u128::MAX - 1);
        assert_eq!(s.len(), u128::MAX);
        assert!(s.take(u64::MAX as u128));
        assert_eq!(s.len(), u128::MAX - 1);
        assert_eq!(s.range_count(), 2);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, u8),
        Remove(u8, u8),
        Take(u8),
        TakeFirst,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Op::Insert(a.min(b), a.max(b))),
            (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Op::Remove(a.min(b), a.max(b))),
            any::<u8>().prop_map(Op::Take),
            Just(Op::TakeFirst),
        ]
    }

    proptest! {
        /// The range set behaves exactly like a set of integers, and stays canonical.
        #[test]
        fn matches_btreeset_model(ops in proptest::collection::vec(op(), 1..200)) {
            let mut s = RangeSet::new();
            let mut m = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Insert(a, b) => { s.insert(a as u128, b as u128); m.extend(a as u128..=b as u128); }
                    Op::Remove(a, b) => {
                        let before = m.len();
                        m.retain(|v| *v < a as u128 || *v > b as u128);
                        prop_assert_eq!(s.remove(a as u128, b as u128), (before - m.len()) as u128);
                    }
                    Op::Take(v) => prop_assert_eq!(s.take(v as u128), m.remove(&(v as u128))),
                    Op::TakeFirst => { let want = m.pop_first(); prop_assert_eq!(s.take_first(), want); }
                }
                prop_assert_eq!(s.len(), m.len() as u128);
                let flat: BTreeSet<u128> = s.iter().flat_map(|(a, b)| a..=b).collect();
                prop_assert_eq!(&flat, &m);
                // Canonical: disjoint and non-adjacent.
                let v: Vec<_> = s.iter().collect();
                for w in v.windows(2) { prop_assert!(w[0].1 + 1 < w[1].0); }
                prop_assert_eq!(s.count_within(50, 150), m.range(50..=150).count() as u128);
                prop_assert_eq!(s.intersects(50, 150), m.range(50..=150).next().is_some());
            }
        }
    }
}
