//! `haproxy.cfg` from an [`LbConfig`]. Pure and deterministic: the same configuration gives
//! byte-identical text (the agent compares texts to skip needless reloads), and every line
//! is traceable to the proxy — and so the Service — it belongs to (to attribute HAProxy's
//! `[file:line]` complaints).

use std::{fmt::Write as _, ops::RangeInclusive};

use super::model::{Check, LbConfig, Proxy, ServiceRef};

/// The rendered file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    /// The file's text.
    pub text: String,
    /// Which lines (1-based, inclusive) each proxy occupies.
    pub sections: Vec<Section>,
}

/// The lines of one proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    /// 1-based line numbers.
    pub lines: RangeInclusive<usize>,
    /// Proxy name.
    pub proxy: String,
    /// Its Service.
    pub owner: Option<ServiceRef>,
}

impl Rendered {
    /// The section a line number belongs to.
    pub fn section_at(&self, line: usize) -> Option<&Section> {
        self.sections.iter().find(|s| s.lines.contains(&line))
    }

    /// The section of a proxy.
    pub fn section_of(&self, proxy: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.proxy == proxy)
    }

    /// Number of frontends serving traffic (the stats frontend not counted).
    pub fn frontends(&self) -> usize {
        self.sections.len()
    }
}

const HEADER: &str = "\
# Written by `cairn-ccm haproxy-agent`; edits are overwritten at the next change.
# Run HAProxy in master-worker mode: haproxy -W -S <master socket> -f <this file>
";

fn secs(d: std::time::Duration) -> String {
    format!("{}s", d.as_secs().max(1))
}

fn proxy(out: &mut String, p: &Proxy) {
    match &p.owner {
        Some(o) => {
            let _ = writeln!(out, "# Service {o}");
        }
        None => {
            let _ = writeln!(out, "# Kubernetes API server");
        }
    }
    let _ = writeln!(out, "frontend {}", p.name);
    for b in &p.binds {
        let _ = writeln!(out, "    bind {b}");
    }
    match &p.source_ranges {
        None => {}
        Some(r) if r.is_empty() => {
            let _ = writeln!(out, "    # loadBalancerSourceRanges allows nobody");
            let _ = writeln!(out, "    tcp-request connection reject");
        }
        Some(r) => {
            let _ = writeln!(
                out,
                "    tcp-request connection reject unless {{ src {} }}",
                r.join(" ")
            );
        }
    }
    let _ = writeln!(out, "    default_backend {}", p.name);
    out.push('\n');
    let _ = writeln!(out, "backend {}", p.name);
    let _ = writeln!(out, "    balance roundrobin");
    let check = match &p.check {
        Check::Tcp => "check".to_string(),
        Check::Http { path, port } => {
            let _ = writeln!(out, "    option httpchk GET {path}");
            format!("check port {port}")
        }
        Check::Https { path } => {
            let _ = writeln!(out, "    option httpchk GET {path}");
            "check check-ssl verify none".to_string()
        }
    };
    if p.servers.is_empty() {
        let _ = writeln!(out, "    # no eligible node");
    }
    for s in &p.servers {
        let _ = writeln!(out, "    server {} {} {check}", s.name, s.addr);
    }
}

