//! `ClusterNetwork` (`cairn.dev/v1alpha1`, cluster-scoped): a shared network as this cluster
//! uses it. The CRD in `manifests/crds/` is generated from these types (`cairn-ccm crd`), and
//! a test fails when the file is stale.
//!
//! The schema rejects malformed objects at the apiserver (formats, sizes, CEL rules), so the
//! reconciler only meets objects that can be sent to the store; the store still validates
//! everything and its field-named errors land in the `Ready` condition.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What a pool's addresses are for.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum PoolPurpose {
    /// API-server VIP and LoadBalancer Service VIPs.
    #[serde(rename = "VIP")]
    Vip,
    /// Node addresses.
    #[serde(rename = "NODE")]
    Node,
}

/// A pool of the network.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PoolSpec {
    /// Unique within the network: lowercase letters, digits and '-'.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// VIP or NODE.
    pub purpose: PoolPurpose,
    /// CIDRs (`10.20.1.0/24`, `fd00::/64`) or inclusive ranges (`10.20.1.10-10.20.1.99`).
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 100)))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self.all(r, isCIDR(r) || isIP(r) || (r.split('-').size() == 2 && isIP(r.split('-')[0].trim()) && isIP(r.split('-')[1].trim())))", "message": "each range must be a CIDR, an address, or FIRST-LAST addresses"}]))]
    pub ranges: Vec<String>,
    /// Addresses or ranges never handed out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 100)))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self.all(r, isCIDR(r) || isIP(r) || (r.split('-').size() == 2 && isIP(r.split('-')[0].trim()) && isIP(r.split('-')[1].trim())))", "message": "each exclusion must be a CIDR, an address, or FIRST-LAST addresses"}]))]
    pub exclusions: Vec<String>,
    /// Used without being named by `cairn.dev/pool`. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_assign: Option<bool>,
}

/// Who in this cluster may take addresses from one pool of the network: Services in the
/// `namespaces` named, or in namespaces matching `namespaceSelector` (either admits the
/// namespace; neither given: any namespace), and, when `serviceSelector` is given, only Services
/// whose labels match it. A pool with policies admits a Service that matches one of them; a
/// pool without any admits every Service (as before policies existed). Enforced on new
/// allocations — auto-assigned, named by `cairn.dev/pool`, or requested addresses; an address a
/// Service already holds is kept.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.namespaces) && size(self.namespaces) > 0) || has(self.namespaceSelector) || has(self.serviceSelector)",
    "message": "a policy needs namespaces, namespaceSelector or serviceSelector"
}]))]
pub struct PoolPolicy {
    /// The pool's name in the network.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub pool: String,
    /// Namespaces, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 63)))]
    pub namespaces: Vec<String>,
    /// Namespaces, by label. (Operators are checked by the controller, condition
    /// `PoliciesValid`: a CEL rule over unbounded selectors exceeds the apiserver's cost budget.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Services, by label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_selector: Option<LabelSelector>,
}

/// The cluster's API-server VIP. Present: allocate it (idempotent: the same VIP the cloud
/// service allocated for this cluster is found, not a second one). Absent: only look it up.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ApiServerVipSpec {
    /// Allocate (or look up) the VIP. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// A specific address (e.g. the one the cloud service already allocated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 45))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "isIP(self)", "message": "address must be an IP address"}]))]
    pub address: Option<String>,
    /// Pool to draw from (default: the first auto-assign VIP pool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

/// Conflict probing: before a new VIP from one of `pools` is published for a Service, the
/// controller asks the network whether a host already answers for it (an ARP probe per
/// RFC 5227 for IPv4, a duplicate-address-detection neighbour solicitation for IPv6), on
/// `interface`. An answer: the address is reported to the store as in use by an unknown host
/// (never handed out again until an operator releases that record), a Warning event names the
/// address and the MAC that answered, and the Service gets the next address. The controller's
/// pod needs CAP_NET_RAW and an interface on the network (host networking on a node attached
/// to it, or a secondary interface).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ConflictProbeSpec {
    /// The controller's interface on this network, e.g. `eth1` or `bond0.120`.
    #[schemars(length(min = 1, max = 15), regex(pattern = r"^[A-Za-z0-9_.@:-]+$"))]
    pub interface: String,
    /// VIP pools whose new addresses are probed, by name. Empty: every VIP pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 63)))]
    pub pools: Vec<String>,
    /// How long to wait for an answer, in milliseconds. Default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<i32>", range(min = 20, max = 10000))]
    pub timeout_milliseconds: Option<u32>,
    /// Probes sent, spread over the timeout. Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<i32>", range(min = 1, max = 10))]
    pub attempts: Option<u32>,
}

