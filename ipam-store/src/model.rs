//! Domain types of the ledger, independent of gRPC: what is stored and what requests carry.
//! Validation here names each offending field with the path a client sent it under.

use std::{collections::BTreeSet, fmt, net::IpAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use crate::alloc::sharing::{Port, Protocol};
use crate::{
    alloc::{
        addr::{AddrRange, Family, RangeError, parse_cidr, parse_ip, parse_range, special},
        sharing::Claim,
    },
    error::{Error, Result},
};

/// What a pool's addresses are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Purpose {
    /// API-server and Service VIPs.
    Vip,
    /// Node addresses.
    Node,
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Purpose::Vip => "VIP",
            Purpose::Node => "NODE",
        })
    }
}

/// A pool as defined by its network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolDef {
    /// Unique within the network.
    pub name: String,
    /// VIP or NODE.
    pub purpose: Purpose,
    /// CIDR, `a-b` or single-address strings, as given (trimmed).
    pub ranges: Vec<String>,
    /// Same forms, never handed out.
    pub exclusions: Vec<String>,
    /// Used without being named.
    pub auto_assign: bool,
}

/// A shared network's definition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkDef {
    /// Unique name.
    pub name: String,
    /// At most one per family.
    pub prefixes: Vec<IpNet>,
    /// At most one per family.
    pub gateways: Vec<IpAddr>,
    /// At most three per family.
    pub dns_servers: Vec<IpAddr>,
    /// 0 = untagged.
    pub vlan: u16,
    /// At least one.
    pub pools: Vec<PoolDef>,
    /// None = server default.
    pub reuse_grace_secs: Option<u32>,
    /// Who may change it.
    pub managed_by: String,
}

impl NetworkDef {
    /// Equal in everything but `managed_by` (compared in place: a definition can be
    /// megabytes, and this runs under the ledger's lock).
    pub fn same_but_manager(&self, o: &NetworkDef) -> bool {
        // Destructured, so a new field cannot be forgotten here.
        let NetworkDef {
            name,
            prefixes,
            gateways,
            dns_servers,
            vlan,
            pools,
            reuse_grace_secs,
            managed_by: _,
        } = self;
        *name == o.name
            && *prefixes == o.prefixes
            && *gateways == o.gateways
            && *dns_servers == o.dns_servers
            && *vlan == o.vlan
            && *pools == o.pools
            && *reuse_grace_secs == o.reuse_grace_secs
    }
}

/// A stored network: the definition plus bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// The definition.
    pub def: NetworkDef,
    /// Bumped by each change.
    pub version: u64,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Milliseconds since the Unix epoch.
    pub updated_ms: u64,
}

/// What kind of object holds an allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum OwnerKind {
    /// A cluster's API-server VIP.
    ApiServer,
    /// A node.
    Node,
    /// A LoadBalancer Service.
    Service,
    /// An address a conflict probe found answered by a host the store never handed it to
    /// (`ReportConflict`): `name` is [`unknown_host_name`] of the address, `uid` the MAC that
    /// answered, `cluster_id` the reporting cluster. Never handed out by Allocate; an operator
    /// clears it with Release. Kept last: stored records name kinds by position.
    UnknownHost,
}

impl OwnerKind {
    /// The stable name used in keys and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            OwnerKind::ApiServer => "api-server",
            OwnerKind::Node => "node",
            OwnerKind::Service => "service",
            OwnerKind::UnknownHost => "unknown-host",
        }
    }

    /// The pool purpose this kind draws from by default.
    pub fn default_purpose(self) -> Purpose {
        match self {
            OwnerKind::Node => Purpose::Node,
            OwnerKind::ApiServer | OwnerKind::Service | OwnerKind::UnknownHost => Purpose::Vip,
        }
    }
}

