//! What every reconciler shares: clients, the cluster identity, the ClusterNetwork cache, the
//! event recorder, metrics, the set of Services waiting for a free VIP, and each object's count
//! of failed reconciles (for its backoff).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{Namespace, Service};
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

/// Events waiting to be published, at most (beyond it they are dropped, never blocking).
const EVENT_QUEUE: usize = 4096;

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
    /// Events to publish, drained by one task that owns the Recorder (see [`Context::event`]).
    events: mpsc::Sender<(Event, ObjectReference)>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// ClusterNetworks, from a reflector.
    pub networks: Store<ClusterNetwork>,
    /// Namespaces (for the labels pool policies select on), from a reflector.
    pub namespaces: Store<Namespace>,
    /// Services waiting for an address, and the store network each waits on (`None`: any);
    /// re-triggered when the store frees one there.
    pending: Mutex<HashMap<ObjectRef<Service>, Option<String>>>,
    retrigger: mpsc::UnboundedSender<ObjectRef<Service>>,
    store_ok: AtomicBool,
    /// Failed reconciles in a row, per object; absent after a successful one.
    failures: Mutex<HashMap<ObjectRef<DynamicObject>, Streak>>,
    /// Addresses a conflict probe found free ahead of need, and when.
    pub probed_free: crate::conflict::ProbedFree,
}

impl Context {
    /// A context over the ClusterNetwork and Namespace caches; `retrigger` feeds
    /// `Controller::reconcile_on` of the Service controller.
    pub fn new(
        client: Client,
        ipam: Ipam,
        cluster_id: String,
        lb_class: Option<String>,
        metrics: Arc<Metrics>,
        (networks, namespaces): (Store<ClusterNetwork>, Store<Namespace>),
        retrigger: mpsc::UnboundedSender<ObjectRef<Service>>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: None,
            },
        );
        let (events, mut queue) = mpsc::channel::<(Event, ObjectReference)>(EVENT_QUEUE);
        tokio::spawn(async move {
            while let Some((ev, obj)) = queue.recv().await {
                if let Err(e) = recorder.publish(&ev, &obj).await {
                    tracing::warn!(error = %e, reason = %ev.reason, "could not publish event");
                }
            }
        });
        Context {
            client,
            ipam,
            cluster_id,
            lb_class,
            events,
            metrics,
            networks,
            namespaces,
            pending: Mutex::new(HashMap::new()),
            retrigger,
            store_ok: AtomicBool::new(true),
            failures: Mutex::new(HashMap::new()),
            probed_free: crate::conflict::ProbedFree::default(),
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
        let mut fit: Vec<_> = all
            .iter()
            .filter(|n| n.has_pool(purpose) && duplicate_in(&all, n).is_none())
            .cloned()
            .collect();
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

    /// The ClusterNetwork that stands for `cn`'s store network in this cluster, when that is
    /// not `cn` itself (see [`duplicate_in`]).
    pub fn duplicate_of(&self, cn: &ClusterNetwork) -> Option<String> {
        duplicate_in(&self.networks.state(), cn)
    }

    /// The labels of a namespace, when it is in the cache.
    pub fn namespace_labels(&self, name: &str) -> Option<std::collections::BTreeMap<String, String>> {
        self.namespaces
            .get(&ObjectRef::new(name))
            .map(|n| n.labels().clone())
    }

    /// Queues an event on `obj` for publishing; failures are logged, never fatal.
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
        // Never awaited in the reconcile: publishing is an apiserver round trip plus the
        // Recorder's own cache upkeep, and a burst of allocations would wait on both
        // (docs/benchmarks.md, proposal 3). A full queue drops the event, counted in
        // `cairn_ccm_events_dropped_total`.
        if let Err(e) = self.events.try_send((ev, obj.object_ref(&()))) {
            self.metrics.events_dropped.inc();
            tracing::debug!(reason, error = %e, "event queue full; event dropped");
        }
    }

    /// Marks a Service as waiting for an address on store network `on` (`Some(None)`: on any
    /// network, e.g. it has none yet), or as not waiting (`None`).
    pub fn set_pending(&self, svc: ObjectRef<Service>, on: Option<Option<String>>) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match on {
            Some(network) => {
                p.insert(svc, network);
            }
            None => {
                p.remove(&svc);
            }
        }
        self.metrics.pending_services.set(p.len() as i64);
    }

    /// Re-triggers every waiting Service (this controller freed an address).
    pub fn retrigger_pending(&self) {
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for r in p.keys() {
            let _ = self.retrigger.send(r.clone());
        }
    }

    /// Re-triggers the Services waiting on store network `network` (or on any): an address
    /// was freed there. A release elsewhere in the fleet wakes nobody it cannot help.
    pub fn retrigger_pending_on(&self, network: &str) {
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for (r, on) in p.iter() {
            if on.as_deref().is_none_or(|n| n == network) {
                let _ = self.retrigger.send(r.clone());
            }
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

/// Of several ClusterNetworks naming one store network, the oldest (then the first by name)
/// is the one reconciled; the others would overwrite it on every resync. Returns the name of
/// that one when it is not `cn`.
pub fn duplicate_in(all: &[Arc<ClusterNetwork>], cn: &ClusterNetwork) -> Option<String> {
    let rank = |n: &ClusterNetwork| (n.metadata.creation_timestamp.clone().map(|t| t.0), n.name_any());
    all.iter()
        .filter(|n| n.spec.network == cn.spec.network)
        .min_by_key(|n| rank(n))
        .map(|n| n.name_any())
        .filter(|first| *first != cn.name_any())
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
