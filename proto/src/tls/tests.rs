//! Real servers on loopback (tonic's own TLS and plaintext, serving gRPC health), real clients
//! built from files, certificates minted by rcgen.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use tonic::transport::{Server, ServerTlsConfig};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use super::*;

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    let key = KeyPair::generate().expect("key");
    let pem = p.self_signed(&key).expect("sign").pem();
    Ca {
        issuer: Issuer::new(p, key),
        pem,
    }
}

fn leaf(ca: &Ca, sans: Vec<SanType>, eku: ExtendedKeyUsagePurpose) -> (String, String) {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.subject_alt_names = sans;
    p.extended_key_usages = vec![eku];
    let key = KeyPair::generate().expect("key");
    (
        p.signed_by(&key, &ca.issuer).expect("sign").pem(),
        key.serialize_pem(),
    )
}

fn server_cert(ca: &Ca, host: &str) -> (String, String) {
    let mut sans = vec![SanType::DnsName(host.try_into().expect("dns"))];
    if host == "localhost" {
        sans.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }
    leaf(ca, sans, ExtendedKeyUsagePurpose::ServerAuth)
}

fn client_cert(ca: &Ca, uri: &str) -> (String, String) {
    leaf(
        ca,
        vec![SanType::URI(uri.try_into().expect("uri"))],
        ExtendedKeyUsagePurpose::ClientAuth,
    )
}

/// Serves gRPC health on loopback; with `tls` = (server cert, key, client CA) it requires
/// client certificates from that CA.
async fn serve(tls: Option<((String, String), &Ca)>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_reporter, health) = tonic_health::server::health_reporter();
    let mut b = Server::builder();
    if let Some(((cert, key), ca)) = tls {
        b = b
            .tls_config(
                ServerTlsConfig::new()
                    .identity(Identity::from_pem(cert, key))
                    .client_ca_root(Certificate::from_pem(&ca.pem)),
            )
            .expect("server tls");
    }
    let router = b.add_service(health);
    tokio::spawn(router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)));
    addr
}

struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Self {
        Dir {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn file(&self, name: &str, content: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, content).expect("write");
        p
    }

    /// Files for a client trusting `trust` with an optional certificate.
    fn client(&self, trust: &Ca, me: Option<&(String, String)>) -> ClientTlsFiles {
        ClientTlsFiles {
            ca: Some(self.file("ca.pem", &trust.pem)),
            cert: me.map(|(c, _)| self.file("client.pem", c)),
            key: me.map(|(_, k)| self.file("client-key.pem", k)),
        }
    }
}

/// Connects and makes one health call; the error, boxed, if either fails.
async fn call(files: &ClientTlsFiles, uri: &str) -> Result<(), Box<dyn StdError + Send + Sync>> {
    let ep = files.endpoint(uri)?.connect_timeout(Duration::from_secs(5));
    let ch = ep.connect().await?;
    HealthClient::new(ch).check(HealthCheckRequest::default()).await?;
    Ok(())
}

async fn mismatch(files: &ClientTlsFiles, uri: &str) -> Mismatch {
    let e = call(files, uri).await.expect_err("the call must fail");
    let explained = explain(&*e, files.is_set());
    diagnose(&*e, files.is_set()).unwrap_or_else(|| panic!("not recognised: {explained}"))
}

#[tokio::test]
async fn mtls_call_succeeds() {
    let ca = ca("store ca");
    let d = Dir::new();
    let addr = serve(Some((server_cert(&ca, "localhost"), &ca))).await;
    let me = client_cert(&ca, "spiffe://cairn.test/cluster/a");
    call(
        &d.client(&ca, Some(&me)),
        &format!("http://127.0.0.1:{}", addr.port()),
    )
    .await
    .expect("mTLS call over an http:// endpoint upgraded to https");
}

