//! The web view's JSON shapes: what `/api/v1/...` returns and what the pages render. They are
//! the contract of the JSON endpoints, kept apart from the stored model so a storage change
//! does not change the API. Counts are decimal strings (an IPv6 pool's size exceeds what JSON
//! numbers carry exactly), times are RFC 3339 in UTC.

use serde::Serialize;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::{
    alloc::addr::Family,
    ledger::{AddressInfo, Usage},
    model::{Allocation, NetworkRecord, Owner, Protocol, Quarantined},
};

/// RFC 3339 (UTC) of milliseconds since the Unix epoch.
pub fn rfc3339(ms: u64) -> String {
    i128::from(ms)
        .checked_mul(1_000_000)
        .and_then(|ns| OffsetDateTime::from_unix_timestamp_nanos(ns).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// A network with its pools and their usage.
#[derive(Clone, Debug, Serialize)]
pub struct NetworkView {
    /// Name.
    pub name: String,
    /// CIDRs, one per family.
    pub prefixes: Vec<String>,
    /// Gateways.
    pub gateways: Vec<String>,
    /// DNS servers.
    pub dns_servers: Vec<String>,
    /// 0 = untagged.
    pub vlan: u16,
    /// The network's own reuse grace; `null` = the store's default.
    pub reuse_grace_seconds: Option<u32>,
    /// Who may change it (empty = anyone allowed to).
    pub managed_by: String,
    /// Bumped by each change.
    pub version: u64,
    /// Created.
    pub created: String,
    /// Last changed.
    pub updated: String,
    /// Pools in definition order.
    pub pools: Vec<PoolView>,
}

/// A pool and its usage per family.
#[derive(Clone, Debug, Serialize)]
pub struct PoolView {
    /// Name.
    pub name: String,
    /// `VIP` or `NODE`.
    pub purpose: String,
    /// Ranges as defined.
    pub ranges: Vec<String>,
    /// Never handed out.
    pub exclusions: Vec<String>,
    /// Used without being named.
    pub auto_assign: bool,
    /// One entry per family the pool has.
    pub usage: Vec<UsageView>,
}

/// One pool family's counts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UsageView {
    /// `IPv4` or `IPv6`.
    pub family: String,
    /// Addresses in the pool.
    pub total: String,
    /// Held.
    pub used: String,
    /// Free now.
    pub free: String,
    /// Waiting out their reuse grace.
    pub in_grace: String,
    /// Held but outside the pool's current ranges.
    pub out_of_range: String,
    /// Held by unknown-host records (found in use by a host the store never handed them to).
    pub unknown_hosts: String,
    /// `used / total` in percent, for the bars (rounded to 0.1).
    pub used_percent: f64,
    /// `in_grace / total` in percent.
    pub grace_percent: f64,
}

impl UsageView {
    fn of(u: &Usage) -> Self {
        let pct = |n: u128| {
            if u.total == 0 {
                0.0
            } else {
                // f64 is exact enough for a bar; the counts themselves stay exact strings.
                ((n as f64) * 1000.0 / (u.total as f64)).round() / 10.0
            }
        };
        UsageView {
            family: u.family.to_string(),
            total: u.total.to_string(),
            used: u.used.to_string(),
            free: u.free.to_string(),
            in_grace: u.quarantined.to_string(),
            out_of_range: u.out_of_range.to_string(),
            unknown_hosts: u.unknown_hosts.to_string(),
            used_percent: pct(u.used),
            grace_percent: pct(u.quarantined),
        }
    }
}

impl NetworkView {
    /// `rec` with the usage rows of its pools (`usage` may hold other networks' rows too).
    pub fn of(rec: &NetworkRecord, usage: &[Usage]) -> Self {
        let d = &rec.def;
        let strings = |v: &[std::net::IpAddr]| v.iter().map(ToString::to_string).collect();
        NetworkView {
            name: d.name.clone(),
            prefixes: d.prefixes.iter().map(ToString::to_string).collect(),
            gateways: strings(&d.gateways),
            dns_servers: strings(&d.dns_servers),
            vlan: d.vlan,
            reuse_grace_seconds: d.reuse_grace_secs,
            managed_by: d.managed_by.clone(),
            version: rec.version,
            created: rfc3339(rec.created_ms),
            updated: rfc3339(rec.updated_ms),
            pools: d
                .pools
                .iter()
                .map(|p| PoolView {
                    name: p.name.clone(),
                    purpose: p.purpose.to_string(),
                    ranges: p.ranges.clone(),
                    exclusions: p.exclusions.clone(),
                    auto_assign: p.auto_assign,
                    usage: Family::ALL
                        .iter()
                        .filter_map(|f| {
                            usage
                                .iter()
                                .find(|u| u.network == d.name && u.pool == p.name && u.family == *f)
                        })
                        .map(UsageView::of)
                        .collect(),
                })
                .collect(),
        }
    }
}

/// Who holds an allocation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OwnerView {
    /// Cluster id.
    pub cluster: String,
    /// `api-server`, `node`, `service` or `unknown-host`.
    pub kind: String,
    /// Namespace (Services only).
    pub namespace: String,
    /// Object name.
    pub name: String,
    /// Object uid (may be empty); for `unknown-host`, the MAC that answered.
    pub uid: String,
}

