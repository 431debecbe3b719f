//! Proto ⇄ domain conversion. Parsing names each bad field with the path the client sent it
//! under; nothing here touches the ledger.

use cairn_proto::v1 as pb;

use crate::{
    alloc::addr::Family,
    error::Error,
    ledger::{ListFilter, Usage},
    model::{
        self, Allocation, NetworkDef, NetworkRecord, Owner, OwnerKind, PoolDef, Port, Protocol, Purpose,
        Quarantined,
    },
    store::Snapshot,
};

pub(super) fn ts(ms: u64) -> cairn_proto::Timestamp {
    cairn_proto::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

pub(super) fn ms(t: Option<&cairn_proto::Timestamp>) -> u64 {
    t.map_or(0, |t| {
        (t.seconds.max(0) as u64) * 1000 + (t.nanos.max(0) as u64) / 1_000_000
    })
}

/// An optional purpose: `None` when unspecified.
pub(super) fn purpose_from(field: &str, v: i32) -> Result<Option<Purpose>, Error> {
    match pb::PoolPurpose::try_from(v) {
        Ok(pb::PoolPurpose::Vip) => Ok(Some(Purpose::Vip)),
        Ok(pb::PoolPurpose::Node) => Ok(Some(Purpose::Node)),
        Ok(pb::PoolPurpose::Unspecified) => Ok(None),
        Err(_) => Err(Error::invalid(field, format!("unknown value {v}"))),
    }
}

/// A purpose that must be given.
pub(super) fn required_purpose_from(field: &str, v: i32) -> Result<Purpose, Error> {
    purpose_from(field, v)?
        .ok_or_else(|| Error::invalid(field, "is required (POOL_PURPOSE_VIP or POOL_PURPOSE_NODE)"))
}

pub(super) fn purpose_to(p: Purpose) -> pb::PoolPurpose {
    match p {
        Purpose::Vip => pb::PoolPurpose::Vip,
        Purpose::Node => pb::PoolPurpose::Node,
    }
}

pub(super) fn kind_from(field: &str, v: i32) -> Result<OwnerKind, Error> {
    match pb::OwnerKind::try_from(v) {
        Ok(pb::OwnerKind::ApiServer) => Ok(OwnerKind::ApiServer),
        Ok(pb::OwnerKind::Node) => Ok(OwnerKind::Node),
        Ok(pb::OwnerKind::Service) => Ok(OwnerKind::Service),
        Ok(pb::OwnerKind::UnknownHost) => Ok(OwnerKind::UnknownHost),
        Ok(pb::OwnerKind::Unspecified) => Err(Error::invalid(
            field,
            "is required (OWNER_KIND_API_SERVER, _NODE, _SERVICE or _UNKNOWN_HOST)",
        )),
        Err(_) => Err(Error::invalid(field, format!("unknown value {v}"))),
    }
}

pub(super) fn kind_to(k: OwnerKind) -> pb::OwnerKind {
    match k {
        OwnerKind::ApiServer => pb::OwnerKind::ApiServer,
        OwnerKind::Node => pb::OwnerKind::Node,
        OwnerKind::Service => pb::OwnerKind::Service,
        OwnerKind::UnknownHost => pb::OwnerKind::UnknownHost,
    }
}

pub(super) fn family_from(field: &str, v: i32) -> Result<Family, Error> {
    match pb::IpFamily::try_from(v) {
        Ok(pb::IpFamily::Ipv4) => Ok(Family::V4),
        Ok(pb::IpFamily::Ipv6) => Ok(Family::V6),
        Ok(pb::IpFamily::Unspecified) => Err(Error::invalid(field, "IP_FAMILY_UNSPECIFIED is not a family")),
        Err(_) => Err(Error::invalid(field, format!("unknown value {v}"))),
    }
}

pub(super) fn family_to(f: Family) -> pb::IpFamily {
    match f {
        Family::V4 => pb::IpFamily::Ipv4,
        Family::V6 => pb::IpFamily::Ipv6,
    }
}

pub(super) fn protocol_from(field: &str, v: i32) -> Result<Protocol, Error> {
    match pb::Protocol::try_from(v) {
        Ok(pb::Protocol::Tcp) => Ok(Protocol::Tcp),
        Ok(pb::Protocol::Udp) => Ok(Protocol::Udp),
        Ok(pb::Protocol::Sctp) => Ok(Protocol::Sctp),
        Ok(pb::Protocol::Unspecified) => {
            Err(Error::invalid(field, "is required (PROTOCOL_TCP, _UDP or _SCTP)"))
        }
        Err(_) => Err(Error::invalid(field, format!("unknown value {v}"))),
    }
}

pub(super) fn protocol_to(p: Protocol) -> pb::Protocol {
    match p {
        Protocol::Tcp => pb::Protocol::Tcp,
        Protocol::Udp => pb::Protocol::Udp,
        Protocol::Sctp => pb::Protocol::Sctp,
    }
}

/// Parses an owner; `field` is its path.
pub(super) fn owner_from(field: &str, o: Option<pb::Owner>) -> Result<Owner, Error> {
    let o = o.ok_or_else(|| Error::invalid(field, "is required"))?;
    let owner = Owner {
        cluster_id: o.cluster_id,
        kind: kind_from(&format!("{field}.kind"), o.kind)?,
        namespace: o.namespace,
        name: o.name,
        uid: o.uid,
    };
    owner.validate(field)?;
    Ok(owner)
}

pub(super) fn owner_to(o: &Owner) -> pb::Owner {
    pb::Owner {
        cluster_id: o.cluster_id.clone(),
        kind: kind_to(o.kind) as i32,
        namespace: o.namespace.clone(),
        name: o.name.clone(),
        uid: o.uid.clone(),
    }
}

/// Parses a network definition; field paths start at `network`.
pub(super) fn network_from(n: Option<pb::Network>) -> Result<NetworkDef, Error> {
    let n = n.ok_or_else(|| Error::invalid("network", "is required"))?;
    let prefixes = n
        .prefixes
        .iter()
        .enumerate()
        .map(|(i, p)| model::parse_prefix(&format!("network.prefixes[{i}]"), p))
        .collect::<Result<_, _>>()?;
    let gateways = n
        .gateways
        .iter()
        .enumerate()
        .map(|(i, g)| model::parse_addr(&format!("network.gateways[{i}]"), g))
        .collect::<Result<_, _>>()?;
    let dns_servers = n
        .dns_servers
        .iter()
        .enumerate()
        .map(|(i, g)| model::parse_addr(&format!("network.dns_servers[{i}]"), g))
        .collect::<Result<_, _>>()?;
    let vlan = u16::try_from(n.vlan)
        .map_err(|_| Error::invalid("network.vlan", format!("{} is not in 0..4094", n.vlan)))?;
    let pools = n
        .pools
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            Ok(PoolDef {
                purpose: required_purpose_from(&format!("network.pools[{i}].purpose"), p.purpose)?,
                name: p.name,
                ranges: p.ranges.into_iter().map(|r| r.trim().to_string()).collect(),
                exclusions: p.exclusions.into_iter().map(|r| r.trim().to_string()).collect(),
                auto_assign: p.auto_assign.unwrap_or(true),
            })
        })
        .collect::<Result<_, Error>>()?;
    Ok(NetworkDef {
        name: n.name,
        prefixes,
        gateways,
        dns_servers,
        vlan,
        pools,
        reuse_grace_secs: n.reuse_grace_seconds,
        managed_by: n.managed_by,
    })
}

