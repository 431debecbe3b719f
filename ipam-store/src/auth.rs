//! Who is calling and what they may do: the identity in a client certificate and the store's
//! authorization table, as pure functions the gRPC edge calls once per RPC.
//!
//! **Identity.** A client certificate carries exactly one SPIFFE-style URI SAN
//! `spiffe://<trust-domain>/<path>`; the path names the role:
//!
//! | path            | identity               |
//! |-----------------|------------------------|
//! | `/cluster/<id>` | [`Identity::Cluster`]  |
//! | `/cloud`        | [`Identity::Cloud`]    |
//! | `/reader`       | [`Identity::Reader`]   |
//!
//! Anything else (no `spiffe://` URI, several, another trust domain, another path, a cluster id
//! that is not a valid cluster id) is an [`IdentityError`] naming what is wrong; the edge answers
//! `UNAUTHENTICATED` with it.
//!
//! **Authorization** ([`authorize`]): method × role. "own" means every owner the call touches has
//! `cluster_id == <id>`; anything else is `PERMISSION_DENIED` naming both ids.
//!
//! | method            | `cluster/<id>`                                                      | `cloud` | `reader` | none |
//! |-------------------|---------------------------------------------------------------------|---------|----------|------|
//! | UpsertNetwork     | if it manages the network (`managed_by: cluster/<id>`, also to create one), or the upsert changes nothing (binding to a network someone else manages) | yes | no | no |
//! | GetNetwork        | yes                                                                 | yes     | yes      | no   |
//! | ListNetworks      | yes                                                                 | yes     | yes      | no   |
//! | DeleteNetwork     | no                                                                  | yes     | no       | no   |
//! | Allocate          | own                                                                 | yes     | no       | no   |
//! | Release           | own                                                                 | yes     | no       | no   |
//! | ReportConflict    | own (`cluster_id`; the holder's too)                                | yes     | no       | no   |
//! | GetAllocation     | own                                                                 | yes     | yes      | no   |
//! | ListAllocations   | only with `cluster_id` set to its own id (a request without the filter is refused, not silently narrowed) | yes | yes | no |
//! | WatchAllocations  | own filter: full events; no filter: allowed, but events of other clusters' owners are [`redact`]ed (the controller wakes pending Services when any cluster frees an address on a shared network) | yes | yes | no |
//! | GetUsage          | yes (counts only)                                                   | yes     | yes      | no   |
//! | Export            | no                                                                  | yes     | no (a full backup is an admin operation, not a dashboard read) | no |
//! | Import            | no                                                                  | yes     | no       | no   |
//!
//! Health and reflection are separate services and stay open; metrics have their own port. When
//! the store runs without TLS there is no identity and the edge does not call [`authorize`]
//! (plaintext is for development; the store warns at startup).

use std::fmt;

use cairn_proto::v1 as pb;
use rustls::pki_types::CertificateDer;

use crate::model::{NetworkDef, NetworkRecord, check_cluster_id, check_dns_subdomain};

/// The role a client certificate grants.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// One cluster's controller: acts for owners with this `cluster_id` only.
    Cluster(String),
    /// The on-prem cloud service or an administrator: everything.
    Cloud,
    /// Dashboards and other observers: read-only.
    Reader,
}

impl fmt::Display for Identity {
    /// The SPIFFE path without its leading slash, which is also the `managed_by` form:
    /// `cluster/<id>`, `cloud`, `reader`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Cluster(id) => write!(f, "cluster/{id}"),
            Identity::Cloud => f.write_str("cloud"),
            Identity::Reader => f.write_str("reader"),
        }
    }
}

/// The trust domain of accepted SPIFFE ids, e.g. `cairn.local` (`--trust-domain`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// A trust domain: lowercase letters, digits, '-', '.' (a DNS subdomain), as SPIFFE requires.
    pub fn new(td: &str) -> Result<Self, crate::Error> {
        check_dns_subdomain("trust_domain", td)?;
        Ok(TrustDomain(td.to_string()))
    }

    /// The trust domain.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE id of `identity` in this trust domain, e.g. `spiffe://cairn.local/cluster/a`.
    pub fn spiffe_id(&self, identity: &Identity) -> String {
        format!("spiffe://{}/{identity}", self.0)
    }
}