/// Renders the file.
pub fn render(cfg: &LbConfig) -> Rendered {
    let s = &cfg.settings;
    let mut out = String::from(HEADER);
    out.push_str("\nglobal\n");
    if let Some(m) = s.maxconn {
        let _ = writeln!(out, "    maxconn {m}");
    }
    if let Some(u) = &s.user {
        let _ = writeln!(out, "    user {u}");
    }
    if let Some(g) = &s.group {
        let _ = writeln!(out, "    group {g}");
    }
    if let Some(l) = &s.log {
        let _ = writeln!(out, "    log {l}");
    }
    let _ = write!(
        out,
        "    # Old workers finish established connections for at most this long after a reload.
    hard-stop-after {hard_stop}

defaults
    mode tcp
{log}    option dontlognull
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout check 3s
    default-server inter 2s fall 2 rise 2
",
        hard_stop = secs(s.hard_stop_after),
        log = if s.log.is_some() {
            "    log global\n    option tcplog\n"
        } else {
            ""
        },
    );
    if let Some(addr) = s.stats {
        let _ = write!(
            out,
            "
frontend stats
    mode http
    bind {addr}
    http-request return status 200 content-type text/plain string ok if {{ path /healthz }}
    stats enable
    stats uri /stats
    stats refresh 10s
"
        );
    }
    let mut sections = Vec::with_capacity(cfg.proxies.len());
    // Lines written so far (every line ends with '\n').
    let mut lines = out.matches('\n').count();
    for p in &cfg.proxies {
        out.push('\n');
        lines += 1;
        let first = lines + 1;
        let start = out.len();
        proxy(&mut out, p);
        lines += out[start..].matches('\n').count();
        let last = lines;
        sections.push(Section {
            lines: first..=last,
            proxy: p.name.clone(),
            owner: p.owner.clone(),
        });
    }
    Rendered { text: out, sections }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::{net::SocketAddr, path::PathBuf};

    use serde_json::json;

    use super::*;
    use crate::haproxy::model::{
        ApiServer, CONTROL_PLANE_LABEL, EXCLUDE_LABEL, Inputs, Settings, build,
        tests::{lb, node, slice},
    };

    fn golden(name: &str, text: &str) {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("src/haproxy/testdata")
            .join(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, text).unwrap();
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
        assert_eq!(
            text,
            want,
            "{} differs (UPDATE_GOLDEN=1 rewrites it)",
            path.display()
        );
    }

    fn sample() -> Rendered {
        let services = vec![
            lb(
                "shop",
                "web",
                "2024-01-01T00:00:00Z",
                &["10.20.1.2", "fd00:20::2"],
                json!([
                    { "name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080 },
                    { "name": "https", "port": 443, "protocol": "TCP", "nodePort": 30443 },
                    { "name": "quic", "port": 443, "protocol": "UDP", "nodePort": 30444 },
                ]),
                json!({ "ipFamilyPolicy": "RequireDualStack" }),
            ),
            lb(
                "shop",
                "api",
                "2024-01-02T00:00:00Z",
                &["10.20.1.3"],
                json!([{ "port": 8080, "nodePort": 31080 }]),
                json!({ "externalTrafficPolicy": "Local", "healthCheckNodePort": 32100 }),
            ),
            // Local, but no endpoint anywhere: an empty backend.
            lb(
                "shop",
                "idle",
                "2024-01-04T00:00:00Z",
                &["10.20.1.5"],
                json!([{ "port": 9000, "nodePort": 31900 }]),
                json!({ "externalTrafficPolicy": "Local", "healthCheckNodePort": 32101 }),
            ),
            lb(
                "db",
                "pg",
                "2024-01-03T00:00:00Z",
                &["10.20.1.4"],
                json!([{ "port": 5432, "nodePort": 31432 }]),
                json!({ "loadBalancerSourceRanges": ["10.0.0.0/8", "192.168.10.0/24"] }),
            ),
        ];
        let nodes = vec![
            node("cp-1", "10.20.2.1", true, json!({ CONTROL_PLANE_LABEL: "" })),
            node("cp-2", "10.20.2.2", false, json!({ CONTROL_PLANE_LABEL: "" })),
            node("worker-b", "10.20.2.12", true, json!({})),
            node("worker-a", "10.20.2.11", true, json!({})),
            node("worker-c", "10.20.2.13", false, json!({})),
            node("edge", "10.20.2.14", true, json!({ EXCLUDE_LABEL: "true" })),
        ];
        let slices = vec![slice("shop", "api", &[("worker-b", Some(true))])];
        let api = ApiServer {
            vips: vec!["10.20.1.1".parse().unwrap()],
            port: 6443,
            backend_port: 6443,
        };
        let settings = Settings {
            stats: Some("127.0.0.1:8404".parse::<SocketAddr>().unwrap()),
            log: Some("stderr format raw daemon".into()),
            ..Settings::default()
        };
        let (cfg, _) = build(
            &Inputs {
                services: &services,
                nodes: &nodes,
                slices: &slices,
                class: None,
                api_server: &api,
            },
            settings,
        );
        render(&cfg)
    }

    #[test]
    fn golden_config() {
        let r = sample();
        golden("sample.cfg", &r.text);
    }

    #[test]
    fn deterministic_whatever_the_input_order() {
        let a = sample();
        let b = sample();
        assert_eq!(a, b);
        // Reversed inputs.
        let mk = |rev: bool| {
            let mut services = vec![
                lb(
                    "a",
                    "x",
                    "2024-01-01T00:00:00Z",
                    &["10.0.0.1"],
                    json!([{ "port": 1, "nodePort": 30001 }]),
                    json!({}),
                ),
                lb(
                    "a",
                    "y",
                    "2024-01-01T00:00:00Z",
                    &["10.0.0.2"],
                    json!([{ "port": 1, "nodePort": 30002 }]),
                    json!({}),
                ),
            ];
            let mut nodes = vec![
                node("n1", "10.1.0.1", true, json!({})),
                node("n2", "10.1.0.2", true, json!({})),
            ];
            if rev {
                services.reverse();
                nodes.reverse();
            }
            let api = ApiServer::default();
            let (cfg, _) = build(
                &Inputs {
                    services: &services,
                    nodes: &nodes,
                    slices: &[],
                    class: None,
                    api_server: &api,
                },
                Settings::default(),
            );
            render(&cfg).text
        };
        assert_eq!(mk(false), mk(true));
    }

    #[test]
    fn sections_map_lines_to_services() {
        let r = sample();
        let lines: Vec<&str> = r.text.lines().collect();
        for s in &r.sections {
            let body = lines[(s.lines.start() - 1)..*s.lines.end()].join("\n");
            assert!(body.contains(&format!("frontend {}", s.proxy)), "{body}");
            assert!(body.contains(&format!("backend {}", s.proxy)), "{body}");
        }
        let web = r.section_of("svc:shop:web:80").unwrap();
        assert_eq!(web.owner.as_ref().unwrap().to_string(), "shop/web");
        let bind = lines
            .iter()
            .position(|l| l.contains("bind 10.20.1.4:5432"))
            .unwrap()
            + 1;
        assert_eq!(r.section_at(bind).unwrap().proxy, "svc:db:pg:5432");
        assert!(r.section_at(1).is_none(), "global is nobody's");
        assert_eq!(r.frontends(), 6);
    }

    /// The golden file is a configuration HAProxy accepts (fails, not skips, without haproxy).
    #[test]
    fn haproxy_accepts_the_golden_config() {
        let bin = crate::haproxy::apply::tests::require_haproxy();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, sample().text).unwrap();
        let out = std::process::Command::new(&bin)
            .args(["-c", "-f"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
