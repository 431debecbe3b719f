//! What HAProxy should serve, computed from the cluster's objects. Pure: no I/O, no clock;
//! the same objects give the same [`LbConfig`], whatever order they come in.
//!
//! - One proxy (frontend + backend) per Service port: `VIP:port` for every ingress VIP of a
//!   LoadBalancer Service this agent serves ([`crate::svc::wants_lb`]), to
//!   `nodeIP:nodePort` of the eligible nodes. Only TCP ports: UDP and SCTP ports are skipped
//!   with a [`Warning`].
//! - Eligible node: `Ready=True`, schedulable, not being deleted, initialised (no
//!   `node.cloudprovider.kubernetes.io/uninitialized` taint), not labelled
//!   `node.kubernetes.io/exclude-from-external-load-balancers`, with an `InternalIP`.
//! - `externalTrafficPolicy: Local`: only eligible nodes that run a ready endpoint of the
//!   Service (EndpointSlices, `nodeName`), health-checked with HTTP on `healthCheckNodePort`.
//!   `Cluster`: every eligible node, with a TCP check on the nodePort.
//! - The API-server VIP(s) `:6443` → nodes labelled `node-role.kubernetes.io/control-plane`
//!   (Ready, not being deleted) `:6443`, checked with HTTPS `GET /readyz`.
//! - Two proxies never bind the same `VIP:port`: the API server wins, then the older Service;
//!   the loser is skipped with a [`Warning`].

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::ResourceExt;

use crate::{
    UNINITIALIZED_TAINT,
    svc::{ingress_ips, wants_lb},
};

/// The legacy form of `spec.loadBalancerSourceRanges` (comma-separated CIDRs), still honoured
/// by Kubernetes' own cloud providers; ignoring it would open a Service its owner restricted.
pub const LEGACY_SOURCE_RANGES: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";

/// Nodes with this label never receive load-balancer traffic.
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";
/// Nodes with this label run an API server.
pub const CONTROL_PLANE_LABEL: &str = "node-role.kubernetes.io/control-plane";
/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Name of the API-server proxy.
pub const API_SERVER_PROXY: &str = "api-server";

/// A Service, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl std::fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How HAProxy checks a backend server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// TCP connect to the server's address.
    Tcp,
    /// Plain HTTP `GET path` on another port of the server (kube-proxy's per-Service health
    /// server on `healthCheckNodePort`).
    Http {
        /// Request path.
        path: &'static str,
        /// Port.
        port: u16,
    },
    /// HTTPS `GET path` on the server's own port, certificate not verified (the API server).
    Https {
        /// Request path.
        path: &'static str,
    },
}

/// One backend server: a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Server {
    /// The node's name.
    pub name: String,
    /// `nodeIP:nodePort`.
    pub addr: SocketAddr,
}

/// A frontend and its backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proxy {
    /// `api-server`, or `svc:<namespace>:<name>:<port>`.
    pub name: String,
    /// The Service it serves (none for the API server).
    pub owner: Option<ServiceRef>,
    /// `VIP:port` addresses to listen on.
    pub binds: Vec<SocketAddr>,
    /// Health check of the servers.
    pub check: Check,
    /// Servers, sorted by name. May be empty (connections are then refused after accept).
    pub servers: Vec<Server>,
    /// Client CIDRs allowed (`spec.loadBalancerSourceRanges`); `None`: everyone.
    pub source_ranges: Option<Vec<String>>,
}

/// Settings that come from flags, not from the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The stats/health frontend (`/stats`, `/healthz`), normally on loopback.
    pub stats: Option<SocketAddr>,
    /// How long old workers may keep serving established connections after a reload.
    pub hard_stop_after: Duration,
    /// Global connection limit (none: HAProxy derives it from its file-descriptor limit).
    pub maxconn: Option<u32>,
    /// User and group the workers run as (the master keeps its own).
    pub user: Option<String>,
    /// See `user`.
    pub group: Option<String>,
    /// A `log` target for traffic logs, e.g. `/dev/log local0` (none: no traffic logs).
    pub log: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            stats: None,
            hard_stop_after: Duration::from_secs(1800),
            maxconn: None,
            user: None,
            group: None,
            log: None,
        }
    }
}

/// Everything HAProxy should serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LbConfig {
    /// Flags.
    pub settings: Settings,
    /// Proxies: the API server's first, then by Service and port.
    pub proxies: Vec<Proxy>,
}

impl LbConfig {
    /// Number of backend servers over all proxies.
    pub fn servers(&self) -> usize {
        self.proxies.iter().map(|p| p.servers.len()).sum()
    }
}

/// Something the agent could not serve as asked, for an Event (on `owner`) or a log line.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Warning {
    /// The Service concerned, if any.
    pub owner: Option<ServiceRef>,
    /// Event reason (`UnsupportedProtocol`, `NoNodePort`, `VIPConflict`, `InvalidIngressIP`).
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
}

