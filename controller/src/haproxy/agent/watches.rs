//! The agent's caches: one reflector per kind, each driven by its own task, all waking one
//! loop through a shared [`Notify`].

use std::{pin::pin, sync::Arc};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api,
    runtime::{reflector::Store, watcher},
};
use tokio::sync::{Notify, watch};

use crate::k8s::{Cached, reflect, strip_managed_fields};

/// A reflector on its own task: the store, a signal that turns true once the initial list is
/// in, and `changed` notified after every change (not during a (re)list).
pub(super) fn watch_store<K: Cached>(
    api: Api<K>,
    changed: Arc<Notify>,
    strip: fn(&mut K),
) -> (Store<K>, watch::Receiver<bool>, tokio::task::JoinHandle<()>) {
    let (reader, events, ready) = reflect(api, watcher::Config::default().any_semantic(), strip);
    let kind = K::kind(&());
    let task = tokio::spawn(async move {
        let mut events = pin!(events);
        while let Some(ev) = events.next().await {
            match ev {
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Ok(_) => changed.notify_one(),
                Err(e) => tracing::warn!(%kind, error = %e, "watch failed; retrying"),
            }
        }
    });
    (reader, ready, task)
}

/// Nodes also drop their image lists: large, and nothing here reads them.
pub(super) fn strip_node(n: &mut Node) {
    strip_managed_fields(n);
    if let Some(s) = n.status.as_mut() {
        s.images = None;
    }
}
