//! The pure allocation core: address math, the free-range set, pools and the sharing rule.
//! No I/O, no gRPC, no clock: callers pass time in.

pub mod addr;
pub mod pool;
pub mod rangeset;
pub mod sharing;
