//! `manifests/` on a real kube-apiserver: the kustomize tree applies (server-side dry-run,
//! then for real), its pod templates pass the `restricted` Pod Security Standard, the CRD
//! accepts the README's ClusterNetwork and rejects malformed ones, the README's overlay
//! renders — and `cairn-ccm` runs as a process authenticated as the manifests'
//! ServiceAccount, with the Deployment's own args and config, against a `cairn-ipam` started
//! with the StatefulSet's args, and does its job under exactly that RBAC (and nothing more).
//! The HA overlay (`overlays/ha-etcd`) applies too, and three store processes started with its
//! rendered args on a real TLS etcd cluster elect one leader, which alone passes the readiness
//! probe while every replica passes liveness.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use cairn_e2e::{ControlPlane, eventually};
use common::*;
use k8s_openapi::api::{
    apps::v1::{Deployment, StatefulSet},
    coordination::v1::Lease,
    core::v1::{ConfigMap, Container, Node, Pod, Secret, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, ResourceExt,
    api::{
        ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
        PostParams,
    },
    discovery::{self, Scope},
};
use serde_json::{Value, json};

const NS: &str = "cairn-system";
const CLUSTER: &str = "cluster-a";

fn root() -> PathBuf {
    cairn_e2e::workspace_root()
}

fn manifests() -> PathBuf {
    root().join("manifests")
}

/// Runs the built kubectl against `kubeconfig`; returns (success, stdout, stderr).
async fn kubectl(kubeconfig: &Path, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(
        cairn_e2e::binary_path("kubectl").expect("kubectl (e2e/tools/build.sh)"),
    )
    .arg(format!("--kubeconfig={}", kubeconfig.display()))
    .args(args)
    .output()
    .await
    .expect("run kubectl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `kubectl kustomize <dir>` as JSON documents.
async fn render(kubeconfig: &Path, dir: &Path) -> Vec<Value> {
    let (ok, out, err) = kubectl(kubeconfig, &["kustomize", &dir.to_string_lossy()]).await;
    assert!(ok, "kubectl kustomize {}: {err}", dir.display());
    serde_yaml_ng::Deserializer::from_str(&out)
        .map(|d| serde::Deserialize::deserialize(d).expect("rendered YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| {
            d["kind"] == kind
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(name))
        })
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered manifests"))
}

/// Apiserver warnings in kubectl's stderr (the generated CRD must not cause any).
fn warnings(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.starts_with("Warning:")).collect()
}

/// The server-side dry-run of `-k dir`, then the real apply; both must succeed without warnings.
async fn apply_k(cp: &ControlPlane, dir: &Path) -> String {
    let k = dir.to_string_lossy();
    let (ok, out, err) = kubectl(
        cp.kubeconfig_path(),
        &["apply", "--server-side", "--dry-run=server", "-k", &k],
    )
    .await;
    assert!(ok, "server-side dry-run of {k} failed:\n{out}\n{err}");
    assert!(warnings(&err).is_empty(), "dry-run of {k} warned:\n{err}");
    assert!(
        out.lines().all(|l| l.ends_with("(server dry run)")),
        "not all objects dry-run: {out}"
    );
    let (ok, out, err) = kubectl(cp.kubeconfig_path(), &["apply", "--server-side", "-k", &k]).await;
    assert!(ok, "apply of {k} failed:\n{out}\n{err}");
    assert!(warnings(&err).is_empty(), "apply of {k} warned:\n{err}");
    out
}

/// Applies manifests/ the way the README says (namespace and CRDs first, then the rest) and
/// waits until the CRD is served. Returns the rendered tree.
async fn install(cp: &ControlPlane, client: &Client) -> Vec<Value> {
    apply_k(cp, &manifests().join("namespace")).await;
    apply_k(cp, &manifests().join("crds")).await;
    let out = apply_k(cp, &manifests()).await;
    let docs = render(cp.kubeconfig_path(), &manifests()).await;
    assert_eq!(
        out.lines().count(),
        docs.len(),
        "one apply line per object:\n{out}"
    );
    // The CRD is established and served (kubectl does not wait for that).
    let cn: Api<ClusterNetwork> = Api::all(client.clone());
    eventually("ClusterNetwork served", ACT, || {
        let cn = cn.clone();
        async move { cn.list(&ListParams::default()).await.map(|_| ()) }
    })
    .await
    .expect("ClusterNetwork served");
    docs
}

/// The API of a rendered object.
async fn api_for(client: &Client, doc: &Value) -> Api<DynamicObject> {
    let (group, version) = match doc["apiVersion"].as_str().unwrap().split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (String::new(), doc["apiVersion"].as_str().unwrap().to_string()),
    };
    let gvk = GroupVersionKind::gvk(&group, &version, doc["kind"].as_str().unwrap());
    let (ar, caps) = discovery::pinned_kind(client, &gvk).await.expect("discovery");
    match (caps.scope, doc["metadata"]["namespace"].as_str()) {
        (Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), ns, &ar),
        (Scope::Namespaced, None) => panic!("{} {} has no namespace", doc["kind"], doc["metadata"]["name"]),
        (Scope::Cluster, _) => Api::all_with(client.clone(), &ar),
    }
}

/// The yaml code blocks of README.md that contain `needle`.
fn readme_yamls(needle: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let blocks: Vec<String> = readme
        .split("```yaml\n")
        .skip(1)
        .filter_map(|b| b.split_once("```").map(|(y, _)| y.to_string()))
        .filter(|y| y.contains(needle))
        .collect();
    assert!(!blocks.is_empty(), "README.md has no yaml block with {needle:?}");
    blocks
}

/// The README's ClusterNetwork examples.
fn readme_networks() -> Vec<Value> {
    readme_yamls("kind: ClusterNetwork")
        .iter()
        .map(|y| serde_yaml_ng::from_str(y).expect("README ClusterNetwork"))
        .collect()
}

