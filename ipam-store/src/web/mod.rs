//! The read-only web view of the ledger, served on the metrics listener beside `/metrics`:
//! networks and their pools' usage, who holds an address, a cluster's, a namespace's or a
//! Service's allocations, paged allocation tables, and live updates from the ledger's commits.
//!
//! Contract:
//! - Read-only: only `GET` routes exist; nothing here changes the ledger.
//! - Every page has a JSON twin under `/api/v1/` with the same figures ([`view`]).
//! - Never proportional to the whole ledger per request: tables are pages (at most
//!   [`MAX_PAGE`] rows), an address is looked up through the holder index, usage comes from
//!   the pools' counters.
//! - Every interpolated value is escaped (maud), and the Content-Security-Policy allows only
//!   this server's own script and style, so ledger data can never run as code.
//! - Live updates: `/api/v1/events` is a server-sent-event stream of durable commits (each
//!   change with its table row rendered here). A client that falls behind gets a `resync`
//!   event and reloads. At most [`MAX_STREAMS`] streams at once; they end when the store stops.
//! - Bad query parameters answer 400 naming the parameter; unknown networks 404.

mod pages;
pub mod view;

use std::{net::IpAddr, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{HeaderValue, StatusCode, header},
    response::{
        IntoResponse, Redirect, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::get,
};
use futures::{Stream, StreamExt as _};
use maud::Markup;
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, watch};

use crate::{
    error::Error,
    ledger::{Change, Committed, Ledger, ListFilter},
    model::{self, OwnerKind},
};
use view::{AddressView, AllocationPage, AllocationView, ChangeView, NetworkView};

/// Rows per page unless `page_size` says otherwise.
pub const DEFAULT_PAGE: usize = 100;
/// The largest `page_size` accepted.
pub const MAX_PAGE: usize = 1000;
/// Concurrent event streams; more are refused with 503.
pub const MAX_STREAMS: usize = 64;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

struct Web {
    ledger: Arc<Ledger>,
    streams: Arc<Semaphore>,
    stopping: watch::Receiver<bool>,
}

/// The web view's routes (`/`, `/ui/...`, `/api/v1/...`). `stopping` turning true ends the
/// event streams, so a graceful shutdown does not wait on them.
pub fn router(ledger: Arc<Ledger>, stopping: watch::Receiver<bool>) -> Router {
    let web = Arc::new(Web {
        ledger,
        streams: Arc::new(Semaphore::new(MAX_STREAMS)),
        stopping,
    });
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(ui_overview))
        .route("/ui/networks/{name}", get(ui_network))
        .route("/ui/allocations", get(ui_allocations))
        .route("/ui/search", get(ui_search))
        .route(
            "/ui/style.css",
            get(|| async { asset("text/css; charset=utf-8", include_str!("style.css")) }),
        )
        .route(
            "/ui/live.js",
            get(|| async { asset("text/javascript; charset=utf-8", include_str!("live.js")) }),
        )
        .route(
            "/ui/favicon.svg",
            get(|| async { asset("image/svg+xml", include_str!("favicon.svg")) }),
        )
        .route("/api/v1/networks", get(api_networks))
        .route("/api/v1/networks/{name}", get(api_network))
        .route("/api/v1/allocations", get(api_allocations))
        .route("/api/v1/addresses/{ip}", get(api_address))
        .route("/api/v1/events", get(api_events))
        .layer(axum::middleware::map_response(headers))
        .with_state(web)
}

/// Security headers on every response.
async fn headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    r
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// A refused request: the status and a message naming the field.
#[derive(Debug)]
struct WebError(StatusCode, String);

impl From<Error> for WebError {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::Invalid { .. } => StatusCode::BAD_REQUEST,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Storage(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::CONFLICT,
        };
        WebError(code, e.to_string())
    }
}

