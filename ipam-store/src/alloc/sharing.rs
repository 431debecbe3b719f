//! The sharing rule (invariant 1): an address is held by one owner, or by several owners of
//! the same cluster that all carry the same non-empty sharing key and whose (protocol, port)
//! sets are pairwise disjoint. Owners of different clusters never share.

use crate::model::{Allocation, Owner, Port};

/// Why `candidate` may not join `holder` on an address, or `None` when it may.
pub fn conflict(holder: &Allocation, owner: &Owner, sharing_key: &str, ports: &[Port]) -> Option<String> {
    let h = &holder.owner;
    if h.cluster_id != owner.cluster_id {
        return Some(format!("held by another cluster ({h})"));
    }
    if holder.sharing_key.is_empty() || sharing_key.is_empty() {
        return Some(format!("held exclusively by {h}"));
    }
    if holder.sharing_key != sharing_key {
        return Some(format!(
            "held by {h} with a different sharing key {:?}",
            holder.sharing_key
        ));
    }
    // Both sorted: a merge walk finds a common port in O(n + m).
    let (mut i, mut j) = (0, 0);
    let hp = &holder.ports;
    while i < hp.len() && j < ports.len() {
        match hp[i].cmp(&ports[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                return Some(format!(
                    "held by {h} with the same sharing key, and both use {:?}/{}",
                    hp[i].protocol, hp[i].port
                ));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{OwnerKind, Protocol};

    fn alloc(cluster: &str, key: &str, ports: &[u16]) -> Allocation {
        Allocation {
            network: "n".into(),
            pool: "p".into(),
            owner: owner(cluster, "a"),
            addresses: vec![],
            sharing_key: key.into(),
            ports: ports
                .iter()
                .map(|p| Port {
                    protocol: Protocol::Tcp,
                    port: *p,
                })
                .collect(),
            created_ms: 0,
            updated_ms: 0,
            revision: 0,
        }
    }
    fn owner(cluster: &str, name: &str) -> Owner {
        Owner {
            cluster_id: cluster.into(),
            kind: OwnerKind::Service,
            namespace: "ns".into(),
            name: name.into(),
            uid: String::new(),
        }
    }
    fn ports(p: &[u16]) -> Vec<Port> {
        p.iter()
            .map(|p| Port {
                protocol: Protocol::Tcp,
                port: *p,
            })
            .collect()
    }

    #[test]
    fn rule() {
        let h = alloc("a", "k", &[80, 443]);
        assert!(conflict(&h, &owner("a", "b"), "k", &ports(&[8080])).is_none());
        assert!(
            conflict(&h, &owner("a", "b"), "k", &ports(&[443]))
                .unwrap()
                .contains("443")
        );
        assert!(conflict(&h, &owner("a", "b"), "other", &ports(&[8080])).is_some());
        assert!(conflict(&h, &owner("a", "b"), "", &ports(&[8080])).is_some());
        assert!(
            conflict(&h, &owner("b", "b"), "k", &ports(&[8080]))
                .unwrap()
                .contains("another cluster")
        );
        let udp = vec![Port {
            protocol: Protocol::Udp,
            port: 80,
        }];
        assert!(conflict(&h, &owner("a", "b"), "k", &udp).is_none());
        assert!(conflict(&alloc("a", "", &[80]), &owner("a", "b"), "k", &ports(&[81])).is_some());
    }
}