/// The README's managed ClusterNetwork (the one that defines pools, so it needs nothing in the
/// store beforehand).
fn readme_managed_network() -> Value {
    readme_networks()
        .into_iter()
        .find(|n| n["spec"]["pools"].is_array())
        .expect("a README ClusterNetwork with pools")
}

fn cn_api(client: &Client) -> Api<DynamicObject> {
    Api::all_with(client.clone(), &ApiResource::erase::<ClusterNetwork>(&()))
}

/// Creating `obj` fails with 422 and a message containing every needle.
async fn rejected(client: &Client, what: &str, obj: Value, needles: &[&str]) {
    let obj: DynamicObject = serde_json::from_value(obj).unwrap();
    match cn_api(client).create(&PostParams::default(), &obj).await {
        Ok(_) => panic!("{what}: accepted"),
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 422, "{what}: {s:?}");
            for n in needles {
                assert!(s.message.contains(n), "{what}: {n:?} not in {:?}", s.message);
            }
        }
        Err(e) => panic!("{what}: {e}"),
    }
}

fn forbidden<T: std::fmt::Debug>(what: &str, r: Result<T, kube::Error>) {
    match r {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}

fn collect_yaml(dir: &Path, referenced: &mut BTreeSet<PathBuf>, files: &mut BTreeSet<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            collect_yaml(&p, referenced, files);
        } else if p.file_name().unwrap() == "kustomization.yaml" {
            let k: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            for r in k["resources"].as_array().into_iter().flatten() {
                referenced.insert(dir.join(r.as_str().unwrap()));
            }
            // Patch files count as part of the tree too.
            for p in k["patches"].as_array().into_iter().flatten() {
                if let Some(path) = p["path"].as_str() {
                    referenced.insert(dir.join(path));
                }
            }
        } else if p.extension().is_some_and(|x| x == "yaml") {
            files.insert(p);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn manifests_apply_pass_pod_security_and_the_crd_validates() {
    let t0 = Instant::now();
    // Every Kubernetes manifest (a YAML file with an apiVersion; not, say, promtool's rule
    // tests) is part of the tree.
    let (mut referenced, mut files) = (BTreeSet::new(), BTreeSet::new());
    collect_yaml(&manifests(), &mut referenced, &mut files);
    let orphans: Vec<_> = files
        .difference(&referenced)
        .filter(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains("apiVersion:")))
        .collect();
    assert!(
        orphans.is_empty(),
        "YAML files no kustomization.yaml lists: {orphans:?}"
    );

    let cp = ControlPlane::start().await.expect("control plane");
    let client = cp.client().unwrap();
    let docs = install(&cp, &client).await;

    // Every rendered object exists as rendered (spot-check: labels and, for workloads, the spec).
    for doc in &docs {
        let name = doc["metadata"]["name"].as_str().unwrap();
        let live = api_for(&client, doc)
            .await
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("{} {name} missing after apply: {e}", doc["kind"]));
        assert_eq!(
            live.labels().get("app.kubernetes.io/part-of").map(String::as_str),
            Some("cairn"),
            "{} {name} lacks app.kubernetes.io/part-of=cairn",
            doc["kind"]
        );
    }
    let dep: Deployment = Api::namespaced(client.clone(), NS)
        .get("cairn-ccm")
        .await
        .unwrap();
    assert_eq!(dep.spec.as_ref().unwrap().replicas, Some(2));
    let sts: StatefulSet = Api::namespaced(client.clone(), NS)
        .get("cairn-ipam")
        .await
        .unwrap();
    let sts_spec = sts.spec.as_ref().unwrap();
    assert_eq!(sts_spec.replicas, Some(1), "sled is single-process");
    let claim = &sts_spec.volume_claim_templates.as_ref().unwrap()[0];
    assert_eq!(
        claim.spec.as_ref().unwrap().access_modes.as_deref(),
        Some(&["ReadWriteOnce".to_string()][..])
    );
    wiring_is_consistent(&docs);
    // The README's upgrade step "store first" selects exactly the store's objects.
    let (ok, out, err) = kubectl(
        cp.kubeconfig_path(),
        &[
            "apply",
            "--server-side",
            "--dry-run=server",
            "-k",
            &manifests().to_string_lossy(),
            "-l",
            "app.kubernetes.io/name=cairn-ipam",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let mut store_objects: Vec<_> = out.lines().filter_map(|l| l.split_whitespace().next()).collect();
    store_objects.sort_unstable();
    assert_eq!(
        store_objects,
        [
            "networkpolicy.networking.k8s.io/cairn-ipam",
            "service/cairn-ipam",
            "serviceaccount/cairn-ipam",
            "statefulset.apps/cairn-ipam",
        ]
    );
    // No controller-manager runs here: the workloads exist but get no Pods.
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    assert!(pods.list(&ListParams::default()).await.unwrap().items.is_empty());

    // The pod templates meet the namespace's enforced "restricted" Pod Security Standard and
    // every admission check a real Pod meets (dry-run create of a Pod from each template).
    for (name, doc) in [
        ("pss-cairn-ccm", find(&docs, "Deployment", "cairn-ccm")),
        ("pss-cairn-ipam", find(&docs, "StatefulSet", "cairn-ipam")),
    ] {
        let mut spec = doc["spec"]["template"]["spec"].clone();
        if doc["kind"] == "StatefulSet" {
            spec["volumes"] =
                json!([{ "name": "data", "persistentVolumeClaim": { "claimName": "data-cairn-ipam-0" } }]);
        }
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "namespace": NS, "labels": doc["spec"]["template"]["metadata"]["labels"] },
            "spec": spec,
        }))
        .unwrap();
        let dry = PostParams {
            dry_run: true,
            ..Default::default()
        };
        pods.create(&dry, &pod)
            .await
            .unwrap_or_else(|e| panic!("a Pod from the {} template is refused: {e}", doc["kind"]));
        // And the check bites: the same Pod with a privileged escalation is refused.
        let mut bad = pod.clone();
        bad.spec.as_mut().unwrap().containers[0]
            .security_context
            .as_mut()
            .unwrap()
            .allow_privilege_escalation = Some(true);
        forbidden("PodSecurity restricted", pods.create(&dry, &bad).await);
    }

    // The README's ClusterNetworks are accepted as written (server-side dry-run: they may
    // share a name), the first one for real.
    let cns = cn_api(&client);
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    for example in readme_networks() {
        cns.create(&dry, &serde_json::from_value(example).unwrap())
            .await
            .expect("README ClusterNetwork accepted");
    }
    let example = readme_managed_network();
    cns.create(
        &PostParams::default(),
        &serde_json::from_value(example.clone()).unwrap(),
    )
    .await
    .expect("README ClusterNetwork accepted");
    // Malformed ones are refused by the apiserver, naming the field or rule.
    let with = |name: &str, f: &dyn Fn(&mut Value)| {
        let mut v = example.clone();
        v["metadata"]["name"] = json!(name);
        f(&mut v);
        v
    };
    rejected(
        &client,
        "bad pool purpose",
        with("bad-purpose", &|v| {
            v["spec"]["pools"][0]["purpose"] = json!("LOADBALANCER")
        }),
        &[
            "spec.pools[0].purpose",
            "Unsupported value",
            "\"VIP\"",
            "\"NODE\"",
        ],
    )
    .await;
    rejected(
        &client,
        "vlan 5000",
        with("bad-vlan", &|v| v["spec"]["vlan"] = json!(5000)),
        &["spec.vlan", "4094"],
    )
    .await;
    rejected(
        &client,
        "duplicate pool names",
        with("dup-pools", &|v| v["spec"]["pools"][1]["name"] = json!("vip")),
        &["spec.pools", "pool names must be unique"],
    )
    .await;
    rejected(
        &client,
        "apiServerVIP without a VIP pool",
        with("no-vip-pool", &|v| {
            v["spec"]["pools"] = json!([{ "name": "nodes", "purpose": "NODE", "ranges": ["10.30.2.0/24"] }]);
        }),
        &["spec", "apiServerVIP needs a VIP pool"],
    )
    .await;
    rejected(
        &client,
        "bad network name",
        with("bad-name", &|v| v["spec"]["network"] = json!("Net_A")),
        &["spec.network", "should match"],
    )
    .await;
    // spec.network is immutable.
    let name = example["metadata"]["name"].as_str().unwrap();
    match cns
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "network": "net-other" } })),
        )
        .await
    {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 422, "{s:?}");
            assert!(
                s.message.contains("spec.network") && s.message.contains("network is immutable"),
                "{s:?}"
            );
        }
        other => panic!("changing spec.network: {other:?}"),
    }

    // The README's overlay renders as it says and applies (dry-run) on top of the base.
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&manifests(), &tmp.path().join("manifests"));
    std::fs::create_dir(tmp.path().join("my-cluster")).unwrap();
    std::fs::write(
        tmp.path().join("my-cluster/kustomization.yaml"),
        readme_yamls("kind: Kustomization").remove(0),
    )
    .unwrap();
    let overlay = render(cp.kubeconfig_path(), &tmp.path().join("my-cluster")).await;
    assert_eq!(overlay.len(), docs.len());
    let cm = find(&overlay, "ConfigMap", "cairn-ccm-config");
    assert_eq!(cm["data"]["CAIRN_CLUSTER_ID"], "cluster-a");
    let ccm = &find(&overlay, "Deployment", "cairn-ccm")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(ccm["envFrom"][0]["configMapRef"]["name"], cm["metadata"]["name"]);
    assert!(
        ccm["args"]
            .as_array()
            .unwrap()
            .contains(&json!("--load-balancer-class=cairn.dev/haproxy")),
        "{ccm}"
    );
    for (kind, name) in [("Deployment", "cairn-ccm"), ("StatefulSet", "cairn-ipam")] {
        assert_eq!(
            find(&overlay, kind, name)["spec"]["template"]["spec"]["containers"][0]["image"],
            "registry.example.com/cairn:0.1.0"
        );
    }
    let (ok, out, err) = kubectl(
        cp.kubeconfig_path(),
        &[
            "apply",
            "--server-side",
            "--dry-run=server",
            "-k",
            &tmp.path().join("my-cluster").to_string_lossy(),
        ],
    )
    .await;
    assert!(ok && warnings(&err).is_empty(), "overlay dry-run:\n{out}\n{err}");
    eprintln!("manifests test: {:?}", t0.elapsed());
}

