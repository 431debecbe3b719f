//! A squatter on a private link, for tests of conflict probing: a veth pair whose far end sits
//! in a network namespace of its own and holds the addresses a test names (documentation
//! addresses: 192.0.2.0/24, 2001:db8::/32), while the near end stays in this namespace
//! without any address — a bare Ethernet port to probe from. Nothing leaves the pair.
//! Dropping the [`Squatter`] deletes both, also when a test panics.
//!
//! Making links and namespaces needs root (CAP_NET_ADMIN; probing needs CAP_NET_RAW):
//! [`Squatter::new`] panics with how to run the tests otherwise, never skips.

use std::{
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs `ip args…`, panicking with its stderr if it fails; returns stdout.
fn ip(args: &[&str]) -> String {
    let out = match Command::new("ip").args(args).output() {
        Ok(o) => o,
        Err(e) => panic!("running `ip` (iproute2): {e}"),
    };
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One link's `ip -j link show` object.
fn link(netns: Option<&str>, dev: &str) -> serde_json::Value {
    let mut args = vec![];
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["-j", "link", "show", "dev", dev]);
    let links: Vec<serde_json::Value> = serde_json::from_str(&ip(&args)).unwrap_or_default();
    links.into_iter().next().unwrap_or_default()
}

/// Whether the link is up and can transmit: until the kernel attaches its real qdisc it has
/// `noop`, which drops every frame.
fn ready(netns: Option<&str>, dev: &str) -> bool {
    let l = link(netns, dev);
    l["operstate"] == "UP" && l["qdisc"] != "noop"
}

fn addrs(netns: &str, dev: &str) -> Vec<serde_json::Value> {
    let out = ip(&["-n", netns, "-j", "addr", "show", "dev", dev]);
    let links: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_default();
    links
        .iter()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// Polls `done` every 10 ms until it holds; panics naming `what` after 10 s.
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Panics unless the process runs as root, saying how to run `what`.
pub fn require_root(what: &str) {
    assert!(
        rustix::process::geteuid().is_root(),
        "{what} makes network namespaces and veth pairs and opens packet sockets: it needs root \
         (CAP_NET_ADMIN and CAP_NET_RAW). Run it as root, e.g. `sudo -E make test` \
         (CI runs as root)"
    );
}

/// A veth pair: [`Squatter::near`] here without any address, the far end in its own
/// namespace holding the addresses given to [`Squatter::new`].
#[derive(Debug)]
pub struct Squatter {
    netns: String,
    near: String,
    far: String,
}

impl Squatter {
    /// Makes the pair and gives the far end `addresses` (with prefix length, e.g.
    /// `192.0.2.10/24`, `2001:db8::10/64`); returns once both ends pass frames and every
    /// address answers.
    pub fn new(addresses: &[&str]) -> Squatter {
        require_root("this test");
        let (pid, n) = (std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        // IFNAMSIZ leaves 15 characters.
        let s = Squatter {
            netns: format!("cairn-sq-{pid}-{n}"),
            near: format!("csq{}{n}a", pid % 100_000),
            far: format!("csq{}{n}b", pid % 100_000),
        };
        let (ns, near, far) = (s.netns.as_str(), s.near.as_str(), s.far.as_str());
        ip(&["netns", "add", ns]);
        ip(&[
            "link", "add", near, "type", "veth", "peer", "name", far, "netns", ns,
        ]);
        // No link-local address either: the near end is a bare Ethernet port for the probe.
        ip(&["link", "set", "dev", near, "addrgenmode", "none"]);
        ip(&["link", "set", "dev", near, "up"]);
        ip(&["-n", ns, "link", "set", "dev", "lo", "up"]);
        ip(&["-n", ns, "link", "set", "dev", far, "up"]);
        for a in addresses {
            // `nodad`: usable at once instead of tentative for a second (IPv6), so it defends
            // right away.
            let mut args = vec!["-n", ns, "addr", "add", a, "dev", far];
            if a.contains(':') {
                args.push("nodad");
            }
            ip(&args);
        }
        wait_for("both ends of the veth pair to come up", || {
            ready(None, near) && ready(Some(ns), far)
        });
        wait_for("the squatter's addresses to be usable", || {
            let have = addrs(ns, far);
            addresses.iter().all(|a| {
                let local = a.split('/').next().unwrap_or(a);
                have.iter().any(|x| {
                    x["local"] == local && x.get("tentative").is_none() && x.get("dadfailed").is_none()
                })
            })
        });
        s
    }

    /// The interface to probe from (in this namespace, no address).
    pub fn near(&self) -> &str {
        &self.near
    }

    /// The squatter's namespace.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The MAC of the squatting interface, as `ip` prints it (`aa:bb:cc:dd:ee:ff`).
    pub fn far_mac(&self) -> String {
        link(Some(&self.netns), &self.far)["address"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

impl Drop for Squatter {
    fn drop(&mut self) {
        // Deleting one end deletes the pair; the namespace goes after it. Failures are only
        // reported: a panic here, while unwinding from a failed test, would abort.
        for args in [
            vec!["link", "del", "dev", self.near.as_str()],
            vec!["netns", "del", self.netns.as_str()],
        ] {
            match Command::new("ip").args(&args).output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(e) => eprintln!("ip {}: {e}", args.join(" ")),
            }
        }
    }
}
