//! Istio security policy for an L4 agent: reads the PeerAuthentication, DestinationRule and
//! AuthorizationPolicy YAML users already have, and decides per connection whether to accept
//! it and how to originate it.
//!
//! Pure: no I/O, no async, no aya. The caller reads files and hands their contents to
//! [`load_documents`] (or [`check_files`] for `interceptor policy check`), builds an
//! [`Engine`] from the resulting [`PolicySet`], the mesh [`Settings`] and the [`Inventory`]
//! of workloads and services, and swaps in a new engine when either changes. A load error
//! names the file, the 1-based document and the field, so the caller can keep the last good
//! engine and log why.
//!
//! # Decisions
//!
//! * [`Engine::effective_peer_auth`]: the mode of a workload port. Workload (selector)
//!   policy over namespace policy over mesh policy (root namespace); UNSET inherits;
//!   `portLevelMtls` counts only in selector policies; the default is PERMISSIVE. Several
//!   policies at one level: Istio keeps the oldest, we have no creation time and keep the
//!   first in file order (the caller passes files sorted by name), with a warning.
//! * [`Engine::inbound`]: plaintext from a `probeSources` address is accepted outright (as
//!   Istio's probe rewrite lets kubelet through); STRICT refuses other plaintext; DISABLE
//!   refuses mesh mTLS, because a server that does not terminate mesh TLS cannot serve it
//!   (seed 004's last phase: a DestinationRule forcing ISTIO_MUTUAL onto a DISABLE server
//!   fails). Then CUSTOM rules (enforced as DENY, failing closed), DENY rules, and, if any
//!   ALLOW policy applies, at least one ALLOW rule must match. Rules with L7 fields are
//!   projected to L4: an ALLOW rule that needs them never matches, a DENY rule applies with
//!   its L4 parts only; both are reported as warnings when loading. A peer whose trust
//!   domain is neither the local one nor an alias is refused, and so is a connection to an
//!   address that is no workload of the inventory (fail closed). Principals match with
//!   aliases folded into the local trust domain, on both sides.
//! * [`Engine::outbound`]: a service VIP is resolved to an endpoint round robin (the caller
//!   owns the counter), then the DestinationRule the client sees (client namespace, then the
//!   service's namespace, then the root namespace, most specific host first) decides:
//!   DISABLE → plaintext, ISTIO_MUTUAL → mesh mTLS even if the server refuses it, MUTUAL and
//!   SIMPLE → TLS origination with the rule's files. Without one, automatic mTLS: mesh mTLS
//!   exactly when the chosen endpoint is a mesh workload whose port is not DISABLE, so a
//!   service with one mesh and one legacy endpoint alternates.
//!   DestinationRules apply only to destinations the inventory maps to a service (its VIP or
//!   one of its endpoints): the agent sees addresses, never host names.
//! * Open flows under a new engine: inbound flows are decided again like new connections.
//!   Outbound flows are decided again with [`Pick::Endpoint`], so a VIP flow is judged on the
//!   endpoint it is connected to, not on the next round-robin pick; the flow stays when
//!   [`OutboundTls::met_by`] says what it runs ([`FlowTls`]) is at least what the new
//!   decision asks: anything meets plaintext (a flow stronger than required is left alone),
//!   mesh mTLS needs mesh mTLS to the same server identity, origination needs origination
//!   with the same settings. Otherwise, or when the new engine refuses the connection, the
//!   caller closes it.
//!
//! # Old `authentication.istio.io/v1alpha1` policies
//!
//! `MeshPolicy` and `Policy` are translated with a deprecation warning: `peers` with an
//! `mtls` entry means STRICT (or PERMISSIVE if asked), no `mtls` peer means DISABLE (no peer
//! authentication, which is what the seeds' "plaintext" policy relies on). A `Policy` with
//! `targets` names Services; since the inventory's services carry endpoint addresses rather
//! than selectors, the engine resolves a target to the workloads whose addresses are that
//! service's endpoints, and target ports (numbers or names of service ports) to their target
//! ports. Such a policy then ranks as a workload-specific policy.
//!
//! # What the client sees (L4 mapping)
//!
//! The agent works at L4 and cannot answer with an HTTP status. Where Envoy answers 503 (no
//! upstream, TLS mismatch, STRICT refusing plaintext) or 403 (AuthorizationPolicy), the agent
//! resets the connection instead: curl prints `000` and exits with 56 (receive failure: the
//! reset arrived while it waited for the response) or 52 (empty reply: the connection closed
//! before any response byte). Every refusal has a stable [`Verdict::code`] or
//! [`Refusal::code`] for per-reason counters, and a `Display` that names the mode or the
//! policy and rule for the one-line log.
//!
//! # Reading the seed documents
//!
//! The acceptance tests replay the seeds' curl matrices through these decisions. Where the
//! seeds are ambiguous:
//!
//! * Automatic mTLS is always on. Seed 001 predates it, so its first step (MeshPolicy STRICT
//!   without DestinationRules, 503 between mesh services) succeeds here with mTLS, as its own
//!   next step with the `*.local` ISTIO_MUTUAL rule does.
//! * Resources applied with `kubectl apply -n NS` and no `metadata.namespace` must name the
//!   namespace in files; without one, `default` is assumed with a warning, as kubectl would.
//! * Seed 004's `httpbin.partial` sits behind one service with a mesh and a legacy endpoint:
//!   each single curl in the seed sampled one of them. Policies in namespace `full` never
//!   touch `partial`, whatever the prose says; its mesh endpoint keeps PERMISSIVE.
//! * A DENY rule with `methods: [GET]` (seed 003) refuses every connection its L4 parts
//!   match, since the agent cannot see the method.

mod authz;
mod compile;
mod eval;
mod inventory;
mod matcher;
mod model;
mod schema;
mod source;

pub use compile::{Engine, ServiceId};
pub use eval::{
    EffectiveMode, FlowTls, InboundRequest, Outbound, OutboundRequest, OutboundTls, Pick, Refusal,
    TlsReason, Verdict,
};
pub use inventory::{Inventory, Service, ServicePort, Settings, Workload};
pub use matcher::{IpBlock, IpBlockError, PatternError, StrMatch};
pub use model::{
    Action, AuthorizationPolicy, ClientTls, Constraint, DestinationRule, ExportTo, HostPattern,
    Kind, Labels, Location, Mode, PeerAuthentication, PeerTarget, PolicySet, PortRef, ResourceRef,
    Rule, ServiceTarget, TlsMode, Warning,
};
pub use source::{DocumentError, PolicyError};

/// Parses every YAML document of every file, given as `(file name, contents)`.
///
/// Unknown kinds are skipped and unsupported fields are kept out of the decisions, both with
/// a [`Warning`]. Any invalid document fails the whole set, so a half-applied policy never
/// takes effect; the error lists every invalid document.
pub fn load_documents(files: &[(String, String)]) -> Result<PolicySet, PolicyError> {
    source::load(files)
}

/// Validates files offline for `interceptor policy check`: the warnings on success, every
/// invalid document on failure.
pub fn check_files(files: &[(String, String)]) -> Result<Vec<Warning>, PolicyError> {
    load_documents(files).map(|set| set.warnings)
}

#[cfg(test)]
mod tests;
