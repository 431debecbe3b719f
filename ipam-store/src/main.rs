//! `cairn-ipam`: `serve` runs the store; the other subcommands administer a running one.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use cairn_ipam::{
    cli::{self, AllocCmd, ClientArgs, NetworkCmd, certs::CertsCmd},
    server::{ServeOptions, serve},
    store::etcd::{EtcdOptions, EtcdTls},
    tls::ServeTlsArgs,
};
use cairn_runtime::{LogFormat, parse_duration, shutdown_signal};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "cairn-ipam",
    version,
    about = "Cairn IPAM: the durable, conflict-free IP ledger for shared networks"
)]
struct Cli {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// Embedded sled database in --data-dir.
    Sled,
    /// An etcd cluster (docs/etcd.md).
    Etcd,
}

/// `--backend etcd` settings.
#[derive(clap::Args, Debug)]
struct EtcdArgs {
    /// etcd client URLs, comma-separated (http:// or https://).
    #[arg(long, env = "CAIRN_IPAM_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// Key prefix of this store in etcd.
    #[arg(long, default_value = "/cairn")]
    etcd_prefix: String,
    /// CA certificate (PEM) of the etcd servers.
    #[arg(long)]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd.
    #[arg(long, requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// Client key (PEM) for etcd.
    #[arg(long, requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// With etcd, replicas elect one writer: the gRPC URL clients reach this replica at,
    /// published while it leads (default: http(s)://<bound --listen>).
    #[arg(long, env = "CAIRN_IPAM_ADVERTISE")]
    advertise: Option<String>,
    /// With etcd: the leader lease; a dead leader is replaced after about this long
    /// (whole seconds, 2s to 60s).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    leader_lease: Duration,
}

