//! Mutual TLS and per-cluster authorization against a real `cairn-ipam serve` process, with
//! certificates minted in the test by `cairn-ipam certs` (and rcgen for an expired one).
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use cairn_proto::{tls::ClientTlsFiles, v1 as pb};
use common::*;
use tonic::Code;

/// A CA in a temporary directory, with a server certificate for 127.0.0.1 and the client
/// certificates the tests use.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        Pki::with_trust_domain("cairn.local")
    }

    /// A CA for `td` (which is also in the CA's name, so two such CAs differ in name).
    fn with_trust_domain(td: &str) -> Pki {
        let dir = tempfile::Builder::new().prefix("cairn-pki-").tempdir().unwrap();
        let d = dir.path().to_str().unwrap().to_string();
        certs(&["init", "--dir", &d, "--trust-domain", td]);
        certs(&["issue", "--dir", &d, "--server", "--ip", "127.0.0.1"]);
        for role in [
            &["--cluster", "a"][..],
            &["--cluster", "b"],
            &["--cloud"],
            &["--reader"],
        ] {
            let mut args = vec!["issue", "--dir", &d];
            args.extend_from_slice(role);
            certs(&args);
        }
        Pki {
            ca: dir.path().to_path_buf(),
            _dir: dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.ca.join(name)
    }

    fn s(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }

    /// The `serve` flags for mTLS with this CA.
    fn serve_flags(&self) -> Vec<String> {
        vec![
            "--default-reuse-grace".into(),
            "0s".into(),
            "--tls-cert".into(),
            self.s("server.pem"),
            "--tls-key".into(),
            self.s("server-key.pem"),
            "--client-ca".into(),
            self.s("ca.pem"),
        ]
    }

    /// Client files for the identity whose files are `<stem>.pem`/`<stem>-key.pem`.
    fn client(&self, stem: &str) -> ClientTlsFiles {
        ClientTlsFiles {
            ca: Some(self.path("ca.pem")),
            cert: Some(self.path(&format!("{stem}.pem"))),
            key: Some(self.path(&format!("{stem}-key.pem"))),
        }
    }
}

async fn start(flags: &[String]) -> Server {
    let f: Vec<&str> = flags.iter().map(String::as_str).collect();
    Server::start_with(&f).await
}

/// A client with `files`; the error is the first failure (connect or none yet).
async fn connect(srv: &Server, files: &ClientTlsFiles) -> Result<Client, String> {
    let ch = files
        .endpoint(&srv.endpoint())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| cairn_proto::tls::explain(&e, true))?;
    Ok(pb::ipam_service_client::IpamServiceClient::new(ch))
}

async fn client(srv: &Server, files: &ClientTlsFiles) -> Client {
    connect(srv, files)
        .await
        .unwrap_or_else(|e| panic!("connecting: {e}\n{}", srv.log_tail(40)))
}

/// A call's error as the client sees it: a refused handshake may surface at connect or at
/// the first call.
async fn first_call_error(srv: &Server, files: &ClientTlsFiles) -> String {
    match connect(srv, files).await {
        Err(e) => e,
        Ok(mut c) => match c.list_networks(pb::ListNetworksRequest {}).await {
            Ok(_) => panic!("a call with {files:?} succeeded"),
            Err(s) => cairn_proto::tls::explain(&s, true),
        },
    }
}

