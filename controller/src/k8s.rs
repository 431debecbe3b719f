//! Kubernetes plumbing shared by the controller ([`crate::run`]) and the HAProxy agent
//! ([`crate::haproxy`]): the client from `--kubeconfig`, and reflectors that say when their
//! initial list is in.

use std::path::Path;

use anyhow::Context as _;
use futures::{Stream, StreamExt as _};
use kube::{
    Api, Client, Config, Resource,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::sync::watch;

/// A client from `--kubeconfig`, or the default chain (in-cluster, `$KUBECONFIG`,
/// `~/.kube/config`).
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(p) => {
            let kc = Kubeconfig::read_from(p).with_context(|| format!("--kubeconfig {}", p.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
        }
        None => Config::infer()
            .await
            .context("no Kubernetes config found (in-cluster, KUBECONFIG, ~/.kube/config)")?,
    };
    Ok(Client::try_from(config)?)
}

/// What a reflector can cache: a typed, cluster-known kind.
pub trait Cached:
    Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static
{
}

impl<K> Cached for K where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static
{
}

/// Drops `managedFields` before an object is cached: nothing here reads them, and they are
/// about half of a cached Service (~8 KiB each).
pub fn strip_managed_fields<K: Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
}

/// A reflector over `api`: its store; the watch events, each already applied to the store
/// (poll this stream, or nothing is cached); and a signal that turns true once the initial
/// list is in the store. `strip` trims every object before it is cached.
///
/// Any number of tasks may wait on the signal. (kube-runtime's `Store::wait_until_ready`
/// wakes only the last of several concurrent waiters.)
pub fn reflect<K: Cached>(
    api: Api<K>,
    cfg: watcher::Config,
    strip: fn(&mut K),
) -> (
    Store<K>,
    impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    watch::Receiver<bool>,
) {
    let (reader, writer) = reflector::store();
    let (tx, rx) = watch::channel(false);
    let events = watcher(api, cfg)
        .default_backoff()
        .modify(strip)
        .reflect(writer)
        // After `reflect`, so the store already holds the initial list when waiters wake.
        .inspect(move |ev| {
            if matches!(ev, Ok(watcher::Event::InitDone)) {
                let _ = tx.send(true);
            }
        });
    (reader, events, rx)
}
