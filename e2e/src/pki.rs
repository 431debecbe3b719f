//! PKI for one control plane, made with the openssl CLI: a CA, an apiserver serving
//! certificate for 127.0.0.1/localhost signed by it, and a service-account signing key pair.
//! EC P-256 keys: they generate in milliseconds, and rustls, Go and kube's SA tokens (ES256)
//! all accept them.

use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::error::{Error, Result};

/// Files produced by [`generate`].
#[derive(Debug, Clone)]
pub(crate) struct Pki {
    pub(crate) dir: PathBuf,
    pub(crate) ca_cert: PathBuf,
    pub(crate) ca_der: Vec<u8>,
    pub(crate) serving_cert: PathBuf,
    pub(crate) serving_key: PathBuf,
    pub(crate) sa_key: PathBuf,
    pub(crate) sa_pub: PathBuf,
}

async fn openssl(dir: &Path, step: &'static str, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| {
            Error::io(
                format!("running openssl ({step}); is the openssl CLI installed?"),
                e,
            )
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Openssl {
            step,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

pub(crate) async fn generate(dir: &Path) -> Result<Pki> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    const EC: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    let ca = [
        &[
            "req",
            "-x509",
            "-nodes",
            "-days",
            "3650",
            "-subj",
            "/CN=cairn-e2e-ca",
        ][..],
        &EC,
        &[
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
    ]
    .concat();
    let csr = [
        &["req", "-nodes", "-subj", "/CN=kube-apiserver"][..],
        &EC,
        &["-keyout", "apiserver.key", "-out", "apiserver.csr"],
    ]
    .concat();
    // CA and serving key are independent: generate them concurrently.
    let (a, b, c) = tokio::join!(
        openssl(dir, "CA", &ca),
        openssl(dir, "serving key", &csr),
        openssl(
            dir,
            "service-account key",
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "sa.key"
            ]
        ),
    );
    a?;
    b?;
    c?;

    // rustls only matches IP addresses against IP SANs, so 127.0.0.1 must be one.
    let ext = dir.join("apiserver.ext");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n\
         extendedKeyUsage=serverAuth\n\
         keyUsage=critical,digitalSignature\n\
         basicConstraints=critical,CA:FALSE\n",
    )
    .map_err(|e| Error::io("writing apiserver.ext", e))?;
    let (a, b, c) = tokio::join!(
        openssl(
            dir,
            "serving certificate",
            &[
                "x509",
                "-req",
                "-in",
                "apiserver.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "3650",
                "-extfile",
                "apiserver.ext",
                "-out",
                "apiserver.crt",
            ]
        ),
        openssl(
            dir,
            "service-account public key",
            &["ec", "-in", "sa.key", "-pubout", "-out", "sa.pub"]
        ),
        openssl(
            dir,
            "CA to DER",
            &["x509", "-in", "ca.crt", "-outform", "DER", "-out", "ca.der"]
        ),
    );
    a?;
    b?;
    c?;

    let ca_der = std::fs::read(dir.join("ca.der")).map_err(|e| Error::io("reading ca.der", e))?;
    Ok(Pki {
        dir: dir.to_owned(),
        ca_cert: dir.join("ca.crt"),
        ca_der,
        serving_cert: dir.join("apiserver.crt"),
        serving_key: dir.join("apiserver.key"),
        sa_key: dir.join("sa.key"),
        sa_pub: dir.join("sa.pub"),
    })
}
