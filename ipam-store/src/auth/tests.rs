use rcgen::{CertificateParams, KeyPair, SanType};

use super::*;

fn td() -> TrustDomain {
    TrustDomain::new("cairn.test").expect("trust domain")
}

fn cert_with_uris(uris: &[&str]) -> CertificateDer<'static> {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().expect("ia5")))
        .collect();
    let key = KeyPair::generate().expect("key");
    p.self_signed(&key).expect("sign").der().clone()
}

#[test]
fn identity_from_each_role_uri() {
    let td = td();
    for (uri, want) in [
        ("spiffe://cairn.test/cluster/a", Identity::Cluster("a".into())),
        (
            "spiffe://cairn.test/cluster/prod.eu-1",
            Identity::Cluster("prod.eu-1".into()),
        ),
        ("spiffe://cairn.test/cloud", Identity::Cloud),
        ("spiffe://cairn.test/reader", Identity::Reader),
    ] {
        let c = cert_with_uris(&["https://example.invalid/x", uri]);
        assert_eq!(identity_from_cert(&c, &td), Ok(want.clone()), "{uri}");
        assert_eq!(td.spiffe_id(&want), uri);
    }
}

#[test]
fn identity_errors_name_what_is_wrong() {
    let td = td();
    let e = identity_from_cert(&cert_with_uris(&[]), &td).expect_err("no uri");
    assert!(e.to_string().contains("no spiffe:// URI SAN"), "{e}");
    let e = identity_from_cert(&cert_with_uris(&["https://x.invalid/"]), &td).expect_err("no spiffe");
    assert!(e.to_string().contains("https://x.invalid/"), "{e}");
    let e = identity_from_cert(&cert_with_uris(&["spiffe://other.test/cloud"]), &td).expect_err("td");
    assert_eq!(
        e.to_string(),
        "client certificate's SPIFFE id \"spiffe://other.test/cloud\" is not in trust domain \"cairn.test\""
    );
    let e = identity_from_cert(&cert_with_uris(&["spiffe://cairn.test/admin"]), &td).expect_err("role");
    assert!(matches!(e, IdentityError::UnknownRole(_)), "{e}");
    let e =
        identity_from_cert(&cert_with_uris(&["spiffe://cairn.test/cluster/Bad_ID"]), &td).expect_err("id");
    assert!(
        e.to_string().contains("invalid cluster id") && e.to_string().contains("Bad_ID"),
        "{e}"
    );
    let e =
        identity_from_cert(&cert_with_uris(&["spiffe://cairn.test/cluster/"]), &td).expect_err("empty id");
    assert!(matches!(e, IdentityError::BadClusterId { .. }), "{e}");
    let e = identity_from_cert(
        &cert_with_uris(&["spiffe://cairn.test/cloud", "spiffe://cairn.test/reader"]),
        &td,
    )
    .expect_err("several");
    assert!(matches!(e, IdentityError::SeveralSpiffeIds(_)), "{e}");
    let e = identity_from_cert(&CertificateDer::from(vec![1u8, 2, 3]), &td).expect_err("garbage");
    assert!(matches!(e, IdentityError::Unparsable(_)), "{e}");
    assert_eq!(tonic::Status::from(e).code(), tonic::Code::Unauthenticated);
    assert!(TrustDomain::new("Not A Domain").is_err());
}

fn cluster(id: &str) -> Identity {
    Identity::Cluster(id.into())
}

/// Every call shape, with owner "a" where it has one, and a label for messages.
fn all_calls() -> Vec<Call<'static>> {
    vec![
        Call::UpsertNetwork {
            network: "n",
            requested_manager: "cluster/a",
            existing: None,
        },
        Call::GetNetwork,
        Call::ListNetworks,
        Call::DeleteNetwork,
        Call::Allocate { owner_cluster: "a" },
        Call::Release { owner_cluster: "a" },
        Call::ReportConflict { cluster: "a" },
        Call::GetAllocation { owner_cluster: "a" },
        Call::ListAllocations { cluster_filter: "a" },
        Call::WatchAllocations { cluster_filter: "a" },
        Call::GetUsage,
        Call::Export,
        Call::Import,
    ]
}

