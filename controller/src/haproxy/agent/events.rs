//! What the agent tells users: Kubernetes Events on the Services a warning or a refused
//! configuration is about (and log lines for the rest). The agent writes nothing else.

use std::{collections::BTreeSet, path::Path};

use k8s_openapi::api::core::v1::Service;
use kube::{
    Client, Resource as _,
    runtime::{
        events::{Event, EventType, Recorder, Reporter},
        reflector::{ObjectRef, Store},
    },
};

use crate::haproxy::{
    apply::{ApplyError, cited_lines},
    model::{ServiceRef, Warning},
    render::Rendered,
};

/// Event reporter name.
pub const REPORTER: &str = "cairn-haproxy-agent";

/// Longest Event note; the API server refuses notes over 1 KiB.
const MAX_NOTE: usize = 1000;

/// Publishes Events on Services found in the agent's cache.
pub(super) struct Events {
    recorder: Recorder,
    services: Store<Service>,
    /// Warnings already reported (an Event is sent when one appears, not on every turn).
    warned: BTreeSet<Warning>,
}

impl Events {
    pub(super) fn new(client: Client, services: Store<Service>) -> Self {
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: REPORTER.into(),
                instance: std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_string()),
            },
        );
        Events {
            recorder,
            services,
            warned: BTreeSet::new(),
        }
    }

    async fn publish(&self, owner: &ServiceRef, type_: EventType, reason: &str, action: &str, note: &str) {
        let key = ObjectRef::<Service>::new(&owner.name).within(&owner.namespace);
        let Some(svc) = self.services.get(&key) else {
            return;
        };
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(truncate(note, MAX_NOTE)),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &svc.object_ref(&())).await {
            tracing::warn!(error = %e, reason, service = %owner, "could not publish event");
        }
    }

    /// Reports the warnings that were not there last turn.
    pub(super) async fn warnings(&mut self, warnings: Vec<Warning>) {
        let now: BTreeSet<Warning> = warnings.into_iter().collect();
        for w in now.difference(&self.warned) {
            match &w.owner {
                Some(o) => {
                    tracing::warn!(service = %o, reason = w.reason, "{}", w.message);
                    self.publish(o, EventType::Warning, w.reason, "Configure", &w.message)
                        .await;
                }
                None => tracing::warn!(reason = w.reason, "{}", w.message),
            }
        }
        self.warned = now;
    }

    /// Reports a failed apply: on the Services HAProxy's messages point at, else in the log.
    /// `running`: whether a previous configuration is still in service; `isolated`: whether
    /// everything but those Services' frontends was put into service instead.
    pub(super) async fn apply_failed(
        &self,
        e: &ApplyError,
        r: &Rendered,
        config: &Path,
        running: bool,
        isolated: bool,
    ) {
        let lines = cited_lines(e.output(), config);
        let mut owners: Vec<&ServiceRef> = lines
            .iter()
            .filter_map(|l| r.section_at(*l))
            .filter_map(|s| s.owner.as_ref())
            .collect();
        owners.sort();
        owners.dedup();
        let services: Vec<String> = owners.iter().map(ToString::to_string).collect();
        if isolated {
            tracing::error!(error = %e, ?services, "these Services' frontends are left out; every other change is applied");
        } else if running {
            tracing::error!(error = %e, ?services, "configuration not applied; the previous one keeps running");
        } else {
            tracing::error!(error = %e, ?services, "configuration not applied; HAProxy is not running");
        }
        let reason = match e {
            _ if isolated => "FrontendIsolated",
            ApplyError::Rejected { .. } => "ConfigRejected",
            _ => "ReloadFailed",
        };
        for o in owners {
            // Only the complaints about this Service's lines.
            let mine: Vec<&str> = e
                .output()
                .lines()
                .filter(|l| {
                    cited_lines(l, config)
                        .iter()
                        .any(|n| r.section_at(*n).and_then(|s| s.owner.as_ref()) == Some(o))
                })
                .collect();
            let note = format!(
                "HAProxy refused the configuration for this Service; {}: {}",
                if isolated {
                    "its frontend is left out (retried every --retry-interval) and every other change is applied"
                } else if running {
                    "the previous configuration keeps running"
                } else {
                    "HAProxy is not running"
                },
                mine.join("; ")
            );
            self.publish(o, EventType::Warning, reason, "Reload", &note).await;
        }
    }
}

/// `s` cut to at most `max` bytes, ending in `...` when cut.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate("abc", 10), "abc");
        assert_eq!(truncate("ééééé", 6), "é...");
    }
}
