//! `cairn_ccm::probe` against the real kernel: each test makes a veth pair whose far end sits
//! in a network namespace of its own and holds a documentation address (192.0.2.10/24,
//! 2001:db8::10/64), then probes from the near end, which has no address at all
//! ([`cairn_e2e::netns::Squatter`]). Nothing leaves the pair. Everything is removed
//! afterwards, also when a test panics.
//!
//! The namespace tests need root (CAP_NET_ADMIN for the links, CAP_NET_RAW for the probe) and
//! fail without it: `sudo -E cargo test -p cairn-ccm --test probe`.
#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::time::{Duration, Instant};

use cairn_ccm::probe::{ProbeError, Prober};
use cairn_e2e::netns::Squatter;

const SQUATTED_V4: &str = "192.0.2.10";
const FREE_V4: &str = "192.0.2.11";
const SQUATTED_V6: &str = "2001:db8::10";
const FREE_V6: &str = "2001:db8::11";
const TIMEOUT: Duration = Duration::from_millis(500);
const ATTEMPTS: u32 = 3;

fn squatter() -> Squatter {
    Squatter::new(&[&format!("{SQUATTED_V4}/24"), &format!("{SQUATTED_V6}/64")])
}

async fn probe(s: &Squatter, ip: &str) -> Option<String> {
    let ip: IpAddr = ip.parse().unwrap();
    let answer = Prober::new(s.near())
        .unwrap()
        .probe(ip, TIMEOUT, ATTEMPTS)
        .await
        .unwrap();
    answer.map(|a| a.mac_string())
}

#[tokio::test]
async fn an_ipv4_address_a_host_answers_for_is_reported_with_its_mac() {
    let s = squatter();
    assert_eq!(probe(&s, SQUATTED_V4).await, Some(s.far_mac()));
}

#[tokio::test]
async fn a_free_ipv4_address_gets_no_answer() {
    let s = squatter();
    let started = Instant::now();
    assert_eq!(probe(&s, FREE_V4).await, None);
    assert!(
        started.elapsed() >= TIMEOUT,
        "gave up after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_ipv6_address_a_host_answers_for_is_reported_with_its_mac() {
    let s = squatter();
    assert_eq!(probe(&s, SQUATTED_V6).await, Some(s.far_mac()));
}

#[tokio::test]
async fn a_free_ipv6_address_gets_no_answer() {
    let s = squatter();
    let started = Instant::now();
    assert_eq!(probe(&s, FREE_V6).await, None);
    assert!(
        started.elapsed() >= TIMEOUT,
        "gave up after {:?}",
        started.elapsed()
    );
}

#[test]
fn an_unknown_interface_is_a_clear_error() {
    let err = Prober::new("cairn-nope0").unwrap_err();
    assert!(
        matches!(&err, ProbeError::NoInterface { name } if name == "cairn-nope0"),
        "{err:?}"
    );
    assert!(err.to_string().contains("cairn-nope0"), "{err}");
}
