//! `cli_files`: `cairn_ipam::cli::file::parse_networks` (what `network apply -f` reads) on
//! arbitrary text. Contract: never panics; every error is non-empty and says where it is
//! (a document and the field path, or for YAML errors the line and column), or that no network was found.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    match cairn_ipam::cli::file::parse_networks(text) {
        Ok(nets) => assert!(!nets.is_empty(), "Ok with no network"),
        Err(e) => {
            let m = format!("{e:#}");
            assert!(
                m.contains("document ") || m == "no network found",
                "error does not say where: {m:?}"
            );
            // A data error (the YAML parsed) names the field by its path; a YAML error (syntax,
            // a number too large, ...) its line and column instead.
            if m != "no network found" {
                assert!(
                    m.contains("field ") || m.contains(" line "),
                    "error names neither field nor line: {m:?}"
                );
            }
        }
    }
});
