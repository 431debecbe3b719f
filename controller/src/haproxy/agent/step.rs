//! One turn of the agent's loop: the configuration the caches call for, the reload gate
//! (`--min-reload-interval`, `--retry-interval`), and putting a configuration into service.

use std::sync::Arc;

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::runtime::reflector::Store;
use tokio::{sync::watch, time::Instant};

use super::{AgentArgs, AgentMetrics, events::Events};
use crate::{
    crd::ClusterNetwork,
    haproxy::{
        apply::{ApplyError, Haproxy, cited_lines, write_atomic},
        model::{ApiServer, Inputs, LbConfig, Settings, Warning, build},
        render::{Rendered, render},
    },
};

/// The caches the configuration is built from.
pub(super) struct Caches {
    pub(super) services: Store<Service>,
    pub(super) nodes: Store<Node>,
    pub(super) slices: Store<EndpointSlice>,
    /// For the API-server VIP; None when `--api-server-vip` is given.
    pub(super) networks: Option<Store<ClusterNetwork>>,
}

impl Caches {
    /// The configuration the cluster calls for now, its warnings, and its text.
    pub(super) fn desired(&self, args: &AgentArgs) -> (LbConfig, Vec<Warning>, Rendered) {
        let mut vips = args.api_server_vip.clone();
        if let Some(cns) = &self.networks {
            for cn in cns.state() {
                if let Some(ip) = cn
                    .status
                    .as_ref()
                    .and_then(|s| s.api_server_vip.as_deref())
                    .and_then(|s| s.trim().parse().ok())
                {
                    vips.push(ip);
                }
            }
        }
        let api = ApiServer {
            vips,
            port: args.api_server_port,
            backend_port: args.api_server_backend_port,
        };
        let (services, nodes, slices) = (self.services.state(), self.nodes.state(), self.slices.state());
        let (cfg, warnings) = build(
            &Inputs {
                services: &services,
                nodes: &nodes,
                slices: &slices,
                class: args.load_balancer_class.as_deref(),
                api_server: &api,
            },
            Settings {
                stats: Some(args.stats_listen),
                hard_stop_after: args.hard_stop_after,
                maxconn: args.maxconn,
                user: args.haproxy_user.clone(),
                group: args.haproxy_group.clone(),
                log: args.haproxy_log.clone(),
            },
        );
        let r = render(&cfg);
        (cfg, warnings, r)
    }
}

/// The loop's state.
pub(super) struct Agent {
    pub(super) args: AgentArgs,
    pub(super) haproxy: Haproxy,
    pub(super) metrics: Arc<AgentMetrics>,
    pub(super) events: Events,
    pub(super) caches: Caches,
    /// The text HAProxy runs.
    pub(super) running: Option<String>,
    /// The last text that failed, and when.
    pub(super) failed: Option<(String, Instant)>,
    pub(super) last_apply: Option<Instant>,
    /// True once a configuration is in service (for `/readyz`).
    pub(super) ready: watch::Sender<bool>,
}

impl Agent {
    async fn apply(&mut self, r: &Rendered) -> Result<(), ApplyError> {
        self.haproxy.install(&r.text).await?;
        if self.args.manage_haproxy && !self.haproxy.child_alive() {
            return self.haproxy.start().await;
        }
        match self.haproxy.reload().await {
            Ok(()) => Ok(()),
            Err(e) => {
                // Keep the file what HAProxy runs, so a restart comes up with it.
                if let Some(prev) = &self.running
                    && let Err(w) = write_atomic(&self.args.config, prev).await
                {
                    tracing::error!(error = %w, "could not restore the previous configuration file");
                }
                Err(e)
            }
        }
    }

    /// One turn: render, and apply if needed and allowed. Returns when to look again even if
    /// nothing changes (a gated or failed apply).
    pub(super) async fn step(&mut self) -> Option<Instant> {
        let (cfg, warnings, r) = self.caches.desired(&self.args);
        self.events.warnings(warnings).await;
        if self.running.as_deref() == Some(r.text.as_str()) {
            return None;
        }
        let now = Instant::now();
        let mut gate = self.last_apply.map_or(now, |t| t + self.args.min_reload_interval);
        if let Some((text, at)) = &self.failed
            && *text == r.text
        {
            gate = gate.max(*at + self.args.retry_interval);
        }
        if now < gate {
            return Some(gate);
        }
        self.last_apply = Some(now);
        let result = self.apply(&r).await;
        self.metrics.reload_seconds.observe(now.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                self.applied(&cfg, r, now, 0);
                None
            }
            Err(e) => {
                self.metrics.reload_failed(e.stage());
                // The Services HAProxy's messages point at (e.g. a VIP:port it cannot bind):
                // leave their frontends out and put every other change into service, so one
                // Service never freezes the cluster's load balancer. The full configuration is
                // tried again after --retry-interval.
                let culprits = culprits(&e, &r, &self.args.config);
                let mut isolated = false;
                if !culprits.is_empty() {
                    let mut rest = cfg.clone();
                    rest.proxies.retain(|p| !culprits.contains(&p.name));
                    let r2 = render(&rest);
                    if self.running.as_deref() == Some(r2.text.as_str()) {
                        // What runs already leaves them out (the change was only theirs).
                        self.metrics.isolated.set(culprits.len() as i64);
                        isolated = true;
                    } else {
                        match self.apply(&r2).await {
                            Ok(()) => {
                                self.applied(&rest, r2, now, culprits.len());
                                isolated = true;
                            }
                            Err(e2) => {
                                self.metrics.reload_failed(e2.stage());
                                tracing::error!(error = %e2, "the configuration without the refused frontends failed too");
                            }
                        }
                    }
                }
                self.events
                    .apply_failed(&e, &r, &self.args.config, self.running.is_some(), isolated)
                    .await;
                let at = Instant::now();
                self.failed = Some((r.text, at));
                Some(at + self.args.retry_interval)
            }
        }
    }

    /// Records a configuration put into service; `isolated` Service frontends were left out.
    fn applied(&mut self, cfg: &LbConfig, r: Rendered, started: Instant, isolated: usize) {
        self.metrics.reloads.inc();
        self.metrics.frontends.set(r.frontends() as i64);
        self.metrics.backends.set(cfg.servers() as i64);
        self.metrics.isolated.set(isolated as i64);
        self.metrics.up.set(1);
        tracing::info!(
            frontends = r.frontends(),
            servers = cfg.servers(),
            isolated,
            took_ms = started.elapsed().as_millis() as u64,
            "configuration applied"
        );
        self.running = Some(r.text);
        if isolated == 0 {
            self.failed = None;
        }
        let _ = self.ready.send(true);
    }
}

/// Names of the Service proxies an error's messages cite (never the API server's: without it
/// the configuration is no use, and it cannot be left out).
fn culprits(e: &ApplyError, r: &Rendered, config: &std::path::Path) -> std::collections::BTreeSet<String> {
    cited_lines(e.output(), config)
        .into_iter()
        .filter_map(|l| r.section_at(l))
        .filter(|s| s.owner.is_some())
        .map(|s| s.proxy.clone())
        .collect()
}
