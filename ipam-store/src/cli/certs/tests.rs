use std::{
    net::{Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::SystemTime,
};

use clap::Parser;
use rustls::{
    RootCertStore,
    client::{WebPkiServerVerifier, danger::ServerCertVerifier as _},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
    server::WebPkiClientVerifier,
};

use super::*;
use crate::{
    auth::identity_from_cert,
    tls::{ServerTls, TlsFiles},
};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

fn pem_cert(p: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(p).expect("certificate")
}

fn roots(dir: &Path) -> Arc<RootCertStore> {
    let mut r = RootCertStore::empty();
    r.add(pem_cert(&dir.join(CA_CERT))).expect("root");
    Arc::new(r)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[test]
fn init_and_issue_write_0600_files_that_validate_against_each_other() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("pki");
    let written = init(&dir, "fleet.example", 30, false).expect("init");
    assert_eq!(written.len(), 3);
    for p in &written {
        assert_eq!(mode(p), 0o600, "{}", p.display());
    }

    let now = UnixTime::since_unix_epoch(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("time"),
    );
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots(&dir), provider())
        .build()
        .expect("client verifier");
    let td = TrustDomain::new("fleet.example").expect("td");
    for (role, want) in [
        (
            Role::Client(Identity::Cluster("prod-a".into())),
            Identity::Cluster("prod-a".into()),
        ),
        (Role::Client(Identity::Cloud), Identity::Cloud),
        (Role::Client(Identity::Reader), Identity::Reader),
    ] {
        let files = issue(&dir, &role, 7, false).expect("issue");
        assert_eq!(
            files,
            vec![
                dir.join(format!("{}.pem", role.stem())),
                dir.join(format!("{}-key.pem", role.stem()))
            ]
        );
        for p in &files {
            assert_eq!(mode(p), 0o600, "{}", p.display());
        }
        let leaf = pem_cert(&files[0]);
        client_verifier
            .verify_client_cert(&leaf, &[], now)
            .expect("client certificate chains to the CA");
        assert_eq!(identity_from_cert(&leaf, &td), Ok(want));
    }

    let server = Role::Server {
        dns: vec!["cairn-ipam.cairn-system.svc".into(), "localhost".into()],
        ip: vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()],
    };
    let files = issue(&dir, &server, 7, false).expect("issue server");
    let server_verifier = WebPkiServerVerifier::builder_with_provider(roots(&dir), provider())
        .build()
        .expect("server verifier");
    let leaf = pem_cert(&files[0]);
    for name in ["cairn-ipam.cairn-system.svc", "localhost", "127.0.0.1", "::1"] {
        let name = ServerName::try_from(name).expect("name");
        server_verifier
            .verify_server_cert(&leaf, &[], &name, &[], now)
            .unwrap_or_else(|e| panic!("{name:?}: {e}"));
    }
    let other = ServerName::try_from("other.example").expect("name");
    assert!(
        server_verifier
            .verify_server_cert(&leaf, &[], &other, &[], now)
            .is_err()
    );

    // The store loads the server pair with the CA as its client CA.
    ServerTls::load(TlsFiles {
        cert: files[0].clone(),
        key: files[1].clone(),
        client_ca: dir.join(CA_CERT),
        crls: vec![],
    })
    .expect("the store accepts the issued files");
}

#[test]
fn existing_files_are_kept_without_force() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    init(dir, "cairn.local", 30, false).expect("init");
    let ca_before = std::fs::read(dir.join(CA_CERT)).expect("read");
    let e = init(dir, "cairn.local", 30, false).expect_err("second init");
    assert_eq!(
        e.to_string(),
        format!(
            "{} exists; pass --force to overwrite it",
            dir.join(CA_CERT).display()
        )
    );
    assert_eq!(std::fs::read(dir.join(CA_CERT)).expect("read"), ca_before);

    let role = Role::Client(Identity::Cluster("a".into()));
    issue(dir, &role, 1, false).expect("issue");
    let before = std::fs::read(dir.join("cluster-a.pem")).expect("read");
    assert!(issue(dir, &role, 1, false).is_err());
    assert_eq!(std::fs::read(dir.join("cluster-a.pem")).expect("read"), before);

    // --force replaces, and resets a loosened mode to 0600.
    std::fs::set_permissions(dir.join("cluster-a.pem"), std::fs::Permissions::from_mode(0o644))
        .expect("chmod");
    issue(dir, &role, 1, true).expect("forced");
    assert_ne!(std::fs::read(dir.join("cluster-a.pem")).expect("read"), before);
    assert_eq!(mode(&dir.join("cluster-a.pem")), 0o600);
}

#[test]
fn bad_input_is_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let e = init(tmp.path(), "Not A Domain", 30, false).expect_err("td");
    assert!(
        format!("{e:#}").starts_with("--trust-domain: trust_domain: "),
        "{e:#}"
    );
    let e = issue(tmp.path(), &Role::Client(Identity::Cloud), 1, false).expect_err("no ca");
    assert!(format!("{e:#}").contains("run `cairn-ipam certs init"), "{e:#}");
    init(tmp.path(), "cairn.local", 30, false).expect("init");
    let e = issue(tmp.path(), &Role::Client(Identity::Cloud), 0, false).expect_err("days");
    assert_eq!(e.to_string(), "--days must be at least 1");
}

/// The clap surface: exactly one role, --dns/--ip only with --server.
#[derive(Parser, Debug)]
struct Cli {
    #[command(subcommand)]
    cmd: CertsCmd,
}

#[test]
fn command_line() {
    let parse = |args: &[&str]| Cli::try_parse_from(std::iter::once("certs").chain(args.iter().copied()));
    let Ok(Cli {
        cmd: CertsCmd::Issue(a),
    }) = parse(&["issue", "--dir", "d", "--cluster", "a"])
    else {
        panic!("issue --cluster parses");
    };
    assert_eq!(
        a.role().expect("role"),
        Role::Client(Identity::Cluster("a".into()))
    );
    assert!(parse(&["issue", "--dir", "d"]).is_err(), "a role is required");
    assert!(
        parse(&["issue", "--dir", "d", "--cloud", "--reader"]).is_err(),
        "one role"
    );
    let Ok(Cli {
        cmd: CertsCmd::Issue(a),
    }) = parse(&["issue", "--dir", "d", "--cloud", "--dns", "x"])
    else {
        panic!("parses");
    };
    assert_eq!(
        a.role().expect_err("--dns without --server").to_string(),
        "--dns and --ip apply only to --server"
    );
    let Ok(Cli {
        cmd: CertsCmd::Issue(a),
    }) = parse(&["issue", "--dir", "d", "--server"])
    else {
        panic!("issue --server parses");
    };
    assert!(
        a.role()
            .expect_err("no names")
            .to_string()
            .contains("--server needs at least one --dns or --ip")
    );
    let Ok(Cli {
        cmd: CertsCmd::Issue(a),
    }) = parse(&["issue", "--dir", "d", "--cluster", "Bad_Id"])
    else {
        panic!("parses");
    };
    assert!(
        a.role()
            .expect_err("bad id")
            .to_string()
            .starts_with("--cluster: ")
    );
    assert!(matches!(
        parse(&["init", "--dir", "d"]),
        Ok(Cli {
            cmd: CertsCmd::Init { .. }
        })
    ));
}