/// Why a client certificate does not name an identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The certificate could not be parsed.
    #[error("client certificate cannot be parsed: {0}")]
    Unparsable(String),
    /// No `spiffe://` URI SAN.
    #[error(
        "client certificate has no spiffe:// URI SAN (URI SANs: {found:?}); expected spiffe://{trust_domain}/cluster/<id>, /cloud or /reader"
    )]
    NoSpiffeId {
        /// The URI SANs present.
        found: Vec<String>,
        /// The expected trust domain.
        trust_domain: String,
    },
    /// More than one `spiffe://` URI SAN (SPIFFE allows exactly one).
    #[error("client certificate has several spiffe:// URI SANs {0:?}; exactly one is allowed")]
    SeveralSpiffeIds(Vec<String>),
    /// The SPIFFE id is in another trust domain.
    #[error("client certificate's SPIFFE id {uri:?} is not in trust domain {trust_domain:?}")]
    WrongTrustDomain {
        /// The SPIFFE id presented.
        uri: String,
        /// The expected trust domain.
        trust_domain: String,
    },
    /// The path names no role.
    #[error(
        "client certificate's SPIFFE id {0:?} names no role: the path must be /cluster/<id>, /cloud or /reader"
    )]
    UnknownRole(String),
    /// `/cluster/<id>` with an invalid id.
    #[error("client certificate's SPIFFE id {uri:?} has an invalid cluster id: {reason}")]
    BadClusterId {
        /// The SPIFFE id presented.
        uri: String,
        /// Why the id is invalid.
        reason: String,
    },
}

/// Parses a SPIFFE id (`spiffe://<td>/cluster/<id>`, `/cloud`, `/reader`) in trust domain `td`.
pub fn parse_spiffe_id(uri: &str, td: &TrustDomain) -> Result<Identity, IdentityError> {
    let rest = uri
        .strip_prefix("spiffe://")
        .ok_or_else(|| IdentityError::NoSpiffeId {
            found: vec![uri.to_string()],
            trust_domain: td.0.clone(),
        })?;
    let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    if domain != td.0 {
        return Err(IdentityError::WrongTrustDomain {
            uri: uri.to_string(),
            trust_domain: td.0.clone(),
        });
    }
    match path {
        "cloud" => Ok(Identity::Cloud),
        "reader" => Ok(Identity::Reader),
        _ => {
            let id = path
                .strip_prefix("cluster/")
                .ok_or_else(|| IdentityError::UnknownRole(uri.to_string()))?;
            check_cluster_id("cluster id", id).map_err(|e| IdentityError::BadClusterId {
                uri: uri.to_string(),
                reason: e.to_string(),
            })?;
            Ok(Identity::Cluster(id.to_string()))
        }
    }
}

/// The identity in an end-entity certificate (DER). Non-`spiffe://` URI SANs are ignored.
pub fn identity_from_cert(cert: &CertificateDer<'_>, td: &TrustDomain) -> Result<Identity, IdentityError> {
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let uris: Vec<String> = ee.valid_uri_names().map(str::to_string).collect();
    let spiffe: Vec<&String> = uris.iter().filter(|u| u.starts_with("spiffe://")).collect();
    match spiffe.as_slice() {
        [] => Err(IdentityError::NoSpiffeId {
            found: uris.clone(),
            trust_domain: td.0.clone(),
        }),
        [one] => parse_spiffe_id(one, td),
        several => Err(IdentityError::SeveralSpiffeIds(
            several.iter().map(|s| s.to_string()).collect(),
        )),
    }
}

/// The caller's identity: `Ok(None)` on a connection without TLS (or without a client
/// certificate), else the identity in the leaf certificate tonic recorded at the handshake.
pub fn identity_of<T>(req: &tonic::Request<T>, td: &TrustDomain) -> Result<Option<Identity>, IdentityError> {
    match req.peer_certs() {
        Some(certs) => match certs.first() {
            Some(leaf) => identity_from_cert(leaf, td).map(Some),
            None => Ok(None),
        },
        None => Ok(None),
    }
}

impl From<IdentityError> for tonic::Status {
    fn from(e: IdentityError) -> Self {
        tonic::Status::unauthenticated(e.to_string())
    }
}