/// Renders a stored network.
pub(super) fn network_to(r: &NetworkRecord) -> pb::Network {
    let d = &r.def;
    pb::Network {
        name: d.name.clone(),
        prefixes: d.prefixes.iter().map(ToString::to_string).collect(),
        gateways: d.gateways.iter().map(ToString::to_string).collect(),
        dns_servers: d.dns_servers.iter().map(ToString::to_string).collect(),
        vlan: u32::from(d.vlan),
        pools: d
            .pools
            .iter()
            .map(|p| pb::Pool {
                name: p.name.clone(),
                purpose: purpose_to(p.purpose) as i32,
                ranges: p.ranges.clone(),
                exclusions: p.exclusions.clone(),
                auto_assign: Some(p.auto_assign),
            })
            .collect(),
        reuse_grace_seconds: d.reuse_grace_secs,
        managed_by: d.managed_by.clone(),
        version: r.version,
        created_at: Some(ts(r.created_ms)),
        updated_at: Some(ts(r.updated_ms)),
    }
}

pub(super) fn ports_from(ports: &[pb::PortSpec]) -> Result<Vec<Port>, Error> {
    let raw = ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Ok((
                protocol_from(&format!("ports[{i}].protocol"), p.protocol)?,
                p.port,
            ))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    model::check_ports("ports", &raw)
}

pub(super) fn allocation_to(a: &Allocation, out_of_range: bool) -> pb::Allocation {
    pb::Allocation {
        network: a.network.clone(),
        pool: a.pool.clone(),
        owner: Some(owner_to(&a.owner)),
        addresses: a.addresses.iter().map(ToString::to_string).collect(),
        sharing_key: a.sharing_key.clone(),
        ports: a
            .ports
            .iter()
            .map(|p| pb::PortSpec {
                protocol: protocol_to(p.protocol) as i32,
                port: u32::from(p.port),
            })
            .collect(),
        state: if out_of_range {
            pb::AllocationState::OutOfRange
        } else {
            pb::AllocationState::Active
        } as i32,
        created_at: Some(ts(a.created_ms)),
        updated_at: Some(ts(a.updated_ms)),
        revision: a.revision,
    }
}