#[test]
fn table_method_by_role() {
    // (method, cluster/a, cloud, reader) for calls touching only cluster a.
    let want: &[(&str, bool, bool, bool)] = &[
        ("UpsertNetwork", true, true, false),
        ("GetNetwork", true, true, true),
        ("ListNetworks", true, true, true),
        ("DeleteNetwork", false, true, false),
        ("Allocate", true, true, false),
        ("Release", true, true, false),
        ("ReportConflict", true, true, false),
        ("GetAllocation", true, true, true),
        ("ListAllocations", true, true, true),
        ("WatchAllocations", true, true, true),
        ("GetUsage", true, true, true),
        ("Export", false, true, false),
        ("Import", false, true, false),
    ];
    let calls = all_calls();
    assert_eq!(calls.len(), want.len());
    for (call, &(method, c, cloud, reader)) in calls.iter().zip(want) {
        assert_eq!(call.method(), method);
        assert_eq!(
            authorize(Some(&cluster("a")), call).is_ok(),
            c,
            "cluster/a {method}"
        );
        assert_eq!(
            authorize(Some(&Identity::Cloud), call).is_ok(),
            cloud,
            "cloud {method}"
        );
        assert_eq!(
            authorize(Some(&Identity::Reader), call).is_ok(),
            reader,
            "reader {method}"
        );
        let e = authorize(None, call).expect_err("unauthenticated");
        assert_eq!(
            tonic::Status::from(e).code(),
            tonic::Code::Unauthenticated,
            "{method}"
        );
    }
}

#[test]
fn cross_cluster_denials_name_both_ids() {
    let a = cluster("a");
    for call in [
        Call::Allocate { owner_cluster: "b" },
        Call::Release { owner_cluster: "b" },
        Call::ReportConflict { cluster: "b" },
        Call::GetAllocation { owner_cluster: "b" },
        Call::ListAllocations { cluster_filter: "b" },
        Call::WatchAllocations { cluster_filter: "b" },
    ] {
        let e = authorize(Some(&a), &call).expect_err("cross-cluster");
        assert_eq!(
            e.to_string(),
            format!(
                "{}: identity cluster/a may not act for cluster \"b\"",
                call.method()
            )
        );
        let s = tonic::Status::from(e);
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
        // cloud acts for anyone; reader reads anyone's.
        assert!(authorize(Some(&Identity::Cloud), &call).is_ok());
    }
    assert!(
        authorize(
            Some(&Identity::Reader),
            &Call::GetAllocation { owner_cluster: "b" }
        )
        .is_ok()
    );
    assert!(authorize(Some(&Identity::Reader), &Call::Allocate { owner_cluster: "b" }).is_err());
}

#[test]
fn cluster_admin_calls_and_reader_writes_are_refused_with_reasons() {
    let a = cluster("a");
    for call in [Call::DeleteNetwork, Call::Export, Call::Import] {
        let e = authorize(Some(&a), &call).expect_err("admin");
        assert_eq!(
            e.to_string(),
            format!(
                "{}: identity cluster/a may not call it: it is for the cloud identity only",
                call.method()
            )
        );
    }
    let e = authorize(Some(&Identity::Reader), &Call::Release { owner_cluster: "a" }).expect_err("write");
    assert_eq!(e.to_string(), "Release: identity reader is read-only");
    let e = authorize(Some(&Identity::Reader), &Call::Export).expect_err("export");
    assert!(e.to_string().contains("may not export"), "{e}");
}

#[test]
fn unfiltered_list_is_refused_unfiltered_watch_is_allowed_for_a_cluster() {
    let a = cluster("a");
    let e = authorize(Some(&a), &Call::ListAllocations { cluster_filter: "" }).expect_err("unfiltered");
    assert_eq!(
        e.to_string(),
        "ListAllocations: identity cluster/a must set cluster_id to \"a\" to list allocations"
    );
    assert!(authorize(Some(&a), &Call::WatchAllocations { cluster_filter: "" }).is_ok());
    assert!(
        authorize(
            Some(&Identity::Reader),
            &Call::ListAllocations { cluster_filter: "" }
        )
        .is_ok()
    );
}

