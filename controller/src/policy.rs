//! Pool policies (`spec.policies` of a ClusterNetwork): which VIP pools of a network a Service
//! may take a *new* address from — auto-assigned, named by `cairn.dev/pool`, or requested. Pure:
//! the caller passes the labels of the Service's namespace (from its cache). A pool without a
//! policy admits everyone; a pool with policies admits a Service that one of them admits. An
//! unparsable selector admits nobody (fail closed), and says so.

use std::collections::BTreeMap;

use k8s_openapi::{api::core::v1::Service, apimachinery::pkg::apis::meta::v1::LabelSelector};
use kube::{ResourceExt, core::SelectorExt};

use crate::crd::{ClusterNetwork, PoolPolicy};

/// What the policies allow a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// No policy keeps the Service from any pool: everything works as without policies.
    Any,
    /// Only some pools.
    Only {
        /// Admitted pools as (name, auto-assign), in definition order.
        allowed: Vec<(String, bool)>,
        /// Refused pools as (name, why), the why naming the policies.
        denied: Vec<(String, String)>,
    },
}

impl Admission {
    /// The refusals, as one message.
    pub fn denials(&self) -> String {
        match self {
            Admission::Any => String::new(),
            Admission::Only { denied, .. } => denied
                .iter()
                .map(|(_, why)| why.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        }
    }
}

/// Whether `selector` matches `labels`; an unparsable one matches nothing.
fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> Result<bool, String> {
    kube::core::Selector::try_from(selector.clone())
        .map(|s| s.matches(labels))
        .map_err(|e| e.to_string())
}

/// Whether one policy admits the Service; `Err` names a selector that cannot be read.
fn admits(
    p: &PoolPolicy,
    namespace: &str,
    ns_labels: &BTreeMap<String, String>,
    svc_labels: &BTreeMap<String, String>,
) -> Result<bool, String> {
    let ns_ok = match (&p.namespace_selector, p.namespaces.is_empty()) {
        (None, true) => true,
        (None, false) => p.namespaces.iter().any(|n| n == namespace),
        (Some(sel), _) => {
            p.namespaces.iter().any(|n| n == namespace)
                || selects(sel, ns_labels).map_err(|e| format!("namespaceSelector: {e}"))?
        }
    };
    let svc_ok = match &p.service_selector {
        None => true,
        Some(sel) => selects(sel, svc_labels).map_err(|e| format!("serviceSelector: {e}"))?,
    };
    Ok(ns_ok && svc_ok)
}

/// The pools of `cn` the Service may take a new address from. `ns_labels`: its namespace's
/// labels (`None`: not known, treated as no labels).
pub fn admission(
    cn: &ClusterNetwork,
    svc: &Service,
    ns_labels: Option<&BTreeMap<String, String>>,
) -> Admission {
    let policies = &cn.spec.policies;
    if policies.is_empty() {
        return Admission::Any;
    }
    let empty = BTreeMap::new();
    let ns_labels = ns_labels.unwrap_or(&empty);
    let namespace = svc.namespace().unwrap_or_default();
    let svc_labels = svc.labels();
    let mut allowed = Vec::new();
    let mut denied = Vec::new();
    for (pool, auto) in cn.vip_pools() {
        let mine: Vec<(usize, &PoolPolicy)> = policies
            .iter()
            .enumerate()
            .filter(|(_, p)| p.pool == pool)
            .collect();
        if mine.is_empty() {
            allowed.push((pool, auto));
            continue;
        }
        let mut problems = Vec::new();
        let mut ok = false;
        for (i, p) in &mine {
            match admits(p, &namespace, ns_labels, svc_labels) {
                Ok(true) => {
                    ok = true;
                    break;
                }
                Ok(false) => {}
                Err(e) => problems.push(format!("spec.policies[{i}].{e}")),
            }
        }
        if ok {
            allowed.push((pool, auto));
        } else {
            let idx: Vec<String> = mine.iter().map(|(i, _)| i.to_string()).collect();
            let mut why = format!(
                "pool {pool:?} admits only what ClusterNetwork {:?} spec.policies[{}] allow{}, not Service {namespace}/{}",
                cn.name_any(),
                idx.join(","),
                if idx.len() == 1 { "s" } else { "" },
                svc.name_any(),
            );
            if !problems.is_empty() {
                why.push_str(&format!(" (unreadable: {})", problems.join(", ")));
            }
            denied.push((pool, why));
        }
    }
    if denied.is_empty() {
        Admission::Any
    } else {
        Admission::Only { allowed, denied }
    }
}

/// What is wrong with `cn`'s policies, field by field: a pool that is not one of the network's
/// `vip_pools` (in managed mode the CRD's rules already refuse that; bound, only the store's
/// definition can tell) or a selector that cannot be read (it admits nobody).
pub fn problems(cn: &ClusterNetwork, vip_pools: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, p) in cn.spec.policies.iter().enumerate() {
        if !vip_pools.contains(&p.pool.as_str()) {
            out.push(format!(
                "spec.policies[{i}].pool: {:?} is not a VIP pool of network {:?}",
                p.pool, cn.spec.network
            ));
        }
        for (field, sel) in [
            ("namespaceSelector", &p.namespace_selector),
            ("serviceSelector", &p.service_selector),
        ] {
            if let Some(Err(e)) = sel.clone().map(kube::core::Selector::try_from) {
                out.push(format!("spec.policies[{i}].{field}: {e} (it admits nobody)"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    fn cn(policies: serde_json::Value) -> ClusterNetwork {
        serde_json::from_value(json!({
            "apiVersion": "cairn.dev/v1alpha1",
            "kind": "ClusterNetwork",
            "metadata": { "name": "net-a" },
            "spec": {
                "network": "net-a",
                "pools": [
                    { "name": "public", "purpose": "VIP", "ranges": ["10.0.1.0/28"] },
                    { "name": "internal", "purpose": "VIP", "ranges": ["10.0.2.0/28"] },
                    { "name": "special", "purpose": "VIP", "ranges": ["10.0.3.0/28"], "autoAssign": false },
                    { "name": "nodes", "purpose": "NODE", "ranges": ["10.0.4.0/28"] },
                ],
                "policies": policies,
            },
        }))
        .unwrap()
    }

    fn svc(ns: &str, labels: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": { "name": "web", "namespace": ns, "labels": labels },
        }))
        .unwrap()
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn without_policies_everything_is_admitted() {
        assert_eq!(
            admission(&cn(json!([])), &svc("a", json!({})), None),
            Admission::Any
        );
    }

    #[test]
    fn namespaces_by_name_or_label_and_services_by_label() {
        let net = cn(json!([
            { "pool": "public", "namespaces": ["edge"] },
            { "pool": "public", "namespaceSelector": { "matchLabels": { "tier": "public" } }, "serviceSelector": { "matchLabels": { "expose": "internet" } } },
        ]));
        // Named namespace: admitted.
        assert_eq!(admission(&net, &svc("edge", json!({})), None), Admission::Any);
        // Labelled namespace and labelled Service: admitted by the second policy.
        let pub_ns = labels(&[("tier", "public")]);
        assert_eq!(
            admission(&net, &svc("shop", json!({ "expose": "internet" })), Some(&pub_ns)),
            Admission::Any
        );
        // Labelled namespace, Service without the label: refused, naming the policies.
        let a = admission(&net, &svc("shop", json!({})), Some(&pub_ns));
        let Admission::Only { allowed, denied } = &a else {
            panic!("{a:?}")
        };
        assert_eq!(
            allowed,
            &[("internal".to_string(), true), ("special".to_string(), false)]
        );
        assert_eq!(denied.len(), 1);
        assert_eq!(denied[0].0, "public");
        assert!(
            denied[0].1.contains("spec.policies[0,1]") && denied[0].1.contains("shop/web"),
            "{}",
            denied[0].1
        );
        // Unknown namespace labels: treated as none.
        assert!(matches!(
            admission(&net, &svc("shop", json!({ "expose": "internet" })), None),
            Admission::Only { .. }
        ));
    }

    #[test]
    fn a_selector_that_cannot_be_read_admits_nobody_and_says_so() {
        let net = cn(json!([
            { "pool": "internal", "namespaceSelector": { "matchExpressions": [ { "key": "k", "operator": "In" } ] } },
        ]));
        let a = admission(&net, &svc("x", json!({})), Some(&labels(&[("k", "v")])));
        assert!(
            a.denials().contains("spec.policies[0].namespaceSelector"),
            "{a:?}"
        );
        let p = problems(&net, &["public", "internal", "special"]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("spec.policies[0].namespaceSelector: "), "{p:?}");
    }

    #[test]
    fn a_policy_for_a_pool_the_network_lacks_is_a_problem() {
        let net = cn(json!([{ "pool": "gone", "namespaces": ["a"] }]));
        assert_eq!(
            problems(&net, &["public"]),
            ["spec.policies[0].pool: \"gone\" is not a VIP pool of network \"net-a\""]
        );
        let ok = cn(json!([{ "pool": "public", "namespaces": ["a"] }]));
        assert!(problems(&ok, &["public"]).is_empty());
    }
}
