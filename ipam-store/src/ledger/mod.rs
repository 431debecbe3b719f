//! The ledger: every invariant of the store, as pure transitions on an in-memory [`State`],
//! made durable by [`Ledger`].
//!
//! Each transition first checks everything and only then changes anything, so an error leaves
//! the state untouched; on success it returns the storage ops that make the change durable
//! and the changes watchers see ([`Outcome`]). [`Ledger`] commits the ops before it replies.
//!
//! Invariants (architecture.md §3), and where they are kept:
//! 1. One owner cluster per address; sharing only within one cluster, same key, disjoint
//!    ports: every path that adds a holder goes through `State::can_hold` in `allocate.rs`
//!    (→ `alloc::sharing`); `state.rs` checks stored records against it on load. A new owner
//!    with a sharing key looks only at its group's addresses (`shared.rs`). An address a probe
//!    found answered by an unknown host is held, exclusively, by an unknown-host record until
//!    an operator releases it (`conflict.rs`).
//! 2. Allocate is idempotent per owner: `allocate.rs` looks the owner key up first and returns
//!    what it holds; the same key is rebuilt from the engine on restart (`state.rs`).
//! 3. Durability: `durable.rs` replies only after the engine committed the ops.
//! 4. Nothing moves: no transition changes an existing allocation's addresses except its
//!    owner's explicit request (dropping a family, `allocate.rs`); pool edits (`networks.rs`)
//!    only recompute free space and flag held addresses outside the new ranges.
//! 5. Reuse grace: a released address goes to the quarantine (`quarantine.rs`), not back to
//!    free, until its time (`release.rs`).
//! 6. O(log n) allocation: free space is a `RangeSet` per pool and family (`pool.rs`).
//!
//! Files: `state.rs` (the state and loading it), `networks.rs` (upsert/delete networks),
//! `allocate.rs`, `release.rs` (release, grace), `conflict.rs` (addresses found in use by unknown hosts), `query.rs` (reads and usage), `pool.rs`,
//! `quarantine.rs`, `replica.rs` (a follower applying the leader's committed ops), `shared.rs` (addresses held under a sharing key, by group), `types.rs` (requests, results, changes), `durable.rs` (the group-committed
//! [`Ledger`]).

mod allocate;
mod conflict;
mod durable;
mod networks;
mod pool;
mod quarantine;
mod query;
mod release;
mod replica;
mod shared;
mod space;
mod state;
mod types;

pub use conflict::{ConflictReq, Reported};
pub use durable::{
    CommitObserver, Committed, DEFAULT_WATCH_BUFFER, Ledger, NoObserver, WATCH_BUFFER_RANGE, now_ms,
};
pub use state::{MAX_REVISION, State};
pub use types::{AddressInfo, AllocateReq, Change, ListFilter, Outcome, Upserted, Usage};

#[cfg(test)]
mod tests;