impl OwnerView {
    fn of(o: &Owner) -> Self {
        OwnerView {
            cluster: o.cluster_id.clone(),
            kind: o.kind.as_str().to_string(),
            namespace: o.namespace.clone(),
            name: o.name.clone(),
            uid: o.uid.clone(),
        }
    }
}

/// One allocation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AllocationView {
    /// The ledger's key: `network/cluster/kind/namespace/name`.
    pub key: String,
    /// Network.
    pub network: String,
    /// Pool.
    pub pool: String,
    /// Holder.
    pub owner: OwnerView,
    /// One per family.
    pub addresses: Vec<String>,
    /// Empty = exclusive.
    pub sharing_key: String,
    /// `TCP/443`, ...
    pub ports: Vec<String>,
    /// Created.
    pub created: String,
    /// Last changed.
    pub updated: String,
    /// Commit sequence of the last change.
    pub revision: u64,
    /// An address lies outside its pool's current ranges.
    pub out_of_range: bool,
}

impl AllocationView {
    /// `a`, with its out-of-range flag.
    pub fn of(a: &Allocation, out_of_range: bool) -> Self {
        AllocationView {
            key: a.key(),
            network: a.network.clone(),
            pool: a.pool.clone(),
            owner: OwnerView::of(&a.owner),
            addresses: a.addresses.iter().map(ToString::to_string).collect(),
            sharing_key: a.sharing_key.clone(),
            ports: a
                .ports
                .iter()
                .map(|p| {
                    let proto = match p.protocol {
                        Protocol::Tcp => "TCP",
                        Protocol::Udp => "UDP",
                        Protocol::Sctp => "SCTP",
                    };
                    format!("{proto}/{}", p.port)
                })
                .collect(),
            created: rfc3339(a.created_ms),
            updated: rfc3339(a.updated_ms),
            revision: a.revision,
            out_of_range,
        }
    }
}

/// A page of allocations.
#[derive(Clone, Debug, Serialize)]
pub struct AllocationPage {
    /// The page.
    pub allocations: Vec<AllocationView>,
    /// Pass as `page_token` for the next page; empty = this was the last.
    pub next_page_token: String,
}

/// A recently released address in its reuse grace.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GraceView {
    /// Network.
    pub network: String,
    /// The pool it returns to.
    pub pool: String,
    /// When it may go to someone else.
    pub until: String,
    /// Who released it (and may take it back before then).
    pub previous_owner: OwnerView,
}

/// What `/api/v1/addresses/{ip}` answers.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AddressView {
    /// The address, normalised.
    pub address: String,
    /// `held`, `in-grace` or `not-held`.
    pub state: &'static str,
    /// The network whose space contains it, if any.
    pub network: Option<String>,
    /// The pool whose ranges contain it, if any.
    pub pool: Option<String>,
    /// Its holders (several only when shared).
    pub holders: Vec<AllocationView>,
    /// Its reuse grace, when recently released.
    pub grace: Option<GraceView>,
}

impl AddressView {
    /// `info`; `out_of_range` flags each holder.
    pub fn of(info: &AddressInfo, out_of_range: impl Fn(&Allocation) -> bool) -> Self {
        let grace = info.grace.as_ref().map(|q: &Quarantined| GraceView {
            network: q.network.clone(),
            pool: q.pool.clone(),
            until: rfc3339(q.until_ms),
            previous_owner: OwnerView::of(&q.previous_owner),
        });
        AddressView {
            address: info.address.to_string(),
            state: if !info.holders.is_empty() {
                "held"
            } else if grace.is_some() {
                "in-grace"
            } else {
                "not-held"
            },
            network: info.network.clone(),
            pool: info.pool.clone(),
            holders: info
                .holders
                .iter()
                .map(|a| AllocationView::of(a, out_of_range(a)))
                .collect(),
            grace,
        }
    }
}

/// One live change, as the event stream sends it.
#[derive(Clone, Debug, Serialize)]
pub struct ChangeView {
    /// `ADDED`, `MODIFIED` or `DELETED`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The commit batch's sequence.
    pub seq: u64,
    /// The allocation after the change (before it, for `DELETED`).
    pub allocation: AllocationView,
    /// The allocation's table row, rendered (and escaped) by the server.
    pub row: String,
}
