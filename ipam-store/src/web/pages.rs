//! The HTML pages, as compile-checked `maud` templates: every interpolated value is escaped.
//! No inline script or style (the Content-Security-Policy forbids them); bars are SVG
//! attributes, live updates come from `/ui/live.js`.

use maud::{DOCTYPE, Markup, html};

use super::{
    AllocQuery,
    view::{AddressView, AllocationPage, AllocationView, NetworkView, UsageView},
};

/// The page frame: header with navigation and the search box, then `body`.
pub(super) fn layout(title: &str, search: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Cairn IPAM" }
                link rel="icon" href="/ui/favicon.svg" type="image/svg+xml";
                link rel="stylesheet" href="/ui/style.css";
                script src="/ui/live.js" defer {}
            }
            body {
                header {
                    a.brand href="/ui/" { "Cairn IPAM" }
                    nav {
                        a href="/ui/" { "Networks" }
                        a href="/ui/allocations" { "Allocations" }
                    }
                    form.search action="/ui/search" method="get" role="search" {
                        input #q type="search" name="q" value=(search)
                            placeholder="10.0.0.7, cluster, cluster/namespace or cluster/namespace/service"
                            aria-label="Search an address, a cluster, a namespace or a Service";
                        button type="submit" { "Search" }
                    }
                    span #live title="Live updates from the ledger" { "connecting…" }
                }
                main { (body) }
                footer { "Read-only view of the ledger · JSON: " a href="/api/v1/networks" { "/api/v1" } }
            }
        }
    }
}

/// A stacked usage bar (used, then in grace) with its figures.
fn usage(network: &str, pool: &str, u: &UsageView) -> Markup {
    let id = format!("{network}/{pool}/{}", u.family);
    let grace_x = u.used_percent;
    html! {
        div.usage data-usage=(id) {
            svg.bar viewBox="0 0 100 6" preserveAspectRatio="none" role="img"
                aria-label=(format!("{} {}% used", u.family, u.used_percent)) {
                rect.free x="0" y="0" width="100" height="6" {}
                rect.used x="0" y="0" width=(u.used_percent) height="6" {}
                rect.grace x=(grace_x) y="0" width=(u.grace_percent) height="6" {}
            }
            span.figures {
                (u.family) ": "
                b.used-n { (u.used) } " used of " span.total-n { (u.total) }
                " (" span.pct { (u.used_percent) } "%) · "
                span.grace-n { (u.in_grace) } " in grace · "
                span.free-n { (u.free) } " free"
                @if u.out_of_range != "0" {
                    " · " span.oor { (u.out_of_range) " out of range" }
                }
                @if u.unknown_hosts != "0" {
                    " · " span.unknown-n.oor { (u.unknown_hosts) " in use by unknown hosts" }
                }
            }
        }
    }
}

fn list(v: &[String]) -> Markup {
    html! {
        @if v.is_empty() { span.none { "—" } } @else {
            @for (i, s) in v.iter().enumerate() { @if i > 0 { ", " } code { (s) } }
        }
    }
}

fn definition(n: &NetworkView) -> Markup {
    html! {
        dl.def {
            dt { "Prefixes" } dd { (list(&n.prefixes)) }
            dt { "Gateways" } dd { (list(&n.gateways)) }
            dt { "DNS" } dd { (list(&n.dns_servers)) }
            dt { "VLAN" } dd { @if n.vlan == 0 { "untagged" } @else { (n.vlan) } }
            dt { "Reuse grace" } dd {
                @match n.reuse_grace_seconds { Some(s) => { (s) " s" }, None => { "store default" } }
            }
            dt { "Managed by" } dd { @if n.managed_by.is_empty() { span.none { "—" } } @else { (n.managed_by) } }
            dt { "Version" } dd { (n.version) " · updated " time { (n.updated) } }
        }
    }
}

fn pools(n: &NetworkView, detail: bool) -> Markup {
    html! {
        table.pools {
            thead { tr {
                th { "Pool" } th { "Purpose" }
                @if detail { th { "Ranges" } th { "Exclusions" } th { "Auto-assign" } }
                th { "Usage" }
            } }
            tbody {
                @for p in &n.pools {
                    tr {
                        td { a href=(format!("/ui/allocations?network={}&pool={}", enc(&n.name), enc(&p.name))) { (p.name) } }
                        td { (p.purpose) }
                        @if detail {
                            td { (list(&p.ranges)) }
                            td { (list(&p.exclusions)) }
                            td { @if p.auto_assign { "yes" } @else { "no" } }
                        }
                        td { @for u in &p.usage { (usage(&n.name, &p.name, u)) } }
                    }
                }
            }
        }
    }
}

/// `/ui/`: every network, its definition and its pools' usage.
pub(super) fn overview(nets: &[NetworkView], allocations: usize) -> Markup {
    layout(
        "Networks",
        "",
        html! {
            h1 { "Networks" }
            p.summary { (nets.len()) " networks · " (allocations) " allocations" }
            @if nets.is_empty() {
                p.empty { "No networks yet. The cloud service creates them over gRPC, or: " code { "cairn-ipam network apply -f network.yaml" } }
            }
            @for n in nets {
                section.network {
                    h2 { a href=(format!("/ui/networks/{}", enc(&n.name))) { (n.name) } }
                    (definition(n))
                    (pools(n, false))
                }
            }
        },
    )
}

/// `/ui/networks/{name}`: one network in full, and its first allocations.
pub(super) fn network(n: &NetworkView, page: &AllocationPage, q: &AllocQuery) -> Markup {
    layout(
        &n.name,
        "",
        html! {
            h1 { "Network " (n.name) }
            (definition(n))
            h2 { "Pools" }
            (pools(n, true))
            h2 { "Allocations" }
            (allocations_table(page, q))
        },
    )
}