/// The API-server frontend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApiServer {
    /// VIPs (from `--api-server-vip` or the ClusterNetworks' `status.apiServerVIP`).
    pub vips: Vec<IpAddr>,
    /// Frontend port (6443).
    pub port: u16,
    /// Port of the API server on the control-plane nodes (6443).
    pub backend_port: u16,
}

/// The objects the configuration is computed from.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// All Services (any type; the ones not served are skipped).
    pub services: &'a [Arc<Service>],
    /// All Nodes.
    pub nodes: &'a [Arc<Node>],
    /// All EndpointSlices (only those of `Local` Services are read).
    pub slices: &'a [Arc<EndpointSlice>],
    /// `--load-balancer-class`.
    pub class: Option<&'a str>,
    /// The API-server frontend.
    pub api_server: &'a ApiServer,
}

fn condition_true(node: &Node, type_: &str) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

fn has_label(node: &Node, key: &str) -> bool {
    node.labels().contains_key(key)
}

/// A node that may take Service traffic.
pub fn lb_eligible(node: &Node) -> bool {
    let spec = node.spec.as_ref();
    node.metadata.deletion_timestamp.is_none()
        && condition_true(node, "Ready")
        && !spec.and_then(|s| s.unschedulable).unwrap_or(false)
        && !spec
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == UNINITIALIZED_TAINT))
        && !has_label(node, EXCLUDE_LABEL)
}

/// A node that serves the API server.
pub fn api_server_eligible(node: &Node) -> bool {
    node.metadata.deletion_timestamp.is_none()
        && condition_true(node, "Ready")
        && has_label(node, CONTROL_PLANE_LABEL)
}

/// The node's `InternalIP` of the wanted family, else its first `InternalIP`.
pub fn node_ip(node: &Node, prefer_v4: bool) -> Option<IpAddr> {
    let ips: Vec<IpAddr> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.trim().parse().ok())
        .collect();
    ips.iter()
        .find(|ip| ip.is_ipv4() == prefer_v4)
        .or_else(|| ips.first())
        .copied()
}

/// Nodes running a ready endpoint of `ns/name`.
fn endpoint_nodes(slices: &[Arc<EndpointSlice>], ns: &str, name: &str) -> BTreeSet<String> {
    slices
        .iter()
        .filter(|s| {
            s.namespace().as_deref() == Some(ns)
                && s.labels().get(SERVICE_NAME_LABEL).map(String::as_str) == Some(name)
        })
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .filter_map(|e| e.node_name.clone())
        .collect()
}

/// `a.b.c.d/n` or `x::y/n` in canonical form (host bits are kept: HAProxy masks them).
fn cidr(s: &str) -> Option<String> {
    let (ip, len) = s.trim().split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (len <= max).then(|| format!("{ip}/{len}"))
}