#[tokio::test]
async fn cluster_identity_acts_only_for_its_own_owners() {
    let pki = Pki::new();
    let srv = start(&pki.serve_flags()).await;
    let mut cloud = client(&srv, &pki.client("cloud")).await;
    let mut a = client(&srv, &pki.client("cluster-a")).await;
    let mut reader = client(&srv, &pki.client("reader")).await;

    upsert(&mut cloud, net_a("shared")).await;
    let b_alloc = allocate(&mut cloud, alloc_req("shared", svc("b", "web"))).await;
    assert!(!b_alloc.addresses.is_empty());

    // Own owners: allowed.
    allocate(&mut a, alloc_req("shared", svc("a", "web"))).await;
    a.get_allocation(pb::GetAllocationRequest {
        network: "shared".into(),
        owner: Some(svc("a", "web")),
    })
    .await
    .unwrap();

    // Another cluster's owners: PERMISSION_DENIED naming both ids.
    let both = ["cluster/a", "\"b\""];
    assert_status(
        a.allocate(alloc_req("shared", svc("b", "db"))).await,
        Code::PermissionDenied,
        &both,
    );
    assert_status(
        a.release(pb::ReleaseRequest {
            network: "shared".into(),
            owner: Some(svc("b", "web")),
        })
        .await,
        Code::PermissionDenied,
        &both,
    );
    assert_status(
        a.get_allocation(pb::GetAllocationRequest {
            network: "shared".into(),
            owner: Some(svc("b", "web")),
        })
        .await,
        Code::PermissionDenied,
        &both,
    );
    assert_status(
        a.list_allocations(pb::ListAllocationsRequest {
            cluster_id: "b".into(),
            ..Default::default()
        })
        .await,
        Code::PermissionDenied,
        &both,
    );
    // b's address is still held: the refused release changed nothing.
    let still = cloud
        .get_allocation(pb::GetAllocationRequest {
            network: "shared".into(),
            owner: Some(svc("b", "web")),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(still.addresses, b_alloc.addresses);

    // Cloud-only methods.
    assert_status(
        a.delete_network(pb::DeleteNetworkRequest {
            name: "shared".into(),
            force: true,
        })
        .await,
        Code::PermissionDenied,
        &["cluster/a", "DeleteNetwork"],
    );
    assert_status(
        a.export(pb::ExportRequest {}).await,
        Code::PermissionDenied,
        &["cluster/a", "Export"],
    );
    // The streaming backups too.
    assert_status(
        a.export_stream(pb::ExportRequest {}).await.map(|_| ()),
        Code::PermissionDenied,
        &["cluster/a", "Export"],
    );
    assert_status(
        a.import_stream(futures::stream::iter(vec![pb::ImportChunk::default()]))
            .await,
        Code::PermissionDenied,
        &["cluster/a", "Import"],
    );
    let backup = cloud.export(pb::ExportRequest {}).await.unwrap().into_inner();
    assert_status(
        a.import(pb::ImportRequest {
            backup: Some(backup.clone()),
        })
        .await,
        Code::PermissionDenied,
        &["cluster/a", "Import"],
    );
    // Changing a network the cloud manages: refused; re-applying it unchanged: allowed.
    let mut changed = net_a("shared");
    changed.dns_servers = vec!["10.20.0.3".into()];
    assert_status(
        a.upsert_network(pb::UpsertNetworkRequest {
            network: Some(changed),
            expected_version: None,
            dry_run: false,
        })
        .await,
        Code::PermissionDenied,
        &["cluster/a", "shared"],
    );
    upsert(&mut a, net_a("shared")).await;

    // The reader reads but cannot write.
    reader
        .list_allocations(pb::ListAllocationsRequest::default())
        .await
        .unwrap();
    reader.get_usage(pb::GetUsageRequest::default()).await.unwrap();
    assert_status(
        reader.allocate(alloc_req("shared", svc("a", "x"))).await,
        Code::PermissionDenied,
        &["reader", "read-only"],
    );
    assert_status(
        reader
            .release(pb::ReleaseRequest {
                network: "shared".into(),
                owner: Some(svc("a", "web")),
            })
            .await,
        Code::PermissionDenied,
        &["reader"],
    );
    assert_status(
        reader
            .upsert_network(pb::UpsertNetworkRequest {
                network: Some(net_a("other")),
                expected_version: None,
                dry_run: false,
            })
            .await,
        Code::PermissionDenied,
        &["reader"],
    );

    // Cloud does everything.
    cloud
        .release(pb::ReleaseRequest {
            network: "shared".into(),
            owner: Some(svc("a", "web")),
        })
        .await
        .unwrap();
    cloud
        .delete_network(pb::DeleteNetworkRequest {
            name: "shared".into(),
            force: true,
        })
        .await
        .unwrap();
    cloud
        .import(pb::ImportRequest { backup: Some(backup) })
        .await
        .unwrap();

    // Every refused and allowed mutation was audited once with identity, method and outcome.
    let log = srv.log_text();
    let audited = |method: &str, who: &str, outcome: &str| {
        log.lines()
            .filter(|l| l.contains("audit") && l.contains(method) && l.contains(who) && l.contains(outcome))
            .count()
    };
    assert_eq!(
        audited("\"Allocate\"", "identity=cluster/a", "permission_denied"),
        1,
        "{}",
        srv.log_tail(60)
    );
    assert_eq!(
        audited("\"DeleteNetwork\"", "identity=cloud", "\"ok\""),
        1,
        "{}",
        srv.log_tail(60)
    );
}

#[tokio::test]
async fn unknown_ca_expired_and_missing_certificates_are_refused_at_the_handshake() {
    let pki = Pki::new();
    let other = Pki::with_trust_domain("elsewhere.example");
    let srv = start(&pki.serve_flags()).await;

    // A certificate from another CA (the client trusts the right server CA).
    let foreign = ClientTlsFiles {
        ca: Some(pki.path("ca.pem")),
        ..other.client("cloud")
    };
    let e = first_call_error(&srv, &foreign).await;
    refused(&srv, "UnknownIssuer", &e).await;

    // No certificate at all.
    let none = ClientTlsFiles {
        ca: Some(pki.path("ca.pem")),
        cert: None,
        key: None,
    };
    let e = first_call_error(&srv, &none).await;
    refused(&srv, "no certificates", &e).await;

    // An expired certificate from the right CA.
    let (cert, key) = expired_cloud_cert(&pki);
    let expired = ClientTlsFiles {
        ca: Some(pki.path("ca.pem")),
        cert: Some(cert),
        key: Some(key),
    };
    let e = first_call_error(&srv, &expired).await;
    refused(&srv, "certificate expired", &e).await;

    // The right certificate works (so the refusals above are about the certificates).
    let mut ok = client(&srv, &pki.client("cloud")).await;
    ok.list_networks(pb::ListNetworksRequest {}).await.unwrap();
}

/// The server logged a refused handshake for `reason`. (With TLS 1.3 the client may see the
/// server's alert or only the closed connection, depending on timing: `client_error` is shown,
/// the server's log is the authority.)
async fn refused(srv: &Server, reason: &str, client_error: &str) {
    eventually(
        &format!("a handshake refused for {reason}"),
        Duration::from_secs(10),
        || async {
            srv.log_text()
                .lines()
                .any(|l| l.contains("TLS handshake refused") && l.contains(reason))
                .then_some(())
        },
    )
    .await;
    eprintln!("client saw: {client_error}");
}

/// A cloud certificate signed by `pki`'s CA that expired yesterday.
fn expired_cloud_cert(pki: &Pki) -> (PathBuf, PathBuf) {
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, SanType};
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(pki.path("ca-key.pem")).unwrap()).unwrap();
    let issuer =
        Issuer::from_ca_cert_pem(&std::fs::read_to_string(pki.path("ca.pem")).unwrap(), ca_key).unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![SanType::URI("spiffe://cairn.local/cloud".try_into().unwrap())];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(30);
    p.not_after = now - time::Duration::days(1);
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &issuer).unwrap();
    let (c, k) = (pki.path("expired.pem"), pki.path("expired-key.pem"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

#[tokio::test]
async fn plaintext_cli_against_a_tls_store_says_so() {
    let pki = Pki::new();
    let srv = start(&pki.serve_flags()).await;
    let out = tokio::process::Command::new(bin())
        .args(["--endpoint", &srv.endpoint(), "network", "list"])
        .env_remove("CAIRN_IPAM_TLS_CA")
        .env_remove("CAIRN_IPAM_TLS_CERT")
        .env_remove("CAIRN_IPAM_TLS_KEY")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("speaks TLS: set --tls-ca, --tls-cert and --tls-key"),
        "stderr: {stderr}"
    );

    // The same command with the flags works.
    let out = tokio::process::Command::new(bin())
        .args(["--endpoint", &srv.endpoint(), "--tls-ca", &pki.s("ca.pem")])
        .args([
            "--tls-cert",
            &pki.s("reader.pem"),
            "--tls-key",
            &pki.s("reader-key.pem"),
        ])
        .args(["network", "list"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Replaces `to` with `from`'s content atomically (what a Secret update does, in effect).
fn replace(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

#[tokio::test]
async fn rotating_the_server_certificate_and_ca_bundle_loses_no_call() {
    let old = Pki::new();
    let new = Pki::new();
    // The server reads its files from here; the client trusts both CAs throughout.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = (
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
        dir.path().join("ca.crt"),
    );
    replace(&old.path("server.pem"), &cert);
    replace(&old.path("server-key.pem"), &key);
    replace(&old.path("ca.pem"), &ca);
    let both = dir.path().join("both.pem");
    let bundle = format!(
        "{}{}",
        std::fs::read_to_string(old.path("ca.pem")).unwrap(),
        std::fs::read_to_string(new.path("ca.pem")).unwrap()
    );
    std::fs::write(&both, bundle).unwrap();
    let p = |p: &Path| p.to_str().unwrap().to_string();
    let srv = start(&[
        "--default-reuse-grace".into(),
        "0s".into(),
        "--tls-cert".into(),
        p(&cert),
        "--tls-key".into(),
        p(&key),
        "--client-ca".into(),
        p(&ca),
    ])
    .await;
    let old_cloud = ClientTlsFiles {
        ca: Some(both.clone()),
        ..old.client("cloud")
    };
    upsert(&mut client(&srv, &old_cloud).await, net_a("n")).await;

    // Load: Allocates in a loop, a new connection (so a new handshake) every 5 calls.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, ok, failed, endpoint) = (stop.clone(), ok.clone(), failed.clone(), srv.endpoint());
        let files = old_cloud.clone();
        tokio::spawn(async move {
            let mut errors = Vec::new();
            for i in 0u64.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let ch = files.endpoint(&endpoint).unwrap().connect().await;
                let mut c = match ch {
                    Ok(ch) => pb::ipam_service_client::IpamServiceClient::new(ch),
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        errors.push(cairn_proto::tls::explain(&e, true));
                        continue;
                    }
                };
                for j in 0..5 {
                    // Allocate and release again, so the pool never runs out.
                    let owner = svc("c", &format!("s{i}-{j}"));
                    let r = match c.allocate(alloc_req("n", owner.clone())).await {
                        Ok(_) => {
                            let release = pb::ReleaseRequest {
                                network: "n".into(),
                                owner: Some(owner),
                            };
                            c.release(release).await.map(|_| ())
                        }
                        Err(e) => Err(e),
                    };
                    match r {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.push(e.to_string());
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            }
            errors
        })
    };
    eventually("calls before the rotation", Duration::from_secs(30), || async {
        (ok.load(Ordering::Relaxed) >= 20).then_some(())
    })
    .await;

    // Rotate: the CA bundle first (both CAs), then the new server certificate and key.
    replace(&both, &ca);
    replace(&new.path("server-key.pem"), &key);
    replace(&new.path("server.pem"), &cert);

    // The new CA's client certificate works once the bundle is re-read, and a client that
    // trusts only the new CA connects once the new server certificate is in use.
    let new_only = new.client("cloud");
    eventually("the rotated files in use", Duration::from_secs(30), || async {
        let mut c = connect(&srv, &new_only).await.ok()?;
        c.list_networks(pb::ListNetworksRequest {}).await.ok()
    })
    .await;
    let before = ok.load(Ordering::Relaxed);
    eventually("calls after the rotation", Duration::from_secs(30), || async {
        (ok.load(Ordering::Relaxed) >= before + 20).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let errors = load.await.unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "calls failed during rotation: {errors:?}"
    );
    assert!(srv.log_text().contains("TLS certificates reloaded"));
}

#[tokio::test]
async fn grpcurl_works_with_its_certificate_flags_and_fails_without() {
    let pki = Pki::new();
    let srv = start(&pki.serve_flags()).await;
    let grpcurl = |flags: Vec<String>| {
        let mut cmd = tokio::process::Command::new(grpcurl_bin());
        cmd.arg("-max-time").arg("30").args(flags);
        cmd.arg("-d").arg("{}").arg(srv.host_port());
        cmd.arg("cairn.ipam.v1.IpamService/ListNetworks");
        async move { cmd.output().await.unwrap() }
    };
    let ca = || vec!["-cacert".to_string(), pki.s("ca.pem")];

    let mut with_cert = ca();
    with_cert.extend([
        "-cert".into(),
        pki.s("reader.pem"),
        "-key".into(),
        pki.s("reader-key.pem"),
    ]);
    let out = grpcurl(with_cert).await;
    assert!(
        out.status.success(),
        "grpcurl with -cacert/-cert/-key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Reflection (used to resolve the method above) and health stay available to certificate holders.

    let out = grpcurl(ca()).await;
    assert!(
        !out.status.success(),
        "grpcurl without a client certificate succeeded"
    );
    let out = grpcurl(vec!["-plaintext".into()]).await;
    assert!(!out.status.success(), "grpcurl -plaintext succeeded");
}
