//! `cairn-ipam`: `serve` runs the store; the other subcommands administer a running one.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use cairn_ipam::{
    cli::{self, AllocCmd, ClientArgs, NetworkCmd},
    server::{ServeOptions, serve},
};
use cairn_runtime::{LogFormat, parse_duration, shutdown_signal};
use clap::{Parser, Subcommand};

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

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the store.
    Serve {
        /// gRPC listen address.
        #[arg(long, env = "CAIRN_IPAM_LISTEN", default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// Data directory (sled database; one process at a time).
        #[arg(long, env = "CAIRN_IPAM_DATA_DIR")]
        data_dir: PathBuf,
        /// Prometheus /metrics, /healthz and /readyz listen address.
        #[arg(long, env = "CAIRN_IPAM_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
        /// Reuse grace for networks that set none, e.g. 30s, 5m (whole seconds).
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        default_reuse_grace: Duration,
        /// sled page cache size in MiB.
        #[arg(long, default_value_t = 32)]
        cache_mib: u64,
        /// Write the bound addresses here once serving (useful with port 0).
        #[arg(long)]
        addr_file: Option<PathBuf>,
        /// Log format.
        #[arg(long, value_enum, default_value = "human")]
        log_format: LogFormat,
    },
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

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Serve {
            listen,
            data_dir,
            metrics_listen,
            default_reuse_grace,
            cache_mib,
            addr_file,
            log_format,
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
            let opts = ServeOptions {
                listen,
                metrics_listen,
                data_dir,
                default_grace_secs: grace,
                cache_bytes: cache_mib << 20,
                addr_file,
            };
            serve(opts, shutdown_signal()).await
        }
        Cmd::Network(c) => cli::network(&cli.client, c).await,
        Cmd::Alloc(c) => cli::alloc(&cli.client, c).await,
        Cmd::Usage { network } => cli::usage(&cli.client, network).await,
        Cmd::Export { file } => cli::export(&cli.client, file).await,
        Cmd::Import { file } => cli::import(&cli.client, file).await,
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
