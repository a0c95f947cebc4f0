//! AuthorizationPolicy YAML to L4 rules.
//!
//! Every `source`, `operation` and `when` field becomes a [`Constraint`] or, when it needs L7
//! data the agent never sees (methods, paths, headers, JWT claims), is dropped and recorded
//! so the rule can fail safe: see [`Rule::needs_l7`].

use super::{
    matcher::{IpBlock, StrMatch},
    model::{Action, AuthorizationPolicy, Constraint, Kind, Rule},
    schema::{
        AuthorizationPolicySpec, ConditionSpec, OperationSpec, Resource, RuleSpec, SourceSpec,
    },
    source::{Ctx, resource_ref, selector_labels},
};

/// The L4 attribute a field or condition tests.
#[derive(Clone, Copy)]
enum Attr {
    Principal,
    Namespace,
    ServiceAccount,
    SourceIp,
    DestinationIp,
    DestinationPort,
}

/// One list-valued field: its name, its values, what it tests and whether it is a `not…`.
type Field = (&'static str, Option<Vec<String>>, Attr, bool);

/// The L7 fields a rule used, for one warning per rule.
#[derive(Default)]
struct L7Fields(Vec<String>);

const REMOTE_IP_WARNING: &str = "evaluated against the connection's source address: the agent \
                                 sees no X-Forwarded-For header or PROXY protocol";

pub(super) fn authorization_policy(
    resource: Resource<AuthorizationPolicySpec>,
    ctx: &mut Ctx<'_>,
) -> Option<AuthorizationPolicy> {
    let resource_ref = resource_ref(Kind::AuthorizationPolicy, resource.metadata, ctx)?;
    let spec = resource.spec.unwrap_or_default();
    let action = spec.action.unwrap_or(Action::Allow);
    let selector = selector_labels(spec.selector);
    let detached = spec.target_ref.is_some() || spec.target_refs.is_some();
    if detached && selector.is_some() {
        ctx.error("spec", "selector and targetRef(s) are mutually exclusive");
        return None;
    }
    if detached {
        ctx.warn(
            "spec.targetRefs",
            "ignored: policies attached to gateways, waypoints or services are enforced \
             there, not by the node agent",
        );
    }
    warn_action(action, spec.provider.is_some(), ctx);
    // Every rule is checked, so one run reports every bad rule.
    let rules: Vec<_> = spec
        .rules
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, rule)| authorization_rule(rule, i, action, ctx))
        .collect();
    Some(AuthorizationPolicy {
        resource: resource_ref,
        selector,
        action,
        rules: rules.into_iter().collect::<Option<_>>()?,
        detached,
    })
}

fn warn_action(action: Action, has_provider: bool, ctx: &mut Ctx<'_>) {
    match action {
        Action::Audit => ctx.warn(
            "spec.action",
            "AUDIT is not supported and the policy is ignored (in Istio it never changes a \
             decision either)",
        ),
        Action::Custom => ctx.warn(
            "spec.action",
            "CUSTOM (external authorization) is not supported: its rules are enforced as \
             DENY so the agent fails closed",
        ),
        Action::Allow | Action::Deny if has_provider => {
            ctx.warn(
                "spec.provider",
                "ignored: a provider only applies to CUSTOM",
            );
        }
        Action::Allow | Action::Deny => {}
    }
}

fn authorization_rule(
    spec: RuleSpec,
    index: usize,
    action: Action,
    ctx: &mut Ctx<'_>,
) -> Option<Rule> {
    let base = format!("spec.rules[{index}]");
    let mut l7 = L7Fields::default();
    let from: Vec<_> = (spec.from.unwrap_or_default().into_iter().enumerate())
        .map(|(j, from)| {
            let field = format!("{base}.from[{j}].source");
            let source = required(from.source, &field, "each `from` needs a source", ctx)?;
            source_constraints(source, &field, &mut l7, ctx)
        })
        .collect();
    let to: Vec<_> = (spec.to.unwrap_or_default().into_iter().enumerate())
        .map(|(j, to)| {
            let field = format!("{base}.to[{j}].operation");
            let operation = required(to.operation, &field, "each `to` needs an operation", ctx)?;
            operation_constraints(operation, &field, &mut l7, ctx)
        })
        .collect();
    let when: Vec<_> = (spec.when.unwrap_or_default().into_iter().enumerate())
        .map(|(j, c)| condition_constraints(c, &format!("{base}.when[{j}]"), &mut l7, ctx))
        .collect();
    let needs_l7 = !l7.0.is_empty();
    if needs_l7 {
        ctx.warn(&base, l7.message(action));
    }
    Some(Rule {
        from: from.into_iter().collect::<Option<_>>()?,
        to: to.into_iter().collect::<Option<_>>()?,
        when: when.into_iter().collect::<Option<Vec<_>>>()?.concat(),
        needs_l7,
    })
}