/// At most 64 characters of `s`, so an error never echoes a huge input back.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// An address to look up; IPv4-mapped IPv6 means its IPv4 address (a read, so no need to refuse).
fn parse_ip(field: &str, s: &str) -> Result<IpAddr, WebError> {
    s.trim()
        .parse::<IpAddr>()
        .map(|ip| ip.to_canonical())
        .map_err(|_| invalid(field, format!("{:?} is not an IP address", shorten(s))))
}

fn invalid(field: &str, msg: impl std::fmt::Display) -> WebError {
    WebError(StatusCode::BAD_REQUEST, format!("{field}: {msg}"))
}

/// Renders the error as JSON (API) or a page (UI).
fn json_error(e: WebError) -> Response {
    (e.0, Json(serde_json::json!({ "error": e.1 }))).into_response()
}

fn page_error(e: WebError) -> Response {
    let title = e.0.canonical_reason().unwrap_or("Error");
    (e.0, pages::error(title, &e.1)).into_response()
}

/// Query parameters of the allocation tables (UI and API alike). Unknown parameters are
/// ignored; empty ones mean "any".
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct AllocQuery {
    network: Option<String>,
    pool: Option<String>,
    cluster: Option<String>,
    kind: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    address: Option<String>,
    page_token: Option<String>,
    page_size: Option<String>,
}

impl AllocQuery {
    /// Blank values are absent.
    fn tidy(mut self) -> Self {
        for v in [
            &mut self.network,
            &mut self.pool,
            &mut self.cluster,
            &mut self.kind,
            &mut self.namespace,
            &mut self.name,
            &mut self.address,
            &mut self.page_token,
            &mut self.page_size,
        ] {
            *v = v.take().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        }
        self
    }

    fn filter(&self) -> Result<(ListFilter, usize), WebError> {
        let kind = match self.kind.as_deref() {
            None => None,
            Some("api-server") => Some(OwnerKind::ApiServer),
            Some("node") => Some(OwnerKind::Node),
            Some("service") => Some(OwnerKind::Service),
            Some("unknown-host") => Some(OwnerKind::UnknownHost),
            Some(k) => {
                return Err(invalid(
                    "kind",
                    format!(
                        "{:?} is not one of api-server, node, service, unknown-host",
                        shorten(k)
                    ),
                ));
            }
        };
        let address = match &self.address {
            None => None,
            Some(a) => Some(parse_ip("address", a)?),
        };
        let size = match &self.page_size {
            None => DEFAULT_PAGE,
            Some(s) => match s.parse::<usize>() {
                Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
                _ => {
                    return Err(invalid(
                        "page_size",
                        format!("{:?} is not a number from 1 to {MAX_PAGE}", shorten(s)),
                    ));
                }
            },
        };
        Ok((
            ListFilter {
                network: self.network.clone(),
                pool: self.pool.clone(),
                cluster_id: self.cluster.clone(),
                kind,
                address,
                namespace: self.namespace.clone(),
                name: self.name.clone(),
            },
            size,
        ))
    }

    /// The link to the page after `token`, with the same filters.
    fn next_href(&self, token: &str) -> String {
        self.href(Some(token))
    }

    /// The link to these filters' table (from its first page, or after `token`).
    fn href(&self, token: Option<&str>) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("network", &self.network),
            ("pool", &self.pool),
            ("cluster", &self.cluster),
            ("kind", &self.kind),
            ("namespace", &self.namespace),
            ("name", &self.name),
            ("address", &self.address),
            ("page_size", &self.page_size),
        ] {
            if let Some(v) = v {
                q.append_pair(k, v);
            }
        }
        if let Some(t) = token {
            q.append_pair("page_token", t);
        }
        format!("/ui/allocations?{}", q.finish())
    }
}

impl Web {
    async fn networks(&self) -> Result<Vec<NetworkView>, WebError> {
        let usage = self.ledger.usage(None).await?;
        let nets = self.ledger.networks().await?;
        Ok(nets.iter().map(|n| NetworkView::of(n, &usage)).collect())
    }

