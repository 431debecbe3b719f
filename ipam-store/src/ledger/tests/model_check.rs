//! The allocator against a simple model of the invariants, over random operation sequences
//! with reloads.

use std::{collections::BTreeMap, net::IpAddr};

use proptest::prelude::*;

use super::*;

#[derive(Clone, Debug)]
enum Step {
    Alloc {
        cluster: u8,
        name: u8,
        key: Option<u8>,
        port: u16,
        v6: bool,
    },
    Release {
        cluster: u8,
        name: u8,
    },
    Reload,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0u8..3, 0u8..12, proptest::option::of(0u8..2), 1u16..4, any::<bool>())
            .prop_map(|(cluster, name, key, port, v6)| Step::Alloc { cluster, name, key, port, v6 }),
        3 => (0u8..3, 0u8..12).prop_map(|(cluster, name)| Step::Release { cluster, name }),
        1 => Just(Step::Reload),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Against a model of who holds what: no address is ever held across clusters or against
    /// the sharing rule, Allocate is idempotent (also across reloads), nothing moves, and
    /// used + free + quarantined = total in every pool and family.
    #[test]
    fn allocator_matches_model(steps in proptest::collection::vec(step(), 1..120)) {
        let mut st = State::new(0);
        let mut n = net("n", vec![pool("vip", Purpose::Vip, &["10.0.0.1-10.0.0.8", "fd00::1-fd00::4"])]);
        n.reuse_grace_secs = Some(0);
        st.upsert_network(n, None, false, 0).unwrap();
        // owner key -> addresses
        let mut model: BTreeMap<(u8, u8), Vec<IpAddr>> = BTreeMap::new();
        for s in steps {
            match s {
                Step::Alloc { cluster, name, key, port, v6 } => {
                    let mut r = req("n", svc(&format!("c{cluster}"), &format!("s{name}")));
                    if let Some(k) = key { r.sharing_key = format!("k{k}"); r.ports = tcp(&[port]); }
                    r.families = if v6 { vec![Family::V6] } else { vec![Family::V4] };
                    match alloc(&mut st, r, 0) {
                        Ok((a, _)) => {
                            if let Some(prev) = model.get(&(cluster, name)) {
                                // Idempotent: nothing it held has moved.
                                for p in prev { if Family::of(p) == Family::of(&a.addresses[0]) { prop_assert!(a.addresses.contains(p)); } }
                            }
                            model.insert((cluster, name), a.addresses.clone());
                        }
                        Err(Error::Exhausted(_)) | Err(Error::Conflict(_)) => {}
                        Err(e) => prop_assert!(false, "unexpected error {e}"),
                    }
                }
                Step::Release { cluster, name } => {
                    let r = st.release("n", &svc(&format!("c{cluster}"), &format!("s{name}")), 0).unwrap();
                    prop_assert_eq!(r.0.is_some(), model.remove(&(cluster, name)).is_some());
                }
                Step::Reload => {
                    st = State::load(st.snapshot(), 0, 0, true).unwrap();
                }
            }
            // The sharing index is what the allocations say, after every kind of step.
            prop_assert_eq!(&st.shared, &super::super::shared::Shared::of(st.allocs.values()));
            // Invariant 1 over the whole state.
            let (all, _) = st.list(&ListFilter::default(), 10_000, "").unwrap();
            let mut by_ip: BTreeMap<IpAddr, Vec<&crate::model::Allocation>> = BTreeMap::new();
            for a in &all { for ip in &a.addresses { by_ip.entry(*ip).or_default().push(a); } }
            for (ip, hs) in &by_ip {
                for (i, x) in hs.iter().enumerate() {
                    for y in &hs[i + 1..] {
                        prop_assert!(crate::alloc::sharing::conflict(&x.claim(), &x.owner, &y.claim()).is_none(), "{ip} held by {:?} and {:?}", x.owner, y.owner);
                    }
                }
            }
            // The state agrees with the model.
            prop_assert_eq!(all.len(), model.len());
            for a in &all {
                let k = (a.owner.cluster_id[1..].parse::<u8>().unwrap(), a.owner.name[1..].parse::<u8>().unwrap());
                prop_assert_eq!(Some(&a.addresses), model.get(&k));
            }
            // Accounting.
            for u in st.usage(Some("n"), 0).unwrap() {
                prop_assert_eq!(u.used + u.free + u.quarantined, u.total);
                let held = by_ip.keys().filter(|ip| Family::of(ip) == u.family).count() as u128;
                prop_assert_eq!(u.used, held);
            }
        }
    }
}