fn source_constraints(
    s: SourceSpec,
    field: &str,
    l7: &mut L7Fields,
    ctx: &mut Ctx<'_>,
) -> Option<Vec<Constraint>> {
    let has_l7 = l7.note(&[
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
    ]);
    for (name, values) in [
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
    ] {
        if is_set(values) {
            ctx.warn(format!("{field}.{name}"), REMOTE_IP_WARNING);
        }
    }
    let fields: [Field; 10] = [
        ("principals", s.principals, Attr::Principal, false),
        ("notPrincipals", s.not_principals, Attr::Principal, true),
        ("namespaces", s.namespaces, Attr::Namespace, false),
        ("notNamespaces", s.not_namespaces, Attr::Namespace, true),
        (
            "serviceAccounts",
            s.service_accounts,
            Attr::ServiceAccount,
            false,
        ),
        (
            "notServiceAccounts",
            s.not_service_accounts,
            Attr::ServiceAccount,
            true,
        ),
        ("ipBlocks", s.ip_blocks, Attr::SourceIp, false),
        ("notIpBlocks", s.not_ip_blocks, Attr::SourceIp, true),
        ("remoteIpBlocks", s.remote_ip_blocks, Attr::SourceIp, false),
        (
            "notRemoteIpBlocks",
            s.not_remote_ip_blocks,
            Attr::SourceIp,
            true,
        ),
    ];
    let constraints = constraints(fields, field, ctx)?;
    non_empty(constraints, has_l7, field, ctx)
}

fn operation_constraints(
    op: OperationSpec,
    field: &str,
    l7: &mut L7Fields,
    ctx: &mut Ctx<'_>,
) -> Option<Vec<Constraint>> {
    let has_l7 = l7.note(&[
        ("hosts", &op.hosts),
        ("notHosts", &op.not_hosts),
        ("methods", &op.methods),
        ("notMethods", &op.not_methods),
        ("paths", &op.paths),
        ("notPaths", &op.not_paths),
    ]);
    let fields: [Field; 2] = [
        ("ports", op.ports, Attr::DestinationPort, false),
        ("notPorts", op.not_ports, Attr::DestinationPort, true),
    ];
    let constraints = constraints(fields, field, ctx)?;
    non_empty(constraints, has_l7, field, ctx)
}

/// The L4 constraints of one condition; empty for an L7 condition, which is recorded in `l7`
/// and dropped from the L4 projection. Istio allows `values` and `notValues` together: the
/// value must be in the first and in none of the second.
fn condition_constraints(
    c: ConditionSpec,
    field: &str,
    l7: &mut L7Fields,
    ctx: &mut Ctx<'_>,
) -> Option<Vec<Constraint>> {
    if !is_set(&c.values) && !is_set(&c.not_values) {
        ctx.error(field, "set values or notValues");
        return None;
    }
    let key = c.key.as_str();
    let attr = match key {
        "source.principal" => Attr::Principal,
        "source.namespace" => Attr::Namespace,
        "source.serviceAccount" => Attr::ServiceAccount,
        "source.ip" => Attr::SourceIp,
        "remote.ip" => {
            ctx.warn(format!("{field}.key"), REMOTE_IP_WARNING);
            Attr::SourceIp
        }
        "destination.ip" => Attr::DestinationIp,
        "destination.port" => Attr::DestinationPort,
        _ if is_l7_attribute(key) => {
            l7.0.push(format!("when {key}"));
            return Some(Vec::new());
        }
        _ => {
            ctx.error(format!("{field}.key"), format!("unknown attribute `{key}`"));
            return None;
        }
    };
    let fields: [Field; 2] = [
        ("values", c.values, attr, false),
        ("notValues", c.not_values, attr, true),
    ];
    constraints(fields, field, ctx)
}

fn is_l7_attribute(key: &str) -> bool {
    key == "connection.sni"
        || key.starts_with("request.")
        || key.starts_with("experimental.envoy.filters.")
}

