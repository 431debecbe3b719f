//! The web view in a real browser: Debian's `chromium`, headless, driven through
//! `chromedriver` (WebDriver) by fantoccini, against a real `cairn-ipam serve` with data.
//! It loads the overview, sees usage bars move when an allocation is made elsewhere, searches
//! an address and sees its owner, watches a new allocation appear in the table without a
//! reload (and a release strike it through), and checks the browser logged no error (CSP
//! violations, script errors, failed loads included).
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (apt: chromium chromium-driver;
//! `.ci/run` installs them). Missing, the test fails saying so — it never passes without a
//! browser. With `CAIRN_WEB_SCREENSHOT=path.png` it also saves a screenshot of the overview
//! (`make web-screenshot` writes `docs/web-view.png`).
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    net::{SocketAddr, TcpListener},
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use cairn_proto::v1 as pb;
use common::*;
use fantoccini::{Client as Browser, ClientBuilder, Locator, wd::WebDriverCompatibleCommand};
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const DEADLINE: Duration = Duration::from_secs(30);

/// A chromedriver child on a loopback port; killed on drop.
struct Driver {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Driver {
    async fn start(dir: &Path) -> Driver {
        for bin in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(bin).exists(),
                "{bin} is missing: install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
            );
        }
        // chromedriver takes a port number, not 0: take a free one from the kernel.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.join("chromedriver.log");
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .arg(format!("--log-path={}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {CHROMEDRIVER}: {e}"));
        let d = Driver { child, port, log };
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        eventually("chromedriver to listen", DEADLINE, || async move {
            tokio::net::TcpStream::connect(addr).await.ok().map(|_| ())
        })
        .await;
        d
    }

    async fn browser(&self, profile: &Path) -> Browser {
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                // The flags a closed network needs (no background fetches to Google's hosts).
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
            "goog:loggingPrefs": { "browser": "ALL" },
        });
        let Value::Object(caps) = caps else { unreachable!() };
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "starting headless chromium through chromedriver: {e}\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                )
            })
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// chromedriver's browser log (console messages, script errors, failed loads, CSP reports).
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(&self, base: &url::Url, session: Option<&str>) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }
    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.to_string()))
    }
}

async fn text_of(b: &Browser, css: &str) -> String {
    b.find(Locator::Css(css)).await.unwrap().text().await.unwrap()
}

/// Polls until the element's text is `want`.
async fn wait_text(b: &Browser, css: &str, want: &str) {
    eventually(&format!("{css} to read {want:?}"), DEADLINE, || async move {
        let e = b.find(Locator::Css(css)).await.ok()?;
        (e.text().await.ok()? == want).then_some(())
    })
    .await;
}

async fn wait_for(b: &Browser, css: &str) -> fantoccini::elements::Element {
    b.wait()
        .at_most(DEADLINE)
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("waiting {DEADLINE:?} for {css}: {e}"))
}

/// Two networks and a few clusters' allocations, so the page (and its screenshot) shows a
/// realistic fleet.
async fn seed(c: &mut Client) -> pb::Allocation {
    upsert(c, net_a("lab")).await;
    let mut edge = network(
        "edge-dc2",
        &["10.40.0.0/20"],
        vec![
            pool("vip", pb::PoolPurpose::Vip, &["10.40.1.0/26"]),
            pool("nodes", pb::PoolPurpose::Node, &["10.40.2.0/27"]),
        ],
    );
    edge.gateways = vec!["10.40.0.1".into()];
    edge.dns_servers = vec!["10.40.0.2".into(), "10.40.0.3".into()];
    edge.vlan = 402;
    upsert(c, edge).await;
    let mut web = None;
    for cluster in ["prod-eu1", "prod-eu2"] {
        allocate(
            c,
            alloc_req("lab", owner(cluster, pb::OwnerKind::ApiServer, "", "api")),
        )
        .await;
        for n in 0..3 {
            allocate(c, alloc_req("lab", node(cluster, &format!("worker-{n}")))).await;
        }
        let a = allocate(
            c,
            alloc_req("lab", owner(cluster, pb::OwnerKind::Service, "shop", "web")),
        )
        .await;
        web.get_or_insert(a);
        allocate(
            c,
            alloc_req("lab", owner(cluster, pb::OwnerKind::Service, "shop", "checkout")),
        )
        .await;
    }
    allocate(
        c,
        alloc_req("edge-dc2", owner("edge-a", pb::OwnerKind::ApiServer, "", "api")),
    )
    .await;
    for n in 0..20 {
        allocate(c, alloc_req("edge-dc2", node("edge-a", &format!("n{n}")))).await;
    }
    for s in ["ingress", "dns", "mqtt"] {
        allocate(
            c,
            alloc_req("edge-dc2", owner("edge-a", pb::OwnerKind::Service, "infra", s)),
        )
        .await;
    }
    web.unwrap()
}

