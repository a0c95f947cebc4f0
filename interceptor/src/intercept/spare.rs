//! Spare mesh sessions (`tuning.meshSpares`): per (server identity, endpoint) a pod called
//! within `spareIdleMs`, a few sessions the pod's agent opened ahead of need, so an app
//! connection there is relayed at once instead of waiting for the agents' TCP and TLS
//! handshakes. Each still carries exactly one app connection (see `handshake::spare`).
//!
//! A spare is used only while everything that made it still holds, checked when it is taken:
//! the pod's credentials (a renewed leaf, a new trust bundle or crypto policy make new
//! `Credentials`), the policy generation (any reload drops it, since it may deny), its age
//! (`spareIdleMs`) and its socket (the peer agent's end of stream or reset, e.g. after a
//! restart, makes it dead). A spare that fails any check is closed and counted, and the app's
//! connection gets a fresh dial, so none of these is visible to the app. The server's agent
//! decides the flow only when the spare is claimed, as for a fresh connection.
//!
//! One task per (pod, server, endpoint) refills the spares after each use, and stops (closing
//! the rest) once no app connection went there for `spareIdleMs`, or when the pod is gone.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError, Weak},
    time::Duration,
};

use tokio::{net::TcpStream, sync::Notify, time::Instant};

use super::{Offload, Shared, flow::reset, pod::PodCtx, pod::dial_mesh};
use crate::{
    handshake::{Credentials, driver, spare},
    identity::SpiffeId,
    telemetry,
};

/// How long a refill waits after a claim while other spares remain (see `fill`): about one
/// first exchange of a claimed flow on a loaded node.
const REFILL_DELAY: Duration = Duration::from_millis(1);

/// A ready spare: the socket, the finished session, and what it was made under.
pub(super) struct Spare {
    pub(super) sock: TcpStream,
    pub(super) est: driver::Established,
    credentials: Arc<Credentials>,
    generation: u64,
    opened: Instant,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    server: SpiffeId,
    endpoint: SocketAddr,
}

struct Slot {
    ready: Mutex<VecDeque<Spare>>,
    /// A spare was taken (or asked for): time to refill.
    wake: Notify,
    last_asked: Mutex<Instant>,
}

