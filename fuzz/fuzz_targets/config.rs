//! The node config is the platform team's YAML, read at every start: parsing and validating
//! it must never panic, whatever it says. A config that validates must survive a round trip
//! through its own serialisation (enrollments are persisted that way), and must turn into
//! policy settings and an inventory the policy engine accepts.
#![no_main]

use interceptor::{
    config::{Config, policy_inventory},
    policy::{Engine, InboundRequest, PolicySet},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match Config::parse("node.yaml", text) {
        Ok(config) => config,
        Err(e) => {
            let e = e.to_string();
            assert!(
                e.starts_with("node.yaml: "),
                "error does not name the file: {e}"
            );
            return;
        }
    };
    let yaml = yaml_serde::to_string(&config).expect("a parsed config serialises");
    let again = Config::parse("again.yaml", &yaml)
        .unwrap_or_else(|e| panic!("a valid config does not read back: {e}\n{yaml}"));
    assert_eq!(again, config, "round trip changed the config:\n{yaml}");
    for w in &config.workloads {
        let json = serde_json::to_string(w).expect("a workload serialises");
        let back: interceptor::config::Workload =
            serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
        assert_eq!(&back, w);
    }

    let inventory = policy_inventory(&config.workloads, &config.peers, &config.services);
    let engine = Engine::new(PolicySet::default(), config.policy_settings(), inventory);
    let addresses: Vec<_> = config.mesh_addresses().take(16).collect();
    for &(ip, _, _) in &addresses {
        for &(dst, _, _) in &addresses {
            let v = engine.inbound(&InboundRequest {
                source: std::net::SocketAddr::new(ip, 40000),
                destination: std::net::SocketAddr::new(dst, 80),
                peer: None,
            });
            let _ = v.to_string();
        }
    }
});
