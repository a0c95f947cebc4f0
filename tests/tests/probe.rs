//! `interceptor probe` tells the truth about the kernel it runs on: every program passes the
//! verifier, and the data-path mode follows what kTLS can actually do here. On the host (no
//! `tls` ULP) that is the userspace fallback; in the VM it is kTLS with every cipher.

use interceptor::probe::{self, Mode};
use interceptor_tests::{in_vm, require_privileged};

#[test]
fn every_program_loads_and_mode_matches_the_kernel() {
    require_privileged();
    let report = probe::run(false);
    let names: Vec<&str> = report.programs.iter().map(|p| p.program.as_str()).collect();
    for want in [
        "intercept_sockops",
        "intercept_sk_msg",
        "intercept_connect4",
        "intercept_connect6",
        "intercept_getpeername4",
        "intercept_getpeername6",
        "intercept_sk_lookup",
    ] {
        assert!(
            names.contains(&want),
            "{want} missing from the object: {names:?}"
        );
    }
    assert!(report.missing.is_empty(), "{}", report.render());
    assert!(report.cgroup2.is_some());
    let ulp_listed = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .unwrap_or_default()
        .split_whitespace()
        .any(|w| w == "tls");
    if in_vm() {
        assert_eq!(report.mode, Mode::Ktls, "{}", report.render());
        assert!(
            report.ktls_ciphers.iter().all(|c| c.tx && c.rx),
            "{}",
            report.render()
        );
        assert!(report.rx_expect_no_pad);
    } else if !ulp_listed && !report.tls_ulp {
        assert_eq!(report.mode, Mode::Userspace, "{}", report.render());
        // `ktls: required` on such a kernel must refuse, naming kTLS.
        let strict = probe::run(true);
        assert!(
            strict.missing.iter().any(|m| m.contains("kernel TLS")),
            "{:?}",
            strict.missing
        );
    }
}
