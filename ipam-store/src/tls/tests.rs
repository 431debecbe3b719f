//! Real handshakes over loopback TCP with certificates minted by rcgen.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Instant,
};

use futures::StreamExt as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType,
    SerialNumber, date_time_ymd,
};
use rustls::{ClientConfig, pki_types::ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_rustls::TlsConnector;

use super::*;
use crate::auth::{Identity, TrustDomain, identity_from_cert};

const TD: &str = "cairn.test";

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    let key = KeyPair::generate().expect("key");
    let pem = p.self_signed(&key).expect("self-sign").pem();
    Ca {
        issuer: Issuer::new(p, key),
        pem,
    }
}

struct Leaf {
    cert: String,
    key: String,
}

fn leaf(ca: &Ca, sans: Vec<SanType>, server: bool, serial: u64, expired: bool) -> Leaf {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.subject_alt_names = sans;
    p.serial_number = Some(SerialNumber::from(serial));
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    if expired {
        p.not_before = date_time_ymd(2020, 1, 1);
        p.not_after = date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().expect("key");
    let cert = p.signed_by(&key, &ca.issuer).expect("sign").pem();
    Leaf {
        cert,
        key: key.serialize_pem(),
    }
}

fn server_leaf(ca: &Ca) -> Leaf {
    leaf(
        ca,
        vec![
            SanType::DnsName("localhost".try_into().expect("dns")),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ],
        true,
        1,
        false,
    )
}

fn client_leaf(ca: &Ca, path: &str, serial: u64, expired: bool) -> Leaf {
    let uri = format!("spiffe://{TD}/{path}");
    leaf(
        ca,
        vec![SanType::URI(uri.as_str().try_into().expect("uri"))],
        false,
        serial,
        expired,
    )
}

struct Files {
    _dir: tempfile::TempDir,
    files: TlsFiles,
}

impl Files {
    fn new(server: &Leaf, ca: &Ca) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = TlsFiles {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
            client_ca: dir.path().join("ca.crt"),
            crls: vec![],
        };
        let f = Files { _dir: dir, files };
        f.write(server, ca);
        f
    }

    fn write(&self, server: &Leaf, ca: &Ca) {
        std::fs::write(&self.files.cert, &server.cert).expect("write");
        std::fs::write(&self.files.key, &server.key).expect("write");
        std::fs::write(&self.files.client_ca, &ca.pem).expect("write");
    }
}

/// A server: accepts TLS streams from `incoming`, reports each peer's identity and echoes.
struct Server {
    addr: SocketAddr,
    tls: Arc<ServerTls>,
    identities: tokio::sync::mpsc::UnboundedReceiver<Result<Identity, String>>,
}

async fn serve(tls: Arc<ServerTls>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut incoming = Box::pin(tls.incoming(listener));
    let (tx, identities) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let td = TrustDomain::new(TD).expect("td");
        while let Some(Ok(mut s)) = incoming.next().await {
            let id = s
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|leaf| identity_from_cert(leaf, &td).map_err(|e| e.to_string()))
                .unwrap_or_else(|| Err("no peer certificate".into()));
            let _ = tx.send(id);
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Server {
        addr,
        tls,
        identities,
    }
}

fn client_config(trust: &Ca, me: Option<&Leaf>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(trust.pem.as_bytes()).expect("ca pem"))
        .expect("root");
    let b = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut c = match me {
        Some(l) => b
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(l.cert.as_bytes()).expect("cert")],
                PrivateKeyDer::from_pem_slice(l.key.as_bytes()).expect("key"),
            )
            .expect("client auth"),
        None => b.with_no_client_auth(),
    };
    c.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(c)
}

type Conn = tokio_rustls::client::TlsStream<TcpStream>;

/// Connects and round-trips one message; the error text otherwise.
async fn connect(addr: SocketAddr, cfg: Arc<ClientConfig>) -> Result<Conn, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").expect("name");
    let mut s = TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    echo(&mut s).await?;
    Ok(s)
}

async fn echo(s: &mut Conn) -> Result<(), String> {
    s.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    // With TLS 1.3 the server judges the client certificate after the client's handshake
    // finished, so a refusal arrives as an alert on this first read.
    s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    if &buf == b"ping" {
        Ok(())
    } else {
        Err(format!("echoed {buf:?}"))
    }
}

