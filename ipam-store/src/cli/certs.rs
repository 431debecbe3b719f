//! `cairn-ipam certs`: a small CA for people without a PKI.
//!
//! - `certs init --dir D [--trust-domain T]` writes `D/ca.pem`, `D/ca-key.pem` and
//!   `D/trust-domain`.
//! - `certs issue --dir D (--cluster ID | --cloud | --reader | --server --dns NAME.. --ip IP..)`
//!   writes `D/<name>.pem` and `D/<name>-key.pem` signed by that CA, where `<name>` is
//!   `cluster-<ID>`, `cloud`, `reader` or `server`. Client certificates carry the SPIFFE id
//!   `spiffe://<T>/cluster/<ID>` (or `/cloud`, `/reader`) as their only URI SAN and the
//!   clientAuth usage; server certificates carry the DNS/IP SANs and serverAuth.
//!
//! Every file is written with mode 0600. Existing files are never overwritten without
//! `--force` (and then nothing is written unless all of them may be). Rotation: issue a new
//! certificate with `--force` (or into a new directory) and replace the Secret; the store and
//! clients re-read their files. Keys are ECDSA P-256 (rcgen's default, ring).

use std::{
    fs::OpenOptions,
    io::Write as _,
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::{
    auth::{Identity, TrustDomain},
    model::check_cluster_id,
};

/// File names inside `--dir`.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key.
pub const CA_KEY: &str = "ca-key.pem";
/// The trust domain `init` was given, read by `issue`.
pub const TRUST_DOMAIN: &str = "trust-domain";

/// `certs ...`
#[derive(Subcommand, Debug)]
pub enum CertsCmd {
    /// Create a certificate authority: ca.pem, ca-key.pem and trust-domain in --dir.
    Init {
        /// Directory for the CA files (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE trust domain of the identities this CA issues.
        #[arg(long, default_value = "cairn.local")]
        trust_domain: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate signed by the CA in --dir.
    Issue(IssueArgs),
}

/// `certs issue`.
#[derive(Args, Debug)]
pub struct IssueArgs {
    /// Directory holding the CA (from `certs init`); the new files go there too.
    #[arg(long)]
    pub dir: PathBuf,
    /// Whom the certificate is for.
    #[command(flatten)]
    pub role: RoleArgs,
    /// DNS names of the store (with --server).
    #[arg(long)]
    pub dns: Vec<String>,
    /// IP addresses of the store (with --server).
    #[arg(long)]
    pub ip: Vec<IpAddr>,
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
}

/// Exactly one role.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct RoleArgs {
    /// A cluster's controller (identity cluster/<ID>).
    #[arg(long, value_name = "ID")]
    pub cluster: Option<String>,
    /// The cloud service / administrator (identity cloud).
    #[arg(long)]
    pub cloud: bool,
    /// A read-only client (identity reader).
    #[arg(long)]
    pub reader: bool,
    /// The store itself (needs --dns and/or --ip).
    #[arg(long)]
    pub server: bool,
}

/// What a certificate is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// A client identity.
    Client(Identity),
    /// The store, reachable at these names and addresses.
    Server {
        /// DNS SANs.
        dns: Vec<String>,
        /// IP SANs.
        ip: Vec<IpAddr>,
    },
}

impl Role {
    /// The file name stem: `cluster-<id>`, `cloud`, `reader`, `server`.
    pub fn stem(&self) -> String {
        match self {
            Role::Client(Identity::Cluster(id)) => format!("cluster-{id}"),
            Role::Client(Identity::Cloud) => "cloud".into(),
            Role::Client(Identity::Reader) => "reader".into(),
            Role::Server { .. } => "server".into(),
        }
    }
}

impl IssueArgs {
    /// The role these flags select.
    pub fn role(&self) -> anyhow::Result<Role> {
        let r = &self.role;
        let has_names = !self.dns.is_empty() || !self.ip.is_empty();
        if has_names && !r.server {
            bail!("--dns and --ip apply only to --server");
        }
        if let Some(id) = &r.cluster {
            check_cluster_id("--cluster", id)?;
            return Ok(Role::Client(Identity::Cluster(id.clone())));
        }
        if r.cloud {
            return Ok(Role::Client(Identity::Cloud));
        }
        if r.reader {
            return Ok(Role::Client(Identity::Reader));
        }
        if self.dns.is_empty() && self.ip.is_empty() {
            bail!("--server needs at least one --dns or --ip (the names clients connect to)");
        }
        Ok(Role::Server {
            dns: self.dns.clone(),
            ip: self.ip.clone(),
        })
    }
}

