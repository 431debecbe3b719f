//! The network file `network apply -f` reads: YAML or JSON, one network, a list of networks,
//! or several YAML documents. Unknown fields are errors, and every error names its field.
//!
//! ```yaml
//! name: net-a
//! prefixes: [10.20.0.0/16]
//! gateways: [10.20.0.1]
//! dnsServers: [10.20.0.2]
//! vlan: 20
//! reuseGraceSeconds: 30
//! pools:
//!   - name: vip
//!     purpose: VIP            # or NODE
//!     ranges: [10.20.1.0/24]
//!     exclusions: [10.20.1.1]
//!     autoAssign: true        # default
//! ```

use std::path::Path;

use anyhow::Context as _;
use cairn_proto::v1 as pb;
use serde::Deserialize;

/// Pool purpose as written in files.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum PurposeFile {
    /// VIPs.
    #[serde(rename = "VIP", alias = "vip")]
    Vip,
    /// Node addresses.
    #[serde(rename = "NODE", alias = "node")]
    Node,
}

/// A pool in a network file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PoolFile {
    /// Name.
    pub name: String,
    /// VIP or NODE.
    pub purpose: PurposeFile,
    /// Ranges.
    pub ranges: Vec<String>,
    /// Exclusions.
    #[serde(default)]
    pub exclusions: Vec<String>,
    /// Default true.
    #[serde(default)]
    pub auto_assign: Option<bool>,
}

/// A network file entry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkFile {
    /// Name.
    pub name: String,
    /// Prefixes.
    #[serde(default)]
    pub prefixes: Vec<String>,
    /// Gateways.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// DNS servers.
    #[serde(default)]
    pub dns_servers: Vec<String>,
    /// VLAN.
    #[serde(default)]
    pub vlan: u32,
    /// Pools.
    pub pools: Vec<PoolFile>,
    /// Reuse grace.
    #[serde(default)]
    pub reuse_grace_seconds: Option<u32>,
    /// Manager.
    #[serde(default)]
    pub managed_by: String,
}

impl From<NetworkFile> for pb::Network {
    fn from(n: NetworkFile) -> Self {
        pb::Network {
            name: n.name,
            prefixes: n.prefixes,
            gateways: n.gateways,
            dns_servers: n.dns_servers,
            vlan: n.vlan,
            pools: n
                .pools
                .into_iter()
                .map(|p| pb::Pool {
                    name: p.name,
                    purpose: match p.purpose {
                        PurposeFile::Vip => pb::PoolPurpose::Vip,
                        PurposeFile::Node => pb::PoolPurpose::Node,
                    } as i32,
                    ranges: p.ranges,
                    exclusions: p.exclusions,
                    auto_assign: p.auto_assign,
                })
                .collect(),
            reuse_grace_seconds: n.reuse_grace_seconds,
            managed_by: n.managed_by,
            ..Default::default()
        }
    }
}

/// Parses networks from text (YAML or JSON).
pub fn parse_networks(text: &str) -> anyhow::Result<Vec<pb::Network>> {
    let mut out = Vec::new();
    for (d, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml_ng::Value::deserialize(doc).with_context(|| format!("document {d}"))?;
        let items = match value {
            serde_yaml_ng::Value::Null => continue,
            serde_yaml_ng::Value::Sequence(s) => s
                .into_iter()
                .enumerate()
                .map(|(i, v)| (format!("document {d}, item {i}"), v))
                .collect(),
            v => vec![(format!("document {d}"), v)],
        };
        for (where_, v) in items {
            let n: NetworkFile = serde_path_to_error::deserialize(v).map_err(|e| {
                let path = e.path().to_string();
                anyhow::anyhow!("{where_}: field {path}: {}", e.into_inner())
            })?;
            out.push(n.into());
        }
    }
    if out.is_empty() {
        anyhow::bail!("no network found");
    }
    Ok(out)
}

/// Reads networks from a file, or standard input for `-`.
pub fn read_networks(path: &Path) -> anyhow::Result<Vec<pb::Network>> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    parse_networks(&text).with_context(|| format!("{}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_yaml_json_and_lists() {
        let y = "name: a\npools:\n- name: vip\n  purpose: VIP\n  ranges: [10.0.0.0/24]\n---\n- name: b\n  pools: [{name: n, purpose: NODE, ranges: [10.1.0.0/24], autoAssign: false}]\n";
        let n = parse_networks(y).unwrap();
        assert_eq!(n.len(), 2);
        assert_eq!(n[1].pools[0].auto_assign, Some(false));
        assert_eq!(n[1].pools[0].purpose, pb::PoolPurpose::Node as i32);
        let j = r#"{"name":"c","vlan":3,"pools":[{"name":"p","purpose":"VIP","ranges":["fd00::/64"]}]}"#;
        assert_eq!(parse_networks(j).unwrap()[0].vlan, 3);
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse_networks("name: a\npools:\n- name: vip\n  purpose: VIPP\n  ranges: []\n").unwrap_err();
        assert!(format!("{e:#}").contains("pools[0].purpose"), "{e:#}");
        let e = parse_networks("name: a\nvlna: 3\npools: []\n").unwrap_err();
        assert!(format!("{e:#}").contains("vlna"), "{e:#}");
        assert!(parse_networks("").is_err());
    }
}
