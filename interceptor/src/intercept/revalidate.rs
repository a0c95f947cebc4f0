//! A new policy generation meets the flows already open: connect4's steering follows it,
//! and every listed flow is decided again (closed when refused); a flow set up while the
//! generation changed is decided again before it is listed.

use std::{collections::BTreeSet, net::SocketAddr};

use anyhow::Context as _;

use super::{
    Shared,
    enforce::{Generation, Refused},
    flow::{self, Ends},
    table::FlowCheck,
};
use crate::datapath::Destination;

/// Decides every open flow again under `generation`: a flow it refuses is reset within one
/// poll of the relay, with one log line and a `closed.<reason>` count; allowed flows are
/// untouched.
///
/// Inbound flows are decided as new connections with the same client, identity and
/// destination. Outbound flows are decided on the endpoint they are connected to and closed
/// when the generation refuses them or needs protection they lack
/// ([`Generation::outbound_still`]: `transport_changed`); a flow already stronger than
/// required stays.
pub fn revalidate(shared: &Shared, generation: &Generation) -> usize {
    shared
        .flows
        .revalidate(|info, check| match recheck(generation, check) {
            Ok(()) => Ok(()),
            Err(refused) => {
                let by = format!("policy generation {}", generation.number);
                flow::closed(shared, &Ends::of(check, &info.pod), &by, &refused);
                Err(refused.code)
            }
        })
}

/// Decides an open flow again under `generation`.
fn recheck(generation: &Generation, check: &FlowCheck) -> Result<(), Refused> {
    match check {
        FlowCheck::Inbound(c) => generation
            .inbound(c.source, c.destination, c.peer.as_ref())
            .map(|_| ()),
        FlowCheck::Outbound(c) => {
            generation.outbound_still(c.source.ip(), c.destination, c.endpoint, &c.tls)
        }
        FlowCheck::Local(c) => super::local::recheck(generation, c),
    }
}

/// Brings connect4's steering in line with a new generation (service VIPs, non-mesh endpoints
/// a DestinationRule may originate TLS to); `old` is what the previous generation steered.
pub fn apply_steering(
    shared: &Shared,
    old: &BTreeSet<SocketAddr>,
    new: &BTreeSet<SocketAddr>,
) -> anyhow::Result<()> {
    let mut dp = shared.datapath();
    for gone in old.difference(new) {
        dp.clear_destination(gone.ip(), Some(gone.port()));
    }
    for added in new.difference(old) {
        dp.set_destination(added.ip(), Some(added.port()), Destination::Steer)
            .with_context(|| format!("steer {added}"))?;
    }
    Ok(())
}

/// Closes the window between deciding a flow and listing it (a handshake, a dial): a
/// generation applied in between revalidated the table without this flow, so it is decided
/// again here, as [`revalidate`] would have. The caller refuses the flow on `Err`.
pub(super) fn admitted_now(
    shared: &Shared,
    decided_by: u64,
    check: &FlowCheck,
) -> Result<(), Refused> {
    let generation = shared.policy.current();
    if generation.number == decided_by {
        return Ok(());
    }
    recheck(&generation, check)
}

/// Decides a flow another agent admitted (an upgrade hands it over) under `generation`, as
/// [`revalidate`] decides an open flow.
pub fn decide_handed_over(generation: &Generation, check: &FlowCheck) -> Result<(), Refused> {
    recheck(generation, check)
}