async fn wait_for(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn client_from_the_ca_is_accepted_and_identified() {
    let ca = ca("cairn test ca");
    let f = Files::new(&server_leaf(&ca), &ca);
    let mut srv = serve(ServerTls::load(f.files.clone()).expect("load")).await;
    let a = client_leaf(&ca, "cluster/a", 10, false);
    let _c = connect(srv.addr, client_config(&ca, Some(&a)))
        .await
        .expect("accepted");
    assert_eq!(
        srv.identities.recv().await,
        Some(Ok(Identity::Cluster("a".into())))
    );
    let cloud = client_leaf(&ca, "cloud", 11, false);
    let _c = connect(srv.addr, client_config(&ca, Some(&cloud)))
        .await
        .expect("accepted");
    assert_eq!(srv.identities.recv().await, Some(Ok(Identity::Cloud)));
    assert_eq!(srv.tls.stats().handshakes.load(Ordering::Relaxed), 2);
    // The server speaks h2 to gRPC clients.
    assert_eq!(srv.tls.config().alpn_protocols, vec![b"h2".to_vec()]);
}

/// A refused client: the error it sees names the reason, and the server counted a failure
/// and yielded no stream.
async fn assert_refused(srv: &mut Server, cfg: Arc<ClientConfig>, alert: &str) {
    let before = srv.tls.stats().handshake_failures.load(Ordering::Relaxed);
    let e = connect(srv.addr, cfg).await.map(|_| ()).expect_err("refused");
    assert!(e.contains(alert), "expected {alert:?} in {e:?}");
    wait_for("the failure count", || {
        srv.tls.stats().handshake_failures.load(Ordering::Relaxed) == before + 1
    })
    .await;
    assert!(
        srv.identities.try_recv().is_err(),
        "a refused connection reached the server"
    );
}

#[tokio::test]
async fn other_ca_expired_and_missing_client_certificates_are_refused_at_the_handshake() {
    let ca1 = ca("cairn test ca");
    let other = ca("someone else");
    let f = Files::new(&server_leaf(&ca1), &ca1);
    let mut srv = serve(ServerTls::load(f.files.clone()).expect("load")).await;

    let foreign = client_leaf(&other, "cluster/a", 10, false);
    assert_refused(&mut srv, client_config(&ca1, Some(&foreign)), "UnknownCA").await;
    let expired = client_leaf(&ca1, "cluster/a", 11, true);
    assert_refused(
        &mut srv,
        client_config(&ca1, Some(&expired)),
        "CertificateExpired",
    )
    .await;
    assert_refused(&mut srv, client_config(&ca1, None), "CertificateRequired").await;

    // Plaintext is refused too (no stream reaches the server).
    let before = srv.tls.stats().handshake_failures.load(Ordering::Relaxed);
    let mut tcp = TcpStream::connect(srv.addr).await.expect("tcp");
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("write");
    wait_for("the plaintext failure", || {
        srv.tls.stats().handshake_failures.load(Ordering::Relaxed) == before + 1
    })
    .await;
    assert!(srv.identities.try_recv().is_err());

    // And a good client still gets in afterwards.
    let good = client_leaf(&ca1, "reader", 12, false);
    connect(srv.addr, client_config(&ca1, Some(&good)))
        .await
        .expect("accepted");
    assert_eq!(srv.identities.recv().await, Some(Ok(Identity::Reader)));
}

#[tokio::test]
async fn revoked_client_certificate_is_refused() {
    let ca = ca("cairn test ca");
    let mut f = Files::new(&server_leaf(&ca), &ca);
    let crl = CertificateRevocationListParams {
        this_update: date_time_ymd(2025, 1, 1),
        next_update: date_time_ymd(2099, 1, 1),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: vec![RevokedCertParams {
            serial_number: SerialNumber::from(42u64),
            revocation_time: date_time_ymd(2025, 6, 1),
            reason_code: None,
            invalidity_date: None,
        }],
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&ca.issuer)
    .expect("crl");
    let crl_path = f.files.client_ca.with_file_name("crl.pem");
    std::fs::write(&crl_path, crl.pem().expect("pem")).expect("write");
    f.files.crls = vec![crl_path];
    let mut srv = serve(ServerTls::load(f.files.clone()).expect("load")).await;

    let revoked = client_leaf(&ca, "cluster/a", 42, false);
    assert_refused(&mut srv, client_config(&ca, Some(&revoked)), "CertificateRevoked").await;
    let fine = client_leaf(&ca, "cluster/a", 43, false);
    connect(srv.addr, client_config(&ca, Some(&fine)))
        .await
        .expect("accepted");
}

#[tokio::test]
async fn rotation_swaps_certificate_and_ca_for_new_handshakes_only() {
    let ca1 = ca("ca one");
    let ca2 = ca("ca two");
    let f = Files::new(&server_leaf(&ca1), &ca1);
    let tls = ServerTls::load(f.files.clone()).expect("load");
    let mut srv = serve(Arc::clone(&tls)).await;
    let c1 = client_leaf(&ca1, "cluster/a", 10, false);
    let c2 = client_leaf(&ca2, "cluster/b", 11, false);

    let mut established = connect(srv.addr, client_config(&ca1, Some(&c1)))
        .await
        .expect("accepted");
    assert!(!tls.reload_if_changed().expect("unchanged"));

    f.write(&server_leaf(&ca2), &ca2);
    assert!(tls.reload_if_changed().expect("reload"));
    assert_eq!(tls.stats().reloads.load(Ordering::Relaxed), 1);

    // New handshakes: the new server certificate (a client trusting only CA one refuses it)
    // and the new client CA.
    let e = connect(srv.addr, client_config(&ca1, Some(&c1)))
        .await
        .map(|_| ())
        .expect_err("old ca");
    assert!(e.contains("UnknownIssuer"), "{e}");
    let _new = connect(srv.addr, client_config(&ca2, Some(&c2)))
        .await
        .expect("new pair");
    assert_eq!(
        srv.identities.recv().await,
        Some(Ok(Identity::Cluster("a".into())))
    );
    assert_eq!(
        srv.identities.recv().await,
        Some(Ok(Identity::Cluster("b".into())))
    );
    let e = connect(srv.addr, client_config(&ca2, Some(&c1)))
        .await
        .map(|_| ())
        .expect_err("old client");
    assert!(e.contains("UnknownCA"), "{e}");

    // The connection made before the swap keeps working.
    echo(&mut established).await.expect("established connection");
}

#[tokio::test]
async fn a_bad_new_file_keeps_the_old_config_and_names_the_file() {
    let ca = ca("cairn test ca");
    let f = Files::new(&server_leaf(&ca), &ca);
    let tls = ServerTls::load(f.files.clone()).expect("load");
    let srv = serve(Arc::clone(&tls)).await;
    let c = client_leaf(&ca, "cloud", 10, false);

    std::fs::write(&f.files.key, "not a key").expect("write");
    let e = tls.reload_if_changed().expect_err("bad key");
    assert!(
        e.to_string().starts_with(&format!(
            "--tls-key {}: no usable private key",
            f.files.key.display()
        )),
        "{e}"
    );
    // Reported once; the old config still serves.
    assert!(!tls.reload_if_changed().expect("same bad content"));
    assert_eq!(tls.stats().reload_failures.load(Ordering::Relaxed), 1);
    connect(srv.addr, client_config(&ca, Some(&c)))
        .await
        .expect("old config serves");

    // A key that belongs to another certificate.
    let other = server_leaf(&ca);
    std::fs::write(&f.files.key, &other.key).expect("write");
    let e = tls.reload_if_changed().expect_err("mismatch");
    assert!(e.to_string().contains("does not fit the certificate"), "{e}");

    std::fs::write(&f.files.client_ca, "garbage").expect("write");
    std::fs::write(&f.files.key, &server_leaf(&ca).key).expect("write");
    let e = tls.reload_if_changed().expect_err("bad ca");
    assert!(
        e.to_string().starts_with("--tls-key") || e.to_string().starts_with("--client-ca"),
        "{e}"
    );

    // Fixed files load again.
    f.write(&server_leaf(&ca), &ca);
    assert!(tls.reload_if_changed().expect("fixed"));
    connect(srv.addr, client_config(&ca, Some(&c)))
        .await
        .expect("new config serves");
}

#[test]
fn load_errors_name_flag_and_file() {
    let ca = ca("cairn test ca");
    let f = Files::new(&server_leaf(&ca), &ca);
    let mut missing = f.files.clone();
    missing.client_ca = f.files.client_ca.with_file_name("nope.pem");
    let e = ServerTls::load(missing).expect_err("missing");
    assert!(
        e.to_string().starts_with(&format!(
            "--client-ca {}: ",
            f.files.client_ca.with_file_name("nope.pem").display()
        )),
        "{e}"
    );
    std::fs::write(&f.files.cert, "").expect("write");
    let e = ServerTls::load(f.files.clone()).expect_err("empty cert");
    assert_eq!(
        e.to_string(),
        format!(
            "--tls-cert {}: no CERTIFICATE block found",
            f.files.cert.display()
        )
    );
}

#[tokio::test]
async fn watch_files_picks_up_a_rotation() {
    let ca1 = ca("ca one");
    let ca2 = ca("ca two");
    let f = Files::new(&server_leaf(&ca1), &ca1);
    let tls = ServerTls::load(f.files.clone()).expect("load");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let w = tokio::spawn(Arc::clone(&tls).watch_files(Duration::from_millis(20), async {
        let _ = stop_rx.await;
    }));
    f.write(&server_leaf(&ca2), &ca2);
    wait_for("the reload", || tls.stats().reloads.load(Ordering::Relaxed) == 1).await;
    let _ = stop_tx.send(());
    w.await.expect("watcher stops");
}

#[test]
fn serve_flags_go_together() {
    let none = ServeTlsArgs {
        trust_domain: "cairn.local".into(),
        ..Default::default()
    };
    assert_eq!(none.files(None, None).expect("plaintext"), None);
    assert_eq!(none.trust_domain().expect("td").as_str(), "cairn.local");
    let ca = ServeTlsArgs {
        client_ca: Some("ca.pem".into()),
        ..none.clone()
    };
    let f = ca
        .files(Some(Path::new("c.pem")), Some(Path::new("k.pem")))
        .expect("mtls")
        .expect("some");
    assert_eq!(f.client_ca, PathBuf::from("ca.pem"));
    let e = ca.files(Some(Path::new("c.pem")), None).expect_err("no key");
    assert_eq!(
        e.to_string(),
        "mutual TLS needs --tls-cert, --tls-key and --client-ca together; missing --tls-key"
    );
    let e = none
        .files(Some(Path::new("c.pem")), Some(Path::new("k.pem")))
        .expect_err("no ca");
    assert!(e.to_string().ends_with("missing --client-ca"), "{e}");
    let crl_only = ServeTlsArgs {
        client_crl: vec!["crl.pem".into()],
        ..none.clone()
    };
    assert!(crl_only.files(None, None).is_err());
    let bad = ServeTlsArgs {
        trust_domain: "Bad Domain".into(),
        ..none
    };
    assert!(
        bad.trust_domain()
            .expect_err("bad")
            .to_string()
            .starts_with("--trust-domain \"Bad Domain\": ")
    );
}

/// The whole path phase B wires: tonic serving over `incoming`, a handler seeing the caller's
/// identity through `Request::peer_certs()`, a client built by `cairn_proto::tls`.
#[tokio::test]
async fn tonic_over_incoming_sees_the_identity_of_a_cairn_proto_client() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let ca = ca("cairn test ca");
    let f = Files::new(&server_leaf(&ca), &ca);
    let tls = ServerTls::load(f.files.clone()).expect("load");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let td = TrustDomain::new(TD).expect("td");
    let svc = tonic::service::interceptor::InterceptedService::new(health, move |req: tonic::Request<()>| {
        let id = crate::auth::identity_of(&req, &td)?;
        record.lock().expect("lock").push(id);
        Ok(req)
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tls.incoming(listener)),
    );

    let client = client_leaf(&ca, "cluster/a", 20, false);
    let files = cairn_proto::tls::ClientTlsFiles {
        ca: Some(f.files.client_ca.clone()),
        cert: Some(f.files.cert.with_file_name("client.pem")),
        key: Some(f.files.cert.with_file_name("client-key.pem")),
    };
    std::fs::write(files.cert.as_ref().expect("cert"), &client.cert).expect("write");
    std::fs::write(files.key.as_ref().expect("key"), &client.key).expect("write");
    let ch = files
        .endpoint(&format!("http://127.0.0.1:{port}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    HealthClient::new(ch)
        .check(HealthCheckRequest::default())
        .await
        .expect("health over mTLS");
    assert_eq!(
        *seen.lock().expect("lock"),
        vec![Some(Identity::Cluster("a".into()))]
    );

    // A plaintext client is refused with the clear message.
    let plain = cairn_proto::tls::ClientTlsFiles::default()
        .endpoint(&format!("http://127.0.0.1:{port}"))
        .expect("endpoint");
    let e: Box<dyn std::error::Error + Send + Sync> = match plain.connect().await {
        Err(e) => e.into(),
        Ok(ch) => HealthClient::new(ch)
            .check(HealthCheckRequest::default())
            .await
            .map(|_| ())
            .expect_err("plaintext refused")
            .into(),
    };
    assert_eq!(
        cairn_proto::tls::diagnose(&*e, false),
        Some(cairn_proto::tls::Mismatch::PlaintextToTls),
        "{}",
        cairn_proto::tls::explain(&*e, false)
    );
}
