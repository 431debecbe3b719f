//! A pool's runtime state: the addresses it spans (ranges minus exclusions and gateways) and
//! the free part of them, per family. Free = span − held − quarantined, always.

use std::net::IpAddr;

use crate::{
    alloc::{
        addr::{Family, from_u128, to_u128},
        rangeset::RangeSet,
    },
    model::{ParsedPool, PoolDef, Purpose},
};

/// One pool, ready to allocate from.
#[derive(Clone, Debug)]
pub(super) struct PoolState {
    /// Name.
    pub(super) name: String,
    /// VIP or NODE.
    pub(super) purpose: Purpose,
    /// Used without being named.
    pub(super) auto_assign: bool,
    /// Addresses that belong to the pool, per family (index = `Family::index`).
    pub(super) span: [RangeSet; 2],
    /// Addresses that may be handed out now, per family.
    pub(super) free: [RangeSet; 2],
    /// Allocations whose `pool` is this one.
    pub(super) allocations: usize,
    /// Held addresses inside the span, per family (shared addresses once). Kept by the
    /// transitions, so usage costs O(1): in grace = span − free − held.
    pub(super) held: [u128; 2],
}

impl PoolState {
    /// Builds the span; `free` starts equal to it (the caller takes out held and quarantined
    /// addresses).
    pub(super) fn new(def: &PoolDef, parsed: &ParsedPool, gateways: &[IpAddr]) -> Self {
        let mut span = [RangeSet::new(), RangeSet::new()];
        for r in &parsed.ranges {
            span[r.family.index()].insert(r.start, r.end);
        }
        for x in &parsed.exclusions {
            span[x.family.index()].remove(x.start, x.end);
        }
        for g in gateways {
            span[Family::of(g).index()].take(to_u128(g));
        }
        PoolState {
            name: def.name.clone(),
            purpose: def.purpose,
            auto_assign: def.auto_assign,
            free: span.clone(),
            span,
            allocations: 0,
            held: [0, 0],
        }
    }

    /// True when `ip` belongs to the pool.
    pub(super) fn spans(&self, ip: &IpAddr) -> bool {
        self.span[Family::of(ip).index()].contains(to_u128(ip))
    }

    /// True when the pool has any address of `family`.
    pub(super) fn has_family(&self, family: Family) -> bool {
        !self.span[family.index()].is_empty()
    }

    /// The lowest free address of `family`.
    pub(super) fn first_free(&self, family: Family) -> Option<IpAddr> {
        self.free[family.index()].first().map(|v| from_u128(family, v))
    }

    /// Addresses of `family` taken out of the free set without being held: in a reuse grace.
    pub(super) fn in_grace(&self, family: Family) -> u128 {
        let f = family.index();
        self.span[f].len() - self.free[f].len() - self.held[f]
    }

    /// Marks `ip` used; returns whether it was free.
    pub(super) fn take(&mut self, ip: &IpAddr) -> bool {
        self.free[Family::of(ip).index()].take(to_u128(ip))
    }

    /// Returns `ip` to the free set if it belongs to the pool.
    pub(super) fn give_back(&mut self, ip: &IpAddr) {
        if self.spans(ip) {
            let v = to_u128(ip);
            self.free[Family::of(ip).index()].insert(v, v);
        }
    }
}