/// Runs a `certs` subcommand, printing the files written.
pub fn run(cmd: CertsCmd) -> anyhow::Result<()> {
    let written = match cmd {
        CertsCmd::Init {
            dir,
            trust_domain,
            days,
            force,
        } => init(&dir, &trust_domain, days, force)?,
        CertsCmd::Issue(args) => {
            let role = args.role()?;
            issue(&args.dir, &role, args.days, args.force)?
        }
    };
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(())
}

/// Writes files, all or none: refuses before writing anything if one exists and `!force`.
fn write_all(files: &[(PathBuf, String)], force: bool) -> anyhow::Result<Vec<PathBuf>> {
    if !force {
        for (p, _) in files {
            if p.exists() {
                bail!("{} exists; pass --force to overwrite it", p.display());
            }
        }
    }
    for (p, content) in files {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(p)
            .with_context(|| format!("{}", p.display()))?;
        // `mode` applies only to new files; an overwritten one gets 0600 too.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("{}", p.display()))?;
        f.write_all(content.as_bytes())
            .with_context(|| format!("{}", p.display()))?;
    }
    Ok(files.iter().map(|(p, _)| p.clone()).collect())
}

fn validity(p: &mut CertificateParams, days: u32) -> anyhow::Result<()> {
    if days == 0 {
        bail!("--days must be at least 1");
    }
    let now = OffsetDateTime::now_utc();
    // A little slack for clocks that run behind.
    p.not_before = now - Duration::minutes(5);
    p.not_after = now + Duration::days(i64::from(days));
    Ok(())
}

/// `certs init`: a new CA in `dir` (created if missing). Returns the files written.
pub fn init(dir: &Path, trust_domain: &str, days: u32, force: bool) -> anyhow::Result<Vec<PathBuf>> {
    let td = TrustDomain::new(trust_domain).context("--trust-domain")?;
    std::fs::create_dir_all(dir).with_context(|| format!("--dir {}", dir.display()))?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Cairn");
    dn.push(DnType::CommonName, format!("Cairn IPAM CA ({})", td.as_str()));
    p.distinguished_name = dn;
    validity(&mut p, days)?;
    let key = KeyPair::generate()?;
    let cert = p.self_signed(&key)?;
    write_all(
        &[
            (dir.join(CA_CERT), cert.pem()),
            (dir.join(CA_KEY), key.serialize_pem()),
            (dir.join(TRUST_DOMAIN), format!("{}\n", td.as_str())),
        ],
        force,
    )
}

/// `certs issue`: a certificate for `role` signed by the CA in `dir`. Returns the files written
/// (certificate, then key).
pub fn issue(dir: &Path, role: &Role, days: u32, force: bool) -> anyhow::Result<Vec<PathBuf>> {
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read_to_string(&p).with_context(|| {
            format!(
                "{} (run `cairn-ipam certs init --dir {}` first)",
                p.display(),
                dir.display()
            )
        })
    };
    let td_path = dir.join(TRUST_DOMAIN);
    let td =
        TrustDomain::new(read(TRUST_DOMAIN)?.trim()).with_context(|| format!("{}", td_path.display()))?;
    let ca_key =
        KeyPair::from_pem(&read(CA_KEY)?).with_context(|| format!("{}", dir.join(CA_KEY).display()))?;
    let issuer = Issuer::from_ca_cert_pem(&read(CA_CERT)?, ca_key)
        .with_context(|| format!("{}", dir.join(CA_CERT).display()))?;

    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Cairn");
    match role {
        Role::Client(identity) => {
            let id = td.spiffe_id(identity);
            dn.push(DnType::CommonName, identity.to_string());
            p.subject_alt_names = vec![SanType::URI(id.as_str().try_into().context("SPIFFE id")?)];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        Role::Server { dns, ip } => {
            dn.push(
                DnType::CommonName,
                dns.first().map_or("cairn-ipam", String::as_str),
            );
            for name in dns {
                let san = name
                    .as_str()
                    .try_into()
                    .with_context(|| format!("--dns {name:?}: not a DNS name"))?;
                p.subject_alt_names.push(SanType::DnsName(san));
            }
            p.subject_alt_names
                .extend(ip.iter().copied().map(SanType::IpAddress));
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        }
    }
    p.distinguished_name = dn;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    validity(&mut p, days)?;
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    let stem = role.stem();
    write_all(
        &[
            (dir.join(format!("{stem}.pem")), cert.pem()),
            (dir.join(format!("{stem}-key.pem")), key.serialize_pem()),
        ],
        force,
    )
}

#[cfg(test)]
mod tests;
