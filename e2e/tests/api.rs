//! The API surface Cairn's controllers rely on, against a real kube-apiserver.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use cairn_e2e::{ControlPlane, eventually};
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Service};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(30);

/// `obj` as JSON, for field lookups with `pointer`.
fn j<T: serde::Serialize>(obj: &T) -> anyhow::Result<Value> {
    Ok(serde_json::to_value(obj)?)
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

#[tokio::test]
async fn configmap_create_get_patch_apply_delete() -> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    cp.logs_on_error(async {
        let api: Api<ConfigMap> = Api::namespaced(cp.client()?, "default");

        let cm: ConfigMap =
            serde_json::from_value(json!({ "metadata": { "name": "crud" }, "data": { "a": "1" } }))?;
        let created = j(&api.create(&PostParams::default(), &cm).await?)?;
        ensure!(str_at(&created, "/metadata/uid").is_some(), "no uid in {created}");

        let got = j(&api.get("crud").await?)?;
        ensure!(str_at(&got, "/data/a") == Some("1"), "get returned {got}");

        let patch = Patch::Merge(json!({ "data": { "b": "2" } }));
        let patched = j(&api.patch("crud", &PatchParams::default(), &patch).await?)?;
        ensure!(str_at(&patched, "/data/a") == Some("1") && str_at(&patched, "/data/b") == Some("2"));
        ensure!(
            str_at(&patched, "/metadata/resourceVersion") != str_at(&created, "/metadata/resourceVersion"),
            "a patch must bump resourceVersion"
        );

        // Server-side apply, as controllers use it.
        let apply = Patch::Apply(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": { "name": "crud" }, "data": { "c": "3" }
        }));
        let applied = j(&api
            .patch("crud", &PatchParams::apply("cairn-e2e").force(), &apply)
            .await?)?;
        ensure!(str_at(&applied, "/data/c") == Some("3") && str_at(&applied, "/data/a") == Some("1"));
        let managers: Vec<&str> = applied["metadata"]["managedFields"]
            .as_array()
            .context("managedFields")?
            .iter()
            .filter_map(|m| m["manager"].as_str())
            .collect();
        ensure!(managers.contains(&"cairn-e2e"), "field managers: {managers:?}");

        api.delete("crud", &DeleteParams::default()).await?;
        let api = &api;
        eventually("configmap crud to be gone", DEADLINE, || async move {
            match api.get_opt("crud").await {
                Ok(None) => Ok(()),
                Ok(Some(_)) => Err("still present".to_owned()),
                Err(e) => Err(e.to_string()),
            }
        })
        .await?;
        anyhow::Ok(())
    })
    .await
}

#[tokio::test]
async fn node_object_created_through_the_api() -> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    cp.logs_on_error(async {
        let nodes: Api<Node> = Api::all(cp.client()?);
        let node: Node = serde_json::from_value(json!({
            "metadata": { "name": "worker-1", "labels": { "kubernetes.io/hostname": "worker-1" } },
            "spec": { "taints": [{
                "key": "node.cloudprovider.kubernetes.io/uninitialized", "value": "true", "effect": "NoSchedule"
            }] }
        }))?;
        nodes.create(&PostParams::default(), &node).await?;

        let got = j(&nodes.get("worker-1").await?)?;
        ensure!(
            str_at(&got, "/spec/taints/0/key") == Some("node.cloudprovider.kubernetes.io/uninitialized"),
            "taint missing: {got}"
        );

        // What a cloud node controller does: set providerID, addresses, drop the taint.
        let spec = Patch::Merge(json!({ "spec": { "providerID": "cairn://test/worker-1", "taints": null } }));
        let patched = j(&nodes.patch("worker-1", &PatchParams::default(), &spec).await?)?;
        ensure!(str_at(&patched, "/spec/providerID") == Some("cairn://test/worker-1"));
        ensure!(
            patched.pointer("/spec/taints").is_none(),
            "taints still set: {patched}"
        );
        let status = Patch::Merge(json!({ "status": { "addresses": [
            { "type": "InternalIP", "address": "10.20.2.5" },
            { "type": "Hostname", "address": "worker-1" }
        ] } }));
        nodes
            .patch_status("worker-1", &PatchParams::default(), &status)
            .await?;
        let got = j(&nodes.get_status("worker-1").await?)?;
        ensure!(
            str_at(&got, "/status/addresses/0/address") == Some("10.20.2.5"),
            "status: {got}"
        );

        // The apiserver refuses to change a providerID once set.
        let change = Patch::Merge(json!({ "spec": { "providerID": "cairn://other/worker-1" } }));
        match nodes.patch("worker-1", &PatchParams::default(), &change).await {
            Err(kube::Error::Api(s)) if s.code == 422 => {}
            other => bail!("changing providerID should be rejected, got {other:?}"),
        }

        let listed = nodes.list(&ListParams::default()).await?;
        let names: Vec<_> = listed
            .items
            .iter()
            .filter_map(|n| n.metadata.name.as_deref())
            .collect();
        ensure!(names == ["worker-1"], "nodes: {names:?}");
        anyhow::Ok(())
    })
    .await
}

