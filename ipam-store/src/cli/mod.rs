//! Admin subcommands: a gRPC client of a running `cairn-ipam serve`. Human tables by default,
//! `-o json` (proto3 JSON, the same as grpcurl prints) for scripts.

mod backup;
pub mod certs;
pub mod file;

use std::{
    io::{BufWriter, Write},
    net::IpAddr,
    path::PathBuf,
};

use anyhow::{Context as _, bail};
use cairn_proto::{
    tls::ClientTlsFiles,
    v1::{self as pb, ipam_service_client::IpamServiceClient},
};
use clap::{Args, Subcommand, ValueEnum};
use comfy_table::{Table, presets::NOTHING};
use tonic::transport::Channel;

pub use file::{NetworkFile, parse_networks, read_networks};

/// Output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns.
    #[default]
    Table,
    /// proto3 JSON.
    Json,
}

/// Where the server is and how to print.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// gRPC endpoint of the store; several replicas (etcd backend) comma-separated: the CLI
    /// uses the one that leads, waiting up to 30 s for an election.
    #[arg(
        long,
        global = true,
        env = "CAIRN_IPAM_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    pub endpoint: String,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// CA bundle the store's certificate must chain to; turns on TLS (http:// becomes https://).
    #[arg(long, global = true, env = "CAIRN_IPAM_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This process's certificate (PEM): the client certificate, or for `serve` the server's.
    #[arg(long, global = true, env = "CAIRN_IPAM_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, global = true, env = "CAIRN_IPAM_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

impl ClientArgs {
    /// The client TLS files (all `None` = plaintext).
    pub fn tls(&self) -> ClientTlsFiles {
        ClientTlsFiles {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
        }
    }
}

/// `network ...`
#[derive(Subcommand, Debug)]
pub enum NetworkCmd {
    /// Create or update networks from a YAML or JSON file (one network, a list, or several
    /// YAML documents).
    Apply {
        /// The file; `-` reads standard input.
        #[arg(short = 'f', long)]
        file: PathBuf,
        /// Validate and show what would change; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// List networks.
    List,
    /// Show one network.
    Get {
        /// Network name.
        name: String,
    },
    /// Delete a network (refused while it has allocations, unless --force).
    Delete {
        /// Network name.
        name: String,
        /// Release its allocations first.
        #[arg(long)]
        force: bool,
    },
}

/// Owner kind on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    /// API-server VIP.
    ApiServer,
    /// Node address.
    Node,
    /// LoadBalancer Service.
    Service,
    /// An address found in use by an unknown host (ReportConflict): `--name` is the address
    /// (IPv6 in full with '-' for ':'); releasing the record clears it.
    UnknownHost,
}

impl KindArg {
    fn pb(self) -> pb::OwnerKind {
        match self {
            KindArg::ApiServer => pb::OwnerKind::ApiServer,
            KindArg::Node => pb::OwnerKind::Node,
            KindArg::Service => pb::OwnerKind::Service,
            KindArg::UnknownHost => pb::OwnerKind::UnknownHost,
        }
    }
}

/// Identifies an owner.
#[derive(Args, Debug, Clone)]
pub struct OwnerArgs {
    /// Network.
    #[arg(long)]
    pub network: String,
    /// Cluster id.
    #[arg(long)]
    pub cluster: String,
    /// Owner kind.
    #[arg(long, value_enum)]
    pub kind: KindArg,
    /// Namespace (services only).
    #[arg(long, default_value = "")]
    pub namespace: String,
    /// Object name.
    #[arg(long)]
    pub name: String,
    /// Object uid.
    #[arg(long, default_value = "")]
    pub uid: String,
}

impl OwnerArgs {
    fn owner(&self) -> pb::Owner {
        pb::Owner {
            cluster_id: self.cluster.clone(),
            kind: self.kind.pb() as i32,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            uid: self.uid.clone(),
        }
    }
}

