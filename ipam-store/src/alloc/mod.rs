//! The pure allocation core: address math, the free-range set and the sharing rule.
//! No I/O, no gRPC, no clock, and nothing of the layers above (`model`, `ledger`).

pub mod addr;
pub mod rangeset;
pub mod sharing;