#[tokio::test]
async fn plaintext_client_to_tls_server() {
    let ca = ca("store ca");
    let addr = serve(Some((server_cert(&ca, "localhost"), &ca))).await;
    let m = mismatch(
        &ClientTlsFiles::default(),
        &format!("http://127.0.0.1:{}", addr.port()),
    )
    .await;
    assert_eq!(m, Mismatch::PlaintextToTls);
    assert!(m.to_string().contains("set --tls-ca, --tls-cert and --tls-key"));
}

/// The same hang-up can surface as hyper's `Canceled` ("connection closed"), depending on
/// when the server's close lands (seen in CI).
#[test]
fn a_cancelled_plaintext_call_to_a_tls_server_is_a_plaintext_mismatch() {
    let e = std::io::Error::other(
        "Cancelled: operation was canceled: transport error: operation was canceled: connection closed",
    );
    assert_eq!(diagnose(&e, false), Some(Mismatch::PlaintextToTls));
    assert_eq!(
        diagnose(&e, true),
        None,
        "a TLS client's closed connection is something else"
    );
}

#[tokio::test]
async fn tls_client_to_plaintext_server() {
    let ca = ca("store ca");
    let d = Dir::new();
    let addr = serve(None).await;
    let me = client_cert(&ca, "spiffe://cairn.test/cluster/a");
    let m = mismatch(
        &d.client(&ca, Some(&me)),
        &format!("https://127.0.0.1:{}", addr.port()),
    )
    .await;
    assert_eq!(m, Mismatch::TlsToPlaintext);
}

#[tokio::test]
async fn server_certificate_from_another_ca() {
    let ca1 = ca("store ca");
    let other = ca("other ca");
    let d = Dir::new();
    let addr = serve(Some((server_cert(&ca1, "localhost"), &ca1))).await;
    let me = client_cert(&ca1, "spiffe://cairn.test/cluster/a");
    let m = mismatch(
        &d.client(&other, Some(&me)),
        &format!("https://127.0.0.1:{}", addr.port()),
    )
    .await;
    assert_eq!(m, Mismatch::UnknownServerCa);
}

#[tokio::test]
async fn server_certificate_for_another_name() {
    let ca = ca("store ca");
    let d = Dir::new();
    let addr = serve(Some((server_cert(&ca, "store.example.invalid"), &ca))).await;
    let me = client_cert(&ca, "spiffe://cairn.test/cluster/a");
    let m = mismatch(
        &d.client(&ca, Some(&me)),
        &format!("https://127.0.0.1:{}", addr.port()),
    )
    .await;
    assert_eq!(m, Mismatch::WrongServerName);
}

#[tokio::test]
async fn no_client_certificate() {
    let ca = ca("store ca");
    let d = Dir::new();
    let addr = serve(Some((server_cert(&ca, "localhost"), &ca))).await;
    let m = mismatch(
        &d.client(&ca, None),
        &format!("https://127.0.0.1:{}", addr.port()),
    )
    .await;
    assert_eq!(m, Mismatch::ClientCertRequired);
}

#[tokio::test]
async fn client_certificate_from_another_ca() {
    let ca1 = ca("store ca");
    let other = ca("other ca");
    let d = Dir::new();
    let addr = serve(Some((server_cert(&ca1, "localhost"), &ca1))).await;
    let me = client_cert(&other, "spiffe://cairn.test/cluster/a");
    let m = mismatch(
        &d.client(&ca1, Some(&me)),
        &format!("https://127.0.0.1:{}", addr.port()),
    )
    .await;
    assert!(matches!(m, Mismatch::ClientCertRefused(_)), "{m:?}");
}

