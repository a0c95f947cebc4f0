//! The raw YAML schema of the Istio resources the agent reads.
//!
//! These mirror Istio's protobuf messages field for field, so `deny_unknown_fields` rejects
//! typos while every valid Istio field still parses; which fields are honoured is decided in
//! [`source`](super::source). `expecting` texts keep internal type names out of error
//! messages.

use std::{collections::BTreeMap, fmt};

use serde::{Deserialize, Deserializer, de::IgnoredAny};
use yaml_serde::Value;

use super::model::{Action, Labels, Mode, TlsMode};

/// The envelope shared by every Kubernetes resource.
#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a Kubernetes resource with apiVersion, kind, metadata and spec"
)]
pub(super) struct Resource<S> {
    // Read in the first pass; here they only need to be allowed.
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    #[serde(default)]
    pub(super) metadata: Metadata,
    pub(super) spec: Option<S>,
    /// Present in `kubectl get -o yaml` output; never read.
    #[serde(default, rename = "status")]
    _status: Option<IgnoredAny>,
}

/// Kubernetes `ObjectMeta`: open, because clusters add fields (uid, managedFields, ...).
#[derive(Default, Deserialize)]
pub(super) struct Metadata {
    pub(super) name: Option<String>,
    pub(super) namespace: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a selector such as {matchLabels: {app: httpbin}}"
)]
pub(super) struct WorkloadSelectorSpec {
    pub(super) match_labels: Option<Labels>,
}

#[derive(Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a PeerAuthentication spec"
)]
pub(super) struct PeerAuthenticationSpec {
    pub(super) selector: Option<WorkloadSelectorSpec>,
    pub(super) mtls: Option<MtlsSpec>,
    pub(super) port_level_mtls: Option<BTreeMap<PortNumber, MtlsSpec>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping such as {mode: STRICT}")]
pub(super) struct MtlsSpec {
    pub(super) mode: Option<Mode>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a DestinationRule spec"
)]
pub(super) struct DestinationRuleSpec {
    pub(super) host: String,
    pub(super) traffic_policy: Option<TrafficPolicySpec>,
    pub(super) subsets: Option<Vec<Value>>,
    pub(super) export_to: Option<Vec<String>>,
    pub(super) workload_selector: Option<WorkloadSelectorSpec>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a traffic policy"
)]
pub(super) struct TrafficPolicySpec {
    pub(super) load_balancer: Option<Value>,
    pub(super) connection_pool: Option<Value>,
    pub(super) outlier_detection: Option<Value>,
    pub(super) tls: Option<ClientTlsSpec>,
    pub(super) port_level_settings: Option<Vec<PortTrafficPolicySpec>>,
    pub(super) tunnel: Option<Value>,
    pub(super) proxy_protocol: Option<Value>,
    pub(super) retry_budget: Option<Value>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a port traffic policy"
)]
pub(super) struct PortTrafficPolicySpec {
    pub(super) port: Option<PortSelectorSpec>,
    pub(super) load_balancer: Option<Value>,
    pub(super) connection_pool: Option<Value>,
    pub(super) outlier_detection: Option<Value>,
    pub(super) tls: Option<ClientTlsSpec>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a port selector such as {number: 80}"
)]
pub(super) struct PortSelectorSpec {
    pub(super) number: PortNumber,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "TLS settings such as {mode: ISTIO_MUTUAL}"
)]
pub(super) struct ClientTlsSpec {
    pub(super) mode: Option<TlsMode>,
    pub(super) client_certificate: Option<String>,
    pub(super) private_key: Option<String>,
    pub(super) ca_certificates: Option<String>,
    pub(super) credential_name: Option<String>,
    pub(super) subject_alt_names: Option<Vec<String>>,
    pub(super) sni: Option<String>,
    pub(super) insecure_skip_verify: Option<bool>,
    pub(super) ca_crl: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "an AuthorizationPolicy spec"
)]
pub(super) struct AuthorizationPolicySpec {
    pub(super) selector: Option<WorkloadSelectorSpec>,
    pub(super) target_ref: Option<Value>,
    pub(super) target_refs: Option<Vec<Value>>,
    pub(super) rules: Option<Vec<RuleSpec>>,
    pub(super) action: Option<Action>,
    pub(super) provider: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a rule with from, to and when")]
pub(super) struct RuleSpec {
    pub(super) from: Option<Vec<FromSpec>>,
    pub(super) to: Option<Vec<ToSpec>>,
    pub(super) when: Option<Vec<ConditionSpec>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping such as {source: {...}}")]
pub(super) struct FromSpec {
    pub(super) source: Option<SourceSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", expecting = "a source")]
pub(super) struct SourceSpec {
    pub(super) principals: Option<Vec<String>>,
    pub(super) not_principals: Option<Vec<String>>,
    pub(super) request_principals: Option<Vec<String>>,
    pub(super) not_request_principals: Option<Vec<String>>,
    pub(super) namespaces: Option<Vec<String>>,
    pub(super) not_namespaces: Option<Vec<String>>,
    pub(super) service_accounts: Option<Vec<String>>,
    pub(super) not_service_accounts: Option<Vec<String>>,
    pub(super) ip_blocks: Option<Vec<String>>,
    pub(super) not_ip_blocks: Option<Vec<String>>,
    pub(super) remote_ip_blocks: Option<Vec<String>>,
    pub(super) not_remote_ip_blocks: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping such as {operation: {...}}"
)]
pub(super) struct ToSpec {
    pub(super) operation: Option<OperationSpec>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "an operation"
)]
pub(super) struct OperationSpec {
    pub(super) hosts: Option<Vec<String>>,
    pub(super) not_hosts: Option<Vec<String>>,
    pub(super) ports: Option<Vec<String>>,
    pub(super) not_ports: Option<Vec<String>>,
    pub(super) methods: Option<Vec<String>>,
    pub(super) not_methods: Option<Vec<String>>,
    pub(super) paths: Option<Vec<String>>,
    pub(super) not_paths: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a condition with key and values"
)]
pub(super) struct ConditionSpec {
    pub(super) key: String,
    pub(super) values: Option<Vec<String>>,
    pub(super) not_values: Option<Vec<String>>,
}