pub(super) fn allocation_from(i: usize, a: pb::Allocation) -> Result<Allocation, Error> {
    let f = format!("backup.allocations[{i}]");
    let ports = a
        .ports
        .iter()
        .enumerate()
        .map(|(j, p)| {
            Ok((
                protocol_from(&format!("{f}.ports[{j}].protocol"), p.protocol)?,
                p.port,
            ))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(Allocation {
        owner: owner_from(&format!("{f}.owner"), a.owner)?,
        addresses: a
            .addresses
            .iter()
            .enumerate()
            .map(|(j, s)| model::parse_addr(&format!("{f}.addresses[{j}]"), s))
            .collect::<Result<_, _>>()?,
        ports: model::check_ports(&format!("{f}.ports"), &ports)?,
        created_ms: ms(a.created_at.as_ref()),
        updated_ms: ms(a.updated_at.as_ref()),
        network: a.network,
        pool: a.pool,
        sharing_key: a.sharing_key,
        revision: a.revision,
    })
}

pub(super) fn usage_to(u: &Usage) -> pb::PoolUsage {
    pb::PoolUsage {
        network: u.network.clone(),
        pool: u.pool.clone(),
        purpose: purpose_to(u.purpose) as i32,
        family: family_to(u.family) as i32,
        total: u.total.to_string(),
        used: u.used.to_string(),
        free: u.free.to_string(),
        quarantined: u.quarantined.to_string(),
        out_of_range: u.out_of_range.to_string(),
        unknown_hosts: u.unknown_hosts.to_string(),
    }
}

/// Builds an `ExportResponse` from a snapshot and its allocations' out-of-range flags.
pub(super) fn export_to(s: &Snapshot, flags: &[bool]) -> pb::ExportResponse {
    pb::ExportResponse {
        networks: s.networks.iter().map(network_to).collect(),
        allocations: s
            .allocations
            .iter()
            .zip(flags.iter().copied().chain(std::iter::repeat(false)))
            .map(|(a, oor)| allocation_to(a, oor))
            .collect(),
        quarantined: s.quarantined.iter().map(quarantined_to).collect(),
        exported_at: Some(ts(crate::ledger::now_ms())),
    }
}

pub(super) fn quarantined_to(q: &Quarantined) -> pb::QuarantinedAddress {
    pb::QuarantinedAddress {
        network: q.network.clone(),
        pool: q.pool.clone(),
        address: q.address.to_string(),
        until: Some(ts(q.until_ms)),
        previous_owner: Some(owner_to(&q.previous_owner)),
    }
}

pub(super) fn import_from(b: pb::ExportResponse) -> Result<Snapshot, Error> {
    let mut networks = Vec::new();
    for (i, n) in b.networks.into_iter().enumerate() {
        let (version, c, u) = (
            n.version.max(1),
            ms(n.created_at.as_ref()),
            ms(n.updated_at.as_ref()),
        );
        let def = network_from(Some(n)).map_err(|e| Error::invalid(format!("backup.networks[{i}]"), e))?;
        networks.push(NetworkRecord {
            def,
            version,
            created_ms: c,
            updated_ms: u,
        });
    }
    let allocations = b
        .allocations
        .into_iter()
        .enumerate()
        .map(|(i, a)| allocation_from(i, a))
        .collect::<Result<_, _>>()?;
    let quarantined = b
        .quarantined
        .into_iter()
        .enumerate()
        .map(|(i, q)| {
            let f = format!("backup.quarantined[{i}]");
            Ok(Quarantined {
                address: model::parse_addr(&format!("{f}.address"), &q.address)?,
                until_ms: ms(q.until.as_ref()),
                previous_owner: owner_from(&format!("{f}.previous_owner"), q.previous_owner)?,
                network: q.network,
                pool: q.pool,
            })
        })
        .collect::<Result<_, Error>>()?;
    Ok(Snapshot {
        networks,
        allocations,
        quarantined,
        seq: 0,
    })
}

pub(super) fn filter(
    network: &str,
    cluster: &str,
    pool: &str,
    kind: i32,
    address: &str,
) -> Result<ListFilter, Error> {
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
    Ok(ListFilter {
        network: opt(network),
        pool: opt(pool),
        cluster_id: opt(cluster),
        kind: if kind == 0 {
            None
        } else {
            Some(kind_from("kind", kind)?)
        },
        address: if address.is_empty() {
            None
        } else {
            Some(model::parse_addr("address", address)?)
        },
        namespace: None,
        name: None,
    })
}
