//! `requests`: every RPC's request message decoded from arbitrary bytes (prost) and sent
//! through the real service (`grpc::IpamService` over a `Ledger` on the in-memory engine),
//! several calls per input so later calls see what earlier ones stored.
//!
//! Input: byte 0 = flags (bit 0: start from a seeded network `net-a` with one allocation,
//! so Allocate/Release/queries reach the ledger); then calls, each `[rpc][len u16 LE][body]`.
//! Contract: nothing panics; every error is a gRPC status with a known code (never
//! UNKNOWN/INTERNAL, never UNAVAILABLE: the memory engine does not fail) and a non-empty
//! message bounded to `grpc::MAX_MESSAGE` bytes plus the "… (n more bytes)" suffix.
#![no_main]

use std::sync::{Arc, OnceLock};

use cairn_ipam::{
    grpc::{IpamService, MAX_MESSAGE},
    ledger::{Ledger, NoObserver},
    metrics::Metrics,
    store::memory::MemoryEngine,
};
use cairn_proto::v1::{self as pb, ipam_service_server::IpamService as _};
use futures::FutureExt as _;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tokio::runtime::Runtime;
use tonic::{Code, Request, Status};

const MAX_CALLS: usize = 8;

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// Shared by every input: building the metric families is costly, and they keep no state
/// the contract depends on.
fn metrics() -> Arc<Metrics> {
    static M: OnceLock<Arc<Metrics>> = OnceLock::new();
    M.get_or_init(|| Arc::new(Metrics::new())).clone()
}

fn check(rpc: &str, r: Result<(), Status>) {
    let Err(s) = r else { return };
    let m = s.message();
    assert!(
        !matches!(s.code(), Code::Unknown | Code::Internal | Code::Unavailable | Code::Ok),
        "{rpc}: unexpected code {:?}: {m}",
        s.code()
    );
    assert!(!m.is_empty(), "{rpc}: empty message ({:?})", s.code());
    let bounded = m.len() <= MAX_MESSAGE
        || (m.ends_with(" more bytes)") && m.len() <= MAX_MESSAGE + "… ( more bytes)".len() + 20);
    assert!(bounded, "{rpc}: message of {} bytes", m.len());
}

fn decode<M: Message + Default>(b: &[u8]) -> Option<M> {
    M::decode(b).ok()
}

async fn seed(svc: &IpamService) {
    let net = pb::Network {
        name: "net-a".into(),
        pools: vec![pb::Pool {
            name: "vip".into(),
            purpose: pb::PoolPurpose::Vip as i32,
            ranges: vec!["10.0.0.0/28".into(), "fd00::/124".into()],
            ..Default::default()
        }],
        ..Default::default()
    };
    let r = svc
        .upsert_network(Request::new(pb::UpsertNetworkRequest {
            network: Some(net),
            ..Default::default()
        }))
        .await;
    assert!(r.is_ok(), "seed network: {r:?}");
    let r = svc
        .allocate(Request::new(pb::AllocateRequest {
            network: "net-a".into(),
            owner: Some(pb::Owner {
                cluster_id: "a".into(),
                kind: pb::OwnerKind::Service as i32,
                namespace: "default".into(),
                name: "web".into(),
                uid: String::new(),
            }),
            ..Default::default()
        }))
        .await;
    assert!(r.is_ok(), "seed allocation: {r:?}");
}

async fn call(svc: &IpamService, rpc: u8, b: &[u8]) {
    macro_rules! unary {
        ($name:literal, $method:ident, $ty:ty) => {{
            if let Some(m) = decode::<$ty>(b) {
                check($name, svc.$method(Request::new(m)).await.map(|_| ()));
            }
        }};
    }
    match rpc % 12 {
        0 => unary!("UpsertNetwork", upsert_network, pb::UpsertNetworkRequest),
        1 => unary!("GetNetwork", get_network, pb::GetNetworkRequest),
        2 => unary!("ListNetworks", list_networks, pb::ListNetworksRequest),
        3 => unary!("DeleteNetwork", delete_network, pb::DeleteNetworkRequest),
        4 => unary!("Allocate", allocate, pb::AllocateRequest),
        5 => unary!("Release", release, pb::ReleaseRequest),
        6 => unary!("GetAllocation", get_allocation, pb::GetAllocationRequest),
        7 => unary!("ListAllocations", list_allocations, pb::ListAllocationsRequest),
        8 => {
            if let Some(m) = decode::<pb::WatchAllocationsRequest>(b) {
                match svc.watch_allocations(Request::new(m)).await {
                    // The first message (the snapshot) is ready at once; do not wait for more.
                    Ok(resp) => {
                        let mut stream = resp.into_inner();
                        if let Some(Some(Err(s))) = futures::StreamExt::next(&mut stream).now_or_never() {
                            check("WatchAllocations(stream)", Err(s));
                        }
                    }
                    Err(s) => check("WatchAllocations", Err(s)),
                }
            }
        }
        9 => unary!("GetUsage", get_usage, pb::GetUsageRequest),
        10 => unary!("Export", export, pb::ExportRequest),
        _ => unary!("Import", import, pb::ImportRequest),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut rest)) = data.split_first() else { return };
    runtime().block_on(async {
        let ledger = Ledger::open(Arc::new(MemoryEngine::new()), 0, Arc::new(NoObserver))
            .expect("open the ledger");
        let svc = IpamService::new(ledger, metrics(), 0);
        if flags & 1 == 1 {
            seed(&svc).await;
        }
        for _ in 0..MAX_CALLS {
            let [rpc, lo, hi, tail @ ..] = rest else { break };
            let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
            let (body, next) = tail.split_at(len);
            call(&svc, *rpc, body).await;
            rest = next;
        }
    });
});
