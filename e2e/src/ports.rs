//! Free loopback ports.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// Ports this process has handed out already: never hand the same one out twice, so that
/// control planes started at the same time cannot collide with each other. (Another process
/// may still grab a port between our probe and the component's bind; start-up retries then.)
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A port on 127.0.0.1 that was free a moment ago.
pub(crate) fn free_port() -> Result<u16> {
    for _ in 0..64 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| Error::io("binding 127.0.0.1:0 to find a free port", e))?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::io("reading the probe socket's address", e))?
            .port();
        drop(listener);
        let mut used = HANDED_OUT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if used.insert(port) {
            return Ok(port);
        }
    }
    Err(Error::Invalid(
        "could not find a free loopback port in 64 attempts".into(),
    ))
}
