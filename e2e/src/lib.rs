//! Control-plane harness: see e2e/README.md.
#![forbid(unsafe_code)]
