//! `cargo xtask demo`: see `interceptor_tests::demo`.

fn main() {
    interceptor_tests::require_privileged();
    let ktls = if interceptor::ktls::probe().supports(interceptor::ktls::Cipher::Aes128Gcm) {
        interceptor::config::KtlsMode::Required
    } else {
        interceptor::config::KtlsMode::Auto
    };
    let report = interceptor_tests::demo::run(ktls);
    interceptor_tests::demo::say(&report.render());
}
