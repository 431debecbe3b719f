//! `cairn-ccm`: the per-cluster controller. Not yet built; see the controller issue.
#![forbid(unsafe_code)]

fn main() {
    eprintln!("cairn-ccm: the controller is not built yet");
    std::process::exit(2);
}
