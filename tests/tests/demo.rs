//! The demo's matrix, asserted: the same code `cargo xtask demo` runs, through the real
//! `interceptor run` binary and `interceptor flows`.

use interceptor::config::KtlsMode;
use interceptor_tests::{demo, in_vm, require_privileged};

#[test]
fn demo_matrix() {
    require_privileged();
    let ktls = if in_vm() {
        KtlsMode::Required
    } else {
        KtlsMode::Auto
    };
    let report = demo::run(ktls);
    demo::say(&report.render());
    let mode = if in_vm() { "ktls" } else { "userspace" };
    let get = |from: &str, to: &str| {
        report
            .rows
            .iter()
            .find(|r| r.from == from && r.to == to)
            .unwrap_or_else(|| panic!("no row {from} → {to}"))
    };
    let mesh = get("sleep", "httpbin");
    assert_eq!((mesh.code.as_str(), mesh.intact), ("200", true));
    assert_eq!(mesh.protection, mode);
    assert_eq!(
        mesh.client_id.as_deref(),
        Some("spiffe://cluster.local/ns/full/sa/sleep")
    );
    assert_eq!(
        mesh.server_id.as_deref(),
        Some("spiffe://cluster.local/ns/full/sa/httpbin")
    );
    for (from, to) in [
        ("sleep", "legacy"),
        ("legacy", "httpbin"),
        ("legacy", "legacy"),
    ] {
        let r = get(from, to);
        assert_eq!((r.code.as_str(), r.intact), ("200", true), "{from} → {to}");
        assert!(
            r.protection.starts_with("plaintext"),
            "{from} → {to}: {}",
            r.protection
        );
        assert_eq!(r.client_id, None);
        assert_eq!(r.server_id, None);
    }
    assert!(report.capture_tls_records > 0);
    assert!(
        report.clean_exit,
        "`interceptor run` must exit 0 on SIGTERM"
    );
}
