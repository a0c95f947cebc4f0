//! TLS 1.3 session resumption between agents: which tickets exist, for how long, and when
//! they stop counting.
//!
//! A resumed mesh handshake skips both certificates, both handshake signatures and both
//! chain checks, which are most of a full handshake's cost, and still runs a fresh key
//! exchange (`psk_dhe_ke`, the only mode rustls implements; ARCHITECTURE.md argues why it is
//! also the right one). Each app connection keeps its own TLS session, so its own kernel TLS
//! keys.
//!
//! What a ticket is bound to:
//!
//! * **One server, one client identity.** Stores live inside the configs built for one local
//!   leaf ([`super::server_config_with`], [`super::client_config_with`]); a new leaf, CA
//!   bundle or crypto policy builds new configs with empty stores. On top of that rustls
//!   resumes a client ticket only with the very verifier (expected server identity) and
//!   client certificate that made it.
//! * **A short lifetime**, counted from issue on each side with the monotonic clock
//!   ([`SessionResumption::lifetime`]). rustls announces a day for stateful tickets and never
//!   checks a ticket's age on the server, so both stores enforce it themselves.
//! * **An epoch** ([`SessionResumption::new`]'s counter, the policy generation in the agent):
//!   a ticket issued under an older epoch is neither offered nor accepted, so no session
//!   resumes across a policy change; the policy decision runs again on every connection
//!   anyway, with the identity rustls restores from the ticket.
//! * **The peer certificate's validity**: [`super::negotiated`] refuses a resumed session
//!   whose peer leaf is outside its validity window now, since no chain check ran.
//!
//! Tickets are stateful (the ticket is a random key into [`ServerTickets`]) and single use
//! (`take` removes it), so a replayed ClientHello cannot resume twice; each connection
//! receives one new ticket. Both stores are bounded.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use rustls::{
    ClientConfig, NamedGroup,
    client::{
        ClientSessionStore, Resumption, Tls12ClientSessionValue, Tls12Resumption,
        Tls13ClientSessionValue,
    },
    pki_types::ServerName,
    server::StoresServerSessions,
};

/// Whether and how mesh handshakes resume; cheap to clone.
#[derive(Clone, Debug)]
pub struct SessionResumption {
    lifetime: Duration,
    epoch: Arc<AtomicU64>,
}

impl SessionResumption {
    /// Lifetime when the configuration does not set one: long enough that a client calling a
    /// service every few seconds resumes nearly always, short enough that a ticket does not
    /// outlive much of anything.
    pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);

    /// Tickets valid for `lifetime` from issue and only while `epoch` holds the value it had
    /// then. A zero lifetime disables resumption.
    pub fn new(lifetime: Duration, epoch: Arc<AtomicU64>) -> Self {
        Self { lifetime, epoch }
    }

    /// No tickets issued, none offered.
    pub fn disabled() -> Self {
        Self::new(Duration::ZERO, Arc::default())
    }

    pub fn enabled(&self) -> bool {
        !self.lifetime.is_zero()
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    fn stamp<T>(&self, value: T, now: Instant) -> Ticket<T> {
        Ticket {
            value,
            expires: now + self.lifetime,
            epoch: self.epoch.load(Ordering::SeqCst),
        }
    }

    fn fresh<T>(&self, ticket: &Ticket<T>, now: Instant) -> bool {
        now < ticket.expires && ticket.epoch == self.epoch.load(Ordering::SeqCst)
    }
}

struct Ticket<T> {
    value: T,
    expires: Instant,
    epoch: u64,
}

/// Tickets a server config issued: the ticket sent to the client is the key. Holds the
/// session secret and the client's certificate chain, which rustls restores on resumption.
pub(super) struct ServerTickets {
    rules: SessionResumption,
    entries: Mutex<HashMap<Vec<u8>, Ticket<Vec<u8>>>>,
    capacity: usize,
}

/// Tickets one server identity holds out at once. Each entry is about a kilobyte (the client
/// chain and the secret); a client keeps at most [`TICKETS_PER_SERVER`] per address, so this
/// is hundreds of client workloads' worth.
pub(super) const SERVER_TICKETS: usize = 4096;

