//! Reading a Service: the predicates the Service reconciler, repair and the HAProxy agent's
//! model all need, in one place so they cannot drift apart. Pure: no I/O, no writes.

use std::net::IpAddr;

use cairn_proto::v1 as pb;
use k8s_openapi::api::core::v1::Service;

/// True when the Service is ours to serve: `type: LoadBalancer` and its `loadBalancerClass`
/// equals `class` (both unset counts as equal).
pub fn wants_lb(svc: &Service, class: Option<&str>) -> bool {
    let Some(spec) = &svc.spec else { return false };
    spec.type_.as_deref() == Some("LoadBalancer") && spec.load_balancer_class.as_deref() == class
}

/// An annotation's value, trimmed; `None` when absent or blank.
pub fn ann<'a>(svc: &'a Service, key: &str) -> Option<&'a str> {
    svc.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
}

/// The ingress IPs a Service shows.
pub fn ingress_ips(svc: &Service) -> Vec<String> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|i| i.iter().filter_map(|x| x.ip.clone()).collect())
        .unwrap_or_default()
}

/// The store family of an address.
pub fn family_of(ip: &IpAddr) -> pb::IpFamily {
    if ip.is_ipv4() {
        pb::IpFamily::Ipv4
    } else {
        pb::IpFamily::Ipv6
    }
}

/// The store family of a `spec.ipFamilies` entry (`IPv6`; anything else is IPv4, as the API
/// server admits only `IPv4` and `IPv6`).
pub fn family_named(name: &str) -> pb::IpFamily {
    if name == "IPv6" {
        pb::IpFamily::Ipv6
    } else {
        pb::IpFamily::Ipv4
    }
}

/// The other family.
pub fn other_family(f: pb::IpFamily) -> pb::IpFamily {
    if f == pb::IpFamily::Ipv4 {
        pb::IpFamily::Ipv6
    } else {
        pb::IpFamily::Ipv4
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServiceSpec;

    #[test]
    fn class_filter() {
        let mut s = Service {
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(wants_lb(&s, None));
        assert!(!wants_lb(&s, Some("cairn")));
        s.spec.as_mut().unwrap().load_balancer_class = Some("cairn".into());
        assert!(wants_lb(&s, Some("cairn")));
        assert!(!wants_lb(&s, None));
        s.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        assert!(!wants_lb(&s, Some("cairn")));
    }

    #[test]
    fn families() {
        assert_eq!(family_of(&"10.0.0.1".parse().unwrap()), pb::IpFamily::Ipv4);
        assert_eq!(family_of(&"fd00::1".parse().unwrap()), pb::IpFamily::Ipv6);
        assert_eq!(family_named("IPv6"), pb::IpFamily::Ipv6);
        assert_eq!(family_named("IPv4"), pb::IpFamily::Ipv4);
        assert_eq!(other_family(pb::IpFamily::Ipv4), pb::IpFamily::Ipv6);
        assert_eq!(other_family(pb::IpFamily::Ipv6), pb::IpFamily::Ipv4);
    }
}