#[tokio::test]
async fn the_web_view_works_in_a_real_browser() {
    let s = Server::start_with(&["--default-reuse-grace", "30s"]).await;
    let mut c = s.client().await;
    let web = seed(&mut c).await;
    let web_ip = web.addresses[0].clone();
    let base = format!("http://{}", s.metrics.unwrap());

    let driver = Driver::start(s.root()).await;
    let b = driver.browser(&s.root().join("chromium-profile")).await;

    // The overview: networks, definitions, usage; the live stream connects.
    b.goto(&format!("{base}/ui/")).await.unwrap();
    assert!(b.title().await.unwrap().starts_with("Networks"));
    wait_for(&b, "#live.on").await;
    let names: Vec<String> = {
        let mut v = Vec::new();
        for h in b.find_all(Locator::Css("section.network h2")).await.unwrap() {
            v.push(h.text().await.unwrap());
        }
        v
    };
    assert_eq!(names, ["edge-dc2", "lab"]);
    let bar = r#"[data-usage="lab/vip/IPv4"] .used-n"#;
    assert_eq!(text_of(&b, bar).await, "6");

    // An allocation made elsewhere moves the bar without a reload.
    b.execute("window.__cairnNoReload = true;", vec![]).await.unwrap();
    allocate(
        &mut c,
        alloc_req("lab", owner("prod-eu1", pb::OwnerKind::Service, "shop", "cart")),
    )
    .await;
    wait_text(&b, bar, "7").await;

    // Search an address: its owner.
    let q = b.find(Locator::Css("#q")).await.unwrap();
    q.send_keys(&web_ip).await.unwrap();
    b.find(Locator::Css("form.search button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let verdict = wait_for(&b, "#verdict").await;
    assert!(
        verdict.text().await.unwrap().starts_with("Held by 1 owner"),
        "{}",
        verdict.text().await.unwrap()
    );
    let row = text_of(&b, "table.allocs tbody tr").await;
    assert!(
        row.contains("prod-eu1") && row.contains("shop/web") && row.contains(&web_ip),
        "{row}"
    );

    // A new allocation appears in the table without a reload; a release strikes it through.
    b.goto(&format!("{base}/ui/allocations?network=lab&kind=service"))
        .await
        .unwrap();
    wait_for(&b, "#live.on").await;
    b.execute("window.__cairnNoReload = true;", vec![]).await.unwrap();
    let fresh = allocate(
        &mut c,
        alloc_req("lab", owner("prod-eu2", pb::OwnerKind::Service, "shop", "search")),
    )
    .await;
    let key = r#"tr[data-key="lab/prod-eu2/service/shop/search"]"#;
    let row = wait_for(&b, &format!("{key}.fresh")).await;
    assert!(row.text().await.unwrap().contains(&fresh.addresses[0]));
    // A node is not a Service: the filtered table must not show it.
    allocate(&mut c, alloc_req("lab", node("prod-eu2", "worker-9"))).await;
    c.release(pb::ReleaseRequest {
        network: "lab".into(),
        owner: fresh.owner.clone(),
    })
    .await
    .unwrap();
    wait_for(&b, &format!("{key}.gone")).await;
    assert!(
        b.find(Locator::Css(r#"tr[data-key="lab/prod-eu2/node//worker-9"]"#))
            .await
            .is_err()
    );
    let same_page = b
        .execute("return window.__cairnNoReload === true;", vec![])
        .await
        .unwrap();
    assert_eq!(
        same_page,
        json!(true),
        "the page reloaded instead of updating live"
    );

    // Nothing went wrong in the browser: no script error, CSP violation or failed load.
    let log = b.issue_cmd(BrowserLog).await.unwrap();
    let errors: Vec<&Value> = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["level"] == "SEVERE" || e["level"] == "WARNING")
        .collect();
    assert!(errors.is_empty(), "browser console: {errors:#?}");

    if let Ok(path) = std::env::var("CAIRN_WEB_SCREENSHOT") {
        b.set_window_size(1280, 1200).await.unwrap();
        b.goto(&format!("{base}/ui/")).await.unwrap();
        wait_for(&b, "#live.on").await;
        std::fs::write(&path, b.screenshot().await.unwrap()).unwrap();
        eprintln!("saved {path}");
    }
    b.close().await.unwrap();
}
