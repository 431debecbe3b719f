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
    failures: Mutex<HashMap<ObjectRef<DynamicObject>, u32>>,
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
        let mut fit: Vec<_> = all
            .into_iter()
            .filter(|n| n.spec.pools.iter().any(|p| p.purpose == purpose))
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
    /// row (see [`Error::backoff`]).
    pub fn retry_after<K: Resource<DynamicType = ()>>(&self, obj: &K, err: &Error) -> Action {
        let attempt = {
            let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            let n = f.entry(ObjectRef::from_obj(obj).erase()).or_insert(0);
            *n = n.saturating_add(1);
            *n
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
