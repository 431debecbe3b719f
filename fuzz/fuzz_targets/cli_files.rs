//! `cli_files`: `cairn_ipam::cli::file::parse_networks` (what `network apply -f` reads) on
//! arbitrary text. Contract: never panics; every error is non-empty and says where it is
//! (its document; data errors also the field path), or that no network was found.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Deserialize as _;

fuzz_target!(|text: &str| {
    match cairn_ipam::cli::file::parse_networks(text) {
        Ok(nets) => assert!(!nets.is_empty(), "Ok with no network"),
        Err(e) => {
            let m = format!("{e:#}");
            assert!(
                m.contains("document ") || m == "no network found",
                "error does not say where: {m:?}"
            );
            // When every document is valid YAML the error is about the data, and names the
            // field by its path ("field pools[0].purpose"). YAML errors name the document and
            // usually (not always: "did not find expected node content") line and column.
            let yaml_ok = serde_yaml_ng::Deserializer::from_str(text)
                .all(|d| serde_yaml_ng::Value::deserialize(d).is_ok());
            if yaml_ok && m != "no network found" {
                assert!(m.contains(": field "), "data error names no field: {m:?}");
            }
        }
    }
});
