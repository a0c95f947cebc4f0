//! The table of open flows behind `interceptor flows`: what each connection is, who the peer
//! proved to be, how it is encrypted, and live byte counts.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use crate::relay::RelayStats;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

/// How a flow's bytes are protected on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protection {
    /// mTLS with records encrypted by the kernel.
    Ktls,
    /// mTLS with records encrypted by rustls in the agent.
    Userspace,
    /// No TLS from the agent (non-mesh peer, or policy said so).
    Plaintext,
}

#[derive(Debug, Clone)]
pub struct FlowInfo {
    pub pod: String,
    pub direction: Direction,
    /// Outbound: where the app connected; inbound: the pod address the client reached.
    pub destination: SocketAddr,
    /// Outbound: the app socket; inbound: the client.
    pub source: SocketAddr,
    pub peer_id: Option<String>,
    pub cipher: Option<String>,
    pub protection: Protection,
}

/// One row of `interceptor flows --json`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct FlowRow {
    pub id: u64,
    pub pod: String,
    pub direction: Direction,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub peer_id: Option<String>,
    pub cipher: Option<String>,
    pub protection: Protection,
    pub bytes_to_peer: u64,
    pub bytes_from_peer: u64,
    /// A recently closed flow (listed with `--all`).
    #[serde(default)]
    pub closed: bool,
}

/// How many closed flows `interceptor flows --all` still shows.
const RECENT: usize = 256;

#[derive(Debug, Default)]
pub struct FlowTable {
    next: AtomicU64,
    flows: Mutex<BTreeMap<u64, (FlowInfo, Arc<RelayStats>)>>,
    /// The last closed flows with their final counts: short connections (a curl) are gone
    /// before anyone can list them, yet operators and the demo want to see how they went.
    recent: Mutex<std::collections::VecDeque<FlowRow>>,
}

/// Removes its flow from the table when the connection ends, however it ends.
pub struct FlowGuard<'a> {
    table: &'a FlowTable,
    id: u64,
    pub stats: Arc<RelayStats>,
}

impl Drop for FlowGuard<'_> {
    fn drop(&mut self) {
        let Some(entry) = self.table.lock().remove(&self.id) else {
            return;
        };
        let mut row = row(self.id, &entry);
        row.closed = true;
        let mut recent = self.table.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(row);
    }
}

fn row(id: u64, (i, c): &(FlowInfo, Arc<RelayStats>)) -> FlowRow {
    FlowRow {
        id,
        pod: i.pod.clone(),
        direction: i.direction,
        source: i.source,
        destination: i.destination,
        peer_id: i.peer_id.clone(),
        cipher: i.cipher.clone(),
        protection: i.protection,
        bytes_to_peer: c.bytes_app_to_peer(),
        bytes_from_peer: c.bytes_peer_to_app(),
        closed: false,
    }
}

impl FlowTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, (FlowInfo, Arc<RelayStats>)>> {
        // A panic while holding the lock cannot leave the map inconsistent (single insert or
        // remove), so a poisoned lock is still usable.
        self.flows.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, info: FlowInfo) -> FlowGuard<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let stats = RelayStats::new();
        self.lock().insert(id, (info, Arc::clone(&stats)));
        FlowGuard {
            table: self,
            id,
            stats,
        }
    }

    /// Updates a flow once the handshake has told us who the peer is.
    pub fn update(&self, id: u64, f: impl FnOnce(&mut FlowInfo)) {
        if let Some((info, _)) = self.lock().get_mut(&id) {
            f(info);
        }
    }

    /// Open flows.
    pub fn rows(&self) -> Vec<FlowRow> {
        self.lock().iter().map(|(id, e)| row(*id, e)).collect()
    }

    /// Recently closed flows, oldest first, then the open ones.
    pub fn rows_with_recent(&self) -> Vec<FlowRow> {
        let mut rows: Vec<FlowRow> = self
            .recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        rows.extend(self.rows());
        rows
    }
}

impl FlowGuard<'_> {
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// The human table.
pub fn render(rows: &[FlowRow]) -> String {
    use std::fmt::Write as _;
    let mut s = format!(
        "{:<16} {:<8} {:<24} {:<48} {:<12} {:<10} {:>12} {:>12}\n",
        "POD", "DIR", "DESTINATION", "PEER", "CIPHER", "MODE", "BYTES_OUT", "BYTES_IN"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<16} {:<8} {:<24} {:<48} {:<12} {:<10} {:>12} {:>12}",
            r.pod,
            match r.direction {
                Direction::Outbound => "out",
                Direction::Inbound => "in",
            },
            r.destination.to_string(),
            r.peer_id.as_deref().unwrap_or("-"),
            r.cipher.as_deref().unwrap_or("-"),
            match r.protection {
                Protection::Ktls => "ktls",
                Protection::Userspace => "userspace",
                Protection::Plaintext => "plaintext",
            },
            r.bytes_to_peer,
            r.bytes_from_peer
        );
    }
    s
}