#[tokio::test]
async fn loadbalancer_service_gets_cluster_ips_single_and_dual_stack() -> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    cp.logs_on_error(async {
        let services: Api<Service> = Api::namespaced(cp.client()?, "default");
        let v4: ipnet::IpNet = "10.96.0.0/16".parse()?;
        let v6: ipnet::IpNet = "fd00:10:96::/112".parse()?;
        let ports = json!([{ "name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP" }]);

        let single: Service = serde_json::from_value(json!({
            "metadata": { "name": "lb-v4" },
            "spec": { "type": "LoadBalancer", "selector": { "app": "web" }, "ports": ports,
                      "loadBalancerClass": "cairn.dev/lb" }
        }))?;
        let s = j(&services.create(&PostParams::default(), &single).await?)?;
        let ip: IpAddr = str_at(&s, "/spec/clusterIP").context("no clusterIP")?.parse()?;
        ensure!(v4.contains(&ip), "clusterIP {ip} outside {v4}");
        ensure!(
            s["spec"]["ipFamilies"] == json!(["IPv4"]),
            "families: {}",
            s["spec"]["ipFamilies"]
        );
        let node_port = s["spec"]["ports"][0]["nodePort"]
            .as_i64()
            .context("no nodePort")?;
        ensure!((30000..=32767).contains(&node_port), "nodePort {node_port}");
        ensure!(str_at(&s, "/spec/loadBalancerClass") == Some("cairn.dev/lb"));
        // No load-balancer controller runs: nothing may have set an ingress.
        ensure!(
            s.pointer("/status/loadBalancer/ingress").is_none(),
            "unexpected ingress: {s}"
        );

        for (name, families, first, second) in [
            ("lb-dual", json!(["IPv4", "IPv6"]), v4, v6),
            ("lb-dual-v6-first", json!(["IPv6", "IPv4"]), v6, v4),
        ] {
            let dual: Service = serde_json::from_value(json!({
                "metadata": { "name": name },
                "spec": { "type": "LoadBalancer", "selector": { "app": "web" }, "ports": ports,
                          "ipFamilyPolicy": "RequireDualStack", "ipFamilies": families }
            }))?;
            let s = j(&services.create(&PostParams::default(), &dual).await?)?;
            let ips: Vec<IpAddr> = s["spec"]["clusterIPs"]
                .as_array()
                .context("no clusterIPs")?
                .iter()
                .filter_map(Value::as_str)
                .map(str::parse)
                .collect::<Result<_, _>>()?;
            ensure!(ips.len() == 2, "{name}: clusterIPs {ips:?}");
            ensure!(
                first.contains(&ips[0]) && second.contains(&ips[1]),
                "{name}: clusterIPs {ips:?}"
            );
            ensure!(
                s["spec"]["ipFamilies"] == families,
                "{name}: families {}",
                s["spec"]["ipFamilies"]
            );
            ensure!(str_at(&s, "/spec/clusterIP") == Some(ips[0].to_string().as_str()));
        }

        // Every Service got its own addresses.
        let listed = services.list(&ListParams::default()).await?;
        let mut all: Vec<String> = listed
            .items
            .iter()
            .filter(|s| s.metadata.name.as_deref() != Some("kubernetes"))
            .flat_map(|s| {
                s.spec
                    .as_ref()
                    .and_then(|p| p.cluster_ips.clone())
                    .unwrap_or_default()
            })
            .collect();
        let n = all.len();
        all.sort();
        all.dedup();
        ensure!(n == 5 && all.len() == 5, "cluster IPs not distinct: {all:?}");
        anyhow::Ok(())
    })
    .await
}