impl ServerTickets {
    pub(super) fn new(rules: SessionResumption, capacity: usize) -> Self {
        Self {
            rules,
            entries: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Ticket<Vec<u8>>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.entries().len()
    }
}

impl fmt::Debug for ServerTickets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the entries: they hold session secrets.
        f.debug_struct("ServerTickets")
            .field("held", &self.entries().len())
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl StoresServerSessions for ServerTickets {
    /// Refuses (so no ticket is sent) when full of live tickets: a client without one does a
    /// full handshake, which is all a ticket saves.
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let now = Instant::now();
        let mut entries = self.entries();
        if entries.len() >= self.capacity {
            entries.retain(|_, t| self.rules.fresh(t, now));
            if entries.len() >= self.capacity {
                return false;
            }
        }
        entries.insert(key, self.rules.stamp(value, now));
        true
    }

    /// TLS 1.2 resumption only; the mesh is TLS 1.3.
    fn get(&self, _key: &[u8]) -> Option<Vec<u8>> {
        None
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let ticket = self.entries().remove(key)?;
        self.rules
            .fresh(&ticket, Instant::now())
            .then_some(ticket.value)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// Tickets a client keeps per server address: enough for that many concurrent connection
/// set-ups to all resume (each resumed connection brings one new ticket back).
pub(super) const TICKETS_PER_SERVER: usize = 8;

/// Server addresses one client config remembers (the endpoints of one service identity).
const SERVERS: usize = 1024;

/// A client config's tickets and key-exchange hints, by server address.
pub(super) struct ClientTickets {
    rules: SessionResumption,
    state: Mutex<ClientState>,
}

#[derive(Default)]
struct ClientState {
    tickets: HashMap<ServerName<'static>, VecDeque<Ticket<Tls13ClientSessionValue>>>,
    hints: HashMap<ServerName<'static>, NamedGroup>,
}

impl ClientTickets {
    pub(super) fn new(rules: SessionResumption) -> Self {
        Self {
            rules,
            state: Mutex::new(ClientState::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ClientState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[cfg(test)]
    pub(super) fn held(&self, name: &ServerName<'static>) -> usize {
        self.state().tickets.get(name).map_or(0, VecDeque::len)
    }

    /// Drops every ticket held for `server`: it declined one, so the others, issued before
    /// the same restart or policy change, would most likely be declined too.
    pub(super) fn forget(&self, server: &ServerName<'static>) {
        self.state().tickets.remove(server);
    }
}

/// The store of one resumed offer's config (see [`ResumedConfigs`]): the ticket taken from
/// the shared store for the connection the config is lent to, so the connection that was
/// given the classical-only offer is the one that resumes with it. The ticket the server
/// sends back goes to the shared store; no key-exchange hint is kept (the hint of a resumed
/// handshake would make the next full handshake start with a classical share).
pub(super) struct OneTicket {
    ticket: Mutex<Option<Tls13ClientSessionValue>>,
    shared: Arc<ClientTickets>,
}

impl OneTicket {
    fn new(shared: Arc<ClientTickets>) -> Self {
        Self {
            ticket: Mutex::new(None),
            shared,
        }
    }

    fn set(&self, ticket: Tls13ClientSessionValue) {
        *self.ticket.lock().unwrap_or_else(|p| p.into_inner()) = Some(ticket);
    }
}

/// The resumed offer's configs, lent one connection at a time.
///
/// rustls takes a connection's ticket from its config's store, so a connection that must
/// resume with a ticket taken in advance needs a config whose store holds that ticket alone.
/// Cloning the config for each connection did that at the cost of a `ClientConfig` copy (its
/// vectors and two `Arc`s) per resumed connection; here a config goes back to the pool when
/// the last connection built from it is gone (only the pool holds it), and is lent again
/// with the next ticket. A config is never lent to two connections at once, so no connection
/// can take another's ticket.
pub(super) struct ResumedConfigs {
    /// x25519 only, same verifier and client-certificate resolver as the full offer (rustls
    /// resumes a ticket only with the very ones that made it); its own store holds nothing.
    template: ClientConfig,
    /// The store the full offer keeps its tickets in.
    tickets: Arc<ClientTickets>,
    pool: Mutex<Vec<Lendable>>,
}

struct Lendable {
    config: Arc<ClientConfig>,
    ticket: Arc<OneTicket>,
}

/// Configs one [`ResumedConfigs`] keeps: as many resumed connections can be in flight (or,
/// with the userspace relay, open: rustls keeps its config for the session's life) before
/// one more costs a config copy again.
const RESUMED_CONFIGS: usize = 32;

impl ResumedConfigs {
    pub(super) fn new(template: ClientConfig, tickets: Arc<ClientTickets>) -> Self {
        Self {
            template,
            tickets,
            pool: Mutex::new(Vec::new()),
        }
    }

    pub(super) fn tickets(&self) -> &Arc<ClientTickets> {
        &self.tickets
    }

    /// A config for one connection to `server` that resumes with a ticket taken now, if one
    /// is held.
    pub(super) fn lend(&self, server: &ServerName<'static>) -> Option<Arc<ClientConfig>> {
        let ticket = self.tickets.take_tls13_ticket(server)?;
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        // Only the pool holds it: no connection uses it, and none can get it but through
        // this lock.
        if let Some(free) = pool.iter().find(|l| Arc::strong_count(&l.config) == 1) {
            free.ticket.set(ticket);
            return Some(Arc::clone(&free.config));
        }
        let store = Arc::new(OneTicket::new(Arc::clone(&self.tickets)));
        store.set(ticket);
        let mut config = self.template.clone();
        config.resumption = Resumption::store(Arc::clone(&store) as Arc<dyn ClientSessionStore>)
            .tls12_resumption(Tls12Resumption::Disabled);
        let config = Arc::new(config);
        if pool.len() < RESUMED_CONFIGS {
            pool.push(Lendable {
                config: Arc::clone(&config),
                ticket: store,
            });
        }
        Some(config)
    }

    #[cfg(test)]
    pub(super) fn pooled(&self) -> usize {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl fmt::Debug for ResumedConfigs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResumedConfigs")
            .field("pooled", &self.pool.lock().map_or(0, |p| p.len()))
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for OneTicket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OneTicket").finish_non_exhaustive()
    }
}

impl ClientSessionStore for OneTicket {
    fn set_kx_hint(&self, _: ServerName<'static>, _: NamedGroup) {}

    fn kx_hint(&self, _: &ServerName<'_>) -> Option<NamedGroup> {
        None
    }

    fn set_tls12_session(&self, _: ServerName<'static>, _: Tls12ClientSessionValue) {}

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.shared.insert_tls13_ticket(server_name, value);
    }

    fn take_tls13_ticket(&self, _: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        self.ticket.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl fmt::Debug for ClientTickets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        f.debug_struct("ClientTickets")
            .field("servers", &state.tickets.len())
            .finish_non_exhaustive()
    }
}

impl ClientSessionStore for ClientTickets {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        let mut state = self.state();
        if state.hints.len() >= SERVERS && !state.hints.contains_key(&server_name) {
            state.hints.clear();
        }
        state.hints.insert(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.state().hints.get(server_name).copied()
    }

    fn set_tls12_session(&self, _: ServerName<'static>, _: Tls12ClientSessionValue) {}

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        let now = Instant::now();
        let mut state = self.state();
        if state.tickets.len() >= SERVERS && !state.tickets.contains_key(&server_name) {
            let rules = &self.rules;
            state.tickets.retain(|_, q| {
                q.retain(|t| rules.fresh(t, now));
                !q.is_empty()
            });
            if state.tickets.len() >= SERVERS {
                state.tickets.clear();
            }
        }
        let queue = state.tickets.entry(server_name).or_default();
        if queue.len() >= TICKETS_PER_SERVER {
            queue.pop_front();
        }
        queue.push_back(self.rules.stamp(value, now));
    }

    /// The newest ticket that is still fresh; stale ones met on the way are dropped.
    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        let now = Instant::now();
        let mut state = self.state();
        let queue = state.tickets.get_mut(server_name)?;
        let mut found = None;
        while let Some(ticket) = queue.pop_back() {
            if self.rules.fresh(&ticket, now) {
                found = Some(ticket.value);
                break;
            }
        }
        if queue.is_empty() {
            state.tickets.remove(server_name);
        }
        found
    }
}