/// `/ui/allocations`: the filter form and one page.
pub(super) fn allocations(page: &AllocationPage, q: &AllocQuery, error: Option<&str>) -> Markup {
    let v = |o: &Option<String>| o.clone().unwrap_or_default();
    layout(
        "Allocations",
        "",
        html! {
            h1 { "Allocations" }
            form.filters action="/ui/allocations" method="get" {
                @for (field, label, value) in [
                    ("network", "Network", v(&q.network)),
                    ("pool", "Pool", v(&q.pool)),
                    ("cluster", "Cluster", v(&q.cluster)),
                    ("kind", "Kind", v(&q.kind)),
                    ("namespace", "Namespace", v(&q.namespace)),
                    ("name", "Name", v(&q.name)),
                    ("address", "Address", v(&q.address)),
                ] {
                    label { (label) " " input type="text" name=(field) value=(value); }
                }
                button type="submit" { "Filter" }
            }
            @if let Some(e) = error { p.error role="alert" { (e) } }
            (allocations_table(page, q))
        },
    )
}

/// One table row; also sent, rendered, with each live change.
pub(super) fn row(a: &AllocationView) -> Markup {
    let o = &a.owner;
    html! {
        tr data-key=(a.key) data-network=(a.network) data-pool=(a.pool) data-cluster=(o.cluster)
            data-kind=(o.kind) data-namespace=(o.namespace) data-name=(o.name)
            data-addresses=(a.addresses.join(" ")) {
            td.addr { @for ip in &a.addresses { a href=(format!("/ui/search?q={}", enc(ip))) { code { (ip) } } " " } }
            td { a href=(format!("/ui/allocations?cluster={}", enc(&o.cluster))) { (o.cluster) } }
            td { (o.kind) }
            td {
                @if !o.namespace.is_empty() { (o.namespace) "/" }
                (o.name)
            }
            td { a href=(format!("/ui/networks/{}", enc(&a.network))) { (a.network) } " / " (a.pool) }
            td { @if a.sharing_key.is_empty() { span.none { "—" } } @else { (a.sharing_key) } }
            td { @if a.ports.is_empty() { span.none { "—" } } @else { (a.ports.join(", ")) } }
            td.state {
                @if o.kind == "unknown-host" { span.oor.unknown-host { "in use by an unknown host (" (o.uid) ")" } }
                @else if a.out_of_range { span.oor { "out of range" } } @else { "held" }
            }
            td { time { (a.updated) } }
        }
    }
}

fn allocations_table(page: &AllocationPage, q: &AllocQuery) -> Markup {
    let f = |o: &Option<String>| o.clone().unwrap_or_default();
    html! {
        table.allocs data-live="allocations"
            data-filter-network=(f(&q.network)) data-filter-pool=(f(&q.pool))
            data-filter-cluster=(f(&q.cluster)) data-filter-kind=(f(&q.kind))
            data-filter-namespace=(f(&q.namespace)) data-filter-name=(f(&q.name))
            data-filter-address=(f(&q.address)) {
            thead { tr {
                th { "Address" } th { "Cluster" } th { "Kind" } th { "Object" } th { "Network / pool" }
                th { "Sharing key" } th { "Ports" } th { "State" } th { "Updated" }
            } }
            tbody {
                @for a in &page.allocations { (row(a)) }
            }
        }
        @if page.allocations.is_empty() { p.empty #no-rows { "No allocations match." } }
        @if !page.next_page_token.is_empty() {
            p.pager { a rel="next" href=(q.next_href(&page.next_page_token)) { "Next page →" } }
        }
    }
}

/// `/ui/search?q=<address>`: who holds it.
pub(super) fn address(a: &AddressView) -> Markup {
    layout(
        &a.address,
        &a.address,
        html! {
            h1 { "Address " code { (a.address) } }
            p.verdict #verdict data-state=(a.state) {
                @match a.state {
                    "held" => { "Held by " (a.holders.len()) @if a.holders.len() == 1 { " owner" } @else { " owners (shared)" } "." },
                    "in-grace" => { "Not held: in its reuse grace." },
                    _ => { "Not held." },
                }
                " "
                @match (&a.network, &a.pool) {
                    (Some(n), Some(p)) => { "In pool " b { (p) } " of network " a href=(format!("/ui/networks/{}", enc(n))) { (n) } "." },
                    (Some(n), None) => { "In network " a href=(format!("/ui/networks/{}", enc(n))) { (n) } ", outside its pools." },
                    _ => { "Outside every network's address space." },
                }
            }
            @if let Some(g) = &a.grace {
                p.grace {
                    "Released by cluster " b { (g.previous_owner.cluster) } " " (g.previous_owner.kind) " "
                    @if !g.previous_owner.namespace.is_empty() { (g.previous_owner.namespace) "/" }
                    (g.previous_owner.name) "; no one else gets it before " time { (g.until) } "."
                }
            }
            @if !a.holders.is_empty() {
                (allocations_table(&AllocationPage { allocations: a.holders.clone(), next_page_token: String::new() },
                    &AllocQuery { address: Some(a.address.clone()), ..AllocQuery::default() }))
            }
        },
    )
}

/// An error page (400/404/503) with the message naming the field.
pub(super) fn error(title: &str, msg: &str) -> Markup {
    layout(
        title,
        "",
        html! { h1 { (title) } p.error role="alert" { (msg) } p { a href="/ui/" { "Back to the networks" } } },
    )
}

/// Percent-encodes a path segment or query value.
pub(super) fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}