/// The owner name of an unknown-host record for `ip`: the address itself, with IPv6 written
/// in full and `-` for `:` so that it is a DNS subdomain (`2001-0db8-0000-…-0010`).
pub fn unknown_host_name(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => v6
            .segments()
            .iter()
            .map(|s| format!("{s:04x}"))
            .collect::<Vec<_>>()
            .join("-"),
    }
}

/// A MAC address as `aa:bb:cc:dd:ee:ff`; accepts `-` or `:` separators and either case.
pub fn parse_mac(field: &str, s: &str) -> Result<String> {
    let octets: Vec<&str> = s.split([':', '-']).collect();
    if octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        Ok(octets.join(":").to_ascii_lowercase())
    } else {
        Err(Error::invalid(
            field,
            format!("{s:?} is not a MAC address (six hex octets, e.g. 52:54:00:12:34:56)"),
        ))
    }
}

/// Who holds an allocation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Owner {
    /// The cluster.
    pub cluster_id: String,
    /// The object kind.
    pub kind: OwnerKind,
    /// Namespace (Services only).
    pub namespace: String,
    /// Object name.
    pub name: String,
    /// Object uid; may be empty.
    pub uid: String,
}

impl Owner {
    /// The allocation key of this owner on `network`: unique, ordered, `/`-separated (no
    /// component can contain `/`, validation guarantees it).
    pub fn key(&self, network: &str) -> String {
        format!(
            "{network}/{}/{}/{}/{}",
            self.cluster_id,
            self.kind.as_str(),
            self.namespace,
            self.name
        )
    }

    /// Validates the owner; `field` is its path in the request.
    pub fn validate(&self, field: &str) -> Result<()> {
        check_cluster_id(&format!("{field}.cluster_id"), &self.cluster_id)?;
        match self.kind {
            OwnerKind::Service => check_dns_label(&format!("{field}.namespace"), &self.namespace)?,
            _ if !self.namespace.is_empty() => {
                return Err(Error::invalid(
                    format!("{field}.namespace"),
                    format!("must be empty for kind {}", self.kind.as_str()),
                ));
            }
            _ => {}
        }
        check_dns_subdomain(&format!("{field}.name"), &self.name)?;
        if self.uid.len() > 128 || self.uid.chars().any(|c| c.is_control() || c == '/') {
            return Err(Error::invalid(
                format!("{field}.uid"),
                "at most 128 printable characters, no '/'",
            ));
        }
        Ok(())
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(
                f,
                "cluster {} {} {}",
                self.cluster_id,
                self.kind.as_str(),
                self.name
            )
        } else {
            write!(
                f,
                "cluster {} {} {}/{}",
                self.cluster_id,
                self.kind.as_str(),
                self.namespace,
                self.name
            )
        }
    }
}

/// An owner's addresses on one network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// Network name.
    pub network: String,
    /// Pool name.
    pub pool: String,
    /// The holder.
    pub owner: Owner,
    /// At most one per family, in the order they were requested.
    pub addresses: Vec<IpAddr>,
    /// Empty = exclusive.
    pub sharing_key: String,
    /// Ports served on the addresses (sorted, unique).
    pub ports: Vec<Port>,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Milliseconds since the Unix epoch.
    pub updated_ms: u64,
    /// Commit sequence of the last change.
    pub revision: u64,
}

impl Allocation {
    /// The allocation key.
    pub fn key(&self) -> String {
        self.owner.key(&self.network)
    }

    /// The address of `family`, if held.
    pub fn address_of(&self, family: Family) -> Option<IpAddr> {
        self.addresses.iter().copied().find(|a| Family::of(a) == family)
    }

    /// This allocation's side of the sharing rule.
    pub fn claim(&self) -> Claim<'_> {
        Claim {
            cluster_id: &self.owner.cluster_id,
            sharing_key: &self.sharing_key,
            ports: &self.ports,
        }
    }
}