#[test]
fn upsert_network_rules_for_a_cluster() {
    let a = cluster("a");
    let up = |requested_manager: &'static str, existing: Option<Existing<'static>>| Call::UpsertNetwork {
        network: "shared",
        requested_manager,
        existing,
    };
    let managed = |manager: &'static str, unchanged: bool| Some(Existing { manager, unchanged });
    // Create: only as its own manager.
    assert!(authorize(Some(&a), &up("cluster/a", None)).is_ok());
    for other in ["", "cloud", "cluster/b"] {
        let e = authorize(Some(&a), &up(other, None)).expect_err("create as other");
        assert_eq!(
            e.to_string(),
            format!(
                "UpsertNetwork: identity cluster/a may create network \"shared\" only with managed_by \"cluster/a\", not {other:?}"
            )
        );
    }
    // Its own network: any change; "" keeps the manager.
    assert!(authorize(Some(&a), &up("cluster/a", managed("cluster/a", false))).is_ok());
    assert!(authorize(Some(&a), &up("", managed("cluster/a", false))).is_ok());
    let e = authorize(Some(&a), &up("cloud", managed("cluster/a", false))).expect_err("hand over");
    assert!(
        e.to_string()
            .contains("may not hand network \"shared\" to manager \"cloud\""),
        "{e}"
    );
    // Someone else's (or nobody's): binding without change only.
    for manager in ["cloud", "cluster/b", ""] {
        assert!(authorize(Some(&a), &up("cluster/a", managed(manager, true))).is_ok());
        let e = authorize(Some(&a), &up("cluster/a", managed(manager, false))).expect_err("change");
        assert_eq!(
            e.to_string(),
            format!(
                "UpsertNetwork: identity cluster/a may not change network \"shared\", which is managed by {manager:?}; only re-applying its definition unchanged is allowed"
            )
        );
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::PermissionDenied);
    }
    assert!(authorize(Some(&Identity::Cloud), &up("cloud", managed("cluster/b", false))).is_ok());
    assert!(authorize(Some(&Identity::Reader), &up("", managed("cloud", true))).is_err());
}

#[test]
fn existing_compares_like_the_ledger() {
    let def = NetworkDef {
        name: "shared".into(),
        prefixes: vec![],
        gateways: vec![],
        dns_servers: vec![],
        vlan: 7,
        pools: vec![],
        reuse_grace_secs: None,
        managed_by: "cloud".into(),
    };
    let rec = NetworkRecord {
        def: def.clone(),
        version: 3,
        created_ms: 0,
        updated_ms: 0,
    };
    let same_other_manager = NetworkDef {
        managed_by: "cluster/a".into(),
        ..def.clone()
    };
    assert_eq!(
        Existing::of(&rec, &same_other_manager),
        Existing {
            manager: "cloud",
            unchanged: true
        }
    );
    let changed = NetworkDef { vlan: 8, ..def };
    assert!(!Existing::of(&rec, &changed).unchanged);
}

#[test]
fn watch_events_of_other_clusters_are_redacted() {
    let alloc = |cluster: &str| pb::Allocation {
        network: "shared".into(),
        pool: "p".into(),
        owner: Some(pb::Owner {
            cluster_id: cluster.into(),
            name: "svc".into(),
            ..Default::default()
        }),
        addresses: vec!["10.0.0.1".into()],
        sharing_key: "k".into(),
        revision: 9,
        ..Default::default()
    };
    let a = cluster("a");
    let mut mine = alloc("a");
    redact(Some(&a), &mut mine);
    assert_eq!(mine, alloc("a"));
    let mut theirs = alloc("b");
    redact(Some(&a), &mut theirs);
    assert_eq!(theirs.owner, None);
    assert!(theirs.addresses.is_empty() && theirs.sharing_key.is_empty());
    assert_eq!(
        (theirs.network.as_str(), theirs.pool.as_str(), theirs.revision),
        ("shared", "p", 9)
    );
    for who in [Identity::Cloud, Identity::Reader] {
        let mut x = alloc("b");
        redact(Some(&who), &mut x);
        assert_eq!(x, alloc("b"));
    }
}
