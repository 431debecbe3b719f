//! ReportConflict: an address found answered by an unknown host passes to an unknown-host
//! record, atomically with its holder's release, and is never handed out again until an
//! operator releases the record.

use super::*;

const MAC: &str = "52:54:00:12:34:56";

fn report(st: &mut State, address: &str, holder: Option<Owner>, now: u64) -> Result<Reported, Error> {
    let seq = st.seq + 1;
    let (r, ops, _) = st.report_conflict(
        ConflictReq {
            network: "net-a".into(),
            address: ip(address),
            mac: MAC.into(),
            cluster_id: "a".into(),
            holder,
        },
        seq,
        now,
    )?;
    if !ops.is_empty() {
        st.seq = seq;
    }
    Ok(r)
}

fn usage_of(st: &mut State, pool: &str) -> Usage {
    st.usage(Some("net-a"), 0)
        .unwrap()
        .into_iter()
        .find(|u| u.pool == pool && u.family == Family::V4)
        .unwrap()
}

#[test]
fn a_reported_address_passes_from_its_holder_to_an_unknown_host_and_is_never_handed_out_again() {
    let mut st = small();
    let (a, _) = alloc(&mut st, req("net-a", svc("a", "web")), 0).unwrap();
    assert_eq!(a.addresses, vec![ip("10.0.1.1")]);

    let r = report(&mut st, "10.0.1.1", Some(svc("a", "web")), 0).unwrap();
    assert!(r.created);
    assert_eq!(r.released.as_ref().map(|a| &a.owner), Some(&svc("a", "web")));
    assert_eq!(r.conflict.owner.kind, OwnerKind::UnknownHost);
    assert_eq!(r.conflict.owner.name, "10.0.1.1");
    assert_eq!(r.conflict.owner.uid, MAC);
    assert_eq!(r.conflict.addresses, vec![ip("10.0.1.1")]);
    assert_eq!(r.conflict.pool, "vip");
    // The holder's allocation is gone; who holds the address says: the unknown host.
    assert!(st.get_allocation("net-a", &svc("a", "web")).is_err());
    let info = st.lookup(ip("10.0.1.1"));
    assert_eq!(info.holders.len(), 1, "{info:?}");
    assert_eq!(info.holders[0].owner.kind, OwnerKind::UnknownHost);

    // The holder asks again and gets the next address, not the squatted one (no grace for
    // it, no take-back), and neither does anyone after a reload.
    let (a, created) = alloc(&mut st, req("net-a", svc("a", "web")), 0).unwrap();
    assert!(created);
    assert_eq!(a.addresses, vec![ip("10.0.1.2")]);
    let u = usage_of(&mut st, "vip");
    assert_eq!((u.used, u.free, u.quarantined, u.unknown_hosts), (2, 2, 0, 1));

    let mut st = State::load(st.snapshot(), 0, 0, true).unwrap();
    let u = usage_of(&mut st, "vip");
    assert_eq!((u.used, u.unknown_hosts), (2, 1));
    for (name, want) in [("x", "10.0.1.3"), ("y", "10.0.1.4")] {
        let (a, _) = alloc(&mut st, req("net-a", svc("b", name)), 0).unwrap();
        assert_eq!(a.addresses, vec![ip(want)]);
    }
    assert!(matches!(
        alloc(&mut st, req("net-a", svc("b", "z")), 0),
        Err(Error::Exhausted(_))
    ));
    // Nor by asking for it by name.
    let mut r = req("net-a", svc("a", "mine"));
    r.requested = vec![ip("10.0.1.1")];
    let e = alloc(&mut st, r, 0).unwrap_err();
    assert!(
        matches!(&e, Error::Conflict(m) if m.contains("unknown-host")),
        "{e}"
    );
}

#[test]
fn reporting_again_returns_the_record_and_another_owners_address_is_refused() {
    let mut st = small();
    alloc(&mut st, req("net-a", svc("a", "web")), 0).unwrap();
    alloc(&mut st, req("net-a", svc("a", "db")), 0).unwrap();
    report(&mut st, "10.0.1.1", Some(svc("a", "web")), 0).unwrap();
    let seq = st.seq;
    // A retry after a lost reply: the same record, nothing written.
    let again = report(&mut st, "10.0.1.1", Some(svc("a", "web")), 0).unwrap();
    assert!(!again.created);
    assert!(again.released.is_none());
    assert_eq!(st.seq, seq);
    // 10.0.1.2 is db's: a report naming web (or nobody) must not take it from db.
    for holder in [Some(svc("a", "web")), None] {
        let e = report(&mut st, "10.0.1.2", holder, 0).unwrap_err();
        assert!(
            matches!(&e, Error::Conflict(m) if m.starts_with("address: 10.0.1.2 is held by") && m.contains("default/db")),
            "{e}"
        );
    }
    assert_eq!(
        st.get_allocation("net-a", &svc("a", "db")).unwrap().addresses,
        vec![ip("10.0.1.2")]
    );
    // A holder that does not hold the address.
    let e = report(&mut st, "10.0.1.3", Some(svc("a", "db")), 0).unwrap_err();
    assert!(
        matches!(&e, Error::Conflict(m) if m.starts_with("holder:")),
        "{e}"
    );
}