impl ConflictProbeSpec {
    /// Default answer timeout.
    pub const DEFAULT_TIMEOUT_MS: u32 = 300;
    /// Default probes per address.
    pub const DEFAULT_ATTEMPTS: u32 = 3;

    /// Whether new addresses of `pool` are probed.
    pub fn covers(&self, pool: &str) -> bool {
        self.pools.is_empty() || self.pools.iter().any(|p| p == pool)
    }
}

/// Spec of a `ClusterNetwork`, in one of two modes. **Managed** (`pools` set): this cluster
/// defines the network in the store (`managedBy: cluster/<id>`); another cluster or the cloud
/// may bind to it. **Bound** (no `pools`, and no prefixes, gateways, DNS, VLAN or grace): the
/// network was defined in the store by someone else; this cluster mirrors it into status.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "cairn.dev",
    version = "v1alpha1",
    kind = "ClusterNetwork",
    plural = "clusternetworks",
    shortname = "cnet",
    doc = "A shared network as this cluster uses it: the store's network definition and pools, and this cluster's API-server VIP.",
    status = "ClusterNetworkStatus",
    printcolumn = r#"{"name":"Network","type":"string","jsonPath":".spec.network"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".status.mode"}"#,
    printcolumn = r#"{"name":"VIPs","type":"string","jsonPath":".status.vipUsage","description":"VIPs used/total"}"#,
    printcolumn = r#"{"name":"Nodes","type":"string","jsonPath":".status.nodeUsage","description":"node IPs used/total"}"#,
    printcolumn = r#"{"name":"API VIP","type":"string","jsonPath":".status.apiServerVIP"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.apiServerVIP) || (has(self.apiServerVIP.enabled) && !self.apiServerVIP.enabled) || !has(self.pools) || size(self.pools) == 0 || self.pools.exists(p, p.purpose == 'VIP')",
    "message": "apiServerVIP needs a VIP pool"
}, {
    "rule": "!has(self.policies) || !has(self.pools) || size(self.pools) == 0 || self.policies.all(x, self.pools.exists(p, p.name == x.pool && p.purpose == 'VIP'))",
    "message": "each policy must name a VIP pool of this ClusterNetwork"
}, {
    "rule": "(has(self.pools) && size(self.pools) > 0) || (!has(self.prefixes) && !has(self.gateways) && !has(self.dnsServers) && (!has(self.vlan) || self.vlan == 0) && !has(self.reuseGraceSeconds))",
    "message": "without pools the ClusterNetwork binds to a network defined in the store: prefixes, gateways, dnsServers, vlan and reuseGraceSeconds come from there and must not be set"
}]))]
pub struct ClusterNetworkSpec {
    /// The network's name in the store, shared by every cluster on it.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "network is immutable"}]))]
    pub network: String,
    /// Subnets, at most one per family.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 2), inner(length(min = 2, max = 50)))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self.all(p, isCIDR(p))", "message": "each prefix must be a CIDR such as 10.20.0.0/16"}]))]
    pub prefixes: Vec<String>,
    /// Default gateways, at most one per family.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 2), inner(length(min = 2, max = 45)))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self.all(g, isIP(g))", "message": "each gateway must be an IP address"}]))]
    pub gateways: Vec<String>,
    /// DNS servers for nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 6), inner(length(min = 2, max = 45)))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self.all(d, isIP(d))", "message": "each DNS server must be an IP address"}]))]
    pub dns_servers: Vec<String>,
    /// 802.1Q VLAN id; 0 = untagged.
    #[serde(default)]
    // Kubernetes knows int32/int64 formats only; u32's "uint32" would warn on every apply.
    #[schemars(with = "i32", range(min = 0, max = 4094))]
    pub vlan: u32,
    /// Pools. Names must be unique. None: bind to a network someone else (the on-prem cloud
    /// service, `cairn-ipam network apply`) defined in the store; this cluster then only
    /// reads the definition and draws addresses from it, and can never change it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self.all(p, self.exists_one(q, q.name == p.name))", "message": "pool names must be unique"}]))]
    pub pools: Vec<PoolSpec>,
    /// Seconds a released address waits before another owner may take it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<i32>", range(min = 0, max = 604800))]
    pub reuse_grace_seconds: Option<u32>,
    /// The cluster's API-server VIP.
    #[serde(default, rename = "apiServerVIP", skip_serializing_if = "Option::is_none")]
    pub api_server_vip: Option<ApiServerVipSpec>,
    /// Which namespaces and Services may take addresses from which VIP pools (see
    /// [`PoolPolicy`]). Empty: every Service may use every auto-assign pool, and name any pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub policies: Vec<PoolPolicy>,
    /// Probe new VIPs for a host already answering before they are published (see
    /// [`ConflictProbeSpec`]). Absent: no probing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict_probe: Option<ConflictProbeSpec>,
}

