//! Narrow unit tests of the web view's parsing; the HTTP contract is tested against a real
//! store in `tests/web.rs`, the pages in a real browser in `tests/web_browser.rs`.
#![allow(clippy::unwrap_used)]

use super::*;

#[test]
fn a_search_is_an_address_or_an_owner_path() {
    assert_eq!(parse_search("  ").unwrap(), Search::Nothing);
    assert_eq!(
        parse_search(" 10.0.0.7 ").unwrap(),
        Search::Address("10.0.0.7".parse().unwrap())
    );
    // IPv4-mapped IPv6 is the IPv4 address.
    assert_eq!(
        parse_search("::ffff:10.0.0.7").unwrap(),
        Search::Address("10.0.0.7".parse().unwrap())
    );
    let Search::Owner(q) = parse_search("prod/shop/web").unwrap() else {
        panic!()
    };
    assert_eq!(
        (q.cluster.as_deref(), q.namespace.as_deref(), q.name.as_deref()),
        (Some("prod"), Some("shop"), Some("web"))
    );
    assert_eq!(
        q.href(None),
        "/ui/allocations?cluster=prod&namespace=shop&name=web"
    );
    for bad in ["a//b", "a/b/c/d", "/a"] {
        let e = parse_search(bad).unwrap_err();
        assert_eq!(e.0, StatusCode::BAD_REQUEST);
        assert!(e.1.starts_with("q: "), "{}", e.1);
    }
}

#[test]
fn errors_never_echo_more_than_a_short_prefix() {
    let e = parse_search(&"z/".repeat(10_000)).unwrap_err();
    assert!(e.1.len() < 200, "{} bytes", e.1.len());
    assert_eq!(shorten("ab"), "ab");
    assert_eq!(shorten(&"é".repeat(100)).chars().count(), 65);
}

#[test]
fn table_parameters_are_checked_by_name() {
    let q = |s: &str| -> AllocQuery {
        let uri: axum::http::Uri = format!("/ui/allocations?{s}").parse().unwrap();
        Query::<AllocQuery>::try_from_uri(&uri).unwrap().0.tidy()
    };
    let (f, size) = q("cluster=+c1+&kind=node&page_size=5&address=").filter().unwrap();
    assert_eq!(
        (f.cluster_id.as_deref(), f.kind, size, f.address),
        (Some("c1"), Some(OwnerKind::Node), 5, None)
    );
    assert_eq!(q("").filter().unwrap().1, DEFAULT_PAGE);
    for (s, field) in [
        ("kind=pod", "kind: "),
        ("page_size=0", "page_size: "),
        ("page_size=x", "page_size: "),
        ("address=1.2.3", "address: "),
    ] {
        let e = q(s).filter().unwrap_err();
        assert!(e.1.starts_with(field), "{s}: {}", e.1);
    }
    // The next page keeps every filter and escapes the token.
    let href = q("network=n&cluster=c").next_href("n/c/service/ns/x");
    assert_eq!(
        href,
        "/ui/allocations?network=n&cluster=c&page_token=n%2Fc%2Fservice%2Fns%2Fx"
    );
}