#[test]
fn a_free_address_can_be_recorded_and_releasing_the_record_frees_it_after_the_grace() {
    let mut st = small();
    let mut def = st.network("net-a").unwrap().def.clone();
    def.reuse_grace_secs = Some(10);
    st.upsert_network(def, None, false, 0).unwrap();
    let r = report(&mut st, "10.0.1.1", None, 0).unwrap();
    assert!(r.created && r.released.is_none());
    let (a, _) = alloc(&mut st, req("net-a", svc("a", "web")), 0).unwrap();
    assert_eq!(a.addresses, vec![ip("10.0.1.2")]);
    // The operator clears it: the address waits out the grace like any released one.
    let seq = st.seq + 1;
    let (gone, _, _) = st.release("net-a", &r.conflict.owner, 0).unwrap();
    st.seq = seq;
    assert!(gone.is_some());
    let (b, _) = alloc(&mut st, req("net-a", svc("a", "b")), 1_000).unwrap();
    assert_eq!(b.addresses, vec![ip("10.0.1.3")]);
    let (c, _) = alloc(&mut st, req("net-a", svc("a", "c")), 11_000).unwrap();
    assert_eq!(c.addresses, vec![ip("10.0.1.1")]);
}

#[test]
fn a_dual_stack_holder_keeps_its_other_address_in_its_grace() {
    let mut st = State::new(0);
    let mut n = net(
        "net-a",
        vec![pool(
            "vip",
            Purpose::Vip,
            &["10.0.1.1-10.0.1.4", "fd00::1-fd00::4"],
        )],
    );
    n.reuse_grace_secs = Some(60);
    st.upsert_network(n, None, false, 0).unwrap();
    let mut r = req("net-a", svc("a", "web"));
    r.families = vec![Family::V4, Family::V6];
    let (a, _) = alloc(&mut st, r.clone(), 0).unwrap();
    assert_eq!(a.addresses, vec![ip("10.0.1.1"), ip("fd00::1")]);
    let rep = report(&mut st, "fd00::1", Some(svc("a", "web")), 0).unwrap();
    assert_eq!(rep.conflict.owner.name, "fd00-0000-0000-0000-0000-0000-0000-0001");
    // Asking again: the IPv4 address comes back from its grace, the IPv6 one is the next.
    let (a, _) = alloc(&mut st, r, 0).unwrap();
    assert_eq!(a.addresses, vec![ip("10.0.1.1"), ip("fd00::2")]);
}

#[test]
fn bad_reports_name_the_field_and_change_nothing() {
    let mut st = small();
    alloc(&mut st, req("net-a", svc("a", "web")), 0).unwrap();
    let before = format!("{:?}", st.snapshot());
    let base = ConflictReq {
        network: "net-a".into(),
        address: ip("10.0.1.1"),
        mac: MAC.into(),
        cluster_id: "a".into(),
        holder: Some(svc("a", "web")),
    };
    let cases: Vec<(ConflictReq, &str)> = vec![
        (
            ConflictReq {
                network: String::new(),
                ..base.clone()
            },
            "network",
        ),
        (
            ConflictReq {
                network: "nope".into(),
                ..base.clone()
            },
            "not found",
        ),
        (
            ConflictReq {
                address: ip("192.0.2.1"),
                ..base.clone()
            },
            "address: 192.0.2.1 is not in any pool",
        ),
        (
            ConflictReq {
                cluster_id: "B!".into(),
                ..base.clone()
            },
            "cluster_id",
        ),
        (
            ConflictReq {
                holder: Some(svc("b", "web")),
                ..base.clone()
            },
            "holder.cluster_id",
        ),
        (
            ConflictReq {
                holder: Some(Owner {
                    kind: OwnerKind::UnknownHost,
                    namespace: String::new(),
                    ..svc("a", "web")
                }),
                ..base.clone()
            },
            "holder.kind",
        ),
    ];
    for (r, want) in cases {
        let e = st.report_conflict(r, 9, 0).unwrap_err();
        assert!(e.to_string().contains(want), "{e} should name {want}");
    }
    assert_eq!(format!("{:?}", st.snapshot()), before);
    // Allocate never makes an unknown-host record.
    let mut r = req("net-a", svc("a", "x"));
    r.owner = Some(Owner {
        kind: OwnerKind::UnknownHost,
        namespace: String::new(),
        ..svc("a", "x")
    });
    let e = alloc(&mut st, r, 0).unwrap_err();
    assert!(e.to_string().contains("owner.kind"), "{e}");
}
