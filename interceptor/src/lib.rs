//! The interceptor node agent: gives pods mutual TLS without sidecars.
//!
//! One module per runtime component; ARCHITECTURE.md follows one connection through them.
//! Only `datapath` imports aya; `unsafe` lives only in syscall wrappers (`ktls::sys`,
//! `sys`) and `datapath`; `policy` and `identity` parsing do no I/O.

pub mod admin;
pub mod app;
pub mod ca;
pub mod config;
pub mod datapath;
pub mod handshake;
pub mod identity;
pub mod intercept;
pub mod ktls;
pub mod policy;
pub mod probe;
pub mod relay;
pub mod sys;
