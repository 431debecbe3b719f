//! What every reconciler shares: clients, the cluster identity, the ClusterNetwork cache, the
//! event recorder, metrics, the set of Services waiting for a free VIP, and each object's count
//! of failed reconciles (for its backoff).

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use k8s_openapi::api::core::v1::Service;
use kube::{
    Client, Resource, ResourceExt,
    api::DynamicObject,
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{ObjectRef, Store},
    },
};
use tokio::sync::mpsc;

use crate::{ANN_NETWORK, Error, MANAGER, Result, crd::ClusterNetwork, ipam::Ipam, metrics::Metrics};

/// Shared state of the reconcilers.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Store client.
    pub ipam: Ipam,
    /// This cluster's id in the store.
    pub cluster_id: String,
    /// Only Services with this `loadBalancerClass` (or none, when unset) are ours.
    pub lb_class: Option<String>,
    /// Event recorder.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// ClusterNetworks, from a reflector.
    pub networks: Store<ClusterNetwork>,
    /// Services waiting for an address; re-triggered when the store frees one.
    pending: Mutex<HashSet<ObjectRef<Service>>>,
    retrigger: mpsc::UnboundedSender<ObjectRef<Service>>,
    store_ok: AtomicBool,
    /// Failed reconciles in a row, per object; absent after a successful one.
    failures: Mutex<HashMap<ObjectRef<DynamicObject>, Streak>>,
}

impl Context {
    /// A context; `retrigger` feeds `Controller::reconcile_on` of the Service controller.
    pub fn new(
        client: Client,
        ipam: Ipam,
        cluster_id: String,
        lb_class: Option<String>,
        metrics: Arc<Metrics>,
        networks: Store<ClusterNetwork>,
        retrigger: mpsc::UnboundedSender<ObjectRef<Service>>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: None,
            },
        );
        Context {
            client,
            ipam,
            cluster_id,
            lb_class,
            recorder,
            metrics,
            networks,
            pending: Mutex::new(HashSet::new()),
            retrigger,
            store_ok: AtomicBool::new(true),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// The ClusterNetwork an object uses: the one its `cairn.dev/network` annotation names, or
    /// the only one that has a pool of `purpose`.
    pub fn network_for<K: Resource>(
        &self,
        obj: &K,
        purpose: crate::crd::PoolPurpose,
    ) -> Result<Arc<ClusterNetwork>> {
        let all = self.networks.state();
        if let Some(name) = obj.meta().annotations.as_ref().and_then(|a| a.get(ANN_NETWORK)) {
            return all
                .into_iter()
                .find(|n| n.name_any() == *name)
                .ok_or_else(|| Error::Invalid {
                    field: format!("annotation {ANN_NETWORK}"),
                    message: format!("no ClusterNetwork named {name:?}"),
                });
        }
        let mut fit: Vec<_> = all.into_iter().filter(|n| n.has_pool(purpose)).collect();
        match fit.len() {
            1 => Ok(fit.remove(0)),
            0 => Err(Error::NoNetwork(format!(
                "no ClusterNetwork has a {purpose:?} pool"
            ))),
            n => Err(Error::NoNetwork(format!(
                "{n} ClusterNetworks have a {purpose:?} pool; choose one with the {ANN_NETWORK} annotation"
            ))),
        }
    }

    /// Publishes an event on `obj`; failures are logged, never fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "could not publish event");
        }
    }

    /// Marks a Service as waiting for an address (or not).
    pub fn set_pending(&self, svc: ObjectRef<Service>, pending: bool) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending {
            p.insert(svc);
        } else {
            p.remove(&svc);
        }
        self.metrics.pending_services.set(p.len() as i64);
    }

    /// Re-triggers every waiting Service (the store freed an address somewhere).
    pub fn retrigger_pending(&self) {
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for r in p.iter() {
            let _ = self.retrigger.send(r.clone());
        }
    }

    /// Records whether the last store call went through (read by the `store_up` gauge; the
    /// ClusterNetwork `Degraded` condition and readiness do not depend on it).
    pub fn set_store_ok(&self, ok: bool) {
        self.store_ok.store(ok, Ordering::Relaxed);
    }

    /// Whether the store answered last time.
    pub fn store_ok(&self) -> bool {
        self.store_ok.load(Ordering::Relaxed)
    }

    /// When to retry `obj` after `err`: exponential backoff with jitter over its failures in a
    /// row (see [`Error::backoff`]). A new version of the object (a spec change, or the start
    /// of its deletion) starts a new streak: the user acted, so the next retry comes soon.
    pub fn retry_after<K: Resource<DynamicType = ()>>(&self, obj: &K, err: &Error) -> Action {
        let attempt = {
            let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            f.entry(ObjectRef::from_obj(obj).erase())
                .or_default()
                .fail(Version::of(obj))
        };
        Action::requeue(err.backoff(attempt))
    }

    /// Forgets `obj`'s failures: it reconciled successfully (or is gone).
    pub fn reconciled_ok<K: Resource<DynamicType = ()>>(&self, obj: &K) {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if !f.is_empty() {
            f.remove(&ObjectRef::from_obj(obj).erase());
        }
    }
}

/// What of an object restarts its failure streak when it changes: the spec's generation and
/// whether it is being deleted (status and metadata updates, often our own, do not).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Version {
    generation: Option<i64>,
    deleting: bool,
}

impl Version {
    fn of<K: Resource>(obj: &K) -> Self {
        let meta = obj.meta();
        Version {
            generation: meta.generation,
            deleting: meta.deletion_timestamp.is_some(),
        }
    }
}

/// One object's failed reconciles in a row, for the version they failed on.
#[derive(Debug, Default)]
struct Streak {
    version: Version,
    failed: u32,
}

impl Streak {
    /// Counts a failure of `version`; returns the attempt number for the backoff (1-based).
    fn fail(&mut self, version: Version) -> u32 {
        if version != self.version {
            *self = Streak { version, failed: 0 };
        }
        self.failed = self.failed.saturating_add(1);
        self.failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streak_grows_while_the_object_is_unchanged() {
        let v = Version {
            generation: Some(1),
            deleting: false,
        };
        let mut s = Streak::default();
        assert_eq!([s.fail(v), s.fail(v), s.fail(v)], [1, 2, 3]);
    }

    #[test]
    fn deletion_or_a_new_generation_restarts_the_streak() {
        let live = Version {
            generation: Some(1),
            deleting: false,
        };
        let mut s = Streak::default();
        for _ in 0..7 {
            s.fail(live);
        }
        // A Service deleted during a store outage: its release is retried from the short end
        // of the backoff, not after the long waits its earlier failures had reached.
        let deleting = Version {
            deleting: true,
            ..live
        };
        assert_eq!(s.fail(deleting), 1);
        assert_eq!(s.fail(deleting), 2);
        let edited = Version {
            generation: Some(2),
            deleting: true,
        };
        assert_eq!(s.fail(edited), 1);
    }
}
