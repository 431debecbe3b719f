//! ReportConflict: an address a conflict probe found answered by a host the store never
//! handed it to becomes held by an unknown-host record (invariant 1 still holds: the record is
//! its one, exclusive holder), so Allocate never hands it out again.
//!
//! In one transition: the reporting holder's allocation (the owner the address was just given
//! to, if any) is removed — the squatted address passes straight to the record, with no reuse
//! grace for it (the holder never used it); its other addresses, if any, are released as usual
//! — and the record is added. An operator clears the record with Release; the address then
//! waits out the reuse grace like any released address. An address in its reuse grace is not
//! recorded: what answers for it may be its previous owner.

use std::net::IpAddr;

use super::{Change, Outcome, state::State};
use crate::{
    error::{Error, Result},
    model::{Allocation, Owner, OwnerKind, check_cluster_id, unknown_host_name},
    store::Op,
};

/// A parsed ReportConflict request.
#[derive(Clone, Debug)]
pub struct ConflictReq {
    /// Network name.
    pub network: String,
    /// The address that answered.
    pub address: IpAddr,
    /// The MAC that answered, normalised (`aa:bb:cc:dd:ee:ff`).
    pub mac: String,
    /// The reporting cluster.
    pub cluster_id: String,
    /// The owner the address was just allocated to, if any.
    pub holder: Option<Owner>,
}

/// What ReportConflict did.
#[derive(Clone, Debug)]
pub struct Reported {
    /// The unknown-host record holding the address.
    pub conflict: Allocation,
    /// False when the address was already recorded.
    pub created: bool,
    /// The holder's allocation as it was, when it was released.
    pub released: Option<Allocation>,
}

impl State {
    /// See `ReportConflict` in the proto; nothing changes on error.
    pub fn report_conflict(&mut self, req: ConflictReq, seq: u64, now_ms: u64) -> Result<Outcome<Reported>> {
        if req.network.is_empty() {
            return Err(Error::invalid("network", "is required"));
        }
        check_cluster_id("cluster_id", &req.cluster_id)?;
        if let Some(h) = &req.holder {
            h.validate("holder")?;
            if h.cluster_id != req.cluster_id {
                return Err(Error::invalid(
                    "holder.cluster_id",
                    format!("{:?} must equal cluster_id {:?}", h.cluster_id, req.cluster_id),
                ));
            }
            if h.kind == OwnerKind::UnknownHost {
                return Err(Error::invalid("holder.kind", "may not be unknown-host"));
            }
        }
        let network = req.network.as_str();
        let ip = req.address;
        if !self.networks.contains_key(network) {
            return Err(Error::NotFound(format!("network {network:?} not found")));
        }
        self.reap(network, now_ms);
        let net = &self.networks[network];
        let pi = net.pool_spanning(&ip).ok_or_else(|| {
            Error::invalid(
                "address",
                format!("{ip} is not in any pool of network {network:?}"),
            )
        })?;
        let holder_key = req.holder.as_ref().map(|h| h.key(network));
        let holders: Vec<String> = net.holders.get(&ip).cloned().unwrap_or_default();
        for h in &holders {
            let Some(a) = self.allocs.get(h) else { continue };
            if a.owner.kind == OwnerKind::UnknownHost {
                // Already recorded (a retry, or another cluster found it first).
                return Ok((
                    Reported {
                        conflict: a.clone(),
                        created: false,
                        released: None,
                    },
                    vec![],
                    vec![],
                ));
            }
            if holder_key.as_deref() != Some(h.as_str()) {
                return Err(Error::Conflict(format!(
                    "address: {ip} is held by {}, not recorded as an unknown host{}",
                    a.owner,
                    req.holder
                        .as_ref()
                        .map_or(String::new(), |o| format!(" (the holder named is {o})"))
                )));
            }
        }
        if let Some(h) = &req.holder
            && holders.is_empty()
        {
            return Err(Error::Conflict(format!(
                "holder: {h} does not hold {ip} on network {network:?}"
            )));
        }
        // What answers for an address in its grace may well be its previous owner, not yet
        // unconfigured: that is what the grace is for, not a squatter.
        if holders.is_empty()
            && let Some(q) = net.quarantine.get(&ip).or_else(|| self.released.get(&ip))
        {
            return Err(Error::Conflict(format!(
                "address: {ip} is in its reuse grace period until {} ms since epoch (released by {}); not recorded as an unknown host",
                q.until_ms, q.previous_owner
            )));
        }
        if let (Some(key), Some(h)) = (&holder_key, &req.holder)
            && let Some(a) = self.allocs.get(key)
            && !a.owner.uid.is_empty()
            && !h.uid.is_empty()
            && a.owner.uid != h.uid
        {
            return Err(Error::Conflict(format!(
                "holder.uid: the allocation of {} belongs to uid {:?}, not {:?}",
                a.owner, a.owner.uid, h.uid
            )));
        }

        // Checked; now change.
        let owner = Owner {
            cluster_id: req.cluster_id.clone(),
            kind: OwnerKind::UnknownHost,
            namespace: String::new(),
            name: unknown_host_name(&ip),
            uid: req.mac.clone(),
        };
        let key = owner.key(network);
        let mut ops = Vec::new();
        let mut changes = Vec::new();
        let mut released = None;
        match holder_key.and_then(|k| self.allocs.remove(&k).map(|a| (k, a))) {
            Some((hkey, a)) => {
                self.shared.remove(&a);
                for other in a.addresses.iter().filter(|o| **o != ip) {
                    ops.extend(self.unhold(network, &a.pool, &hkey, other, &a.owner, now_ms));
                }
                if let Some(net) = self.networks.get_mut(network) {
                    // The address stays taken and held: only its holder changes.
                    if let Some(hs) = net.holders.get_mut(&ip) {
                        hs.retain(|h| *h != hkey);
                        hs.push(key.clone());
                    }
                    if let Some(api) = net.pool(&a.pool) {
                        net.pools[api].allocations = net.pools[api].allocations.saturating_sub(1);
                    }
                }
                ops.push(Op::DelAlloc(hkey));
                changes.push(Change::Deleted(a.clone()));
                released = Some(a);
            }
            None => ops.extend(self.hold(network, pi, &key, &[ip])),
        }
        let net = &self.networks[network];
        let rec = Allocation {
            network: network.to_string(),
            pool: net.pools[pi].name.clone(),
            owner,
            addresses: vec![ip],
            sharing_key: String::new(),
            ports: vec![],
            created_ms: now_ms,
            updated_ms: now_ms,
            revision: seq,
        };
        if let Some(net) = self.networks.get_mut(network) {
            net.pools[pi].allocations += 1;
        }
        self.shared.add(&rec);
        self.allocs.insert(key, rec.clone());
        ops.push(Op::PutAlloc(rec.clone()));
        changes.push(Change::Added(rec.clone()));
        Ok((
            Reported {
                conflict: rec,
                created: true,
                released,
            },
            ops,
            changes,
        ))
    }
}