/// Usage of one pool and family.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PoolUsage {
    /// Pool.
    pub pool: String,
    /// VIP or NODE.
    pub purpose: String,
    /// IPv4 or IPv6.
    pub family: String,
    /// Addresses (decimal string: IPv6 pools exceed 64 bits).
    pub total: String,
    /// Held by any cluster.
    pub used: String,
    /// Free now.
    pub free: String,
    /// In their reuse grace period.
    pub quarantined: String,
    /// Held but outside the pool's current ranges.
    pub out_of_range: String,
    /// In use by hosts the store never handed them to (found by a conflict probe).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub unknown_hosts: String,
}

/// Status of a `ClusterNetwork`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetworkStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Conflict`, `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Usage per pool and family (all clusters on the network).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usage: Vec<PoolUsage>,
    /// VIPs used/total over VIP pools, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip_usage: Option<String>,
    /// Node IPs used/total over NODE pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_usage: Option<String>,
    /// This cluster's API-server VIP.
    #[serde(default, rename = "apiServerVIP", skip_serializing_if = "Option::is_none")]
    pub api_server_vip: Option<String>,
    /// The store's version of the network definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<i64>")]
    pub store_version: Option<u64>,
    /// `Managed` (this cluster's pools define the network) or `Bound` (the store's definition,
    /// made by someone else, is used as is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<NetworkMode>,
    /// The network as the store defines it (in both modes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<NetworkDefinition>,
}

/// How a `ClusterNetwork` relates to the store's network.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum NetworkMode {
    /// This cluster defines the network (spec.pools set).
    Managed,
    /// Someone else defined it; this cluster only uses it.
    Bound,
}

/// The store's definition of a network, mirrored into status. Not bounded like the spec:
/// the store's own limits apply (a cloud-defined pool may have more ranges than a spec may).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkDefinition {
    /// Subnets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefixes: Vec<String>,
    /// Default gateways.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// DNS servers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_servers: Vec<String>,
    /// 802.1Q VLAN id; 0 = untagged.
    #[serde(default)]
    #[schemars(with = "i32")]
    pub vlan: u32,
    /// Seconds a released address waits before another owner may take it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<i32>")]
    pub reuse_grace_seconds: Option<u32>,
    /// Who may change the definition (`cloud`, `cluster/<id>`, ...).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub managed_by: String,
    /// Pools.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolDefinition>,
}

/// One pool of a [`NetworkDefinition`].
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PoolDefinition {
    /// Name.
    pub name: String,
    /// `VIP` or `NODE`.
    pub purpose: String,
    /// CIDRs or ranges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<String>,
    /// Addresses or ranges never handed out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclusions: Vec<String>,
    /// Used without being named by `cairn.dev/pool`.
    pub auto_assign: bool,
}

impl ClusterNetwork {
    /// Bound mode: no pools of its own (see [`ClusterNetworkSpec`]).
    pub fn is_bound(&self) -> bool {
        self.spec.pools.is_empty()
    }

    /// Whether the network has a pool of `purpose`: from the spec when managed, from the
    /// store's definition in status when bound (unknown until first synced: false).
    pub fn has_pool(&self, purpose: PoolPurpose) -> bool {
        if !self.is_bound() {
            return self.spec.pools.iter().any(|p| p.purpose == purpose);
        }
        let want = match purpose {
            PoolPurpose::Vip => "VIP",
            PoolPurpose::Node => "NODE",
        };
        self.status
            .as_ref()
            .and_then(|s| s.definition.as_ref())
            .is_some_and(|d| d.pools.iter().any(|p| p.purpose == want))
    }
}

impl ClusterNetwork {
    /// The network's VIP pools as (name, auto-assign), in definition order: from the spec when
    /// managed, from the store's definition in status when bound.
    pub fn vip_pools(&self) -> Vec<(String, bool)> {
        if !self.is_bound() {
            return self
                .spec
                .pools
                .iter()
                .filter(|p| p.purpose == PoolPurpose::Vip)
                .map(|p| (p.name.clone(), p.auto_assign.unwrap_or(true)))
                .collect();
        }
        self.status
            .as_ref()
            .and_then(|s| s.definition.as_ref())
            .map(|d| {
                d.pools
                    .iter()
                    .filter(|p| p.purpose == "VIP")
                    .map(|p| (p.name.clone(), p.auto_assign))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The CRD as YAML, as written to `manifests/crds/clusternetworks.cairn.dev.yaml`.
pub fn crd_yaml() -> Result<String, serde_yaml_ng::Error> {
    use kube::CustomResourceExt as _;
    let yaml = serde_yaml_ng::to_string(&ClusterNetwork::crd())?;
    Ok(format!(
        "# Generated by `cairn-ccm crd` from controller/src/crd.rs; do not edit.\n{yaml}"
    ))
}