impl EtcdArgs {
    fn options(self) -> EtcdOptions {
        let mut o = EtcdOptions::new(self.etcd_endpoints);
        o.prefix = self.etcd_prefix;
        if self.etcd_ca.is_some() || self.etcd_cert.is_some() {
            o.tls = Some(EtcdTls {
                ca: self.etcd_ca,
                cert_key: self.etcd_cert.zip(self.etcd_key),
            });
        }
        o
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the store.
    Serve {
        /// gRPC listen address.
        #[arg(long, env = "CAIRN_IPAM_LISTEN", default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// Data directory (sled database; one process at a time). Required with --backend sled.
        #[arg(long, env = "CAIRN_IPAM_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Storage engine.
        #[arg(long, value_enum, default_value = "sled")]
        backend: Backend,
        #[command(flatten)]
        etcd: EtcdArgs,
        /// Prometheus /metrics, /healthz and /readyz listen address.
        #[arg(long, env = "CAIRN_IPAM_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
        /// Serve the read-only web view (/ui/) and its JSON (/api/v1/) on --metrics-listen.
        /// It shows every network, pool and holder to whoever reaches that address.
        #[arg(long, env = "CAIRN_IPAM_WEB_VIEW", default_value_t = true, action = clap::ArgAction::Set)]
        web_view: bool,
        /// Reuse grace for networks that set none, e.g. 30s, 5m (whole seconds).
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        default_reuse_grace: Duration,
        /// sled page cache size in MiB.
        #[arg(long, default_value_t = 32)]
        cache_mib: u64,
        /// Commit batches a WatchAllocations stream may fall behind (a client not reading)
        /// before it is ended with ABORTED and must watch again; one ring shared by all
        /// watchers. 16 to 1048576.
        #[arg(long, default_value_t = cairn_ipam::ledger::DEFAULT_WATCH_BUFFER, value_parser = parse_watch_buffer)]
        watch_buffer: usize,
        /// WatchAllocations streams open at once; one more is refused with RESOURCE_EXHAUSTED
        /// naming this limit. 1 to 1000000.
        #[arg(long, default_value_t = cairn_ipam::grpc::DEFAULT_MAX_WATCHERS as u32,
              value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        max_watchers: u32,
        /// Write the bound addresses here once serving (useful with port 0).
        #[arg(long)]
        addr_file: Option<PathBuf>,
        /// Log format.
        #[arg(long, value_enum, default_value = "human")]
        log_format: LogFormat,
        /// Mutual TLS (with the global --tls-cert and --tls-key: the server's own certificate).
        #[command(flatten)]
        tls: ServeTlsArgs,
    },
    /// Certificates for a store without a PKI: a CA, and client/server certificates from it.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Networks.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Allocations.
    #[command(subcommand)]
    Alloc(AllocCmd),
    /// Usage per network, pool and family.
    Usage {
        /// Only this network.
        #[arg(long)]
        network: Option<String>,
    },
    /// Write a backup of everything (proto3 JSON).
    Export {
        /// Output file (default: standard output).
        #[arg(short = 'f', long)]
        file: Option<PathBuf>,
    },
    /// Restore a backup into an empty store.
    Import {
        /// Backup file written by export.
        #[arg(short = 'f', long)]
        file: PathBuf,
    },
}

/// `--watch-buffer`: a count within [`cairn_ipam::ledger::WATCH_BUFFER_RANGE`].
fn parse_watch_buffer(s: &str) -> Result<usize, String> {
    let r = cairn_ipam::ledger::WATCH_BUFFER_RANGE;
    match s.parse::<usize>() {
        Ok(n) if r.contains(&n) => Ok(n),
        _ => Err(format!(
            "{s:?}: a number of commit batches from {} to {}",
            r.start(),
            r.end()
        )),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Client errors are explained (plaintext vs TLS, wrong CA, refused certificate).
    let client_tls =
        (!matches!(cli.cmd, Cmd::Serve { .. } | Cmd::Certs(_))).then(|| cli.client.tls().is_set());
    let r = match cli.cmd {
        Cmd::Serve {
            listen,
            data_dir,
            backend,
            etcd,
            metrics_listen,
            web_view,
            default_reuse_grace,
            cache_mib,
            watch_buffer,
            max_watchers,
            addr_file,
            log_format,
            tls,
        } => {
            cairn_runtime::logging::init(log_format);
            if default_reuse_grace.subsec_nanos() != 0 {
                eprintln!("error: --default-reuse-grace: whole seconds only");
                return ExitCode::from(2);
            }
            let grace = u32::try_from(default_reuse_grace.as_secs()).unwrap_or(u32::MAX);
            if grace > cairn_ipam::model::MAX_REUSE_GRACE_SECS {
                eprintln!("error: --default-reuse-grace: at most 7 days");
                return ExitCode::from(2);
            }
            let data_dir = match (backend, data_dir) {
                (Backend::Sled, None) => {
                    eprintln!("error: --data-dir: required with --backend sled");
                    return ExitCode::from(2);
                }
                (_, d) => d.unwrap_or_default(),
            };
            let files = match tls.files(cli.client.tls_cert.as_deref(), cli.client.tls_key.as_deref()) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let tls = match files {
                None => None,
                Some(files) => match tls.trust_domain() {
                    Ok(td) => Some((files, td)),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(2);
                    }
                },
            };
            let lease = etcd.leader_lease;
            if lease.subsec_nanos() != 0 || !(2..=60).contains(&lease.as_secs()) {
                eprintln!("error: --leader-lease: whole seconds from 2s to 60s");
                return ExitCode::from(2);
            }
            let advertise = etcd.advertise.clone();
            if let Some(a) = &advertise
                && !(a.starts_with("http://") || a.starts_with("https://"))
            {
                eprintln!("error: --advertise: {a:?} is not an http:// or https:// URL");
                return ExitCode::from(2);
            }
            let opts = ServeOptions {
                advertise,
                leader_lease_secs: lease.as_secs() as i64,
                watch_buffer,
                max_watchers: max_watchers as usize,
                listen,
                metrics_listen,
                web_view,
                data_dir,
                etcd: (backend == Backend::Etcd).then(|| etcd.options()),
                default_grace_secs: grace,
                cache_bytes: cache_mib << 20,
                addr_file,
                tls,
            };
            serve(opts, shutdown_signal()).await
        }
        Cmd::Certs(c) => cli::certs::run(c),
        Cmd::Network(c) => cli::network(&cli.client, c).await,
        Cmd::Alloc(c) => cli::alloc(&cli.client, c).await,
        Cmd::Usage { network } => cli::usage(&cli.client, network).await,
        Cmd::Export { file } => cli::export(&cli.client, file).await,
        Cmd::Import { file } => cli::import(&cli.client, file).await,
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match client_tls {
                Some(tls) => eprintln!("error: {}", cairn_proto::tls::explain(e.as_ref(), tls)),
                None => eprintln!("error: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_buffer_outside_its_bounds_is_refused_naming_them() {
        assert_eq!(parse_watch_buffer("16"), Ok(16));
        assert_eq!(parse_watch_buffer("1048576"), Ok(1 << 20));
        for bad in ["0", "15", "1048577", "-1", "lots"] {
            let e = parse_watch_buffer(bad).unwrap_err();
            assert!(e.contains("from 16 to 1048576"), "{bad}: {e}");
        }
        let e = Cli::try_parse_from(["cairn-ipam", "serve", "--watch-buffer", "0"]).unwrap_err();
        assert!(e.to_string().contains("--watch-buffer"), "{e}");
    }
}