/// `selector` (matchLabels or a Service's map) selects pods labelled `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let sel = selector.get("matchLabels").unwrap_or(selector);
    let sel = sel.as_object().expect("selector labels");
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The names that tie the objects together agree: Services, the PDB and the NetworkPolicy
/// select the right pods and name ports the containers have; the ServiceAccounts the pods
/// and bindings use exist; the Lease the Deployment uses is the one the Role grants.
fn wiring_is_consistent(docs: &[Value]) {
    let pod = |kind: &str, name: &str| find(docs, kind, name)["spec"]["template"].clone();
    let (ccm, store) = (pod("Deployment", "cairn-ccm"), pod("StatefulSet", "cairn-ipam"));
    let (ccm_labels, store_labels) = (&ccm["metadata"]["labels"], &store["metadata"]["labels"]);
    let ports = |p: &Value| -> Vec<Value> {
        p["spec"]["containers"][0]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].clone())
            .collect()
    };
    for (svc, pod_labels, pod_ports) in [
        ("cairn-ipam", store_labels, ports(&store)),
        ("cairn-ccm-metrics", ccm_labels, ports(&ccm)),
    ] {
        let spec = &find(docs, "Service", svc)["spec"];
        assert!(
            selects(&spec["selector"], pod_labels),
            "Service {svc} selects no pod"
        );
        for p in spec["ports"].as_array().unwrap() {
            assert!(
                pod_ports.contains(&p["targetPort"]),
                "Service {svc}: {p} names no container port"
            );
        }
    }
    assert!(selects(
        &find(docs, "PodDisruptionBudget", "cairn-ccm")["spec"]["selector"],
        ccm_labels
    ));
    let np = &find(docs, "NetworkPolicy", "cairn-ipam")["spec"];
    assert!(
        selects(&np["podSelector"], store_labels),
        "NetworkPolicy protects no store pod"
    );
    let grpc = &np["ingress"][0];
    assert!(
        grpc["from"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| selects(&f["podSelector"], ccm_labels)),
        "NetworkPolicy does not admit the controller: {grpc}"
    );
    for p in np["ingress"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["ports"].as_array().unwrap())
    {
        assert!(
            ports(&store).contains(&p["port"]),
            "NetworkPolicy port {p} is not the store's"
        );
    }
    // ServiceAccounts used by pods and bindings exist in the tree.
    let sa_exists = |name: &Value| {
        docs.iter()
            .any(|d| d["kind"] == "ServiceAccount" && d["metadata"]["name"] == *name)
    };
    for p in [&ccm, &store] {
        assert!(
            sa_exists(&p["spec"]["serviceAccountName"]),
            "{}",
            p["spec"]["serviceAccountName"]
        );
    }
    for b in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRoleBinding" || d["kind"] == "RoleBinding")
    {
        for s in b["subjects"].as_array().unwrap() {
            assert!(
                sa_exists(&s["name"]) && s["namespace"] == NS,
                "binding subject {s}"
            );
        }
    }
    // The Lease the controller takes is the one its Role names.
    let lease = ccm["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|a| a.as_str()?.strip_prefix("--lease-name="))
        .expect("--lease-name in the Deployment's args")
        .to_string();
    let role = find(docs, "Role", "cairn-ccm-leader-election");
    assert!(
        role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["resourceNames"] == json!([lease])),
        "the Role does not name Lease {lease}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dst = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dst);
        } else {
            std::fs::copy(&p, &dst).unwrap();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn container(spec: &k8s_openapi::api::core::v1::PodSpec) -> &Container {
    &spec.containers[0]
}

/// A Pod's probe paths on its metrics port answer 200 (fails at once if a process exited).
async fn probes_pass(cp: &ControlPlane, c: &Container, port: u16) {
    for probe in [&c.liveness_probe, &c.readiness_probe] {
        let path = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
            .expect("http probe");
        eventually(&format!("GET {path}"), ACT, || {
            let path = path.clone();
            cp.check_running().expect("cairn-ccm running");
            async move {
                match http_get(&format!("127.0.0.1:{port}"), &path).await {
                    Ok((200, _)) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        })
        .await
        .expect("probe");
    }
}

async fn metric(port: u16, name: &str) -> Option<f64> {
    let (_, body) = http_get(&format!("127.0.0.1:{port}"), "/metrics").await.ok()?;
    body.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

/// `cairn-ccm` as the Deployment runs it: its args (with --metrics-listen on loopback), its
/// env (downward API filled in, ConfigMap values from `config`), authenticated by `kubeconfig`.
fn ccm_command(
    dep: &Deployment,
    config: &BTreeMap<String, String>,
    kubeconfig: &Path,
    pod: &str,
    port: u16,
) -> Command {
    let c = container(dep.spec.as_ref().unwrap().template.spec.as_ref().unwrap());
    assert_eq!(
        c.command.as_deref(),
        Some(&["/usr/local/bin/cairn-ccm".to_string()][..])
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairn-ccm"));
    for a in c.args.iter().flatten() {
        if a.starts_with("--metrics-listen") {
            cmd.arg(format!("--metrics-listen=127.0.0.1:{port}"));
        } else {
            cmd.arg(a);
        }
    }
    cmd.arg("--kubeconfig").arg(kubeconfig);
    for e in c.env.iter().flatten() {
        let v = match (&e.value, e.value_from.as_ref().and_then(|f| f.field_ref.as_ref())) {
            (Some(v), _) => v.clone(),
            (None, Some(f)) if f.field_path == "metadata.name" => pod.to_string(),
            (None, Some(f)) if f.field_path == "metadata.namespace" => NS.to_string(),
            _ => panic!("unexpected env {e:?}"),
        };
        cmd.env(&e.name, v);
    }
    for (k, v) in config {
        cmd.env(k, v);
    }
    cmd.env("RUST_LOG", "info,cairn_ccm=debug");
    cmd
}

/// Exit status, stdout and stderr of a process that must exit within 30 s (it is killed
/// otherwise: e.g. the agent waiting for a list its identity may not make).
async fn run_to_end(cmd: Command) -> (bool, String, String) {
    let what = format!("{cmd:?}");
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not exit within 30s"))
        .expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn lease_holder(client: &Client) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    leases.get_opt("cairn-ccm").await.ok()??.spec?.holder_identity
}

async fn wait_leader(cp: &ControlPlane, client: &Client, who: &str, port: u16) {
    eventually(
        &format!("{who} holds the Lease {NS}/cairn-ccm"),
        ACT,
        || async move {
            cp.check_running().expect("cairn-ccm running");
            let h = lease_holder(client).await;
            let m = metric(port, "cairn_ccm_leader").await;
            if h.as_deref() == Some(who) && m == Some(1.0) {
                Ok(())
            } else {
                Err(format!("holder {h:?}, {who}'s cairn_ccm_leader {m:?}"))
            }
        },
    )
    .await
    .expect("leader");
}

/// Fails if a process log shows an authorisation failure (a missing permission surfaces as a
/// logged 403 — events, leases — even when the scenario itself passes).
fn no_forbidden(cp: &ControlPlane, name: &str) {
    let log = std::fs::read_to_string(cp.log_path(name)).unwrap_or_default();
    let bad: Vec<_> = log
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            // "403" as a word (a status code), not digits inside a timestamp's fraction.
            let status_403 = l.split(|c: char| !c.is_ascii_alphanumeric()).any(|w| w == "403");
            l.contains("forbidden") || status_403 || l.contains("could not publish event")
        })
        .collect();
    assert!(
        bad.is_empty(),
        "{name} hit missing permissions:\n{}",
        bad.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ccm_runs_under_the_manifests_service_account() {
    let t0 = Instant::now();
    let cp = ControlPlane::start().await.expect("control plane");
    let admin = cp.client().unwrap();
    let docs = install(&cp, &admin).await;
    let dep: Deployment = Api::namespaced(admin.clone(), NS).get("cairn-ccm").await.unwrap();
    let sts: StatefulSet = Api::namespaced(admin.clone(), NS)
        .get("cairn-ipam")
        .await
        .unwrap();
    let pod_spec = dep.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod_spec.service_account_name.as_deref(), Some("cairn-ccm"));

    // The store, started with the StatefulSet's args (listeners on loopback, data in a temp dir).
    let data = tempfile::tempdir().unwrap();
    let store_c = container(sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap());
    let mut store = Command::new(workspace_bin("cairn-ipam", "cairn-ipam"));
    for a in store_c.args.iter().flatten() {
        store.arg(match a.split_once('=') {
            Some(("--listen", _)) => "--listen=127.0.0.1:0".to_string(),
            Some(("--metrics-listen", _)) => "--metrics-listen=127.0.0.1:0".to_string(),
            Some(("--data-dir", _)) => format!("--data-dir={}", data.path().join("ledger").display()),
            _ => a.clone(),
        });
    }
    store.arg("--addr-file").arg(data.path().join("addr"));
    cp.spawn("cairn-ipam", &store).expect("spawn cairn-ipam");
    let addrs = eventually("cairn-ipam serving", ACT, || {
        let f = data.path().join("addr");
        async move { std::fs::read_to_string(f) }
    })
    .await
    .unwrap();
    let grpc = addrs
        .lines()
        .find_map(|l| l.strip_prefix("grpc="))
        .unwrap()
        .to_string();
    // Its probes: grpc.health.v1 Check of the probe's service answers SERVING.
    let probe = store_c
        .readiness_probe
        .as_ref()
        .and_then(|p| p.grpc.as_ref())
        .expect("grpc probe");
    let out = Command::new(cairn_e2e::binary_path("grpcurl").unwrap())
        .args(["-plaintext", "-d"])
        .arg(json!({ "service": probe.service.clone().unwrap_or_default() }).to_string())
        .arg(&grpc)
        .arg("grpc.health.v1.Health/Check")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("SERVING"),
        "health: {out:?}"
    );
    let endpoint = format!("http://{grpc}");

    // The controller's config: the ConfigMap's knobs. As shipped, the cluster id is empty and
    // the controller refuses to start.
    let cm_name = container(pod_spec).env_from.as_ref().unwrap()[0]
        .config_map_ref
        .as_ref()
        .unwrap()
        .name
        .clone();
    let cm: ConfigMap = Api::namespaced(admin.clone(), NS).get(&cm_name).await.unwrap();
    let shipped = cm.data.clone().unwrap();
    assert_eq!(
        shipped.keys().map(String::as_str).collect::<Vec<_>>(),
        ["CAIRN_CLUSTER_ID", "CAIRN_IPAM_ENDPOINT"]
    );
    assert_eq!(shipped["CAIRN_CLUSTER_ID"], "");
    let ccm_token = cp.service_account_token(NS, "cairn-ccm").await.unwrap();
    let kubeconfig = cp
        .write_kubeconfig_for_token("cairn-ccm.kubeconfig", &ccm_token)
        .unwrap();
    let (ok, _, err) = run_to_end(ccm_command(&dep, &shipped, &kubeconfig, "unset", free_port())).await;
    assert!(!ok && err.contains("--cluster-id"), "unset cluster id: {err}");

    let mut config = shipped.clone();
    config.insert("CAIRN_CLUSTER_ID".into(), CLUSTER.into());
    config.insert("CAIRN_IPAM_ENDPOINT".into(), endpoint.clone());

    // Replica 0 leads; the Lease is in the manifests' namespace.
    let port0 = free_port();
    cp.spawn(
        "ccm-0",
        &ccm_command(&dep, &config, &kubeconfig, "cairn-ccm-0", port0),
    )
    .unwrap();
    probes_pass(&cp, container(pod_spec), port0).await;
    wait_leader(&cp, &admin, "cairn-ccm-0", port0).await;
    // Replica 1 stands by, ready.
    let port1 = free_port();
    cp.spawn(
        "ccm-1",
        &ccm_command(&dep, &config, &kubeconfig, "cairn-ccm-1", port1),
    )
    .unwrap();
    probes_pass(&cp, container(pod_spec), port1).await;
    assert_eq!(metric(port1, "cairn_ccm_leader").await, Some(0.0));

    // The README's ClusterNetwork becomes Ready, with this cluster's API-server VIP.
    let example = readme_managed_network();
    let net = example["metadata"]["name"].as_str().unwrap().to_string();
    cn_api(&admin)
        .create(&PostParams::default(), &serde_json::from_value(example).unwrap())
        .await
        .unwrap();
    let cns: Api<ClusterNetwork> = Api::all(admin.clone());
    let cn = eventually("ClusterNetwork Ready", ACT, || {
        let cns = cns.clone();
        let net = net.clone();
        async move {
            let cn = cns.get(&net).await.map_err(|e| e.to_string())?;
            let st = cn.status.clone().unwrap_or_default();
            if st
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                && st.observed_generation == cn.metadata.generation
            {
                Ok(cn)
            } else {
                Err(format!("{st:?}"))
            }
        }
    })
    .await
    .unwrap();
    let api_vip = cn.status.unwrap().api_server_vip.expect("API-server VIP");

    // A LoadBalancer Service in a namespace of its own: VIP, Event, finalizer; delete releases.
    cp.ensure_namespace("shop").await.unwrap();
    create_lb(&admin, "shop", "web", 443, json!({})).await;
    let web = wait_ingress(&admin, "shop", "web", 1).await.remove(0);
    assert_ne!(web, api_vip);
    wait_event(&admin, "shop", "web", "Allocated", &web).await;
    let svc: Service = Api::namespaced(admin.clone(), "shop").get("web").await.unwrap();
    assert!(svc.finalizers().contains(&"cairn.dev/vip-release".to_string()));
    assert!(store_holds(&endpoint, "web").await);
    delete_and_wait_gone(&admin, "shop", "web").await;
    assert!(!store_holds(&endpoint, "web").await);

    // A Node with the cloud taint is initialised (and its Event lands in `default`).
    create_node(&admin, "worker-1", BTreeMap::new()).await;
    let nodes: Api<Node> = Api::all(admin.clone());
    let node = eventually("worker-1 initialised", ACT, || {
        let nodes = nodes.clone();
        async move {
            let n = nodes.get("worker-1").await.map_err(|e| e.to_string())?;
            let tainted = n
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|t| t.iter().any(|t| t.key == cairn_ccm::UNINITIALIZED_TAINT));
            if tainted {
                Err("still tainted".to_string())
            } else {
                Ok(n)
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        node.spec.as_ref().unwrap().provider_id.as_deref(),
        Some("cairn://cluster-a/worker-1")
    );
    let addrs = node.status.unwrap().addresses.unwrap();
    assert!(
        addrs
            .iter()
            .any(|a| a.type_ == "InternalIP" && a.address.starts_with("10.30.2.")),
        "{addrs:?}"
    );
    wait_event(
        &admin,
        "default",
        "worker-1",
        "Allocated",
        "cairn://cluster-a/worker-1",
    )
    .await;

    // The leader dies (SIGKILL, no hand-over): the standby takes the Lease once it expires and
    // serves under the same identity.
    cp.kill("ccm-0");
    wait_leader(&cp, &admin, "cairn-ccm-1", port1).await;
    create_lb(&admin, "shop", "api", 8443, json!({})).await;
    let api = wait_ingress(&admin, "shop", "api", 1).await.remove(0);
    assert_ne!(api, api_vip);
    wait_event(&admin, "shop", "api", "Allocated", &api).await;

    // The HAProxy agent as its own ServiceAccount: its --dry-run loads Services, Nodes,
    // EndpointSlices and ClusterNetworks and prints the haproxy.cfg it would apply.
    let agent_token = cp.service_account_token(NS, "cairn-haproxy-agent").await.unwrap();
    let agent_kubeconfig = cp
        .write_kubeconfig_for_token("cairn-haproxy-agent.kubeconfig", &agent_token)
        .unwrap();
    let mut agent_cmd = Command::new(env!("CARGO_BIN_EXE_cairn-ccm"));
    agent_cmd
        .args(["haproxy-agent", "--dry-run", "--kubeconfig"])
        .arg(&agent_kubeconfig)
        .arg("--config")
        .arg(data.path().join("haproxy.cfg"))
        .args(["--metrics-listen", "127.0.0.1:0", "--stats-listen", "127.0.0.1:0"]);
    let (ok, cfg, err) = run_to_end(agent_cmd).await;
    assert!(ok, "haproxy-agent --dry-run as cairn-haproxy-agent: {err}");
    assert!(!err.to_ascii_lowercase().contains("forbidden"), "{err}");
    assert!(cfg.contains(&format!("bind {api_vip}:6443")), "{cfg}");
    assert!(cfg.contains("svc:shop:api:8443"), "{cfg}");

    // Nothing above needed a permission the manifests do not grant.
    no_forbidden(&cp, "ccm-0");
    no_forbidden(&cp, "ccm-1");

    // What the controller's identity may NOT do.
    let ccm = cp.client_for_token(&ccm_token).unwrap();
    forbidden(
        "ccm get secrets",
        Api::<Secret>::namespaced(ccm.clone(), NS)
            .list(&ListParams::default())
            .await,
    );
    forbidden(
        "ccm list secrets cluster-wide",
        Api::<Secret>::all(ccm.clone()).list(&ListParams::default()).await,
    );
    forbidden(
        "ccm delete a Service",
        Api::<Service>::namespaced(ccm.clone(), "shop")
            .delete("api", &DeleteParams::default())
            .await,
    );
    forbidden(
        "ccm create a Service",
        Api::<Service>::namespaced(ccm.clone(), "shop")
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                "metadata": { "name": "x" }, "spec": { "ports": [ { "port": 1 } ] } }))
                .unwrap(),
            )
            .await,
    );
    forbidden(
        "ccm delete a Node",
        Api::<Node>::all(ccm.clone())
            .delete("worker-1", &DeleteParams::default())
            .await,
    );
    forbidden(
        "ccm edit a ClusterNetwork's spec",
        cn_api(&ccm)
            .patch(
                &net,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": { "vlan": 21 } })),
            )
            .await,
    );
    forbidden(
        "ccm read Leases elsewhere",
        Api::<Lease>::namespaced(ccm.clone(), "kube-system")
            .get("kube-controller-manager")
            .await,
    );
    forbidden(
        "ccm patch another Lease",
        Api::<Lease>::namespaced(ccm.clone(), NS)
            .patch(
                "other",
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": {} })),
            )
            .await,
    );
    forbidden(
        "ccm list EndpointSlices",
        Api::<EndpointSlice>::all(ccm.clone())
            .list(&ListParams::default())
            .await,
    );

    // The HAProxy agent's identity reads what it renders, may publish Events, writes nothing.
    let agent = cp
        .service_account_client(NS, "cairn-haproxy-agent")
        .await
        .unwrap();
    Api::<Service>::all(agent.clone())
        .list(&ListParams::default())
        .await
        .expect("agent lists Services");
    Api::<Node>::all(agent.clone())
        .list(&ListParams::default())
        .await
        .expect("agent lists Nodes");
    Api::<EndpointSlice>::all(agent.clone())
        .list(&ListParams::default())
        .await
        .expect("agent lists EndpointSlices");
    Api::<ClusterNetwork>::all(agent.clone())
        .list(&ListParams::default())
        .await
        .expect("agent lists ClusterNetworks");
    let ev: k8s_openapi::api::events::v1::Event = serde_json::from_value(json!({
        "metadata": { "name": "agent-reload.1", "namespace": "shop" },
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "reportingController": "cairn.dev/haproxy-agent", "reportingInstance": "lb-1",
        "action": "Reload", "reason": "Reloaded", "type": "Normal",
        "regarding": { "apiVersion": "v1", "kind": "Service", "namespace": "shop", "name": "api" },
    }))
    .unwrap();
    Api::<k8s_openapi::api::events::v1::Event>::namespaced(agent.clone(), "shop")
        .create(&PostParams::default(), &ev)
        .await
        .expect("agent publishes an Event");
    forbidden(
        "agent patch a Service",
        Api::<Service>::namespaced(agent.clone(), "shop")
            .patch(
                "api",
                &PatchParams::default(),
                &Patch::Merge(json!({ "metadata": { "labels": { "x": "y" } } })),
            )
            .await,
    );
    forbidden(
        "agent patch Service status",
        Api::<Service>::namespaced(agent.clone(), "shop")
            .patch_status(
                "api",
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": {} })),
            )
            .await,
    );
    forbidden(
        "agent read Secrets",
        Api::<Secret>::all(agent.clone())
            .list(&ListParams::default())
            .await,
    );

    // The store's identity has no Kubernetes permissions at all.
    let ipam = cp.service_account_client(NS, "cairn-ipam").await.unwrap();
    forbidden(
        "store lists Services",
        Api::<Service>::all(ipam).list(&ListParams::default()).await,
    );

    assert!(docs.iter().any(|d| d["kind"] == "NetworkPolicy"));
    eprintln!("service-account test: {:?}", t0.elapsed());
}

async fn store_holds(endpoint: &str, name: &str) -> bool {
    let c = cairn_proto::v1::ipam_service_client::IpamServiceClient::connect(endpoint.to_string())
        .await
        .expect("connect store");
    cluster_allocations(c, CLUSTER)
        .await
        .iter()
        .any(|a| a.owner.as_ref().is_some_and(|o| o.name == name))
}

/// `overlays/ha-etcd`: applies without warnings (with its Secret), renders 3 spread replicas
/// without a volume claim, and its args and probes work: three `cairn-ipam` processes started
/// with the rendered args and env (etcd endpoints and client certificate from the Secret, on
/// a real 3-member etcd over mutual TLS) elect exactly one leader, which alone is ready
/// (readiness: gRPC health of IpamService), while all three pass the HTTP liveness and
/// start-up probes.
#[tokio::test(flavor = "multi_thread")]
async fn the_ha_overlay_runs_three_replicas_with_one_ready_leader() {
    let cp = ControlPlane::start().await.expect("control plane");
    let overlay = manifests().join("overlays/ha-etcd");
    apply_k(&cp, &manifests().join("namespace")).await;
    apply_k(&cp, &manifests().join("crds")).await;
    // The Secret the overlay expects, from real certificates.
    let pki = Pki::new(&[]);
    let etcd = etcd_cluster::EtcdCluster::start_tls(
        3,
        &cairn_ipam::store::etcd::server_flags(),
        &etcd_cluster::ServerTls {
            ca: Path::new(&pki.path("ca.pem")),
            cert: Path::new(&pki.path("server.pem")),
            key: Path::new(&pki.path("server-key.pem")),
        },
    );
    let endpoints = etcd.endpoints().join(",");
    let (ok, _, err) = kubectl(
        cp.kubeconfig_path(),
        &[
            "-n",
            NS,
            "create",
            "secret",
            "generic",
            "cairn-ipam-etcd",
            &format!("--from-literal=endpoints={endpoints}"),
            &format!("--from-file=ca.pem={}", pki.path("ca.pem")),
            &format!("--from-file=client.pem={}", pki.path("cloud.pem")),
            &format!("--from-file=client-key.pem={}", pki.path("cloud-key.pem")),
        ],
    )
    .await;
    assert!(ok, "{err}");
    apply_k(&cp, &overlay).await;

    let docs = render(cp.kubeconfig_path(), &overlay).await;
    let sts: StatefulSet = serde_json::from_value(find(&docs, "StatefulSet", "cairn-ipam").clone()).unwrap();
    let spec = sts.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(3));
    assert!(
        spec.volume_claim_templates.is_none(),
        "etcd replicas need no volume"
    );
    let pod = spec.template.spec.as_ref().unwrap();
    let anti = pod
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .expect("anti-affinity");
    assert_eq!(
        anti.required_during_scheduling_ignored_during_execution
            .as_ref()
            .unwrap()[0]
            .topology_key,
        "kubernetes.io/hostname"
    );
    let c = container(pod);
    let ready = c
        .readiness_probe
        .as_ref()
        .and_then(|p| p.grpc.as_ref())
        .expect("gRPC readiness");
    assert_eq!(ready.service.as_deref(), Some("cairn.ipam.v1.IpamService"));
    let health_paths: Vec<_> = [&c.liveness_probe, &c.startup_probe]
        .iter()
        .map(|p| {
            p.as_ref()
                .and_then(|p| p.http_get.as_ref())
                .and_then(|h| h.path.clone())
        })
        .collect();
    assert_eq!(
        health_paths,
        [Some("/healthz".to_string()), Some("/healthz".to_string())]
    );
    // Mounted Secret files, as the kubelet would lay them out.
    let mount = &c.volume_mounts.as_ref().unwrap()[0];
    assert_eq!(mount.name, "etcd-client");
    let files = BTreeMap::from([
        (format!("{}/ca.pem", mount.mount_path), pki.path("ca.pem")),
        (format!("{}/client.pem", mount.mount_path), pki.path("cloud.pem")),
        (
            format!("{}/client-key.pem", mount.mount_path),
            pki.path("cloud-key.pem"),
        ),
    ]);

    // Three replicas with the rendered args: loopback listeners, $(POD_IP) = 127.0.0.1.
    let dir = tempfile::tempdir().unwrap();
    let mut replicas = Vec::new();
    for i in 0..3 {
        let (grpc, metrics) = (free_port(), free_port());
        let mut cmd = Command::new(workspace_bin("cairn-ipam", "cairn-ipam"));
        for a in c.args.iter().flatten() {
            let a = a
                .replace("$(POD_IP)", "127.0.0.1")
                .replace(":50051", &format!(":{grpc}"));
            cmd.arg(match a.split_once('=') {
                Some(("--listen", _)) => format!("--listen=127.0.0.1:{grpc}"),
                Some(("--metrics-listen", _)) => format!("--metrics-listen=127.0.0.1:{metrics}"),
                Some((flag, path)) if files.contains_key(path) => format!("{flag}={}", files[path]),
                _ => a,
            });
        }
        for e in c.env.iter().flatten() {
            let from = e.value_from.as_ref();
            let v = match (
                &e.value,
                from.and_then(|f| f.field_ref.as_ref()),
                from.and_then(|f| f.secret_key_ref.as_ref()),
            ) {
                (Some(v), _, _) => v.clone(),
                (None, Some(f), _) if f.field_path == "status.podIP" => "127.0.0.1".into(),
                (None, _, Some(k)) if k.name == "cairn-ipam-etcd" && k.key == "endpoints" => {
                    endpoints.clone()
                }
                _ => panic!("unexpected env {e:?}"),
            };
            cmd.env(&e.name, v);
        }
        cmd.arg("--addr-file").arg(dir.path().join(format!("addr-{i}")));
        cp.spawn(&format!("cairn-ipam-{i}"), &cmd)
            .expect("spawn cairn-ipam");
        replicas.push((format!("http://127.0.0.1:{grpc}"), metrics));
    }
    // Liveness and start-up (/healthz) pass on every replica; readiness on exactly one.
    let cpr = &cp;
    for (_, metrics) in &replicas {
        eventually("/healthz 200", ACT, || async move {
            cpr.check_running().expect("cairn-ipam running");
            match http_get(&format!("127.0.0.1:{metrics}"), "/healthz").await {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await
        .expect("liveness");
    }
    let leaders = eventually("exactly one ready replica", ACT, || {
        let replicas = &replicas;
        async move {
            let mut ready = Vec::new();
            for (i, (grpc, _)) in replicas.iter().enumerate() {
                if ipam_serving(grpc).await {
                    ready.push(i);
                }
            }
            if ready.len() == 1 {
                Ok(ready)
            } else {
                Err(format!("ready: {ready:?}"))
            }
        }
    })
    .await
    .unwrap();
    for (i, (_, metrics)) in replicas.iter().enumerate() {
        let (code, _) = http_get(&format!("127.0.0.1:{metrics}"), "/readyz")
            .await
            .unwrap();
        assert_eq!(code == 200, leaders.contains(&i), "replica {i}: /readyz {code}");
    }
}

/// `components/conflict-probe` on top of the base tree: applies without a Pod Security
/// warning (the namespace's level is raised for it), and the controller's pod gets host
/// networking and CAP_NET_RAW with every other capability still dropped; the store keeps its
/// restricted security context.
#[tokio::test(flavor = "multi_thread")]
async fn the_conflict_probe_component_gives_the_controller_net_raw_on_the_host_network() {
    let cp = ControlPlane::start().await.expect("control plane");
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&manifests(), &tmp.path().join("manifests"));
    let overlay = tmp.path().join("overlay");
    std::fs::create_dir_all(&overlay).unwrap();
    std::fs::write(
        overlay.join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [../manifests]\ncomponents: [../manifests/components/conflict-probe]\n",
    )
    .unwrap();
    // As the README installs (namespace and CRD first), with the component's step before the
    // rest: the namespace's Pod Security level raised (a server-side dry run of the overlay
    // checks the pod against the live level, not the one the same apply would set).
    apply_k(&cp, &manifests().join("namespace")).await;
    apply_k(&cp, &manifests().join("crds")).await;
    let (ok, _, err) = kubectl(
        cp.kubeconfig_path(),
        &[
            "label",
            "namespace",
            NS,
            "--overwrite",
            "pod-security.kubernetes.io/enforce=privileged",
            "pod-security.kubernetes.io/warn=privileged",
            "pod-security.kubernetes.io/audit=privileged",
        ],
    )
    .await;
    assert!(ok, "{err}");
    apply_k(&cp, &overlay).await;

    let docs = render(cp.kubeconfig_path(), &overlay).await;
    let ns = find(&docs, "Namespace", NS);
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        json!("privileged")
    );
    let dep: Deployment = serde_json::from_value(find(&docs, "Deployment", "cairn-ccm").clone()).unwrap();
    let pod = dep.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    let caps = container(&pod)
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.clone())
        .unwrap();
    assert_eq!(caps.add, Some(vec!["NET_RAW".to_string()]));
    assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
    assert_eq!(
        container(&pod)
            .security_context
            .as_ref()
            .and_then(|s| s.allow_privilege_escalation),
        Some(false),
        "privilege escalation stays off"
    );
    let sts: StatefulSet = serde_json::from_value(find(&docs, "StatefulSet", "cairn-ipam").clone()).unwrap();
    let store_pod = sts.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        store_pod.host_network, None,
        "the store stays off the host network"
    );
    assert_eq!(
        store_pod.security_context.and_then(|s| s.run_as_non_root),
        Some(true)
    );
}
