//! Flags of `cairn-ccm haproxy-agent`, and the checks on values that go into `haproxy.cfg`.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use cairn_runtime::parse_duration;

/// Flags of `cairn-ccm haproxy-agent`.
#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// Kubeconfig file (default: in-cluster config, then $KUBECONFIG, then ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The HAProxy configuration file the agent owns (rewritten on every change).
    #[arg(long, default_value = "/etc/haproxy/haproxy.cfg")]
    pub config: PathBuf,
    /// HAProxy binary (default: `haproxy` on $PATH, else /usr/sbin/haproxy).
    #[arg(long)]
    pub haproxy_bin: Option<PathBuf>,
    /// HAProxy's master CLI socket (`haproxy -W -S <this>`), used to reload and read stats.
    #[arg(long, default_value = "/run/haproxy-master.sock")]
    pub master_socket: PathBuf,
    /// Start and supervise HAProxy (`haproxy -W -S <master socket> -f <config>`) instead of
    /// reloading one that a supervisor runs.
    #[arg(long)]
    pub manage_haproxy: bool,
    /// Serve only Services with this loadBalancerClass (default: those with none).
    #[arg(long)]
    pub load_balancer_class: Option<String>,
    /// API-server VIP(s), comma-separated (default: `status.apiServerVIP` of the ClusterNetworks).
    #[arg(long, value_delimiter = ',')]
    pub api_server_vip: Vec<IpAddr>,
    /// Port of the API-server frontend on the VIP.
    #[arg(long, default_value_t = 6443)]
    pub api_server_port: u16,
    /// Port of the API server on the control-plane nodes.
    #[arg(long, default_value_t = 6443)]
    pub api_server_backend_port: u16,
    /// HAProxy's stats/health frontend (`/stats`, `/healthz`); keep it on loopback. (It is
    /// also the listener that keeps HAProxy running while no Service has a VIP.)
    #[arg(long, default_value = "127.0.0.1:8404")]
    pub stats_listen: SocketAddr,
    /// Address of the agent's /metrics, /healthz and /readyz.
    #[arg(long, default_value = "127.0.0.1:9465")]
    pub metrics_listen: SocketAddr,
    /// Write `metrics=<address>` here once listening (useful with port 0).
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
    /// Print the configuration the agent would apply, then exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Minimum time between two reloads; changes in between are applied together.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub min_reload_interval: Duration,
    /// Retry a configuration HAProxy refused after this long (sooner if the cluster changes).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub retry_interval: Duration,
    /// How long old workers may finish established connections after a reload.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub hard_stop_after: Duration,
    /// How long a reload (or HAProxy's start) may take.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub reload_timeout: Duration,
    /// How often to read server states from HAProxy (for `backends_up`).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub stats_interval: Duration,
    /// HAProxy's global connection limit (default: HAProxy derives it from its file-descriptor
    /// limit, e.g. systemd's `LimitNOFILE`; a value HAProxy cannot get descriptors for makes it
    /// refuse to start).
    #[arg(long)]
    pub maxconn: Option<u32>,
    /// User HAProxy's workers run as (`user` in `global`); the master keeps its own.
    #[arg(long, value_parser = config_word)]
    pub haproxy_user: Option<String>,
    /// Group HAProxy's workers run as.
    #[arg(long, value_parser = config_word)]
    pub haproxy_group: Option<String>,
    /// Traffic log target, rendered as `log <this>` in `global` with `option tcplog`, e.g.
    /// `/dev/log local0` or `stderr format raw daemon` (default: no traffic logs).
    #[arg(long, value_parser = config_line)]
    pub haproxy_log: Option<String>,
}

/// A value that goes into the configuration as one word.
fn config_word(s: &str) -> Result<String, String> {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?}: letters, digits, '-', '_' and '.' only"))
    }
}

/// A value that goes into the configuration as the rest of a line.
fn config_line(s: &str) -> Result<String, String> {
    if !s.trim().is_empty() && !s.chars().any(|c| c.is_control() || c == '#') {
        Ok(s.trim().to_string())
    } else {
        Err(format!("{s:?}: one line, no '#'"))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn config_values_cannot_inject_lines() {
        assert!(config_word("haproxy").is_ok());
        assert!(config_word("hap roxy").is_err());
        assert!(config_word("x\nlisten").is_err());
        assert_eq!(config_line(" /dev/log local0 ").unwrap(), "/dev/log local0");
        assert!(config_line("stderr\nlisten x").is_err());
        assert!(config_line("stderr # x").is_err());
    }

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }

    #[test]
    fn duration_flags_take_the_shared_grammar() {
        let a = Cli::try_parse_from(["agent"]).unwrap().agent;
        assert_eq!(a.min_reload_interval, Duration::from_secs(1));
        assert_eq!(a.hard_stop_after, Duration::from_secs(30 * 60));
        let a = Cli::try_parse_from(["agent", "--min-reload-interval", "250ms", "--retry-interval", "3"])
            .unwrap()
            .agent;
        assert_eq!(a.min_reload_interval, Duration::from_millis(250));
        assert_eq!(a.retry_interval, Duration::from_secs(3));
        let e = Cli::try_parse_from(["agent", "--stats-interval", "1d"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--stats-interval") && e.contains("\"1d\""), "{e}");
    }
}