/// The manager and sameness of the network an upsert would replace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Existing<'a> {
    /// Its `managed_by` now ("" = unmanaged).
    pub manager: &'a str,
    /// The upsert would leave the definition as it is (ignoring `managed_by`, as the ledger
    /// does): binding to it changes nothing.
    pub unchanged: bool,
}

impl<'a> Existing<'a> {
    /// What an upsert of `def` means for the stored `rec`, compared exactly as the ledger does
    /// (same definition apart from `managed_by` = no change).
    pub fn of(rec: &'a NetworkRecord, def: &NetworkDef) -> Self {
        let same = NetworkDef {
            managed_by: rec.def.managed_by.clone(),
            ..def.clone()
        };
        Existing {
            manager: &rec.def.managed_by,
            unchanged: rec.def == same,
        }
    }
}

/// One RPC as authorization sees it: the method and the owners / network manager it touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call<'a> {
    /// UpsertNetwork (also with `dry_run`).
    UpsertNetwork {
        /// The network's name.
        network: &'a str,
        /// `network.managed_by` in the request ("" = keep the current manager).
        requested_manager: &'a str,
        /// The network as stored now; `None` when the upsert would create it.
        existing: Option<Existing<'a>>,
    },
    /// GetNetwork.
    GetNetwork,
    /// ListNetworks.
    ListNetworks,
    /// DeleteNetwork.
    DeleteNetwork,
    /// Allocate for `owner.cluster_id`.
    Allocate {
        /// `owner.cluster_id`.
        owner_cluster: &'a str,
    },
    /// Release for `owner.cluster_id`.
    Release {
        /// `owner.cluster_id`.
        owner_cluster: &'a str,
    },
    /// ReportConflict for `cluster_id` (the holder's `cluster_id` must equal it; the ledger
    /// checks that).
    ReportConflict {
        /// The request's `cluster_id`.
        cluster: &'a str,
    },
    /// GetAllocation for `owner.cluster_id`.
    GetAllocation {
        /// `owner.cluster_id`.
        owner_cluster: &'a str,
    },
    /// ListAllocations with its `cluster_id` filter ("" = all clusters).
    ListAllocations {
        /// The request's `cluster_id`.
        cluster_filter: &'a str,
    },
    /// WatchAllocations with its `cluster_id` filter ("" = all clusters).
    WatchAllocations {
        /// The request's `cluster_id`.
        cluster_filter: &'a str,
    },
    /// GetUsage.
    GetUsage,
    /// Export.
    Export,
    /// Import.
    Import,
}

impl Call<'_> {
    /// The gRPC method name.
    pub fn method(&self) -> &'static str {
        match self {
            Call::UpsertNetwork { .. } => "UpsertNetwork",
            Call::GetNetwork => "GetNetwork",
            Call::ListNetworks => "ListNetworks",
            Call::DeleteNetwork => "DeleteNetwork",
            Call::Allocate { .. } => "Allocate",
            Call::Release { .. } => "Release",
            Call::ReportConflict { .. } => "ReportConflict",
            Call::GetAllocation { .. } => "GetAllocation",
            Call::ListAllocations { .. } => "ListAllocations",
            Call::WatchAllocations { .. } => "WatchAllocations",
            Call::GetUsage => "GetUsage",
            Call::Export => "Export",
            Call::Import => "Import",
        }
    }

    /// True for the methods that change the store (audited).
    pub fn mutates(&self) -> bool {
        matches!(
            self,
            Call::UpsertNetwork { .. }
                | Call::DeleteNetwork
                | Call::Allocate { .. }
                | Call::Release { .. }
                | Call::ReportConflict { .. }
                | Call::Import
        )
    }
}

/// A refused call. `identity` is `None` for a caller without an identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// The caller (`cluster/<id>`, `cloud`, `reader`), if any.
    pub identity: Option<String>,
    /// The method refused.
    pub method: &'static str,
    /// Why, naming the ids involved.
    pub reason: String,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.identity {
            Some(id) => write!(f, "{}: identity {id} {}", self.method, self.reason),
            None => write!(f, "{}: {}", self.method, self.reason),
        }
    }
}

impl std::error::Error for Denied {}

