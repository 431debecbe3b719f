//! A CustomResourceDefinition is installed, served, and its schema (OpenAPI + CEL) enforced.

use std::time::Duration;

use anyhow::{bail, ensure};
use cairn_e2e::{ControlPlane, eventually};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(30);

fn widget_crd() -> anyhow::Result<CustomResourceDefinition> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": { "name": "widgets.e2e.cairn.dev" },
        "spec": {
            "group": "e2e.cairn.dev",
            "scope": "Cluster",
            "names": { "plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList" },
            "versions": [{
                "name": "v1alpha1", "served": true, "storage": true,
                "subresources": { "status": {} },
                "schema": { "openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "spec": {
                            "type": "object",
                            "required": ["size", "min", "max"],
                            "x-kubernetes-validations": [
                                { "rule": "self.min <= self.max", "message": "min must not exceed max" }
                            ],
                            "properties": {
                                "size": { "type": "integer", "minimum": 1, "maximum": 10 },
                                "min": { "type": "integer" },
                                "max": { "type": "integer" },
                                "mode": { "type": "string", "enum": ["fast", "safe"] }
                            }
                        },
                        "status": { "type": "object", "properties": { "phase": { "type": "string" } } }
                    }
                } }
            }]
        }
    }))?)
}

fn widget(name: &str, spec: Value) -> anyhow::Result<DynamicObject> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "e2e.cairn.dev/v1alpha1", "kind": "Widget",
        "metadata": { "name": name }, "spec": spec
    }))?)
}

#[tokio::test]
async fn crd_is_served_and_its_schema_enforced() -> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    cp.logs_on_error(async {
        let client = cp.client()?;
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        crds.create(&PostParams::default(), &widget_crd()?).await?;

        let crds = &crds;
        eventually(
            "CRD widgets.e2e.cairn.dev to be Established",
            DEADLINE,
            || async move {
                let crd = serde_json::to_value(
                    crds.get("widgets.e2e.cairn.dev")
                        .await
                        .map_err(|e| e.to_string())?,
                )
                .map_err(|e| e.to_string())?;
                let established = crd["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Established" && c["status"] == "True");
                if established {
                    Ok(())
                } else {
                    Err(format!("conditions: {}", crd["status"]["conditions"]))
                }
            },
        )
        .await?;

        let gvk = GroupVersionKind::gvk("e2e.cairn.dev", "v1alpha1", "Widget");
        let widgets: Api<DynamicObject> =
            Api::all_with(client, &ApiResource::from_gvk_with_plural(&gvk, "widgets"));

        // Established can precede the handler serving for a moment: retry only NotFound.
        let good = widget(
            "good",
            json!({ "size": 3, "min": 1, "max": 2, "mode": "safe", "bogus": true }),
        )?;
        let (widgets_ref, good_ref) = (&widgets, &good);
        let created = eventually("the Widget endpoint to serve", DEADLINE, || async move {
            match widgets_ref.create(&PostParams::default(), good_ref).await {
                Err(kube::Error::Api(s)) if s.is_not_found() => Err(format!("not served yet: {}", s.message)),
                other => Ok(other),
            }
        })
        .await??;
        let created = serde_json::to_value(&created)?;
        ensure!(created["spec"]["size"] == 3, "stored: {created}");
        // Structural schemas prune unknown fields.
        ensure!(
            created["spec"].get("bogus").is_none(),
            "unknown field kept: {created}"
        );

        let rejected = [
            ("size-zero", json!({ "size": 0, "min": 1, "max": 2 }), "spec.size"),
            (
                "size-string",
                json!({ "size": "big", "min": 1, "max": 2 }),
                "spec.size",
            ),
            (
                "bad-enum",
                json!({ "size": 1, "min": 1, "max": 2, "mode": "turbo" }),
                "spec.mode",
            ),
            ("missing-max", json!({ "size": 1, "min": 1 }), "spec.max"),
            (
                "cel",
                json!({ "size": 1, "min": 5, "max": 1 }),
                "min must not exceed max",
            ),
        ];
        for (name, spec, expect) in rejected {
            match widgets.create(&PostParams::default(), &widget(name, spec)?).await {
                Err(kube::Error::Api(s)) if s.code == 422 && s.message.contains(expect) => {}
                Err(kube::Error::Api(s)) => bail!(
                    "{name}: rejected, but not for {expect:?}: {} {}",
                    s.code,
                    s.message
                ),
                other => bail!("{name}: should be rejected ({expect}), got {other:?}"),
            }
            ensure!(widgets.get_opt(name).await?.is_none(), "{name} was stored");
        }

        // CEL also guards updates.
        let patch = Patch::Merge(json!({ "spec": { "min": 9 } }));
        match widgets.patch("good", &PatchParams::default(), &patch).await {
            Err(kube::Error::Api(s)) if s.code == 422 && s.message.contains("min must not exceed max") => {}
            other => bail!("an update breaking the CEL rule should be rejected, got {other:?}"),
        }

        // The status subresource is served and separate from spec.
        let status = Patch::Merge(json!({ "status": { "phase": "Ready" }, "spec": { "size": 9 } }));
        let after = serde_json::to_value(
            widgets
                .patch_status("good", &PatchParams::default(), &status)
                .await?,
        )?;
        ensure!(
            after["status"]["phase"] == "Ready" && after["spec"]["size"] == 3,
            "after status patch: {after}"
        );
        anyhow::Ok(())
    })
    .await
}
