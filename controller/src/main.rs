//! `cairn-ccm`: runs the controller; `cairn-ccm crd` prints the ClusterNetwork CRD;
//! `cairn-ccm haproxy-agent` keeps a cluster's HAProxy configured.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use cairn_ccm::run::{RunArgs, run};
use cairn_runtime::{LogFormat, logging, shutdown_signal};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "cairn-ccm",
    version,
    about = "Cairn cloud-controller-manager: VIPs and node IPs from the Cairn IPAM store"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
    /// Log format.
    #[arg(long, value_enum, default_value = "human", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once
enum Cmd {
    /// Print the ClusterNetwork CRD (YAML).
    Crd,
    /// Keep this cluster's HAProxy configured (run on the load-balancer host).
    HaproxyAgent(cairn_ccm::haproxy::AgentArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Some(Cmd::Crd) => match cairn_ccm::crd::crd_yaml() {
            Ok(y) => {
                print!("{y}");
                Ok(())
            }
            Err(e) => Err(e.into()),
        },
        Some(Cmd::HaproxyAgent(args)) => {
            logging::init(cli.log_format);
            cairn_ccm::haproxy::run(args, shutdown_signal()).await
        }
        None => {
            logging::init(cli.log_format);
            run(cli.run, shutdown_signal()).await
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