/// `alloc ...`
#[derive(Subcommand, Debug)]
pub enum AllocCmd {
    /// List allocations: who holds each address.
    List {
        /// Only this network.
        #[arg(long)]
        network: Option<String>,
        /// Only this cluster.
        #[arg(long)]
        cluster: Option<String>,
        /// Only this pool.
        #[arg(long)]
        pool: Option<String>,
        /// Only this kind.
        #[arg(long, value_enum)]
        kind: Option<KindArg>,
        /// Only holders of this address.
        #[arg(long)]
        address: Option<IpAddr>,
    },
    /// Allocate (idempotent per owner).
    Create {
        #[command(flatten)]
        owner: OwnerArgs,
        /// Pool name (default: first auto-assign pool of the kind's purpose).
        #[arg(long)]
        pool: Option<String>,
        /// Families in order: ipv4, ipv6 (comma list).
        #[arg(long, value_delimiter = ',')]
        family: Vec<String>,
        /// Specific addresses (at most one per family).
        #[arg(long = "ip", value_delimiter = ',')]
        ips: Vec<IpAddr>,
        /// Sharing key.
        #[arg(long, default_value = "")]
        sharing_key: String,
        /// Ports as PROTO/PORT, e.g. tcp/80 (comma list).
        #[arg(long = "port", value_delimiter = ',')]
        ports: Vec<String>,
        /// Only show what would be allocated; hold nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show the owner's allocation.
    Get {
        #[command(flatten)]
        owner: OwnerArgs,
    },
    /// Release the owner's allocation.
    Release {
        #[command(flatten)]
        owner: OwnerArgs,
    },
}

/// How long the CLI waits for one of several replicas to lead.
const ELECTION_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A client of the store at `--endpoint`, over TLS when `--tls-ca`/`--tls-cert`/`--tls-key`
/// are set; of the leading replica when it lists several. Errors keep their source chain so
/// `main` can explain a TLS mismatch.
async fn connect(c: &ClientArgs) -> anyhow::Result<IpamServiceClient<Channel>> {
    let endpoints: Vec<&str> = c
        .endpoint
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    let ch = match endpoints.as_slice() {
        [] => anyhow::bail!("--endpoint: empty"),
        [endpoint] => c
            .tls()
            .endpoint(endpoint)?
            .connect()
            .await
            .with_context(|| format!("connecting to the store at {endpoint}"))?,
        several => leading(c, several).await?,
    };
    Ok(IpamServiceClient::new(ch)
        .max_decoding_message_size(cairn_proto::MAX_MESSAGE_SIZE)
        .max_encoding_message_size(cairn_proto::MAX_MESSAGE_SIZE))
}

/// The channel to whichever of `endpoints` says (gRPC health) that it serves
/// `cairn.ipam.v1.IpamService`: the leader; followers say NOT_SERVING.
async fn leading(c: &ClientArgs, endpoints: &[&str]) -> anyhow::Result<Channel> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let until = std::time::Instant::now() + ELECTION_WAIT;
    loop {
        let mut why = Vec::new();
        for endpoint in endpoints {
            let ch = match c.tls().endpoint(endpoint)?.connect().await {
                Ok(ch) => ch,
                Err(e) => {
                    why.push(format!("{endpoint}: {e}"));
                    continue;
                }
            };
            let req = HealthCheckRequest {
                service: "cairn.ipam.v1.IpamService".into(),
            };
            match HealthClient::new(ch.clone()).check(req).await {
                Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => return Ok(ch),
                Ok(_) => why.push(format!("{endpoint}: follows")),
                Err(e) => why.push(format!("{endpoint}: {}", e.message())),
            }
        }
        if std::time::Instant::now() >= until {
            anyhow::bail!(
                "no store replica leads after {}s: {}",
                ELECTION_WAIT.as_secs(),
                why.join("; ")
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

fn status(e: tonic::Status) -> anyhow::Error {
    let msg = format!("{:?}: {}", e.code(), e.message());
    if std::error::Error::source(&e).is_some() {
        // A transport failure (e.g. a refused handshake): keep the chain for `explain`.
        anyhow::Error::new(e).context(msg)
    } else {
        anyhow::anyhow!(msg)
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(NOTHING)
        .set_header(header.iter().map(|h| h.to_uppercase()));
    t
}

fn owner_text(o: Option<&pb::Owner>) -> (String, String, String) {
    match o {
        Some(o) => {
            let kind = pb::OwnerKind::try_from(o.kind).map_or("?".into(), |k| {
                k.as_str_name()
                    .trim_start_matches("OWNER_KIND_")
                    .to_lowercase()
                    .replace('_', "-")
            });
            let obj = if o.namespace.is_empty() {
                o.name.clone()
            } else {
                format!("{}/{}", o.namespace, o.name)
            };
            (o.cluster_id.clone(), kind, obj)
        }
        None => Default::default(),
    }
}

fn print_allocations(allocs: &[pb::Allocation]) {
    let mut t = table(&[
        "address", "network", "pool", "cluster", "kind", "owner", "sharing", "state",
    ]);
    for a in allocs {
        let (cluster, kind, obj) = owner_text(a.owner.as_ref());
        let state = if a.state == pb::AllocationState::OutOfRange as i32 {
            "out-of-range"
        } else {
            "active"
        };
        t.add_row(vec![
            a.addresses.join(","),
            a.network.clone(),
            a.pool.clone(),
            cluster,
            kind,
            obj,
            a.sharing_key.clone(),
            state.into(),
        ]);
    }
    println!("{t}");
}

fn print_networks(nets: &[pb::Network]) {
    let mut t = table(&[
        "name",
        "prefixes",
        "gateways",
        "vlan",
        "pools",
        "managed-by",
        "version",
    ]);
    for n in nets {
        let pools = n
            .pools
            .iter()
            .map(|p| {
                let purpose = pb::PoolPurpose::try_from(p.purpose)
                    .map_or("?", |x| x.as_str_name().trim_start_matches("POOL_PURPOSE_"));
                format!("{}({purpose}):{}", p.name, p.ranges.join("+"))
            })
            .collect::<Vec<_>>()
            .join(" ");
        t.add_row(vec![
            n.name.clone(),
            n.prefixes.join(","),
            n.gateways.join(","),
            n.vlan.to_string(),
            pools,
            n.managed_by.clone(),
            n.version.to_string(),
        ]);
    }
    println!("{t}");
}

fn family_arg(s: &str) -> anyhow::Result<pb::IpFamily> {
    match s.to_ascii_lowercase().as_str() {
        "ipv4" | "v4" | "4" => Ok(pb::IpFamily::Ipv4),
        "ipv6" | "v6" | "6" => Ok(pb::IpFamily::Ipv6),
        _ => bail!("--family: {s:?} is not ipv4 or ipv6"),
    }
}

fn port_arg(i: usize, s: &str) -> anyhow::Result<pb::PortSpec> {
    let (proto, port) = s
        .split_once('/')
        .with_context(|| format!("--port[{i}]: {s:?} is not PROTO/PORT, e.g. tcp/80"))?;
    let protocol = match proto.to_ascii_lowercase().as_str() {
        "tcp" => pb::Protocol::Tcp,
        "udp" => pb::Protocol::Udp,
        "sctp" => pb::Protocol::Sctp,
        _ => bail!("--port[{i}]: protocol {proto:?} is not tcp, udp or sctp"),
    };
    let port: u32 = port
        .parse()
        .with_context(|| format!("--port[{i}]: {port:?} is not a number"))?;
    Ok(pb::PortSpec {
        protocol: protocol as i32,
        port,
    })
}

/// Runs `network ...`.
pub async fn network(c: &ClientArgs, cmd: NetworkCmd) -> anyhow::Result<()> {
    let mut cl = connect(c).await?;
    match cmd {
        NetworkCmd::Apply { file, dry_run } => {
            let nets = read_networks(&file)?;
            let mut out = Vec::new();
            for (i, n) in nets.into_iter().enumerate() {
                let name = n.name.clone();
                let r = cl
                    .upsert_network(pb::UpsertNetworkRequest {
                        network: Some(n),
                        expected_version: None,
                        dry_run,
                    })
                    .await
                    .map_err(status)
                    .with_context(|| format!("network {i} ({name:?}) in {}", file.display()))?
                    .into_inner();
                if c.output == Output::Table {
                    let verb = match (dry_run, r.created, r.changed) {
                        (true, true, _) => "would be created",
                        (true, false, true) => "would be changed",
                        (_, _, false) => "unchanged",
                        (false, true, _) => "created",
                        (false, false, true) => "configured",
                    };
                    println!("network/{name} {verb}");
                    for a in &r.out_of_range {
                        let (cl, kind, obj) = owner_text(a.owner.as_ref());
                        println!(
                            "  warning: {} held by cluster {cl} {kind} {obj} is now outside pool {:?} (kept until released)",
                            a.addresses.join(","),
                            a.pool
                        );
                    }
                }
                out.push(r);
            }
            if c.output == Output::Json {
                print_json(&out)?;
            }
        }
        NetworkCmd::List => {
            let r = cl
                .list_networks(pb::ListNetworksRequest {})
                .await
                .map_err(status)?
                .into_inner();
            match c.output {
                Output::Json => print_json(&r)?,
                Output::Table => print_networks(&r.networks),
            }
        }
        NetworkCmd::Get { name } => {
            let r = cl
                .get_network(pb::GetNetworkRequest { name })
                .await
                .map_err(status)?
                .into_inner();
            match c.output {
                Output::Json => print_json(&r)?,
                Output::Table => print_networks(&[r]),
            }
        }
        NetworkCmd::Delete { name, force } => {
            let r = cl
                .delete_network(pb::DeleteNetworkRequest {
                    name: name.clone(),
                    force,
                })
                .await
                .map_err(status)?
                .into_inner();
            match c.output {
                Output::Json => print_json(&r)?,
                Output::Table => println!("network/{name} deleted ({} allocation(s) released)", r.released),
            }
        }
    }
    Ok(())
}

/// Runs `alloc ...`.
pub async fn alloc(c: &ClientArgs, cmd: AllocCmd) -> anyhow::Result<()> {
    let mut cl = connect(c).await?;
    match cmd {
        AllocCmd::List {
            network,
            cluster,
            pool,
            kind,
            address,
        } => {
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let r = cl
                    .list_allocations(pb::ListAllocationsRequest {
                        network: network.clone().unwrap_or_default(),
                        pool: pool.clone().unwrap_or_default(),
                        cluster_id: cluster.clone().unwrap_or_default(),
                        kind: kind.map_or(0, |k| k.pb() as i32),
                        address: address.map(|a| a.to_string()).unwrap_or_default(),
                        page_size: 1000,
                        page_token: token,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                all.extend(r.allocations);
                if r.next_page_token.is_empty() {
                    break;
                }
                token = r.next_page_token;
            }
            match c.output {
                Output::Json => print_json(&all)?,
                Output::Table => print_allocations(&all),
            }
        }
        AllocCmd::Create {
            owner,
            pool,
            family,
            ips,
            sharing_key,
            ports,
            dry_run,
        } => {
            let families = family
                .iter()
                .map(|f| family_arg(f).map(|f| f as i32))
                .collect::<anyhow::Result<_>>()?;
            let ports = ports
                .iter()
                .enumerate()
                .map(|(i, p)| port_arg(i, p))
                .collect::<anyhow::Result<_>>()?;
            let r = cl
                .allocate(pb::AllocateRequest {
                    network: owner.network.clone(),
                    owner: Some(owner.owner()),
                    pool: pool.unwrap_or_default(),
                    purpose: 0,
                    families,
                    optional_extra_families: false,
                    requested_addresses: ips.iter().map(ToString::to_string).collect(),
                    sharing_key,
                    ports,
                    dry_run,
                })
                .await
                .map_err(status)?
                .into_inner();
            match c.output {
                Output::Json => print_json(&r)?,
                Output::Table => print_allocations(&r.allocation.into_iter().collect::<Vec<_>>()),
            }
        }
        AllocCmd::Get { owner } => {
            let r = cl
                .get_allocation(pb::GetAllocationRequest {
                    network: owner.network.clone(),
                    owner: Some(owner.owner()),
                })
                .await
                .map_err(status)?
                .into_inner();
            match c.output {
                Output::Json => print_json(&r)?,
                Output::Table => print_allocations(&[r]),
            }
        }
        AllocCmd::Release { owner } => {
            let r = cl
                .release(pb::ReleaseRequest {
                    network: owner.network.clone(),
                    owner: Some(owner.owner()),
                })
                .await
                .map_err(status)?
                .into_inner();
            match c.output {
                Output::Json => print_json(&r)?,
                Output::Table => match &r.allocation {
                    Some(a) => println!(
                        "released {} ({} {})",
                        a.addresses.join(","),
                        owner.kind.pb().as_str_name(),
                        owner.name
                    ),
                    None => println!("nothing to release"),
                },
            }
        }
    }
    Ok(())
}

/// Runs `usage`.
pub async fn usage(c: &ClientArgs, network: Option<String>) -> anyhow::Result<()> {
    let mut cl = connect(c).await?;
    let r = cl
        .get_usage(pb::GetUsageRequest {
            network: network.unwrap_or_default(),
        })
        .await
        .map_err(status)?
        .into_inner();
    match c.output {
        Output::Json => print_json(&r)?,
        Output::Table => {
            let mut t = table(&[
                "network",
                "pool",
                "purpose",
                "family",
                "total",
                "used",
                "free",
                "grace",
                "out-of-range",
                "unknown-hosts",
            ]);
            for u in &r.pools {
                let purpose = pb::PoolPurpose::try_from(u.purpose)
                    .map_or("?", |x| x.as_str_name().trim_start_matches("POOL_PURPOSE_"));
                let fam = pb::IpFamily::try_from(u.family)
                    .map_or("?", |x| x.as_str_name().trim_start_matches("IP_FAMILY_"));
                t.add_row(vec![
                    u.network.clone(),
                    u.pool.clone(),
                    purpose.into(),
                    fam.into(),
                    u.total.clone(),
                    u.used.clone(),
                    u.free.clone(),
                    u.quarantined.clone(),
                    u.out_of_range.clone(),
                    u.unknown_hosts.clone(),
                ]);
            }
            println!("{t}");
        }
    }
    Ok(())
}

/// Runs `export`: streams a point-in-time backup (proto3 JSON, see `backup.rs`) to `file`
/// (written to `FILE.tmp`, renamed when complete) or standard output (`None` or `-`).
pub async fn export(c: &ClientArgs, file: Option<PathBuf>) -> anyhow::Result<()> {
    let mut cl = connect(c).await?;
    let mut stream = cl
        .export_stream(pb::ExportRequest {})
        .await
        .map_err(status)?
        .into_inner();
    let file = file.filter(|f| f.as_os_str() != "-");
    let (out, tmp): (Box<dyn Write + Send>, _) = match &file {
        Some(f) => {
            let tmp = f.with_extension("tmp");
            let w = std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
            (Box::new(w), Some(tmp))
        }
        None => (Box::new(std::io::stdout()), None),
    };
    let mut w = backup::BackupWriter::new(BufWriter::with_capacity(1 << 20, out));
    let written = async {
        while let Some(chunk) = stream.message().await.map_err(status)? {
            w.chunk(&chunk)?;
        }
        let counts = w.counts;
        w.finish()?.into_inner().map_err(|e| e.into_error())?.flush()?;
        anyhow::Ok(counts)
    }
    .await;
    let counts = match (written, &tmp) {
        (Ok(n), _) => n,
        (Err(e), Some(tmp)) => {
            let _ = std::fs::remove_file(tmp);
            return Err(e.context("export failed; no backup written"));
        }
        (Err(e), None) => return Err(e.context("export failed; the output is incomplete")),
    };
    if let (Some(f), Some(tmp)) = (&file, &tmp) {
        std::fs::rename(tmp, f).with_context(|| format!("writing {}", f.display()))?;
    }
    eprintln!(
        "exported {} network(s), {} allocation(s), {} quarantined address(es){}",
        counts[0],
        counts[1],
        counts[2],
        file.map(|f| format!(" to {}", f.display())).unwrap_or_default()
    );
    Ok(())
}

/// Runs `import`: streams a backup from `file` (`-`: standard input) into an empty store.
/// The server imports nothing unless the whole file parsed and validated.
pub async fn import(c: &ClientArgs, file: PathBuf) -> anyhow::Result<()> {
    let input: Box<dyn std::io::Read + Send> = if file.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(&file).with_context(|| format!("reading {}", file.display()))?)
    };
    let mut cl = connect(c).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let parser = tokio::task::spawn_blocking(move || backup::send_backup(input, &tx));
    let sent = cl
        .import_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    // A parse error explains a refused stream better than the server's "ended without last".
    let parsed = parser
        .await
        .context("backup reader panicked")?
        .with_context(|| format!("{}: not a cairn-ipam backup (nothing imported)", file.display()));
    let r = match (sent, parsed) {
        (Ok(r), Ok(_)) => r.into_inner(),
        (Err(e), Ok(_)) => return Err(status(e)),
        (_, Err(e)) => return Err(e),
    };
    match c.output {
        Output::Json => print_json(&r)?,
        Output::Table => println!(
            "imported {} network(s), {} allocation(s)",
            r.networks, r.allocations
        ),
    }
    Ok(())
}