#[tokio::test]
async fn service_account_token_is_subject_to_rbac() -> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    cp.logs_on_error(async {
        let token = cp.service_account_token("rbac", "reader").await?;
        let sa = cp.client_for_token(&token)?;

        let review = Api::<SelfSubjectReview>::all(sa.clone())
            .create(&PostParams::default(), &SelfSubjectReview::default())
            .await?;
        let review = j(&review)?;
        ensure!(
            str_at(&review, "/status/userInfo/username") == Some("system:serviceaccount:rbac:reader"),
            "whoami: {review}"
        );

        let cms: Api<ConfigMap> = Api::namespaced(sa.clone(), "rbac");
        match cms.list(&ListParams::default()).await {
            Err(kube::Error::Api(s)) if s.is_forbidden() => {}
            other => bail!("listing before any grant should be forbidden, got {other:?}"),
        }

        let admin = cp.client()?;
        let role: Role = serde_json::from_value(json!({
            "metadata": { "name": "cm-reader", "namespace": "rbac" },
            "rules": [{ "apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"] }]
        }))?;
        Api::<Role>::namespaced(admin.clone(), "rbac")
            .create(&PostParams::default(), &role)
            .await?;
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": { "name": "cm-reader", "namespace": "rbac" },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm-reader" },
            "subjects": [{ "kind": "ServiceAccount", "name": "reader", "namespace": "rbac" }]
        }))?;
        Api::<RoleBinding>::namespaced(admin, "rbac")
            .create(&PostParams::default(), &binding)
            .await?;

        let cms_ref = &cms;
        eventually("the RoleBinding to take effect", DEADLINE, || async move {
            cms_ref.list(&ListParams::default()).await.map(drop)
        })
        .await?;

        // The grant is exactly what the Role says: no writes, nothing outside the namespace.
        let cm: ConfigMap = serde_json::from_value(json!({ "metadata": { "name": "x" } }))?;
        match cms.create(&PostParams::default(), &cm).await {
            Err(kube::Error::Api(s)) if s.is_forbidden() => {}
            other => bail!("create should be forbidden, got {other:?}"),
        }
        match Api::<ConfigMap>::namespaced(sa, "default")
            .list(&ListParams::default())
            .await
        {
            Err(kube::Error::Api(s)) if s.is_forbidden() => {}
            other => bail!("other namespaces should be forbidden, got {other:?}"),
        }
        anyhow::Ok(())
    })
    .await
}

#[tokio::test]
async fn kubeconfig_serves_kubectl_and_kube_rs() -> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    cp.logs_on_error(async {
        ensure!(
            cp.server_url().starts_with("https://127.0.0.1:"),
            "{}",
            cp.server_url()
        );

        let out = tokio::process::Command::from(cp.kubectl()?)
            .args(["get", "namespace", "default", "-o", "jsonpath={.metadata.name}"])
            .output()
            .await?;
        ensure!(
            out.status.success(),
            "kubectl get: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            out.stdout == b"default",
            "kubectl printed {:?}",
            String::from_utf8_lossy(&out.stdout)
        );

        let out = tokio::process::Command::from(cp.kubectl()?)
            .args(["version", "-o", "json"])
            .output()
            .await?;
        ensure!(
            out.status.success(),
            "kubectl version: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let version: Value = serde_json::from_slice(&out.stdout)?;
        let server = str_at(&version, "/serverVersion/gitVersion")
            .context("no serverVersion")?
            .to_owned();
        ensure!(server.starts_with("v1."), "server version {server}");

        // The same file as a child process such as `cairn-ccm --kubeconfig` would read it.
        let kubeconfig = kube::config::Kubeconfig::read_from(cp.kubeconfig_path())?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
                .await?;
        let client = kube::Client::try_from(config)?;
        ensure!(
            client.apiserver_version().await?.git_version == server,
            "kube-rs and kubectl disagree"
        );
        anyhow::Ok(())
    })
    .await
}
