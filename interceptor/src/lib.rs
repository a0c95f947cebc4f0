//! The interceptor node agent: gives pods mutual TLS without sidecars.
//!
//! One module per runtime component; ARCHITECTURE.md follows one connection through them.
//! Only `datapath` imports aya; `unsafe` lives only in syscall wrappers (`ktls::sys`,
//! `sys`) and `datapath`; `policy` and `identity` parsing do no I/O.
//!
//! `unsafe` is denied crate-wide and allowed module by module, and `unwrap`/`expect` are
//! denied outside tests: an input the agent did not expect must cost one connection or one
//! policy with an error that names it, never a panic.

#![deny(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod app;
pub mod ca;
pub mod cluster;
pub mod config;
pub mod datapath;
pub mod error;
pub mod handover;
pub mod handshake;
pub mod health;
pub mod identity;
pub mod intercept;
pub mod ktls;
pub mod policy;
pub mod probe;
pub mod refusal;
pub mod relay;
pub mod runtimes;
#[allow(unsafe_code)] // syscall wrappers, each block with its SAFETY comment
pub mod sys;
pub mod telemetry;
#[cfg(test)]
mod test_tls;
