//! Loopback ports for processes that must be told their port before they start (etcd's peer and
//! client URLs, moto). Where a process can bind port 0 and say where it listens (valetd, the
//! upstream frameworks), tests let it; these are for the rest.
//!
//! Binding port 0 and handing the port on is racy: between the probe letting go of it and the
//! process binding it, the kernel may give the same port to anything that asks for an ephemeral
//! one — every outgoing connection of a busy test run does. So ports come from below the kernel's
//! ephemeral range, which it never hands out by itself, each once per test process (a counter
//! from an offset drawn from the process id), and only if a probe can bind them now.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port handed out.
const FLOOR: u32 = 20_000;

/// The first port of the kernel's ephemeral range (`ip_local_port_range`), which these stay below.
fn ephemeral_floor() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .filter(|low: &u32| *low > FLOOR + 1_000)
        .unwrap_or(32_768)
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A loopback port no other caller in this process got, outside the ephemeral range, free now.
pub fn reserve() -> u16 {
    let span = ephemeral_floor() - FLOOR;
    let offset = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = FLOOR + (offset + n) % span;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {FLOOR} and the ephemeral range");
}
