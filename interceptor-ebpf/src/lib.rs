//! Empty on purpose: the agent's build script depends on this crate so that cargo rebuilds the
//! agent when the programs change; the programs themselves are the `interceptor` binary target,
//! built for `bpfel-unknown-none` by aya-build.
#![no_std]