    async fn network(&self, name: &str) -> Result<NetworkView, WebError> {
        let rec = self.ledger.network(name).await?;
        let usage = self.ledger.usage(Some(name)).await?;
        Ok(NetworkView::of(&rec, &usage))
    }

    async fn page(&self, q: &AllocQuery) -> Result<AllocationPage, WebError> {
        let (f, size) = q.filter()?;
        let token = q.page_token.as_deref().unwrap_or("");
        let (rows, next) = self.ledger.list(&f, size, token).await?;
        Ok(AllocationPage {
            allocations: rows.iter().map(|a| self.view(a)).collect(),
            next_page_token: next,
        })
    }

    async fn address(&self, ip: IpAddr) -> Result<AddressView, WebError> {
        let info = self.ledger.lookup(ip).await?;
        Ok(AddressView::of(&info, |a| self.ledger.is_out_of_range(a)))
    }

    fn view(&self, a: &model::Allocation) -> AllocationView {
        AllocationView::of(a, self.ledger.is_out_of_range(a))
    }
}

type W = State<Arc<Web>>;

async fn ui_overview(State(w): W) -> Response {
    match w.networks().await {
        Ok(nets) => pages::overview(&nets, w.ledger.allocation_count()).into_response(),
        Err(e) => page_error(e),
    }
}

async fn ui_network(State(w): W, Path(name): Path<String>) -> Response {
    let q = AllocQuery {
        network: Some(name.clone()),
        ..AllocQuery::default()
    };
    let r = async {
        let n = w.network(&name).await?;
        let page = w.page(&q).await?;
        Ok::<Markup, WebError>(pages::network(&n, &page, &q))
    };
    match r.await {
        Ok(m) => m.into_response(),
        Err(e) => page_error(e),
    }
}

async fn ui_allocations(State(w): W, Query(q): Query<AllocQuery>) -> Response {
    let q = q.tidy();
    match w.page(&q).await {
        Ok(page) => pages::allocations(&page, &q, None).into_response(),
        Err(e) if e.0 == StatusCode::BAD_REQUEST || e.0 == StatusCode::NOT_FOUND => {
            let empty = AllocationPage {
                allocations: vec![],
                next_page_token: String::new(),
            };
            (e.0, pages::allocations(&empty, &q, Some(&e.1))).into_response()
        }
        Err(e) => page_error(e),
    }
}

#[derive(Deserialize)]
struct SearchQuery {
    #[serde(default)]
    q: String,
}

/// What a search box entry means.
#[derive(Debug, PartialEq)]
enum Search {
    Nothing,
    Address(IpAddr),
    /// `cluster`, `cluster/namespace` or `cluster/namespace/name`.
    Owner(AllocQuery),
}

fn parse_search(q: &str) -> Result<Search, WebError> {
    let q = q.trim();
    if q.is_empty() {
        return Ok(Search::Nothing);
    }
    if let Ok(ip) = q.parse::<IpAddr>() {
        return Ok(Search::Address(ip.to_canonical()));
    }
    let parts: Vec<&str> = q.split('/').map(str::trim).collect();
    if parts.len() > 3 || parts.iter().any(|p| p.is_empty()) || q.len() > 256 {
        return Err(invalid(
            "q",
            format!(
                "{:?} is neither an IP address nor cluster[/namespace[/name]]",
                shorten(q)
            ),
        ));
    }
    let part = |i: usize| parts.get(i).map(|s| s.to_string());
    Ok(Search::Owner(AllocQuery {
        cluster: part(0),
        namespace: part(1),
        name: part(2),
        ..AllocQuery::default()
    }))
}

