//! Side-by-side benchmark of the interceptor against a userspace mTLS sidecar pair (HAProxy)
//! and plaintext, on one topology of network namespaces and cgroups (see `bench/README.md`).
//!
//! The library holds the harness so the binary stays a thin command line; `cargo xtask bench`
//! builds it in release mode and runs it as root, on the host or inside the QEMU VM.

pub mod apps;
pub mod forward;
pub mod handoff;
pub mod kx;
pub mod legs;
pub mod micro;
pub mod modes;
pub mod pki;
pub mod plot;
pub mod procs;
pub mod relay_cost;
pub mod report;
pub mod runner;
pub mod scale_policy;
pub mod sysinfo;
pub mod topology;
pub mod workloads;
pub mod zds;
pub mod ztunnel;
