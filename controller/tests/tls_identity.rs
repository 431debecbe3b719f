//! `cairn-ccm` refuses to start when its store client certificate names another cluster than
//! `--cluster-id` (checked before it talks to Kubernetes or the store), and names both.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};

/// Writes a CA and a client certificate for `spiffe://cairn.local/cluster/<cluster>` into
/// `dir`; returns the paths of (ca, cert, key).
fn mint(dir: &std::path::Path, cluster: &str) -> [String; 3] {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    let uri = format!("spiffe://cairn.local/cluster/{cluster}");
    p.subject_alt_names = vec![SanType::URI(uri.as_str().try_into().unwrap())];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &issuer).unwrap();
    let files = [
        (dir.join("ca.pem"), ca_pem),
        (dir.join("cert.pem"), cert.pem()),
        (dir.join("key.pem"), key.serialize_pem()),
    ];
    for (path, pem) in &files {
        std::fs::write(path, pem).unwrap();
    }
    files.map(|(p, _)| p.to_str().unwrap().to_string())
}

#[test]
fn a_certificate_of_another_cluster_is_refused_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let [ca, cert, key] = mint(dir.path(), "b");
    let out = Command::new(env!("CARGO_BIN_EXE_cairn-ccm"))
        .args([
            "--cluster-id",
            "a",
            "--tls-ca",
            &ca,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ])
        // Would be used only after the identity check; point it nowhere useful.
        .args(["--kubeconfig", "/nonexistent", "--leader-elect", "false"])
        .env_remove("CAIRN_CLUSTER_ID")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "cairn-ccm started: {stderr}");
    assert!(
        stderr.contains("spiffe://cairn.local/cluster/b") && stderr.contains("\"a\""),
        "stderr does not name both identities: {stderr}"
    );
    assert!(
        !stderr.contains("/nonexistent"),
        "failed on the kubeconfig, not the identity: {stderr}"
    );
}