async fn ui_search(State(w): W, Query(s): Query<SearchQuery>) -> Response {
    match parse_search(&s.q) {
        Ok(Search::Nothing) => Redirect::to("/ui/").into_response(),
        Ok(Search::Address(ip)) => match w.address(ip).await {
            Ok(a) => pages::address(&a).into_response(),
            Err(e) => page_error(e),
        },
        Ok(Search::Owner(q)) => Redirect::to(&q.href(None)).into_response(),
        Err(e) => page_error(e),
    }
}

async fn api_networks(State(w): W) -> Response {
    match w.networks().await {
        Ok(n) => Json(serde_json::json!({ "networks": n })).into_response(),
        Err(e) => json_error(e),
    }
}

async fn api_network(State(w): W, Path(name): Path<String>) -> Response {
    match w.network(&name).await {
        Ok(n) => Json(n).into_response(),
        Err(e) => json_error(e),
    }
}

async fn api_allocations(State(w): W, Query(q): Query<AllocQuery>) -> Response {
    match w.page(&q.tidy()).await {
        Ok(p) => Json(p).into_response(),
        Err(e) => json_error(e),
    }
}

async fn api_address(State(w): W, Path(ip): Path<String>) -> Response {
    let r = async {
        let ip = parse_ip("address", &ip)?;
        w.address(ip).await
    };
    match r.await {
        Ok(a) => Json(a).into_response(),
        Err(e) => json_error(e),
    }
}

#[derive(Deserialize)]
struct EventsQuery {
    network: Option<String>,
}

async fn api_events(State(w): W, Query(q): Query<EventsQuery>) -> Response {
    let network = q.network.filter(|n| !n.trim().is_empty());
    if let Some(n) = &network
        && let Err(e) = w.ledger.network(n).await
    {
        return json_error(e.into());
    }
    let Ok(permit) = w.streams.clone().try_acquire_owned() else {
        return json_error(WebError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("too many live views open (at most {MAX_STREAMS}); try again later"),
        ));
    };
    let rx = w.ledger.subscribe();
    let stream = events(w.clone(), rx, network, permit);
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// The SSE stream: one `change` event per matching change, `resync` after falling behind.
fn events(
    w: Arc<Web>,
    rx: broadcast::Receiver<Committed>,
    network: Option<String>,
    permit: OwnedSemaphorePermit,
) -> impl Stream<Item = Result<Event, std::convert::Infallible>> {
    let mut stopping = w.stopping.clone();
    let stop = async move {
        let _ = stopping.wait_for(|s| *s).await;
    };
    // Comment first, so the browser's `open` fires (and the page says "live") before any change.
    let hello = futures::stream::once(async { Ok(Event::default().comment("live")) });
    let changes = futures::stream::unfold((rx, permit), move |(mut rx, permit)| {
        let w = w.clone();
        let network = network.clone();
        async move {
            loop {
                match rx.recv().await {
                    Ok(batch) => {
                        let evs: Vec<_> = batch
                            .changes
                            .iter()
                            .filter(|c| network.as_ref().is_none_or(|n| *n == c.allocation().network))
                            .filter_map(|c| change_event(&w, batch.seq, c))
                            .map(Ok)
                            .collect();
                        if !evs.is_empty() {
                            return Some((futures::stream::iter(evs), (rx, permit)));
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let ev = Event::default().event("resync").data("behind");
                        return Some((futures::stream::iter(vec![Ok(ev)]), (rx, permit)));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    })
    .flatten();
    hello.chain(changes).take_until(stop)
}

fn change_event(w: &Web, seq: u64, c: &Change) -> Option<Event> {
    let (kind, a) = match c {
        Change::Added(a) => ("ADDED", a),
        Change::Modified(a) => ("MODIFIED", a),
        Change::Deleted(a) => ("DELETED", a),
    };
    let allocation = w.view(a);
    let row = pages::row(&allocation).into_string();
    let v = ChangeView {
        kind,
        seq,
        allocation,
        row,
    };
    Event::default().event("change").json_data(v).ok()
}

#[cfg(test)]
mod tests;