/// `authentication.istio.io/v1alpha1` Policy and MeshPolicy.
#[derive(Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a v1alpha1 policy spec"
)]
pub(super) struct LegacyPolicySpec {
    pub(super) targets: Option<Vec<LegacyTargetSpec>>,
    pub(super) peers: Option<Vec<LegacyPeerSpec>>,
    pub(super) peer_is_optional: Option<bool>,
    pub(super) origins: Option<Vec<Value>>,
    pub(super) origin_is_optional: Option<bool>,
    pub(super) principal_binding: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a target such as {name: httpbin}")]
pub(super) struct LegacyTargetSpec {
    pub(super) name: String,
    pub(super) ports: Option<Vec<LegacyPortSpec>>,
    pub(super) labels: Option<Labels>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a port such as {number: 80}")]
pub(super) struct LegacyPortSpec {
    pub(super) number: Option<PortNumber>,
    pub(super) name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a peer such as {mtls: {}}")]
pub(super) struct LegacyPeerSpec {
    /// `- mtls:` with no value still selects mutual TLS, so presence is tracked separately
    /// from the (optional) settings.
    #[serde(default, deserialize_with = "present")]
    pub(super) mtls: Option<Option<LegacyMtlsSpec>>,
    pub(super) jwt: Option<Value>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "mtls settings such as {mode: STRICT}"
)]
pub(super) struct LegacyMtlsSpec {
    pub(super) mode: Option<LegacyMode>,
    pub(super) allow_tls: Option<bool>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub(super) enum LegacyMode {
    Strict,
    Permissive,
}

/// A port number written as a YAML integer or, as in JSON map keys, a numeric string.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct PortNumber(pub(super) u16);

// === impl PortNumber ===

impl<'de> Deserialize<'de> for PortNumber {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PortNumber;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number (1-65535)")
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortNumber, E> {
                u16::try_from(v)
                    .ok()
                    .filter(|&p| p != 0)
                    .map(PortNumber)
                    .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortNumber, E> {
                Err(E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortNumber, E> {
                v.parse::<u64>()
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Str(v), &self))
                    .and_then(|n| self.visit_u64(n))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

// === helpers ===

/// Deserializes a field that may be present with a null value as `Some(None)`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}
