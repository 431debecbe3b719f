//! Writes a valid generated backup of N allocations (default 1,000,000) as JSON to standard
//! output, for `make reliability-backup`: `gen_backup [N] > backup.json`.
#![allow(clippy::unwrap_used)]

#[path = "../tests/support/backup_gen.rs"]
mod backup_gen;

use std::io::Write as _;

fn main() {
    let n = std::env::args()
        .nth(1)
        .map_or(1_000_000, |s| s.parse().expect("N must be a number"));
    let b = backup_gen::generated_backup(n);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    serde_json::to_writer(&mut out, &b).unwrap();
    out.write_all(b"\n").unwrap();
    out.flush().unwrap();
}