impl From<Denied> for tonic::Status {
    /// No identity: `UNAUTHENTICATED`; an identity without the right: `PERMISSION_DENIED`.
    fn from(d: Denied) -> Self {
        if d.identity.is_none() {
            tonic::Status::unauthenticated(d.to_string())
        } else {
            tonic::Status::permission_denied(d.to_string())
        }
    }
}

/// The authorization table (see the module docs): may `identity` make `call`?
pub fn authorize(identity: Option<&Identity>, call: &Call<'_>) -> Result<(), Denied> {
    let method = call.method();
    let Some(identity) = identity else {
        return Err(Denied {
            identity: None,
            method,
            reason: "a client certificate naming a cluster, cloud or reader identity is required".into(),
        });
    };
    let deny = |reason: String| Denied {
        identity: Some(identity.to_string()),
        method,
        reason,
    };
    match identity {
        Identity::Cloud => Ok(()),
        Identity::Reader => match call {
            Call::GetNetwork
            | Call::ListNetworks
            | Call::GetAllocation { .. }
            | Call::ListAllocations { .. }
            | Call::WatchAllocations { .. }
            | Call::GetUsage => Ok(()),
            Call::Export => Err(deny(
                "may not export: a full backup is for the cloud identity".into(),
            )),
            _ => Err(deny("is read-only".into())),
        },
        Identity::Cluster(me) => {
            let own = |owner: &str| {
                if owner == me {
                    Ok(())
                } else {
                    Err(deny(format!("may not act for cluster {owner:?}")))
                }
            };
            let manager = format!("cluster/{me}");
            match *call {
                Call::GetNetwork | Call::ListNetworks | Call::GetUsage => Ok(()),
                Call::Allocate { owner_cluster }
                | Call::Release { owner_cluster }
                | Call::GetAllocation { owner_cluster }
                | Call::ReportConflict {
                    cluster: owner_cluster,
                } => own(owner_cluster),
                Call::ListAllocations { cluster_filter } => {
                    if cluster_filter.is_empty() {
                        Err(deny(format!("must set cluster_id to {me:?} to list allocations")))
                    } else {
                        own(cluster_filter)
                    }
                }
                Call::WatchAllocations { cluster_filter } => {
                    // Unfiltered is allowed: other clusters' events arrive redacted.
                    if cluster_filter.is_empty() {
                        Ok(())
                    } else {
                        own(cluster_filter)
                    }
                }
                Call::UpsertNetwork {
                    network,
                    requested_manager,
                    existing,
                } => match existing {
                    Some(ex) if ex.unchanged => Ok(()),
                    Some(ex) if ex.manager == manager => {
                        if requested_manager.is_empty() || requested_manager == manager {
                            Ok(())
                        } else {
                            Err(deny(format!(
                                "may not hand network {network:?} to manager {requested_manager:?}"
                            )))
                        }
                    }
                    Some(ex) => Err(deny(format!(
                        "may not change network {network:?}, which is managed by {:?}; only re-applying its definition unchanged is allowed",
                        ex.manager
                    ))),
                    None if requested_manager == manager => Ok(()),
                    None => Err(deny(format!(
                        "may create network {network:?} only with managed_by {manager:?}, not {requested_manager:?}"
                    ))),
                },
                Call::DeleteNetwork | Call::Export | Call::Import => {
                    Err(deny("may not call it: it is for the cloud identity only".into()))
                }
            }
        }
    }
}

/// Whether `identity` sees the owner of an allocation held by `owner_cluster` in full.
pub fn sees_owner(identity: Option<&Identity>, owner_cluster: &str) -> bool {
    match identity {
        Some(Identity::Cluster(me)) => me == owner_cluster,
        Some(Identity::Cloud | Identity::Reader) => true,
        None => false,
    }
}

/// Strips what `identity` may not see from a watched allocation of another cluster: the owner,
/// its addresses, sharing key and ports go; network, pool, state and revision stay (enough to
/// know that something changed on a shared network).
pub fn redact(identity: Option<&Identity>, a: &mut pb::Allocation) {
    let owner_cluster = a.owner.as_ref().map_or("", |o| o.cluster_id.as_str());
    if sees_owner(identity, owner_cluster) {
        return;
    }
    a.owner = None;
    a.addresses.clear();
    a.sharing_key.clear();
    a.ports.clear();
    a.created_at = None;
    a.updated_at = None;
}

#[cfg(test)]
mod tests;
