//! Whose address space is whose, fleet-wide: every network's footprint (prefixes and whole
//! pool ranges) merged per network into disjoint intervals, in one ordered map. "Does this
//! overlap another network" and "which network's space holds this address" are range
//! queries, O(log n + k), instead of comparing every pair of definitions.

use std::{collections::BTreeMap, net::IpAddr};

use crate::alloc::{
    addr::{AddrRange, Family, to_u128},
    rangeset::RangeSet,
};

/// Intervals keyed by (family index, start) → (end, network). Intervals of different
/// networks never overlap (the ledger refuses that); one network's are merged.
#[derive(Debug, Default)]
pub(super) struct Spaces {
    map: BTreeMap<(usize, u128), (u128, String)>,
}

/// A footprint merged into disjoint intervals, per family in address order: a network's
/// space. O(k log k); computed once per definition, outside the ledger's lock on upserts.
pub(super) fn merged(footprint: &[(String, AddrRange)]) -> Vec<AddrRange> {
    let mut sets = [RangeSet::new(), RangeSet::new()];
    for (_, r) in footprint {
        sets[r.family.index()].insert(r.start, r.end);
    }
    Family::ALL
        .into_iter()
        .flat_map(|family| {
            sets[family.index()]
                .iter()
                .map(move |(start, end)| AddrRange { family, start, end })
                .collect::<Vec<_>>()
        })
        .collect()
}

impl Spaces {
    /// Adds `network`'s space (its merged footprint).
    pub(super) fn insert(&mut self, network: &str, space: &[AddrRange]) {
        for r in space {
            self.map
                .insert((r.family.index(), r.start), (r.end, network.to_string()));
        }
    }

    /// Removes `network`'s space (as it was inserted).
    pub(super) fn remove(&mut self, network: &str, space: &[AddrRange]) {
        for r in space {
            let k = (r.family.index(), r.start);
            if self.map.get(&k).is_some_and(|(_, n)| n == network) {
                self.map.remove(&k);
            }
        }
    }

    /// The networks other than `except` whose space overlaps `r`, in address order.
    pub(super) fn overlapping<'a>(
        &'a self,
        r: &AddrRange,
        except: &'a str,
    ) -> impl Iterator<Item = &'a str> + 'a {
        let fi = r.family.index();
        let start = r.start;
        // Disjoint intervals sorted by start have sorted ends too: walk back from the last
        // interval starting at or before r's end until one ends before r starts.
        self.map
            .range((fi, 0)..=(fi, r.end))
            .rev()
            .take_while(move |(_, (end, _))| *end >= start)
            .map(|(_, (_, n))| n.as_str())
            .filter(move |n| *n != except)
    }

    /// The network whose space holds `ip`.
    pub(super) fn owner_of(&self, ip: &IpAddr) -> Option<&str> {
        let (fi, v) = (Family::of(ip).index(), to_u128(ip));
        self.map
            .range((fi, 0)..=(fi, v))
            .next_back()
            .filter(|(_, (end, _))| *end >= v)
            .map(|(_, (_, n))| n.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc::addr::parse_range;

    fn fp(ranges: &[&str]) -> Vec<AddrRange> {
        let fp: Vec<(String, AddrRange)> = ranges
            .iter()
            .map(|r| (r.to_string(), parse_range(r, false).unwrap()))
            .collect();
        merged(&fp)
    }

    #[test]
    fn finds_overlaps_and_owners_across_networks() {
        let mut s = Spaces::default();
        s.insert("a", &fp(&["10.0.0.0/16", "10.0.1.0/24", "fd00::/64"]));
        s.insert("b", &fp(&["10.2.0.0/16"]));
        s.insert("c", &fp(&["10.4.0.0/24", "10.4.2.0/24"]));
        let r = parse_range("10.1.255.0-10.4.1.0", false).unwrap();
        let got: Vec<&str> = s.overlapping(&r, "x").collect();
        assert_eq!(got, vec!["c", "b"]);
        assert_eq!(s.overlapping(&r, "b").collect::<Vec<_>>(), vec!["c"]);
        assert_eq!(s.owner_of(&"10.0.200.1".parse().unwrap()), Some("a"));
        assert_eq!(s.owner_of(&"fd00::9".parse().unwrap()), Some("a"));
        assert_eq!(s.owner_of(&"10.4.1.1".parse().unwrap()), None);
        s.remove("a", &fp(&["10.0.0.0/16", "10.0.1.0/24", "fd00::/64"]));
        assert_eq!(s.owner_of(&"10.0.200.1".parse().unwrap()), None);
    }
}