/// Converts every set field of `fields` (found under `parent`), reporting each bad value.
fn constraints<const N: usize>(
    fields: [Field; N],
    parent: &str,
    ctx: &mut Ctx<'_>,
) -> Option<Vec<Constraint>> {
    let mut out = Vec::new();
    let mut ok = true;
    for (name, values, attr, negated) in fields {
        let Some(values) = values.filter(|v| !v.is_empty()) else {
            continue;
        };
        match constraint(attr, &values, negated, &format!("{parent}.{name}"), ctx) {
            Some(c) => out.push(c),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn constraint(
    attr: Attr,
    values: &[String],
    negated: bool,
    field: &str,
    ctx: &mut Ctx<'_>,
) -> Option<Constraint> {
    Some(match attr {
        Attr::Principal => {
            let values = parse_each(values, field, ctx, |v| v.parse::<StrMatch>())?;
            if values.iter().any(|v| v.literal().starts_with("spiffe://")) {
                ctx.warn(
                    field,
                    "Istio principals omit the spiffe:// scheme, so this entry never matches",
                );
            }
            Constraint::Principal { values, negated }
        }
        Attr::Namespace => Constraint::Namespace {
            values: parse_each(values, field, ctx, |v| v.parse::<StrMatch>())?,
            negated,
        },
        Attr::ServiceAccount => Constraint::ServiceAccount {
            values: parse_each(values, field, ctx, service_account)?,
            negated,
        },
        Attr::SourceIp => Constraint::SourceIp {
            blocks: parse_each(values, field, ctx, |v| v.parse::<IpBlock>())?,
            negated,
        },
        Attr::DestinationIp => Constraint::DestinationIp {
            blocks: parse_each(values, field, ctx, |v| v.parse::<IpBlock>())?,
            negated,
        },
        Attr::DestinationPort => Constraint::DestinationPort {
            ports: parse_each(values, field, ctx, port)?,
            negated,
        },
    })
}

/// Parses every value, naming the first bad one as `field[i]`.
fn parse_each<T, E: ToString>(
    values: &[String],
    field: &str,
    ctx: &mut Ctx<'_>,
    parse: impl Fn(&str) -> Result<T, E>,
) -> Option<Vec<T>> {
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        match parse(v) {
            Ok(parsed) => out.push(parsed),
            Err(e) => {
                ctx.error(format!("{field}[{i}]"), e.to_string());
                return None;
            }
        }
    }
    Some(out)
}

fn service_account(v: &str) -> Result<(String, String), String> {
    match v.split_once('/') {
        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
            Ok((ns.to_owned(), sa.to_owned()))
        }
        _ => Err(format!("`{v}` is not <namespace>/<service account>")),
    }
}

fn port(v: &str) -> Result<u16, String> {
    match v.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("`{v}` is not a port number (1-65535)")),
    }
}

/// Istio rejects a `source` or `operation` that sets nothing; one that set only L7 fields
/// is valid and matches everything at L4.
fn non_empty(
    constraints: Vec<Constraint>,
    has_l7: bool,
    field: &str,
    ctx: &mut Ctx<'_>,
) -> Option<Vec<Constraint>> {
    if constraints.is_empty() && !has_l7 {
        ctx.error(field, "must not be empty");
        return None;
    }
    Some(constraints)
}

fn required<T>(value: Option<T>, field: &str, message: &str, ctx: &mut Ctx<'_>) -> Option<T> {
    if value.is_none() {
        ctx.error(field, format!("missing; {message}"));
    }
    value
}

fn is_set(values: &Option<Vec<String>>) -> bool {
    values.as_ref().is_some_and(|v| !v.is_empty())
}

// === impl L7Fields ===

impl L7Fields {
    /// Records the set fields among `fields`; whether there were any.
    fn note(&mut self, fields: &[(&str, &Option<Vec<String>>)]) -> bool {
        let before = self.0.len();
        for (name, values) in fields {
            if is_set(values) {
                self.0.push((*name).to_owned());
            }
        }
        self.0.len() > before
    }

    fn message(&self, action: Action) -> String {
        let effect = match action {
            Action::Allow => "this ALLOW rule never matches (fail safe)",
            Action::Deny | Action::Custom => {
                "this rule is enforced on its L4 parts alone, so it refuses every connection \
                 they match"
            }
            Action::Audit => "the policy is ignored anyway",
        };
        format!(
            "uses L7 fields an L4 agent cannot see ({}): {effect}",
            self.0.join(", ")
        )
    }
}