/// A released address waiting out its reuse grace period.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    /// Network name.
    pub network: String,
    /// Pool it returns to.
    pub pool: String,
    /// The address.
    pub address: IpAddr,
    /// Milliseconds since the Unix epoch.
    pub until_ms: u64,
    /// The owner that released it, which may take it back early.
    pub previous_owner: Owner,
}

/// Parsed, validated pool ranges, ready for the allocator.
#[derive(Clone, Debug)]
pub struct ParsedPool {
    /// Ranges, in the definition's order.
    pub ranges: Vec<AddrRange>,
    /// Exclusions.
    pub exclusions: Vec<AddrRange>,
}

/// Lowercase letters, digits and '-', 1..=63, starting and ending alphanumeric.
pub fn check_dns_label(field: &str, v: &str) -> Result<()> {
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !v.starts_with('-')
        && !v.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!(
                "{v:?} must be 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit"
            ),
        ))
    }
}

/// A DNS subdomain: dot-separated labels, at most 253 characters.
pub fn check_dns_subdomain(field: &str, v: &str) -> Result<()> {
    let ok = !v.is_empty()
        && v.len() <= 253
        && v.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!(
                "{v:?} must be a DNS subdomain: lowercase letters, digits, '-' and '.', at most 253 characters"
            ),
        ))
    }
}

/// Cluster ids: a DNS subdomain of at most 63 characters (the one rule, shared with
/// `cairn-ccm --cluster-id`).
pub fn check_cluster_id(field: &str, v: &str) -> Result<()> {
    cairn_runtime::check_cluster_id(field, v).map_err(|e| Error::invalid(e.field, e.message))
}

