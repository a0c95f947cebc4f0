//! Policy evaluation per connection.
//!
//! GAP: the agent's policy module (`interceptor/src/policy*`, Istio PeerAuthentication /
//! AuthorizationPolicy evaluation) is not in this build yet, so there is nothing to measure.
//! This target says so instead of timing a stand-in; replace it with a criterion group over
//! `interceptor::policy` once that module lands (one decision per new connection: source
//! principal, namespace, destination port, against a policy set of realistic size).

fn main() {
    println!(
        "policy: not measured — interceptor has no policy module in this build \
         (interceptor/src/policy* is absent); see bench/benches/policy.rs"
    );
}