#[test]
fn flag_errors_name_flag_and_file() {
    let ca = ca("store ca");
    let d = Dir::new();
    let me = client_cert(&ca, "spiffe://cairn.test/cluster/a");
    let good = d.client(&ca, Some(&me));
    assert!(good.config().expect("config").is_some());
    assert!(ClientTlsFiles::default().config().expect("plaintext").is_none());

    let no_ca = ClientTlsFiles {
        ca: None,
        ..good.clone()
    };
    assert_eq!(
        no_ca.config().expect_err("no ca").to_string(),
        "--tls-cert is set but --tls-ca is not; the store's certificate is checked against that CA only"
    );
    let no_key = ClientTlsFiles {
        key: None,
        ..good.clone()
    };
    assert!(
        no_key
            .config()
            .expect_err("no key")
            .to_string()
            .starts_with("--tls-cert is set but --tls-key is not")
    );
    let no_cert = ClientTlsFiles {
        cert: None,
        ..good.clone()
    };
    assert!(
        no_cert
            .config()
            .expect_err("no cert")
            .to_string()
            .starts_with("--tls-key is set but --tls-cert is not")
    );

    let missing = d.dir.path().join("missing.pem");
    let e = ClientTlsFiles {
        ca: Some(missing.clone()),
        ..good.clone()
    }
    .config()
    .expect_err("missing file");
    assert!(
        e.to_string()
            .starts_with(&format!("--tls-ca {}: ", missing.display())),
        "{e}"
    );
    let junk = d.file("junk.pem", "hello");
    let e = ClientTlsFiles {
        cert: Some(junk.clone()),
        ..good.clone()
    }
    .config()
    .expect_err("junk cert");
    assert_eq!(
        e.to_string(),
        format!("--tls-cert {}: no CERTIFICATE block found", junk.display())
    );
    let e = ClientTlsFiles {
        key: Some(junk.clone()),
        ..good.clone()
    }
    .config()
    .expect_err("junk key");
    assert!(
        e.to_string()
            .starts_with(&format!("--tls-key {}: no usable private key", junk.display())),
        "{e}"
    );
}

#[test]
fn endpoint_scheme_follows_the_tls_flags() {
    let ca = ca("store ca");
    let d = Dir::new();
    let tls = d.client(&ca, None);
    assert_eq!(
        tls.endpoint("http://127.0.0.1:1")
            .expect("upgraded")
            .uri()
            .scheme_str(),
        Some("https")
    );
    let plain = ClientTlsFiles::default();
    assert_eq!(
        plain
            .endpoint("http://127.0.0.1:1")
            .expect("plain")
            .uri()
            .scheme_str(),
        Some("http")
    );
    let e = plain
        .endpoint("https://127.0.0.1:1")
        .expect_err("https without tls");
    assert!(e.to_string().contains("https:// needs --tls-ca"), "{e}");
    let e = plain.endpoint("127.0.0.1:1").expect_err("no scheme");
    assert!(
        e.to_string().contains("must start with http:// or https://"),
        "{e}"
    );
}

#[test]
fn controller_identity_must_match_its_cluster_id() {
    let ca = ca("store ca");
    let d = Dir::new();
    let a = d.client(&ca, Some(&client_cert(&ca, "spiffe://cairn.test/cluster/a")));
    a.check_cluster_identity("a").expect("matches");
    assert_eq!(
        a.spiffe_ids().expect("ids"),
        vec!["spiffe://cairn.test/cluster/a".to_string()]
    );
    let e = a.check_cluster_identity("b").expect_err("other cluster");
    assert!(
        e.to_string().ends_with(
            "names spiffe://cairn.test/cluster/a, but --cluster-id is \"b\" (expected spiffe://<trust domain>/cluster/b)"
        ),
        "{e}"
    );
    let cloud = d.client(&ca, Some(&client_cert(&ca, "spiffe://cairn.test/cloud")));
    assert!(cloud.check_cluster_identity("a").is_err());
    // A longer id that merely starts with the cluster id is not it.
    let ab = d.client(&ca, Some(&client_cert(&ca, "spiffe://cairn.test/cluster/ab")));
    assert!(ab.check_cluster_identity("a").is_err());
    ClientTlsFiles::default()
        .check_cluster_identity("a")
        .expect("no certificate, nothing to check");
}