/// Validates ports: 1..=65535, no duplicates. Returns them sorted.
pub fn check_ports(field: &str, ports: &[(Protocol, u32)]) -> Result<Vec<Port>> {
    if ports.len() > MAX_PORTS {
        return Err(Error::invalid(
            field,
            format!("{} ports; at most {MAX_PORTS}", ports.len()),
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, (protocol, port)) in ports.iter().enumerate() {
        if *port == 0 || *port > 65535 {
            return Err(Error::invalid(
                format!("{field}[{i}].port"),
                format!("{port} is not in 1..65535"),
            ));
        }
        let p = Port {
            protocol: *protocol,
            port: *port as u16,
        };
        if !seen.insert(p) {
            return Err(Error::invalid(
                format!("{field}[{i}]"),
                format!("duplicate port {protocol:?}/{port}"),
            ));
        }
    }
    Ok(seen.into_iter().collect())
}

/// Upper bound on the reuse grace period (7 days): longer is a typo, not a policy.
pub const MAX_REUSE_GRACE_SECS: u32 = 7 * 24 * 3600;
/// Pools per network (documented in the proto).
pub const MAX_POOLS: usize = 64;
/// Ranges, and exclusions, per pool (documented in the proto).
pub const MAX_RANGES: usize = 1024;
/// Ports per allocation (documented in the proto).
pub const MAX_PORTS: usize = 1024;

impl NetworkDef {
    /// Validates everything that can be checked without other networks, and parses the pools.
    /// Field paths are relative to `network`.
    pub fn validate(&self) -> Result<Vec<ParsedPool>> {
        check_dns_label("network.name", &self.name)?;
        if !self.managed_by.is_empty()
            && (self.managed_by.len() > 253 || self.managed_by.chars().any(char::is_control))
        {
            return Err(Error::invalid(
                "network.managed_by",
                "at most 253 printable characters",
            ));
        }
        let mut fams = BTreeSet::new();
        for (i, p) in self.prefixes.iter().enumerate() {
            if p.trunc() != *p {
                return Err(Error::invalid(
                    format!("network.prefixes[{i}]"),
                    format!("{p} has host bits set; did you mean {}?", p.trunc()),
                ));
            }
            if !fams.insert(Family::of(&p.addr())) {
                return Err(Error::invalid(
                    format!("network.prefixes[{i}]"),
                    format!(
                        "a second {} prefix; at most one per family",
                        Family::of(&p.addr())
                    ),
                ));
            }
        }
        let prefix_of = |f: Family| self.prefixes.iter().find(|p| Family::of(&p.addr()) == f);
        let mut gw_fams = BTreeSet::new();
        for (i, g) in self.gateways.iter().enumerate() {
            let f = Family::of(g);
            if !gw_fams.insert(f) {
                return Err(Error::invalid(
                    format!("network.gateways[{i}]"),
                    format!("a second {f} gateway"),
                ));
            }
            if let Some(p) = prefix_of(f)
                && !p.contains(g)
            {
                return Err(Error::invalid(
                    format!("network.gateways[{i}]"),
                    format!("{g} is outside prefix {p}"),
                ));
            }
        }
        for f in Family::ALL {
            if self.dns_servers.iter().filter(|d| Family::of(d) == f).count() > 3 {
                return Err(Error::invalid(
                    "network.dns_servers",
                    format!("more than 3 {f} servers"),
                ));
            }
        }
        if self.vlan > 4094 {
            return Err(Error::invalid(
                "network.vlan",
                format!("{} is not in 0..4094", self.vlan),
            ));
        }
        if let Some(g) = self.reuse_grace_secs
            && g > MAX_REUSE_GRACE_SECS
        {
            return Err(Error::invalid(
                "network.reuse_grace_seconds",
                format!("{g} exceeds the maximum of {MAX_REUSE_GRACE_SECS} (7 days)"),
            ));
        }
        if self.pools.is_empty() {
            return Err(Error::invalid("network.pools", "at least one pool is required"));
        }
        if self.pools.len() > MAX_POOLS {
            return Err(Error::invalid(
                "network.pools",
                format!("{} pools; at most {MAX_POOLS} per network", self.pools.len()),
            ));
        }
        let mut names = BTreeSet::new();
        let mut parsed = Vec::with_capacity(self.pools.len());
        // (range, pool index, range index) of every pool range, for overlap errors naming both.
        let mut all: Vec<(AddrRange, usize, usize)> = Vec::new();
        for (pi, pool) in self.pools.iter().enumerate() {
            let pf = format!("network.pools[{pi}]");
            check_dns_label(&format!("{pf}.name"), &pool.name)?;
            if !names.insert(pool.name.as_str()) {
                return Err(Error::invalid(
                    format!("{pf}.name"),
                    format!("duplicate pool name {:?}", pool.name),
                ));
            }
            if pool.ranges.is_empty() {
                return Err(Error::invalid(
                    format!("{pf}.ranges"),
                    "at least one range is required",
                ));
            }
            if pool.ranges.len() > MAX_RANGES {
                return Err(Error::invalid(
                    format!("{pf}.ranges"),
                    format!("{} ranges; at most {MAX_RANGES} per pool", pool.ranges.len()),
                ));
            }
            if pool.exclusions.len() > MAX_RANGES {
                return Err(Error::invalid(
                    format!("{pf}.exclusions"),
                    format!(
                        "{} exclusions; at most {MAX_RANGES} per pool",
                        pool.exclusions.len()
                    ),
                ));
            }
            let mut ranges = Vec::with_capacity(pool.ranges.len());
            // Addresses per family minus one; a pool's count must fit in u128 (so not all of
            // IPv6), or the free-space arithmetic would overflow.
            let mut size: [Option<u128>; 2] = [None, None];
            for (ri, r) in pool.ranges.iter().enumerate() {
                let field = format!("{pf}.ranges[{ri}]");
                let rg = parse_range(r, true).map_err(|e| Error::invalid(&field, e))?;
                if let Some(what) = parse_range(r, false).ok().as_ref().and_then(special) {
                    return Err(Error::invalid(&field, format!("{r} contains {what}")));
                }
                let f = rg.family.index();
                size[f] = match size[f] {
                    None => Some(rg.end - rg.start),
                    Some(n) => (rg.end - rg.start).checked_add(1).and_then(|m| n.checked_add(m)),
                };
                if size[f].is_none_or(|n| n == u128::MAX) {
                    return Err(Error::invalid(
                        &field,
                        format!("{r}: the pool would hold all 2^128 IPv6 addresses; use a smaller range"),
                    ));
                }
                if let Some(p) = prefix_of(rg.family) {
                    let pr = crate::alloc::addr::net_range(p);
                    if rg.start < pr.start || rg.end > pr.end {
                        return Err(Error::invalid(&field, format!("{r} is outside prefix {p}")));
                    }
                }
                all.push((rg, pi, ri));
                ranges.push(rg);
            }
            let mut exclusions = Vec::with_capacity(pool.exclusions.len());
            for (ei, x) in pool.exclusions.iter().enumerate() {
                let rg =
                    parse_range(x, false).map_err(|e| Error::invalid(format!("{pf}.exclusions[{ei}]"), e))?;
                exclusions.push(rg);
            }
            parsed.push(ParsedPool { ranges, exclusions });
        }
        // Pool ranges may not overlap, within a pool or across pools: sorted by start, a range
        // overlaps an earlier one exactly when it starts before the furthest end seen so far.
        // O(r log r), where comparing every pair was O(r²).
        all.sort_by_key(|(r, pi, ri)| (r.family, r.start, *pi, *ri));
        let mut furthest: Option<(AddrRange, usize, usize)> = None;
        for &(rg, pi, ri) in &all {
            if let Some((prev, ppi, pri)) = furthest
                && prev.family == rg.family
                && rg.start <= prev.end
            {
                // Name the later-defined range as the field, the earlier in the message.
                let ((lpi, lri), (epi, eri)) = if (pi, ri) > (ppi, pri) {
                    ((pi, ri), (ppi, pri))
                } else {
                    ((ppi, pri), (pi, ri))
                };
                return Err(Error::invalid(
                    format!("network.pools[{lpi}].ranges[{lri}]"),
                    format!(
                        "{} overlaps network.pools[{epi}].ranges[{eri}] ({}) of pool {:?}",
                        self.pools[lpi].ranges[lri], self.pools[epi].ranges[eri], self.pools[epi].name
                    ),
                ));
            }
            if furthest.is_none_or(|(prev, _, _)| prev.family != rg.family || rg.end > prev.end) {
                furthest = Some((rg, pi, ri));
            }
        }
        Ok(parsed)
    }

    /// Every address span the network claims, for overlap checks between networks: its
    /// prefixes, and pool ranges (which matter where no prefix of their family is set).
    pub fn footprint(&self, parsed: &[ParsedPool]) -> Vec<(String, AddrRange)> {
        let mut out: Vec<(String, AddrRange)> = self
            .prefixes
            .iter()
            .map(|p| (format!("prefix {p}"), crate::alloc::addr::net_range(p)))
            .collect();
        // Whole CIDRs, network and broadcast included: a network claims all of them.
        for (pool, pp) in self.pools.iter().zip(parsed) {
            for (s, r) in pool.ranges.iter().zip(&pp.ranges) {
                let whole = parse_range(s, false).unwrap_or(*r);
                out.push((format!("pool {:?} range {s}", pool.name), whole));
            }
        }
        out
    }
}

/// Parses a CIDR for a field, naming it on error.
pub fn parse_prefix(field: &str, s: &str) -> Result<IpNet> {
    parse_cidr(s).map_err(|e| Error::invalid(field, e))
}

/// Parses an address for a field, naming it on error.
pub fn parse_addr(field: &str, s: &str) -> Result<IpAddr> {
    parse_ip(s).map_err(|e| match e {
        RangeError::Syntax(_) => Error::invalid(field, format!("{s:?} is not an IP address")),
        e => Error::invalid(field, e),
    })
}
