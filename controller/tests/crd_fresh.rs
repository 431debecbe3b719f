//! The committed CRD must be exactly what the Rust types generate.

#[test]
fn committed_crd_matches_the_types() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../manifests/crds/clusternetworks.cairn.dev.yaml"
    );
    let committed = std::fs::read_to_string(path).expect("manifests/crds/clusternetworks.cairn.dev.yaml");
    let generated = cairn_ccm::crd::crd_yaml().expect("CRD renders");
    assert!(
        committed == generated,
        "manifests/crds/clusternetworks.cairn.dev.yaml is stale: run `cargo run -p cairn-ccm -- crd > manifests/crds/clusternetworks.cairn.dev.yaml`"
    );
}