/// Servers for a proxy whose first VIP is `vip`: `nodes` (already filtered) at `port`.
fn servers<'n>(nodes: impl Iterator<Item = &'n Arc<Node>>, vip: IpAddr, port: u16) -> Vec<Server> {
    let mut out: Vec<Server> = nodes
        .filter_map(|n| {
            node_ip(n, vip.is_ipv4()).map(|ip| Server {
                name: n.name_any(),
                addr: SocketAddr::new(ip, port),
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out.dedup_by(|a, b| a.name == b.name);
    out
}

/// Computes the configuration; also returns what could not be served.
pub fn build(inputs: &Inputs<'_>, settings: Settings) -> (LbConfig, Vec<Warning>) {
    let mut proxies = Vec::new();
    let mut warnings = Vec::new();
    // Bound `VIP:port` → the proxy that holds it.
    let mut taken: BTreeMap<SocketAddr, String> = BTreeMap::new();

    // The API server first: it wins any clash.
    let api = inputs.api_server;
    let mut api_vips = api.vips.clone();
    api_vips.sort();
    api_vips.dedup();
    if let Some(first) = api_vips.first() {
        let binds: Vec<SocketAddr> = api_vips.iter().map(|ip| SocketAddr::new(*ip, api.port)).collect();
        for b in &binds {
            taken.insert(*b, API_SERVER_PROXY.to_string());
        }
        proxies.push(Proxy {
            name: API_SERVER_PROXY.to_string(),
            owner: None,
            binds,
            check: Check::Https { path: "/readyz" },
            servers: servers(
                inputs.nodes.iter().filter(|n| api_server_eligible(n)),
                *first,
                api.backend_port,
            ),
            source_ranges: None,
        });
    }

    // Services, oldest first (the older one keeps a contested VIP:port).
    let mut svcs: Vec<&Arc<Service>> = inputs
        .services
        .iter()
        .filter(|s| s.metadata.deletion_timestamp.is_none() && wants_lb(s, inputs.class))
        .collect();
    svcs.sort_by(|a, b| {
        (a.creation_timestamp(), a.namespace(), a.name_any()).cmp(&(
            b.creation_timestamp(),
            b.namespace(),
            b.name_any(),
        ))
    });
    for svc in svcs {
        let owner = ServiceRef {
            namespace: svc.namespace().unwrap_or_default(),
            name: svc.name_any(),
        };
        let warn = |warnings: &mut Vec<Warning>, reason: &'static str, message: String| {
            warnings.push(Warning {
                owner: Some(owner.clone()),
                reason,
                message,
            });
        };
        let mut vips: Vec<IpAddr> = Vec::new();
        for s in ingress_ips(svc) {
            match s.trim().parse::<IpAddr>() {
                Ok(ip) if !vips.contains(&ip) => vips.push(ip),
                Ok(_) => {}
                Err(_) => warn(
                    &mut warnings,
                    "InvalidIngressIP",
                    format!("ingress IP {s:?} is not an IP address; skipped"),
                ),
            }
        }
        if vips.is_empty() {
            continue;
        }
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        let local = spec.external_traffic_policy.as_deref() == Some("Local");
        let local_nodes = if local {
            endpoint_nodes(inputs.slices, &owner.namespace, &owner.name)
        } else {
            BTreeSet::new()
        };
        // An allow-list: `spec.loadBalancerSourceRanges`, else the legacy annotation (as
        // Kubernetes reads them: the field wins when set). Entries that are not CIDRs are
        // dropped (never widening it); if none is left, nobody is allowed.
        let legacy = svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(LEGACY_SOURCE_RANGES))
            .filter(|v| !v.trim().is_empty());
        let listed: Option<(String, Vec<String>)> = match spec
            .load_balancer_source_ranges
            .as_ref()
            .filter(|r| !r.is_empty())
        {
            Some(r) => Some(("loadBalancerSourceRanges".into(), r.clone())),
            None => legacy.map(|v| {
                (
                    format!("annotation {LEGACY_SOURCE_RANGES}"),
                    v.split(',').map(str::to_string).collect(),
                )
            }),
        };
        let source_ranges = listed.map(|(field, ranges)| {
            let mut ok = Vec::new();
            for r in &ranges {
                match cidr(r) {
                    Some(c) => ok.push(c),
                    None => warnings.push(Warning {
                        owner: Some(owner.clone()),
                        reason: "InvalidSourceRange",
                        message: format!("{field} entry {r:?} is not a CIDR; ignored"),
                    }),
                }
            }
            ok.sort();
            ok.dedup();
            ok
        });
        let check = match spec.health_check_node_port.and_then(|p| u16::try_from(p).ok()) {
            Some(port) if local && port > 0 => Check::Http {
                path: "/healthz",
                port,
            },
            _ => Check::Tcp,
        };
        for p in spec.ports.iter().flatten() {
            let proto = p.protocol.as_deref().unwrap_or("TCP");
            let Ok(port) = u16::try_from(p.port) else {
                continue;
            };
            if proto != "TCP" {
                warn(
                    &mut warnings,
                    "UnsupportedProtocol",
                    format!("port {port}/{proto} skipped: the HAProxy load balancer serves TCP only"),
                );
                continue;
            }
            let Some(node_port) = p.node_port.and_then(|n| u16::try_from(n).ok()).filter(|n| *n > 0) else {
                warn(
                    &mut warnings,
                    "NoNodePort",
                    format!(
                        "port {port}/TCP skipped: it has no nodePort (allocateLoadBalancerNodePorts: false?)"
                    ),
                );
                continue;
            };
            let name = format!("svc:{}:{}:{port}", owner.namespace, owner.name);
            let mut binds = Vec::new();
            for ip in &vips {
                let addr = SocketAddr::new(*ip, port);
                match taken.get(&addr) {
                    Some(holder) => warn(
                        &mut warnings,
                        "VIPConflict",
                        format!("{addr} is already served by {holder}; not bound for this Service"),
                    ),
                    None => {
                        taken.insert(addr, name.clone());
                        binds.push(addr);
                    }
                }
            }
            if binds.is_empty() {
                continue;
            }
            let nodes = inputs
                .nodes
                .iter()
                .filter(|n| lb_eligible(n) && (!local || local_nodes.contains(&n.name_any())));
            let family = binds[0].ip();
            proxies.push(Proxy {
                name,
                owner: Some(owner.clone()),
                binds,
                check: check.clone(),
                servers: servers(nodes, family, node_port),
                source_ranges: source_ranges.clone(),
            });
        }
    }
    // The API server first, then by Service and port.
    proxies.sort_by_key(|p| (p.owner.clone(), p.binds.first().map(SocketAddr::port)));
    warnings.sort();
    warnings.dedup();
    (LbConfig { settings, proxies }, warnings)
}

#[cfg(test)]
pub(crate) mod tests;