/// One pod's spares, by (server identity, endpoint).
#[derive(Default)]
pub(super) struct Spares {
    slots: Mutex<HashMap<Key, Arc<Slot>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Takes a usable spare toward `endpoint` (which must prove `server`), if the pod has one, and
/// asks for a refill either way. `me` and `generation` are what the app's flow is decided
/// with now; a spare made under others is closed.
pub(super) fn take(
    shared: &Arc<Shared>,
    ctx: &Arc<PodCtx>,
    server: &SpiffeId,
    endpoint: SocketAddr,
    me: &Arc<Credentials>,
    generation: u64,
) -> Option<Spare> {
    // The claim goes through rustls' buffered connection: spares serve userspace flows.
    if shared.tuning.mesh_spares == 0 || !matches!(shared.offload, Offload::Userspace) {
        return None;
    }
    let key = Key {
        server: server.clone(),
        endpoint,
    };
    let slot = {
        let mut slots = lock(&ctx.spares.slots);
        match slots.get(&key) {
            Some(slot) => Arc::clone(slot),
            None => {
                let slot = Arc::new(Slot {
                    ready: Mutex::new(VecDeque::new()),
                    wake: Notify::new(),
                    last_asked: Mutex::new(Instant::now()),
                });
                slots.insert(key.clone(), Arc::clone(&slot));
                tokio::spawn(fill(
                    Arc::clone(shared),
                    Arc::downgrade(ctx),
                    key,
                    Arc::clone(&slot),
                ));
                slot
            }
        }
    };
    *lock(&slot.last_asked) = Instant::now();
    let idle = Duration::from_millis(shared.tuning.spare_idle_ms);
    let mut found = None;
    while let Some(mut s) = lock(&slot.ready).pop_front() {
        let outcome = if s.opened.elapsed() >= idle {
            super::SpareOutcome::Expired
        } else if !Arc::ptr_eq(&s.credentials, me) {
            super::SpareOutcome::StaleCert
        } else if s.generation != generation {
            super::SpareOutcome::StalePolicy
        } else if !spare::alive(&s.sock, &mut s.est) {
            super::SpareOutcome::Dead
        } else {
            found = Some(s);
            break;
        };
        shared.counters.spare(outcome);
        reset(s.sock);
    }
    slot.wake.notify_one();
    found
}

/// Keeps one slot filled until nobody asks for it, or its pod is gone.
async fn fill(shared: Arc<Shared>, ctx: Weak<PodCtx>, key: Key, slot: Arc<Slot>) {
    let idle = Duration::from_millis(shared.tuning.spare_idle_ms);
    let target = shared.tuning.mesh_spares as usize;
    let mut retry_at = Instant::now();
    let mut backoff = Duration::from_millis(100);
    loop {
        let now = Instant::now();
        let expired: Vec<Spare> = {
            let mut ready = lock(&slot.ready);
            let keep = ready.iter().take_while(|s| now < s.opened + idle).count();
            let cut = ready.len() - keep;
            ready.drain(..cut).collect()
        };
        for s in expired {
            shared.counters.spare(super::SpareOutcome::Expired);
            reset(s.sock);
        }
        let asked = *lock(&slot.last_asked);
        let Some(pod) = ctx.upgrade() else {
            return;
        };
        if now >= asked + idle {
            // Nobody called there for a while: close the rest and forget the slot (a later
            // call makes a new one). Under the map's lock, so `take` sees one or the other.
            let mut slots = lock(&pod.spares.slots);
            if slots.get(&key).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                slots.remove(&key);
            }
            drop(slots);
            for s in lock(&slot.ready).drain(..) {
                shared.counters.spare(super::SpareOutcome::Expired);
                reset(s.sock);
            }
            return;
        }
        let have = lock(&slot.ready).len();
        if have < target && now >= retry_at {
            // All missing spares at once: a burst that took several is refilled in one
            // handshake's time, not one after the other.
            let opened =
                futures::future::join_all((have..target).map(|_| open(&shared, &pod, &key))).await;
            for result in opened {
                match result {
                    Ok(Some(s)) => {
                        shared.counters.spare(super::SpareOutcome::Opened);
                        lock(&slot.ready).push_back(s);
                        backoff = Duration::from_millis(100);
                    }
                    Ok(None) => {
                        // The peer agent predates spares: stop asking it for a while.
                        shared.counters.spare(super::SpareOutcome::NotSupported);
                        retry_at = Instant::now() + idle.max(Duration::from_secs(60));
                    }
                    Err(e) => {
                        shared.counters.spare(super::SpareOutcome::FillFailed);
                        tracing::debug!(pod = %pod.name, endpoint = %key.endpoint, "spare: {e:#}");
                        retry_at = Instant::now() + backoff;
                        backoff = (backoff * 2).min(idle);
                    }
                }
            }
            continue;
        }
        drop(pod);
        let oldest = lock(&slot.ready).front().map(|s| s.opened + idle);
        let mut next = asked + idle;
        if let Some(t) = oldest {
            next = next.min(t);
        }
        if have < target {
            next = next.min(retry_at);
        }
        let woken = tokio::select! {
            () = slot.wake.notified() => true,
            () = tokio::time::sleep_until(next) => false,
        };
        // A spare was just claimed: its flow's first exchange runs on the same cores as a
        // refill's handshake would. While spares remain, let it go first.
        if woken && !lock(&slot.ready).is_empty() {
            tokio::time::sleep(REFILL_DELAY).await;
        }
    }
}

/// Opens one spare: dial from the pod, full or resumed mesh handshake offering the spare
/// protocol. `None` if the peer agent does not know spares (that connection is reset).
async fn open(shared: &Shared, ctx: &PodCtx, key: &Key) -> anyhow::Result<Option<Spare>> {
    let generation = shared.policy.current().number;
    let credentials = shared.credentials(&ctx.id)?;
    let config = credentials.spare_client(&key.server)?;
    let name = rustls_pki_types::ServerName::IpAddress(key.endpoint.ip().into());
    let conn = driver::client_connection(config, name)?;
    let mut sock = dial_mesh(ctx, key.endpoint, shared.tuning.tcp_fast_open)
        .await?
        .sock;
    let started = std::time::Instant::now();
    let est = driver::client_handshake_prepared(
        &mut sock,
        conn,
        Duration::from_millis(shared.tuning.handshake_timeout_ms),
        shared.handshake_reads(),
    )
    .await?;
    shared.telemetry.handshake_done(
        telemetry::Direction::Outbound,
        telemetry::Mode::Userspace,
        &ctx.name,
        started.elapsed(),
    );
    if !est.negotiated.spare {
        reset(sock);
        return Ok(None);
    }
    Ok(Some(Spare {
        sock,
        est,
        credentials,
        generation,
        opened: Instant::now(),
    }))
}
