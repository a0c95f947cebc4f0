//! The inbound classifier reads the first bytes any client sends to an enrolled pod, before
//! any authentication: it must never panic, must stay bounded, and must not change its mind
//! once it has decided (the agent acts on the first answer that is not `NeedMore`).
#![no_main]

use interceptor::intercept::peek::{FirstBytes, MAX_PEEK, classify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let full = classify(data);
    if data.len() >= MAX_PEEK {
        assert_ne!(full, FirstBytes::NeedMore, "waits beyond MAX_PEEK");
    }
    // Every shorter prefix either asks for more or already gave the final answer. Checking a
    // handful of cut points keeps each run cheap on long inputs.
    let step = (data.len() / 16).max(1);
    for cut in (0..data.len()).step_by(step) {
        let early = classify(&data[..cut]);
        assert!(
            early == FirstBytes::NeedMore || early == full,
            "prefix of {cut} bytes said {early:?}, all {} bytes say {full:?}",
            data.len()
        );
    }
});
