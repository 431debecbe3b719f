//! The sharing rule (invariant 1): an address is held by one owner, or by several owners of
//! the same cluster that all carry the same non-empty sharing key and whose (protocol, port)
//! sets are pairwise disjoint. Owners of different clusters never share.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Transport protocol of a shared port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

/// A (protocol, port) pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Port {
    /// Protocol.
    pub protocol: Protocol,
    /// 1..=65535.
    pub port: u16,
}

/// One side of the rule: who holds (or asks for) an address, under which key, on which ports.
#[derive(Clone, Copy, Debug)]
pub struct Claim<'a> {
    /// The owner's cluster.
    pub cluster_id: &'a str,
    /// Empty = exclusive.
    pub sharing_key: &'a str,
    /// Sorted, unique.
    pub ports: &'a [Port],
}

/// Why `candidate` may not join `holder` (named `who` in the message) on an address, or `None`
/// when it may.
pub fn conflict(holder: &Claim<'_>, who: &dyn fmt::Display, candidate: &Claim<'_>) -> Option<String> {
    if holder.cluster_id != candidate.cluster_id {
        return Some(format!("held by another cluster ({who})"));
    }
    if holder.sharing_key.is_empty() || candidate.sharing_key.is_empty() {
        return Some(format!("held exclusively by {who}"));
    }
    if holder.sharing_key != candidate.sharing_key {
        return Some(format!(
            "held by {who} with a different sharing key {:?}",
            holder.sharing_key
        ));
    }
    // Both sorted: a merge walk finds a common port in O(n + m).
    let (mut i, mut j) = (0, 0);
    let (hp, cp) = (holder.ports, candidate.ports);
    while i < hp.len() && j < cp.len() {
        match hp[i].cmp(&cp[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                return Some(format!(
                    "held by {who} with the same sharing key, and both use {:?}/{}",
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

    fn ports(p: &[u16]) -> Vec<Port> {
        p.iter()
            .map(|p| Port {
                protocol: Protocol::Tcp,
                port: *p,
            })
            .collect()
    }

    fn check(holder: (&str, &str, &[Port]), cand: (&str, &str, &[Port])) -> Option<String> {
        let h = Claim {
            cluster_id: holder.0,
            sharing_key: holder.1,
            ports: holder.2,
        };
        let c = Claim {
            cluster_id: cand.0,
            sharing_key: cand.1,
            ports: cand.2,
        };
        conflict(&h, &"a/service/ns/a", &c)
    }

    #[test]
    fn rule() {
        let hp = ports(&[80, 443]);
        let h = ("a", "k", hp.as_slice());
        assert!(check(h, ("a", "k", &ports(&[8080]))).is_none());
        assert!(check(h, ("a", "k", &ports(&[443]))).unwrap().contains("443"));
        assert!(check(h, ("a", "other", &ports(&[8080]))).is_some());
        assert!(check(h, ("a", "", &ports(&[8080]))).is_some());
        assert!(
            check(h, ("b", "k", &ports(&[8080])))
                .unwrap()
                .contains("another cluster")
        );
        let udp = vec![Port {
            protocol: Protocol::Udp,
            port: 80,
        }];
        assert!(check(h, ("a", "k", &udp)).is_none());
        assert!(check(("a", "", &ports(&[80])), ("a", "k", &ports(&[81]))).is_some());
    }
}
