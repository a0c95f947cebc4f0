//! Per-connection keys derived from an established mesh session (`tuning.connectionKeys:
//! derived`; ARCHITECTURE.md "Session resumption between agents", "Derived connection keys").
//!
//! Why: a resumed handshake still costs each agent an X25519 exchange, a full key schedule and
//! a round trip per app connection. Here both agents keep a secret exported from one mesh
//! handshake (RFC 8446 §7.5, own label) and a new app connection opens with a short header
//! instead of a ClientHello; its two traffic secrets are expanded from (that secret, the
//! header's counter), so each connection is still its own TLS 1.3 record stream (own keys,
//! sequence numbers from 0) that the kernel or [`crate::relay::record`] carries.
//!
//! What it gives up: a connection's keys follow from the stored secret alone, with no fresh
//! key exchange, so whoever learns that secret (either agent's memory while it lives) can
//! decrypt every connection derived from it: `psk_ke`'s secrecy, i.e. a pooled proxy's. So a
//! root is bounded ([`Binding::expires`], [`Binding::max_connections`]) on both ends and
//! erased when retired ([`Store::retire_expired`]): a stolen one reads minutes and a capped
//! number of connections, where a busy pooled connection's keys read all its streams.
//!
//! Every derivation is HKDF-Expand-Label (RFC 8446 §7.1) with the negotiated suite's hash:
//!
//! ```text
//! root    = TLS-Exporter("EXPORTER-interceptor-connection-keys/1", "", Hash.length)
//! id      = Expand-Label(root, "ikd id", "", 16)          // names the root on the wire
//! hdr_key = Expand-Label(root, "ikd header", "", Hash.length)
//! conn    = Expand-Label(root, "ikd conn", counter, Hash.length)   // counter: u64 BE
//! c_ap    = Expand-Label(conn, "c ap traffic", "", Hash.length)    // client → server
//! s_ap    = Expand-Label(conn, "s ap traffic", "", Hash.length)    // server → client
//! key, iv = Expand-Label(c_ap | s_ap, "key" | "iv", "", ...)       // as RFC 8446 §7.3
//! accept  = Expand-Label(conn, "ikd accept", "", 16)
//! header  = magic (4) | id (16) | counter (8) | Expand-Label(hdr_key, "ikd mac", magic|id|counter, 16)
//! ```
//!
//! The server answers an accepted header with `accept` (16 bytes, in clear: it proves the
//! server holds the root, and tells the client its app's bytes may follow); a refused one with
//! a reset, after which the client's agent dials again with a TLS handshake.

use std::{
    collections::{BTreeSet, HashMap, HashSet, VecDeque},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rustls::{
    ConnectionTrafficSecrets, ExtractedSecrets, NamedGroup, SupportedCipherSuite, Tls13CipherSuite,
    crypto::tls13::{HkdfExpander, OkmBlock},
};

use crate::identity::SpiffeId;

/// The exporter label both agents derive the root with.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-interceptor-connection-keys/1";
/// First bytes of a derived connection: 0xd1 is no TLS content type and no ASCII (so neither a
/// ClientHello nor an app's plaintext protocol starts this way), then "ik", then the version.
pub const MAGIC: [u8; 4] = [0xd1, b'i', b'k', 1];
const ID_LEN: usize = 16;
const MAC_LEN: usize = 16;
/// Bytes of the header a derived connection starts with.
pub const HEADER_LEN: usize = MAGIC.len() + ID_LEN + 8 + MAC_LEN;
/// Bytes of the server's acceptance.
pub const ACCEPT_LEN: usize = 16;
/// Out-of-order counters the server still accepts behind the highest one seen (connections
/// dialed concurrently may arrive in another order than their counters). 64 was too few: a
/// sustained run at two client threads and load 15 saw one header arrive more than 64
/// counters late (the other thread had made 64 connections on the same root meanwhile, ~45 ms
/// at its rate), refused as a replay and dialed again (bench/README.md "Sustained churn after
/// the first-use race fix"). 256 covers a stall four times as long for 40 bytes per root.
pub const REPLAY_WINDOW: u64 = 256;
/// Bitmap words of a [`ReplayWindow`].
const WINDOW_WORDS: usize = (REPLAY_WINDOW / 64) as usize;
/// Roots a server keeps per local identity (one per mesh handshake, until it expires);
/// beyond it the oldest goes. A client keeps one per server address.
pub const SERVER_CAPACITY: usize = 4096;
/// Server addresses a client stops trying for a lifetime after a fresh root was refused (the
/// peer agent does not keep roots: it runs `connectionKeys: handshake`, or an older version).
const CLIENT_CAPACITY: usize = 4096;

/// HKDF-Expand-Label (RFC 8446 §7.1) into `out`; `None` only for an output longer than HKDF
/// gives (never for the lengths here).
fn expand_label(
    exp: &dyn HkdfExpander,
    label: &[u8],
    context: &[u8],
    out: &mut [u8],
) -> Option<()> {
    // Lengths here are all constants far below their fields' limits.
    let len = u16::try_from(out.len()).unwrap_or(u16::MAX).to_be_bytes();
    let label_len = [u8::try_from(6 + label.len()).unwrap_or(u8::MAX)];
    let context_len = [u8::try_from(context.len()).unwrap_or(u8::MAX)];
    let info: [&[u8]; 6] = [&len, &label_len, b"tls13 ", label, &context_len, context];
    exp.expand_slice(&info, out).ok()
}

/// [`expand_label`] to one hash-length block.
fn expand_block(exp: &dyn HkdfExpander, label: &[u8], context: &[u8]) -> Option<OkmBlock> {
    let mut buf = [0u8; OkmBlock::MAX_LEN];
    let n = exp.hash_len().min(OkmBlock::MAX_LEN);
    let done = expand_label(exp, label, context, &mut buf[..n]);
    let block = OkmBlock::new(&buf[..n]);
    zeroize::Zeroize::zeroize(&mut buf);
    done.map(|()| block)
}

/// The secret one mesh handshake left both agents, set up for expansion.
pub struct Root {
    suite: &'static Tls13CipherSuite,
    id: [u8; ID_LEN],
    root: Box<dyn HkdfExpander>,
    header: Box<dyn HkdfExpander>,
}

impl std::fmt::Debug for Root {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("Root")
            .field("suite", &self.suite.common.suite)
            .field("id", &hex(&self.id))
            .finish_non_exhaustive()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One connection's keys and its wire header, from [`Root::connection`].
pub struct ConnectionKeys {
    /// What the client sends first.
    pub header: [u8; HEADER_LEN],
    /// What the server answers an accepted header with.
    pub accept: [u8; ACCEPT_LEN],
    /// Client → server traffic keys.
    pub client: ConnectionTrafficSecrets,
    /// Server → client traffic keys.
    pub server: ConnectionTrafficSecrets,
}

impl ConnectionKeys {
    /// Both directions as one end uses them, sequence numbers from 0.
    pub fn secrets(self, is_client: bool) -> ExtractedSecrets {
        self.secrets_after(is_client, 0)
    }

    /// [`ConnectionKeys::secrets`] for an end that has already sent `sent` records (the
    /// client's early data, [`ConnectionKeys::seal_early`]).
    pub fn secrets_after(self, is_client: bool, sent: u64) -> ExtractedSecrets {
        let (tx, rx) = if is_client {
            (self.client, self.server)
        } else {
            (self.server, self.client)
        };
        ExtractedSecrets {
            tx: (sent, tx),
            rx: (0, rx),
        }
    }

    /// Appends the client's record number `seq` (client → server keys) carrying `plain` (at
    /// most [`EARLY_MAX`] bytes) to `out`: the app's first bytes, sent behind the header
    /// instead of a round trip later. A TLS 1.3 application_data record exactly as the
    /// kernel or `relay::record` seals it, so the server reads it as its record `seq` with
    /// no special case. `None` for an empty or oversized `plain`.
    pub fn seal_early(&self, seq: u64, plain: &[u8], out: &mut Vec<u8>) -> Option<()> {
        use aws_lc_rs::aead;
        if plain.is_empty() || plain.len() > EARLY_MAX {
            return None;
        }
        let (alg, key, iv) = match &self.client {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return None,
        };
        let key = aead::LessSafeKey::new(aead::UnboundKey::new(alg, key.as_ref()).ok()?);
        // RFC 8446 §5.3: the sequence number, big-endian and left-padded, XORed into the IV.
        let mut nonce = [0u8; aead::NONCE_LEN];
        nonce.copy_from_slice(iv.as_ref().get(..aead::NONCE_LEN)?);
        for (n, s) in nonce[aead::NONCE_LEN - 8..]
            .iter_mut()
            .zip(seq.to_be_bytes())
        {
            *n ^= s;
        }
        let nonce = aead::Nonce::assume_unique_for_key(nonce);
        // Inner plaintext: the data, then its real content type (RFC 8446 §5.2).
        let body_len = plain.len() + 1 + alg.tag_len();
        let len = u16::try_from(body_len).ok()?.to_be_bytes();
        let header = [23, 3, 3, len[0], len[1]];
        let start = out.len();
        out.extend_from_slice(&header);
        out.extend_from_slice(plain);
        out.push(23);
        let mut body = out.split_off(start + header.len());
        let sealed = key.seal_in_place_append_tag(nonce, aead::Aad::from(header), &mut body);
        if sealed.is_err() {
            out.truncate(start);
            return None;
        }
        out.append(&mut body);
        Some(())
    }
}

/// The most app bytes a client sends behind its header before the server's acceptance: one
/// TLS record's plaintext (RFC 8446 §5.1). The agent keeps a copy of them until then.
pub const EARLY_MAX: usize = 16384;

impl Root {
    /// Sets up a root from the exporter output `secret` of a session on `suite` (a TLS 1.3
    /// suite; its hash is the derivations'). `None` for a TLS 1.2 suite.
    pub fn new(suite: SupportedCipherSuite, secret: &[u8]) -> Option<Root> {
        let suite = suite.tls13()?;
        let root = suite.hkdf_provider.expander_for_okm(&OkmBlock::new(secret));
        let mut id = [0u8; ID_LEN];
        expand_label(root.as_ref(), b"ikd id", &[], &mut id)?;
        let header = expand_block(root.as_ref(), b"ikd header", &[])?;
        let header = suite.hkdf_provider.expander_for_okm(&header);
        Some(Root {
            suite,
            id,
            root,
            header,
        })
    }

    /// The suite whose hash and AEAD every derived connection uses.
    pub fn suite(&self) -> SupportedCipherSuite {
        SupportedCipherSuite::Tls13(self.suite)
    }

    /// How the wire names this root.
    pub fn id(&self) -> [u8; ID_LEN] {
        self.id
    }

    fn mac(&self, signed: &[u8]) -> Option<[u8; MAC_LEN]> {
        let mut mac = [0u8; MAC_LEN];
        expand_label(self.header.as_ref(), b"ikd mac", signed, &mut mac)?;
        Some(mac)
    }

    /// Connection `counter`'s header, acceptance and traffic keys; `None` if the suite's
    /// AEAD is one whose keys rustls cannot hand out (none of the mesh suites).
    pub fn connection(&self, counter: u64) -> Option<ConnectionKeys> {
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&MAGIC);
        header[4..4 + ID_LEN].copy_from_slice(&self.id);
        header[4 + ID_LEN..HEADER_LEN - MAC_LEN].copy_from_slice(&counter.to_be_bytes());
        let mac = self.mac(&header[..HEADER_LEN - MAC_LEN])?;
        header[HEADER_LEN - MAC_LEN..].copy_from_slice(&mac);
        let hkdf = self.suite.hkdf_provider;
        let conn = expand_block(self.root.as_ref(), b"ikd conn", &counter.to_be_bytes())?;
        let conn = hkdf.expander_for_okm(&conn);
        let mut accept = [0u8; ACCEPT_LEN];
        expand_label(conn.as_ref(), b"ikd accept", &[], &mut accept)?;
        let traffic = |label: &[u8]| {
            let secret = hkdf.expander_for_okm(&expand_block(conn.as_ref(), label, &[])?);
            let key = rustls::internal::derive_traffic_key(secret.as_ref(), self.suite.aead_alg);
            let iv = rustls::internal::derive_traffic_iv(secret.as_ref());
            self.suite.aead_alg.extract_keys(key, iv).ok()
        };
        Some(ConnectionKeys {
            header,
            accept,
            client: traffic(b"c ap traffic")?,
            server: traffic(b"s ap traffic")?,
        })
    }
}

/// A parsed header: which root, which connection. The MAC is checked against the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub id: [u8; ID_LEN],
    pub counter: u64,
    mac: [u8; MAC_LEN],
}

impl Header {
    /// Parses the first [`HEADER_LEN`] bytes of a derived connection.
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Result<Header, Refused> {
        if bytes[..4] != MAGIC {
            return Err(Refused::Malformed);
        }
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&bytes[4..4 + ID_LEN]);
        let mut counter = [0u8; 8];
        counter.copy_from_slice(&bytes[4 + ID_LEN..HEADER_LEN - MAC_LEN]);
        let mut mac = [0u8; MAC_LEN];
        mac.copy_from_slice(&bytes[HEADER_LEN - MAC_LEN..]);
        Ok(Header {
            id,
            counter: u64::from_be_bytes(counter),
            mac,
        })
    }

    fn signed(&self) -> [u8; HEADER_LEN - MAC_LEN] {
        let mut b = [0u8; HEADER_LEN - MAC_LEN];
        b[..4].copy_from_slice(&MAGIC);
        b[4..4 + ID_LEN].copy_from_slice(&self.id);
        b[4 + ID_LEN..].copy_from_slice(&self.counter.to_be_bytes());
        b
    }
}

/// Whether `bytes` (a peeked prefix) starts like a derived connection: `Some(true)` once the
/// magic is all there, `None` while a prefix of it is, `Some(false)` otherwise.
pub fn starts_derived(bytes: &[u8]) -> Option<bool> {
    let n = bytes.len().min(MAGIC.len());
    if bytes[..n] != MAGIC[..n] {
        Some(false)
    } else if n == MAGIC.len() {
        Some(true)
    } else {
        None
    }
}

/// Why the server refused a header; the client then dials again with a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("not a derived-connection header of this version")]
    Malformed,
    #[error("no such mesh session here (restarted, evicted, or never made)")]
    Unknown,
    #[error("the mesh session expired")]
    Expired,
    #[error("the policy changed since the mesh session was made")]
    Generation,
    #[error("the peer certificate of the mesh session is no longer valid")]
    PeerExpired,
    #[error("header MAC does not verify")]
    BadMac,
    #[error("connection counter already used or out of the replay window")]
    Replayed,
}

impl Refused {
    /// A short stable name for counters.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::Malformed => "malformed",
            Refused::Unknown => "unknown",
            Refused::Expired => "expired",
            Refused::Generation => "generation",
            Refused::PeerExpired => "peer_expired",
            Refused::BadMac => "bad_mac",
            Refused::Replayed => "replayed",
        }
    }
}

/// Counters seen for one root: the highest and a bitmap of the [`REPLAY_WINDOW`] below it (bit
/// `n` of the whole map: the counter `n` behind the highest; word 0 holds the newest).
#[derive(Debug, Default, Clone, Copy)]
pub struct ReplayWindow {
    top: u64,
    seen: [u64; WINDOW_WORDS],
}

impl ReplayWindow {
    /// Records `counter`; false if it was seen or is too far behind (or 0, never issued).
    pub fn accept(&mut self, counter: u64) -> bool {
        if counter == 0 {
            return false;
        }
        if counter > self.top {
            self.advance(counter - self.top);
            self.seen[0] |= 1;
            self.top = counter;
            return true;
        }
        let behind = self.top - counter;
        if behind >= REPLAY_WINDOW {
            return false;
        }
        // Both below WINDOW_WORDS and 64: `behind` is below REPLAY_WINDOW.
        let (word, bit) = ((behind / 64) as usize, 1u64 << (behind % 64));
        if self.seen[word] & bit != 0 {
            return false;
        }
        self.seen[word] |= bit;
        true
    }

    /// Moves every seen counter `by` further behind the top; those past the window fall off.
    fn advance(&mut self, by: u64) {
        if by >= REPLAY_WINDOW {
            self.seen = [0; WINDOW_WORDS];
            return;
        }
        let (words, bits) = ((by / 64) as usize, (by % 64) as u32);
        // From the oldest word down, each reads only words at or below its own index, which
        // are not yet rewritten.
        for j in (0..WINDOW_WORDS).rev() {
            let word = |i: Option<usize>| i.map_or(0, |i| self.seen[i]);
            let high = word(j.checked_sub(words));
            let low = word(j.checked_sub(words + 1));
            self.seen[j] = if bits == 0 {
                high
            } else {
                (high << bits) | (low >> (64 - bits))
            };
        }
    }
}

/// What a root is bound to besides its secret; a connection derived from it gets the same.
#[derive(Debug, Clone)]
pub struct Binding {
    /// The peer identity the handshake verified.
    pub peer: SpiffeId,
    /// The handshake's key-exchange group: a derived connection's keys descend from it, so
    /// the crypto policy judges it as the connection's.
    pub group: Option<NamedGroup>,
    /// The peer leaf's notAfter, Unix seconds: no connection is derived past it.
    pub peer_not_after: u64,
    /// The notAfter of the leaf this end presented, Unix seconds: no connection is derived
    /// past it either. Why it matters: the store outlives a renewal of this end's leaf
    /// ([`Stores`]), so a root made under the replaced leaf is still offered and accepted
    /// here; the peer refuses it once that leaf has expired (its `peer_not_after`), and
    /// checking it here too ends the root without that refused connection.
    pub own_not_after: u64,
    /// The policy generation the handshake was decided under.
    pub generation: u64,
    /// When the root stops being used (monotonic): `tuning.derivedRootLifetimeSecs` after
    /// its handshake.
    pub expires: Instant,
    /// The highest counter derived from it (`tuning.derivedRootMaxConnections`); the
    /// connection after makes a new root with a handshake.
    pub max_connections: u64,
}

impl Binding {
    fn refuses(&self, generation: u64, now: Instant, unix_now: u64) -> Option<Refused> {
        if now >= self.expires {
            Some(Refused::Expired)
        } else if generation != self.generation {
            Some(Refused::Generation)
        } else if unix_now >= self.peer_not_after {
            Some(Refused::PeerExpired)
        } else if unix_now >= self.own_not_after {
            Some(Refused::Expired)
        } else {
            None
        }
    }
}

struct ServerEntry {
    root: Arc<Root>,
    binding: Binding,
    window: ReplayWindow,
}

/// A connection the server accepted.
pub struct Accepted {
    pub keys: ConnectionKeys,
    pub suite: SupportedCipherSuite,
    pub peer: SpiffeId,
    pub group: Option<NamedGroup>,
}

struct ClientEntry {
    root: Arc<Root>,
    binding: Binding,
    /// The last counter used.
    used: u64,
}

/// A connection the client may open with a derived header.
pub struct Offer {
    pub keys: ConnectionKeys,
    pub suite: SupportedCipherSuite,
    pub peer: SpiffeId,
    pub group: Option<NamedGroup>,
    /// The root's first connection: a refusal then means the peer does not keep roots.
    pub first: bool,
}

/// One local identity's roots, as server (by id) and as client (by server address), and what
/// its client side learned of each server address (keeps roots, refuses them). Held by that
/// identity's credentials and handed on to the next ones when only the leaf is renewed
/// ([`Stores`]); a new bundle, signer or crypto policy starts one with no roots.
#[derive(Default)]
pub struct Store {
    server: Mutex<ServerRoots>,
    client: Mutex<HashMap<IpAddr, ClientEntry>>,
    /// Server addresses that refused a fresh root, until when.
    refusing: Mutex<HashMap<IpAddr, Instant>>,
    /// Server addresses that have accepted a root of this store since their last refused first
    /// use: their
    /// agent keeps roots, so a refused first use there means the root was lost (a restart, a
    /// new leaf), not an agent that keeps none ([`Store::refused`]).
    keeping: Mutex<HashSet<IpAddr>>,
    /// Server handshakes under way that may leave a root ([`Store::expect_root`]).
    in_flight: Mutex<InFlight>,
    /// Woken whenever one of them settles (kept its root, or will keep none).
    settled: tokio::sync::Notify,
}

/// The server's roots by id, and their ids in the order they were kept: every root has the
/// same lifetime (`derivedRootLifetimeSecs`), so the front is the oldest and the first to
/// expire, and a full store evicts it without a scan.
#[derive(Default)]
struct ServerRoots {
    by_id: HashMap<[u8; ID_LEN], ServerEntry>,
    /// May hold ids already gone from `by_id` (refused, retired): skipped when met, and
    /// dropped whenever it grows past twice the capacity.
    order: VecDeque<[u8; ID_LEN]>,
}

impl ServerRoots {
    fn insert(&mut self, id: [u8; ID_LEN], entry: ServerEntry) {
        while self.by_id.len() >= SERVER_CAPACITY {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.by_id.remove(&oldest);
        }
        if self.order.len() >= 2 * SERVER_CAPACITY {
            self.compact();
        }
        self.order.push_back(id);
        self.by_id.insert(id, entry);
    }

    fn compact(&mut self) {
        let by_id = &self.by_id;
        self.order.retain(|id| by_id.contains_key(id));
    }
}

/// Server handshakes that have begun and not yet settled, by the sequence number each got.
#[derive(Default)]
struct InFlight {
    next: u64,
    pending: BTreeSet<u64>,
}

/// A server handshake that may leave a root, from its ClientHello until it keeps the root
/// ([`ExpectedRoot::keep`]) or is dropped (failed, refused, or a connection whose client keeps
/// no root): a header naming a root this store does not know yet waits for it
/// ([`Store::accept_after_handshakes`]).
pub struct ExpectedRoot<'s> {
    store: &'s Store,
    seq: u64,
}

impl ExpectedRoot<'_> {
    /// Keeps the root this handshake made; only then does the handshake count as settled.
    pub fn keep(self, root: Root, binding: Binding) {
        self.store.keep_server(root, binding);
    }
}

impl Drop for ExpectedRoot<'_> {
    fn drop(&mut self) {
        self.store
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pending
            .remove(&self.seq);
        self.store.settled.notify_waiters();
    }
}

/// The root store of each local identity, across renewals of its leaf.
///
/// Why a renewal keeps the store: nothing of a root depends on the leaf this agent presented.
/// The root is an exporter secret of a handshake's key schedule; the leaf only authenticated
/// that handshake, as it authenticates the session of an open flow, which a renewal does not
/// end either (a renewal replaces a leaf that is still valid; it revokes nothing). What a root
/// is bound to ([`Binding`]) is the peer's identity and leaf, the policy generation, the crypto
/// policy (judged per connection) and its own bounds; the replaced leaf's notAfter is one of
/// them too (`own_not_after`), so no root outlives the leaf it was made under. A store that
/// started empty at every renewal instead lost roots the peer still used (one refused
/// connection each), and worse: a server handshake that straddled the renewal kept its root
/// in the replaced store, where no header finds it (its first use refused, 2–5 per renewal in
/// the soak), and a client lost its record of which servers keep roots.
///
/// What starts a new store: new CA material (another signer or trust bundle: the peer of a
/// root was verified against the old one) or a new crypto policy, i.e. another leaf
/// generation ([`Stores::for_leaf`]'s `generation`). Its roots start empty; what the client
/// learned of server addresses (keeps roots, refuses them) carries over.
#[derive(Default)]
pub struct Stores {
    /// Each identity's store and the leaf generation it was made for; weak, so a store lives
    /// exactly as long as credentials (or flows) that hold it.
    current: Mutex<HashMap<SpiffeId, (u64, std::sync::Weak<Store>)>>,
    /// Every store made and still alive, for the sweep: a replaced generation's store lives
    /// while a flow holds its credentials.
    all: Mutex<Vec<std::sync::Weak<Store>>>,
}

impl Stores {
    /// The store for new credentials of `id` minted under leaf generation `generation`: the
    /// one its current credentials hold when that is the same generation (a renewal), else a
    /// new, empty one.
    pub fn for_leaf(&self, id: &SpiffeId, generation: u64) -> Arc<Store> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((made_for, store)) = current.get(id)
            && *made_for == generation
            && let Some(store) = store.upgrade()
        {
            return store;
        }
        // What the client learned of its servers is about their agents, not about this leaf
        // or its trust material: it carries over to the new generation's store, so a CA or
        // crypto policy change here at the moment a server lost its roots cannot make that
        // server look like one that keeps none.
        let store = Arc::new(
            current
                .get(id)
                .and_then(|(_, s)| s.upgrade())
                .map_or_else(Store::default, |previous| previous.peers_only()),
        );
        current.retain(|_, (_, s)| s.strong_count() > 0);
        current.insert(id.clone(), (generation, Arc::downgrade(&store)));
        let mut all = self.all.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|s| s.strong_count() > 0);
        all.push(Arc::downgrade(&store));
        store
    }

    /// Every store still alive, each once.
    pub fn live(&self) -> Vec<Arc<Store>> {
        self.all
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect()
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Store {
    /// A new store with no roots that knows what this one learned of server addresses: which
    /// keep roots, which refuse them (see [`Stores::for_leaf`]).
    fn peers_only(&self) -> Store {
        Store {
            refusing: Mutex::new(
                self.refusing
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
            ),
            keeping: Mutex::new(
                self.keeping
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
            ),
            ..Store::default()
        }
    }

    /// Keeps a root the server side of a handshake made; a full store drops its oldest root
    /// (in constant time: see [`ServerRoots`]).
    pub fn keep_server(&self, root: Root, binding: Binding) {
        let mut server = self.server.lock().unwrap_or_else(|p| p.into_inner());
        let id = root.id();
        server.insert(
            id,
            ServerEntry {
                root: Arc::new(root),
                binding,
                window: ReplayWindow::default(),
            },
        );
    }

    /// Registers a server handshake that is about to begin (before its first answer, so before
    /// its client can hold the root it may leave). Why: the client's agent keeps its root as
    /// soon as it has sent its Finished and may offer it on another connection at once; this
    /// agent keeps its own only after reading that Finished and deciding policy. A header that
    /// arrives in between names a root not kept yet; refused, the client would fall back and,
    /// for a root's first use, take this agent for one that keeps no roots.
    pub fn expect_root(&self) -> ExpectedRoot<'_> {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let seq = in_flight.next;
        in_flight.next += 1;
        in_flight.pending.insert(seq);
        ExpectedRoot { store: self, seq }
    }

    /// [`Store::accept`], except that a header naming an unknown root waits (at most
    /// `limit`) for every server handshake that had begun when it arrived to settle, and is
    /// decided again each time one does: the root it names may be one of theirs, kept a
    /// moment later (see [`Store::expect_root`]). Handshakes begun after it cannot have made
    /// its root, so a header of a truly unknown root waits at most for the handshakes then
    /// under way. The flag says whether it waited.
    pub async fn accept_after_handshakes(
        &self,
        header: &[u8; HEADER_LEN],
        generation: u64,
        limit: Duration,
    ) -> (Result<Accepted, Refused>, bool) {
        let horizon = self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next;
        let deadline = tokio::time::Instant::now() + limit;
        let mut waited = false;
        loop {
            let settled = self.settled.notified();
            tokio::pin!(settled);
            // Registered before the checks: a handshake that settles after them wakes it.
            settled.as_mut().enable();
            // Read before the lookup: a root kept in between is found by the lookup.
            let pending = self.pending_before(horizon);
            match self.accept(header, generation) {
                Err(Refused::Unknown) if pending => {}
                decided => return (decided, waited),
            }
            waited = true;
            if tokio::time::timeout_at(deadline, settled).await.is_err() {
                return (self.accept(header, generation), waited);
            }
        }
    }

    /// Whether a server handshake that began before `horizon` is still under way.
    fn pending_before(&self, horizon: u64) -> bool {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pending
            .first()
            .is_some_and(|&seq| seq < horizon)
    }

    /// Decides a header under policy generation `generation`: the connection's keys, or why
    /// not. A root that can no longer be used is dropped.
    pub fn accept(&self, header: &[u8; HEADER_LEN], generation: u64) -> Result<Accepted, Refused> {
        self.accept_at(header, generation, Instant::now(), unix_now())
    }

    fn accept_at(
        &self,
        header: &[u8; HEADER_LEN],
        generation: u64,
        now: Instant,
        unix_now: u64,
    ) -> Result<Accepted, Refused> {
        let header = Header::parse(header)?;
        let (root, peer) = {
            let mut server = self.server.lock().unwrap_or_else(|p| p.into_inner());
            let server = &mut server.by_id;
            let entry = server.get_mut(&header.id).ok_or(Refused::Unknown)?;
            if let Some(refused) = entry.binding.refuses(generation, now, unix_now) {
                server.remove(&header.id);
                return Err(refused);
            }
            let mac = entry.root.mac(&header.signed()).ok_or(Refused::BadMac)?;
            if !constant_eq(&mac, &header.mac) {
                return Err(Refused::BadMac);
            }
            // Past its connection budget the root is spent, as if expired: the client
            // should not have asked, so the root goes here too.
            if header.counter > entry.binding.max_connections {
                server.remove(&header.id);
                return Err(Refused::Expired);
            }
            if !entry.window.accept(header.counter) {
                return Err(Refused::Replayed);
            }
            (Arc::clone(&entry.root), entry.binding.clone())
        };
        Ok(Accepted {
            keys: root.connection(header.counter).ok_or(Refused::BadMac)?,
            suite: root.suite(),
            peer: peer.peer,
            group: peer.group,
        })
    }

    /// Keeps a root the client side of a handshake to `server` made (the one before goes).
    pub fn keep_client(&self, server: IpAddr, root: Root, binding: Binding) {
        let mut client = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if client.len() >= CLIENT_CAPACITY && !client.contains_key(&server) {
            let now = Instant::now();
            client.retain(|_, e| e.binding.expires > now);
            if client.len() >= CLIENT_CAPACITY {
                return;
            }
        }
        client.insert(
            server,
            ClientEntry {
                root: Arc::new(root),
                binding,
                used: 0,
            },
        );
    }

    /// The next derived connection to `server`, which must prove `expected`, under policy
    /// generation `generation`; `None` if there is no usable root (dial with a handshake).
    pub fn offer(&self, server: IpAddr, expected: &SpiffeId, generation: u64) -> Option<Offer> {
        self.offer_at(server, expected, generation, Instant::now(), unix_now())
    }

    fn offer_at(
        &self,
        server: IpAddr,
        expected: &SpiffeId,
        generation: u64,
        now: Instant,
        unix_now: u64,
    ) -> Option<Offer> {
        let (root, counter, group) = {
            let mut client = self.client.lock().unwrap_or_else(|p| p.into_inner());
            let entry = client.get_mut(&server)?;
            if entry.binding.refuses(generation, now, unix_now).is_some()
                || entry.binding.peer != *expected
                || entry.used >= entry.binding.max_connections
            {
                client.remove(&server);
                return None;
            }
            entry.used += 1;
            (Arc::clone(&entry.root), entry.used, entry.binding.group)
        };
        Some(Offer {
            keys: root.connection(counter)?,
            suite: root.suite(),
            peer: expected.clone(),
            group,
            first: counter == 1,
        })
    }

    /// The server accepted a derived connection: its agent keeps roots.
    pub fn accepted(&self, server: IpAddr) {
        let mut keeping = self.keeping.lock().unwrap_or_else(|p| p.into_inner());
        if keeping.len() < CLIENT_CAPACITY || keeping.contains(&server) {
            keeping.insert(server);
        }
    }

    /// The server refused `offer`: its root is dropped, and after a refused first use the
    /// address is not offered derived connections for `lifetime` (its agent keeps no roots),
    /// unless that agent had accepted one of this store's roots since its last refused first
    /// use: then it lost its roots (it restarted, or its leaf was renewed and its store
    /// started empty, after the client kept this root and before its first use), and one
    /// more root is tried.
    /// Without that second chance one renewal of the server's leaf at the wrong moment made
    /// every connection a handshake for `lifetime` (the soak found it). An agent that keeps
    /// no roots costs one more refused connection, once.
    pub fn refused(&self, server: IpAddr, offer_was_first: bool, lifetime: Duration) {
        self.client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&server);
        // Only a refused first use spends the second chance: the refusal of a used root
        // says the server lost its roots, and the handshake after it may still end in the
        // lost store (one that began under the server's old leaf keeps its root there), so
        // its root's first use may be refused too (the soak saw exactly that pair).
        if offer_was_first
            && !self
                .keeping
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&server)
        {
            let mut refusing = self.refusing.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if refusing.len() >= CLIENT_CAPACITY {
                refusing.retain(|_, until| *until > now);
            }
            if refusing.len() < CLIENT_CAPACITY {
                refusing.insert(server, now + lifetime);
            }
        }
    }

    /// Whether the client should keep a root for `server` (false while its agent is known to
    /// refuse them).
    pub fn wants_client_root(&self, server: IpAddr) -> bool {
        let mut refusing = self.refusing.lock().unwrap_or_else(|p| p.into_inner());
        match refusing.get(&server) {
            Some(until) if *until > Instant::now() => false,
            Some(_) => {
                refusing.remove(&server);
                true
            }
            None => true,
        }
    }

    /// Drops every root past its lifetime or its connection budget, and every lapsed
    /// refusal; returns how many roots went. Expired roots are otherwise only noticed when
    /// used, so without this an idle agent would keep them in memory long after: run
    /// periodically (`Shared::renew_due`). A dropped root is erased: its two keys live in
    /// aws-lc's HKDF PRKs, which zeroize on drop.
    pub fn retire_expired(&self) -> usize {
        self.retire_at(Instant::now())
    }

    fn retire_at(&self, now: Instant) -> usize {
        let mut retired = 0;
        {
            let mut server = self.server.lock().unwrap_or_else(|p| p.into_inner());
            let before = server.by_id.len();
            server
                .by_id
                .retain(|_, e| e.binding.expires > now && e.window.top < e.binding.max_connections);
            retired += before - server.by_id.len();
            server.compact();
        }
        {
            let mut client = self.client.lock().unwrap_or_else(|p| p.into_inner());
            let before = client.len();
            client.retain(|_, e| e.binding.expires > now && e.used < e.binding.max_connections);
            retired += before - client.len();
        }
        self.refusing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, until| *until > now);
        retired
    }

    /// Roots held (server side, client side): for tests and the admin view.
    pub fn len(&self) -> (usize, usize) {
        (
            self.server
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .by_id
                .len(),
            self.client.lock().unwrap_or_else(|p| p.into_inner()).len(),
        )
    }
}

/// Compares two secrets in time independent of where they differ (aws-lc's comparison: a
/// hand-written fold may be turned into an early exit by the optimiser).
pub fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn suite() -> SupportedCipherSuite {
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256
    }

    fn root(byte: u8) -> Root {
        Root::new(suite(), &[byte; 32]).unwrap()
    }

    fn binding(generation: u64) -> Binding {
        Binding {
            peer: "spiffe://cluster.local/ns/default/sa/server"
                .parse()
                .unwrap(),
            group: Some(NamedGroup::X25519),
            peer_not_after: unix_now() + 3600,
            own_not_after: unix_now() + 3600,
            generation,
            expires: Instant::now() + Duration::from_secs(300),
            max_connections: u64::MAX,
        }
    }

    fn key_bytes(s: &ConnectionTrafficSecrets) -> (Vec<u8>, Vec<u8>) {
        match s {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                (key.as_ref().to_vec(), iv.as_ref().to_vec())
            }
            _ => unreachable!(),
        }
    }

    /// The derivation, written out from RFC 8446's HKDF-Expand-Label with aws-lc's HMAC
    /// directly, gives the same id, header, acceptance and keys: a second implementation to
    /// catch a wrong label, length or context.
    #[test]
    fn derivation_matches_an_independent_hkdf_expand_label() {
        use aws_lc_rs::hmac;
        fn expand(prk: &[u8], label: &[u8], ctx: &[u8], len: usize) -> Vec<u8> {
            let mut info = Vec::new();
            info.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
            info.push(u8::try_from(6 + label.len()).unwrap());
            info.extend_from_slice(b"tls13 ");
            info.extend_from_slice(label);
            info.push(u8::try_from(ctx.len()).unwrap());
            info.extend_from_slice(ctx);
            // One block is enough for every length here (≤ 32).
            info.push(1);
            let key = hmac::Key::new(hmac::HMAC_SHA256, prk);
            hmac::sign(&key, &info).as_ref()[..len].to_vec()
        }
        let secret = [7u8; 32];
        let r = Root::new(suite(), &secret).unwrap();
        assert_eq!(r.id().to_vec(), expand(&secret, b"ikd id", &[], 16));
        let hdr_key = expand(&secret, b"ikd header", &[], 32);
        let counter = 0x0102_0304_0506_0708u64;
        let k = r.connection(counter).unwrap();
        assert_eq!(&k.header[..4], &MAGIC);
        assert_eq!(&k.header[4..20], &r.id());
        assert_eq!(&k.header[20..28], &counter.to_be_bytes());
        assert_eq!(
            k.header[28..].to_vec(),
            expand(&hdr_key, b"ikd mac", &k.header[..28], 16)
        );
        let conn = expand(&secret, b"ikd conn", &counter.to_be_bytes(), 32);
        assert_eq!(k.accept.to_vec(), expand(&conn, b"ikd accept", &[], 16));
        for (label, got) in [
            (&b"c ap traffic"[..], &k.client),
            (b"s ap traffic", &k.server),
        ] {
            let ts = expand(&conn, label, &[], 32);
            let (key, iv) = key_bytes(got);
            assert_eq!(key, expand(&ts, b"key", &[], 16));
            assert_eq!(iv, expand(&ts, b"iv", &[], 12));
        }
        // Fixed vectors (computed with Python's hmac module), so a change of any constant
        // shows: counter 1's header and client key.
        let one = r.connection(1).unwrap();
        assert_eq!(
            hex(&one.header),
            "d1696b01d47c970c2740818b713014db72fa81bf0000000000000001f3af7bfa77cc1e4ce86f1ba19b751f07"
        );
        assert_eq!(
            hex(&key_bytes(&one.client).0),
            "90f6866b5a1ca90396bbd77a72be6d2d"
        );
        assert_ne!(key_bytes(&k.client), key_bytes(&k.server));
        assert_ne!(
            key_bytes(&r.connection(1).unwrap().client),
            key_bytes(&r.connection(2).unwrap().client)
        );
    }

    /// The client's early records open with the server's keys in the relay's own record
    /// layer (a second implementation of the record format) as its records 0 and 1, and the
    /// client continues after them; under another counter's keys they do not open.
    #[test]
    fn early_records_are_the_servers_first_records() {
        use crate::relay::record::{Opened, RecordLayer};
        let early: [&[u8]; 2] = [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"second write"];
        for suite in [
            rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
            rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
            rustls::crypto::aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            let len = suite.tls13().unwrap().common.hash_provider.output_len();
            let r = Root::new(suite, &[3u8; 48][..len]).unwrap();
            let client = r.connection(7).unwrap();
            let mut wire = b"prefix".to_vec();
            client.seal_early(0, early[0], &mut wire).unwrap();
            assert_eq!(&wire[..6], b"prefix", "appended");
            let mut first = wire.split_off(6);
            let mut second = Vec::new();
            client.seal_early(1, early[1], &mut second).unwrap();
            assert_eq!(&first[..3], &[23, 3, 3]);
            assert!(
                !first.windows(early[0].len()).any(|w| w == early[0]),
                "in clear"
            );
            let mut wrong =
                RecordLayer::new(r.connection(8).unwrap().secrets(false), false).unwrap();
            assert!(
                wrong.open(&mut first.clone()).is_err(),
                "another counter's keys"
            );
            let mut server =
                RecordLayer::new(r.connection(7).unwrap().secrets(false), false).unwrap();
            assert!(server.open(&mut second.clone()).is_err(), "out of order");
            for (record, plain) in [(&mut first, early[0]), (&mut second, early[1])] {
                assert_eq!(server.open(record).unwrap(), Opened::Data(plain.len()));
                assert_eq!(&record[5..5 + plain.len()], plain);
            }
            assert_eq!(server.rx_seq(), 2);
            let after = RecordLayer::new(client.secrets_after(true, 2), true).unwrap();
            assert_eq!(after.tx_seq(), 2, "the client's next record is 2");
        }
        let k = root(1).connection(1).unwrap();
        let mut out = Vec::new();
        assert!(k.seal_early(0, &[], &mut out).is_none());
        assert!(
            k.seal_early(0, &vec![0u8; EARLY_MAX + 1], &mut out)
                .is_none()
        );
        assert!(out.is_empty());
        assert!(k.seal_early(0, &vec![0u8; EARLY_MAX], &mut out).is_some());
        assert_eq!(out.len(), 5 + EARLY_MAX + 1 + 16);
    }

    #[test]
    fn header_parse_round_trips_and_refuses_other_bytes() {
        let k = root(1).connection(42).unwrap();
        let h = Header::parse(&k.header).unwrap();
        assert_eq!(h.counter, 42);
        assert_eq!(h.id, root(1).id());
        let mut bad = k.header;
        bad[3] = 2;
        assert_eq!(Header::parse(&bad), Err(Refused::Malformed));
        assert_eq!(starts_derived(&[0xd1, b'i']), None);
        assert_eq!(starts_derived(&k.header), Some(true));
        assert_eq!(starts_derived(b"GET / HTTP/1.1"), Some(false));
        assert_eq!(starts_derived(&[22, 3, 1]), Some(false));
    }

    #[test]
    fn replay_window_refuses_repeats_and_the_too_old() {
        let mut w = ReplayWindow::default();
        assert!(!w.accept(0), "counters start at 1");
        assert!(w.accept(1));
        assert!(!w.accept(1));
        assert!(w.accept(3));
        assert!(w.accept(2), "out of order inside the window");
        assert!(!w.accept(2));
        assert!(w.accept(1000));
        assert!(!w.accept(1000 - REPLAY_WINDOW), "behind the window");
        assert!(w.accept(1000 - REPLAY_WINDOW + 1));
        assert!(!w.accept(3), "far behind");
        assert!(w.accept(5000));
        assert!(!w.accept(5000));
    }

    /// The window is as wide as [`REPLAY_WINDOW`] says, at every word boundary: a counter
    /// 200 behind (which a 64-counter window refused: the `replayed` fallback of a loaded
    /// sustained run) is accepted once, the last one inside is accepted, the first outside
    /// refused; and against a plain set of every counter seen, any order of counters gets the
    /// same answers. Fails on a narrower window or a bit lost across a word when it shifts.
    #[test]
    fn replay_window_is_256_wide_and_exact_across_words() {
        assert_eq!(REPLAY_WINDOW, 256);
        let mut w = ReplayWindow::default();
        assert!(w.accept(1000));
        assert!(w.accept(800), "200 behind");
        assert!(!w.accept(800));
        assert!(w.accept(1000 - 255), "the oldest inside");
        assert!(!w.accept(1000 - 256), "the newest outside");
        assert!(w.accept(1063) && w.accept(1064) && w.accept(1129));
        assert!(!w.accept(800) && !w.accept(1000) && !w.accept(1064));
        assert!(w.accept(1001) && w.accept(999));

        // A reference model: a counter is accepted iff it is new and fewer than the window
        // behind the highest seen before it.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let mut w = ReplayWindow::default();
        let mut seen = HashSet::new();
        let mut top = 0u64;
        for _ in 0..200_000 {
            // Mostly near the top, sometimes jumps of up to three windows, sometimes far back.
            let counter = match next(10) {
                0 => top + 1 + next(3 * REPLAY_WINDOW),
                1 => top.saturating_sub(next(4 * REPLAY_WINDOW)),
                _ => (top + 8).saturating_sub(next(REPLAY_WINDOW + 16)),
            };
            let model = counter > 0
                && !seen.contains(&counter)
                && (counter > top || top - counter < REPLAY_WINDOW);
            assert_eq!(w.accept(counter), model, "counter {counter}, top {top}");
            if model {
                seen.insert(counter);
                top = top.max(counter);
            }
        }
    }

    /// Client and server derive the same keys; the server refuses a replay, a bad MAC, an
    /// unknown id, a changed generation, an expired root and an expired peer leaf.
    #[test]
    fn the_server_accepts_each_counter_once_under_its_binding() {
        let (client, server) = (Store::default(), Store::default());
        let addr: IpAddr = "10.0.0.2".parse().unwrap();
        let peer = binding(5).peer;
        server.keep_server(root(9), binding(5));
        client.keep_client(addr, root(9), binding(5));
        let offer = client.offer(addr, &peer, 5).unwrap();
        assert!(offer.first);
        let header = offer.keys.header;
        let accepted = server.accept(&header, 5).unwrap();
        assert_eq!(accepted.keys.accept, offer.keys.accept);
        assert_eq!(accepted.peer, peer);
        let c = offer.keys.secrets(true);
        let s = accepted.keys.secrets(false);
        assert_eq!(key_bytes(&c.tx.1), key_bytes(&s.rx.1));
        assert_eq!(key_bytes(&c.rx.1), key_bytes(&s.tx.1));
        assert_eq!((c.tx.0, c.rx.0), (0, 0));
        assert_eq!(
            server.accept(&header, 5).err(),
            Some(Refused::Replayed),
            "a replayed header"
        );
        let second = client.offer(addr, &peer, 5).unwrap();
        assert!(!second.first);
        let mut forged = second.keys.header;
        forged[27] ^= 1; // another counter under the old MAC
        assert_eq!(server.accept(&forged, 5).err(), Some(Refused::BadMac));
        let mut unknown = second.keys.header;
        unknown[4] ^= 1;
        assert_eq!(server.accept(&unknown, 5).err(), Some(Refused::Unknown));
        assert!(server.accept(&second.keys.header, 5).is_ok());
        // A policy reload: the server drops the root, the client stops offering it.
        let third = client.offer(addr, &peer, 5).unwrap();
        assert_eq!(
            server.accept(&third.keys.header, 6).err(),
            Some(Refused::Generation)
        );
        assert_eq!(
            server.accept(&third.keys.header, 5).err(),
            Some(Refused::Unknown)
        );
        assert!(client.offer(addr, &peer, 6).is_none());
        assert_eq!(client.len(), (0, 0));

        // Expiry (monotonic) and the peer leaf's notAfter, on both sides.
        server.keep_server(root(10), binding(5));
        client.keep_client(addr, root(10), binding(5));
        let later = Instant::now() + Duration::from_secs(301);
        assert!(client.offer_at(addr, &peer, 5, later, unix_now()).is_none());
        client.keep_client(addr, root(10), binding(5));
        let o = client.offer(addr, &peer, 5).unwrap();
        assert_eq!(
            server.accept_at(&o.keys.header, 5, later, unix_now()).err(),
            Some(Refused::Expired)
        );
        server.keep_server(root(10), binding(5));
        let o = client.offer(addr, &peer, 5).unwrap();
        assert_eq!(
            server
                .accept_at(&o.keys.header, 5, Instant::now(), unix_now() + 7200)
                .err(),
            Some(Refused::PeerExpired)
        );
        // Another expected server identity at the address: no offer.
        client.keep_client(addr, root(11), binding(5));
        let other: SpiffeId = "spiffe://cluster.local/ns/default/sa/other"
            .parse()
            .unwrap();
        assert!(client.offer(addr, &other, 5).is_none());
    }

    /// A root serves `max_connections` connections on both ends, then the client asks for
    /// a handshake and the server refuses a counter past it (a client that ignored the
    /// budget); the periodic sweep drops spent and expired roots on both ends and keeps the
    /// live ones. Fails if either end ignores the budget or the sweep keeps a dead root.
    #[test]
    fn a_root_is_retired_after_its_connection_budget_or_lifetime() {
        let (client, server) = (Store::default(), Store::default());
        let addr: IpAddr = "10.0.0.4".parse().unwrap();
        let peer = binding(5).peer;
        let capped = || Binding {
            max_connections: 3,
            ..binding(5)
        };
        server.keep_server(root(20), capped());
        client.keep_client(addr, root(20), capped());
        for counter in 1..=3u64 {
            let offer = client.offer(addr, &peer, 5).expect("within the budget");
            assert_eq!(&offer.keys.header[20..28], &counter.to_be_bytes());
            assert!(server.accept(&offer.keys.header, 5).is_ok(), "{counter}");
        }
        assert!(
            client.offer(addr, &peer, 5).is_none(),
            "the budget is spent"
        );
        assert_eq!(client.len(), (0, 0), "the spent root is gone on the client");
        // A fourth counter made anyway (a client with a larger budget): refused, root gone.
        let over = root(20).connection(4).unwrap();
        assert_eq!(server.accept(&over.header, 5).err(), Some(Refused::Expired));
        assert_eq!(server.len(), (0, 0));

        // The sweep: one spent and one expired root on each end go, a live one stays.
        let short = || Binding {
            expires: Instant::now() + Duration::from_secs(10),
            ..binding(5)
        };
        server.keep_server(root(21), capped());
        server.keep_server(root(22), short());
        server.keep_server(root(23), binding(5));
        for counter in 1..=3 {
            let h = root(21).connection(counter).unwrap().header;
            assert!(server.accept(&h, 5).is_ok());
        }
        let other: IpAddr = "10.0.0.5".parse().unwrap();
        let third: IpAddr = "10.0.0.6".parse().unwrap();
        client.keep_client(addr, root(21), capped());
        for _ in 0..3 {
            assert!(client.offer(addr, &peer, 5).is_some());
        }
        client.keep_client(other, root(22), short());
        client.keep_client(third, root(23), binding(5));
        let refusing: IpAddr = "10.0.0.7".parse().unwrap();
        client.refused(refusing, true, Duration::from_secs(10));
        assert_eq!((server.len().0, client.len().1), (3, 3));
        assert!(!client.wants_client_root(refusing));
        let later = Instant::now() + Duration::from_secs(11);
        assert_eq!(server.retire_at(later), 2);
        assert_eq!(client.retire_at(later), 2);
        assert_eq!((server.len().0, client.len().1), (1, 1));
        assert!(
            client.wants_client_root(refusing),
            "a lapsed refusal goes too"
        );
        let live = root(23).connection(1).unwrap().header;
        assert!(
            server.accept(&live, 5).is_ok(),
            "the live root still serves"
        );
        assert!(client.offer(third, &peer, 5).is_some());
    }

    #[test]
    fn a_refused_first_offer_stops_offers_to_that_address() {
        let client = Store::default();
        let addr: IpAddr = "10.0.0.3".parse().unwrap();
        assert!(client.wants_client_root(addr));
        client.keep_client(addr, root(1), binding(1));
        client.refused(addr, false, Duration::from_secs(60));
        assert!(client.wants_client_root(addr), "a later refusal: retry");
        client.refused(addr, true, Duration::from_secs(60));
        assert!(!client.wants_client_root(addr));
    }

    /// A renewal of the local leaf (same leaf generation) hands the identity's store on: a
    /// server handshake that began under the old leaf and keeps its root after the renewal is
    /// found by a header decided under the new one (even one that overtook it and waits), the
    /// client still knows the server keeps roots (a refused first use there gets its second
    /// chance), and the roots kept before are still offered and accepted. New CA material or
    /// crypto policy (another generation) starts without roots but with what the client
    /// learned of its servers; another identity starts empty. With a store per leaf, as
    /// before session 15, the header is refused `Unknown` and the second chance is lost.
    #[tokio::test]
    async fn a_renewed_leaf_keeps_its_roots_and_what_the_client_learned() {
        let stores = Stores::default();
        let me: SpiffeId = "spiffe://cluster.local/ns/default/sa/server"
            .parse()
            .unwrap();
        let old = stores.for_leaf(&me, 3);
        let addr: IpAddr = "10.0.0.9".parse().unwrap();
        let peer = binding(5).peer;
        // Before the renewal: a root kept each way, a server that keeps roots, and a
        // handshake under way on the old leaf.
        old.keep_server(root(50), binding(5));
        old.keep_client(addr, root(51), binding(5));
        old.accepted(addr);
        let straddling = old.expect_root();
        // The leaf is renewed; the old credentials live on in the handshake's task.
        let new = stores.for_leaf(&me, 3);
        assert!(Arc::ptr_eq(&old, &new), "a renewal keeps the store");
        let header = root(52).connection(1).unwrap().header;
        let current = Arc::clone(&new);
        let waiting = tokio::spawn(async move {
            current
                .accept_after_handshakes(&header, 5, Duration::from_secs(30))
                .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        straddling.keep(root(52), binding(5));
        drop(old);
        let (accepted, waited) = waiting.await.unwrap();
        assert!(accepted.is_ok() && waited, "{:?}", accepted.err());
        let kept_before = root(50).connection(1).unwrap().header;
        assert!(new.accept(&kept_before, 5).is_ok());
        assert!(new.offer(addr, &peer, 5).is_some(), "the client's root too");
        new.refused(addr, true, Duration::from_secs(60));
        assert!(
            new.wants_client_root(addr),
            "the server was known to keep roots: a second chance"
        );

        // New material or crypto policy: no roots, the old store left to its holders; what
        // the client learned of its servers carries over.
        new.accepted(addr);
        let rootless: IpAddr = "10.0.0.10".parse().unwrap();
        new.refused(rootless, true, Duration::from_secs(60));
        let next = stores.for_leaf(&me, 4);
        assert!(!Arc::ptr_eq(&new, &next));
        assert_eq!(next.len(), (0, 0));
        let kept_before = root(50).connection(2).unwrap().header;
        assert_eq!(next.accept(&kept_before, 5).err(), Some(Refused::Unknown));
        assert!(
            !next.wants_client_root(rootless),
            "still known to keep none"
        );
        next.refused(addr, true, Duration::from_secs(60));
        assert!(
            next.wants_client_root(addr),
            "still known to keep roots: a second chance"
        );
        assert_eq!(
            stores.live().len(),
            2,
            "the sweep still reaches the old one"
        );
        drop(new);
        assert_eq!(stores.live().len(), 1);
        let other: SpiffeId = "spiffe://cluster.local/ns/default/sa/other"
            .parse()
            .unwrap();
        let theirs = stores.for_leaf(&other, 4);
        assert!(!Arc::ptr_eq(&theirs, &next), "each identity its own");
        assert!(Arc::ptr_eq(&stores.for_leaf(&me, 4), &next));
        // A store no credentials hold any more is not revived: the next leaf starts empty.
        drop(next);
        assert_eq!(stores.for_leaf(&me, 4).len(), (0, 0));
    }

    /// A root ends with the leaf this end presented at its handshake as with the peer's: a
    /// store kept across renewals still holds roots made under a replaced leaf, and past that
    /// leaf's notAfter the client no longer offers one and the server refuses it.
    #[test]
    fn a_root_ends_with_the_local_leaf_it_was_made_under() {
        let (client, server) = (Store::default(), Store::default());
        let addr: IpAddr = "10.0.0.8".parse().unwrap();
        let peer = binding(5).peer;
        let leaf_ends = || Binding {
            own_not_after: unix_now() + 60,
            ..binding(5)
        };
        server.keep_server(root(60), leaf_ends());
        client.keep_client(addr, root(60), leaf_ends());
        let later = unix_now() + 61;
        assert!(
            client
                .offer_at(addr, &peer, 5, Instant::now(), later)
                .is_none()
        );
        let header = root(60).connection(1).unwrap().header;
        assert_eq!(
            server.accept_at(&header, 5, Instant::now(), later).err(),
            Some(Refused::Expired)
        );
    }

    /// A server that has accepted a root lost it (restart, new leaf) when it refuses the next
    /// root's first use: one more root is tried, and only a second refused first use in a row
    /// stops offers. An acceptance in between starts over.
    #[test]
    fn a_server_that_kept_roots_gets_a_second_chance() {
        let client = Store::default();
        let addr: IpAddr = "10.0.0.3".parse().unwrap();
        let lifetime = Duration::from_secs(60);
        client.accepted(addr);
        client.refused(addr, true, lifetime);
        assert!(
            client.wants_client_root(addr),
            "a lost root, not a server without roots"
        );
        client.accepted(addr);
        client.refused(addr, true, lifetime);
        assert!(client.wants_client_root(addr), "accepted since: again");
        // A used root refused (the server lost its store), then the fallback's root refused
        // at its first use (its handshake kept it in the lost store): still a second chance.
        client.accepted(addr);
        client.refused(addr, false, lifetime);
        client.refused(addr, true, lifetime);
        assert!(
            client.wants_client_root(addr),
            "a refused used root spends no chance"
        );
        client.refused(addr, true, lifetime);
        assert!(
            !client.wants_client_root(addr),
            "two refused first uses in a row"
        );
        // Another address's history is its own.
        let other: IpAddr = "10.0.0.4".parse().unwrap();
        client.accepted(addr);
        client.refused(other, true, lifetime);
        assert!(!client.wants_client_root(other));
    }

    /// What a store keeps does not grow with the connections it has derived: one root per
    /// peer on each side, however many counters were used (the sustained-churn workload makes
    /// hundreds of thousands per root), and every counter still accepted exactly once.
    #[test]
    fn stores_hold_one_root_per_peer_however_many_connections() {
        let (client, server) = (Store::default(), Store::default());
        let addr: IpAddr = "10.0.0.4".parse().unwrap();
        let peer = binding(1).peer;
        server.keep_server(root(7), binding(1));
        client.keep_client(addr, root(7), binding(1));
        for n in 1..=20_000u64 {
            let offer = client.offer(addr, &peer, 1).unwrap();
            assert_eq!(Header::parse(&offer.keys.header).unwrap().counter, n);
            let accepted = server.accept(&offer.keys.header, 1).unwrap();
            assert_eq!(accepted.keys.accept, offer.keys.accept);
            assert_eq!(
                server.accept(&offer.keys.header, 1).err(),
                Some(Refused::Replayed)
            );
        }
        assert_eq!(server.len(), (1, 0));
        assert_eq!(client.len(), (0, 1));
        // Each live root holds one: the top and the window's bits, nothing else.
        assert_eq!(
            std::mem::size_of::<ReplayWindow>(),
            8 + usize::try_from(REPLAY_WINDOW / 8).unwrap()
        );
    }

    /// A full store evicts the oldest root it kept, one per insert, and only it; ids that
    /// went otherwise (refused, retired) are skipped without evicting a live root. Fails if
    /// the store grows past its bound or evicts anything but the oldest.
    #[test]
    fn the_server_store_is_bounded_and_evicts_the_oldest() {
        let server = Store::default();
        let root_n = |i: u64| Root::new(suite(), &i.to_be_bytes().repeat(4)).unwrap();
        let cap = SERVER_CAPACITY as u64;
        for i in 0..cap + 10 {
            server.keep_server(root_n(i), binding(1));
        }
        assert_eq!(server.len().0, SERVER_CAPACITY);
        // A fresh counter each time, so only a missing root can refuse it.
        let counter = std::cell::Cell::new(0u64);
        let usable = |i: u64| {
            counter.set(counter.get() + 1);
            let h = root_n(i).connection(counter.get()).unwrap().header;
            server.accept(&h, 1).is_ok()
        };
        assert!(!usable(9), "the 10 oldest went");
        assert!(usable(10), "the 11th oldest stays");
        // Root 11 goes otherwise (a policy reload): the next insert fills its place, the one
        // after evicts the oldest live root (10), the one after that skips 11's stale place
        // and evicts 12, and only it.
        let h = root_n(11).connection(1).unwrap().header;
        assert_eq!(server.accept(&h, 2).err(), Some(Refused::Generation));
        server.keep_server(root_n(cap + 10), binding(1));
        assert!(usable(10), "a free place: nothing evicted");
        server.keep_server(root_n(cap + 11), binding(1));
        assert!(!usable(10) && usable(12));
        server.keep_server(root_n(cap + 12), binding(1));
        assert_eq!(server.len().0, SERVER_CAPACITY);
        assert!(!usable(12) && usable(13) && usable(cap + 12));
        // Many refused roots do not make the order queue grow without bound.
        for i in cap + 12..4 * cap {
            server.keep_server(root_n(i), binding(1));
        }
        let roots = server.server.lock().unwrap();
        assert_eq!(roots.by_id.len(), SERVER_CAPACITY);
        assert!(roots.order.len() <= 2 * SERVER_CAPACITY);
    }

    /// The first-use race: the client's agent keeps its root when it has sent its Finished,
    /// the server's only after reading it and deciding policy. A header naming that root which
    /// arrives in between waits for the handshake under way and is accepted once it keeps the
    /// root; without the wait it is `Unknown` (and the client would take this server for one
    /// that keeps no roots). A header of a root no handshake under way makes is still refused,
    /// after at most those handshakes, and a handshake begun after the header is not awaited.
    #[tokio::test]
    async fn a_header_overtaking_its_roots_handshake_waits_for_it() {
        let server = Arc::new(Store::default());
        let header = root(40).connection(1).unwrap().header;
        let expected = server.expect_root();
        let s = Arc::clone(&server);
        let waiting = tokio::spawn(async move {
            s.accept_after_handshakes(&header, 5, Duration::from_secs(30))
                .await
        });
        // The handshake reads the client's Finished, decides policy, keeps its root.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "decided before the root was kept");
        expected.keep(root(40), binding(5));
        let (accepted, waited) = waiting.await.unwrap();
        assert!(accepted.is_ok() && waited, "{:?}", accepted.err());

        // An unknown root: refused once the handshakes under way settle without it.
        let unknown = root(41).connection(1).unwrap().header;
        let (a, b) = (server.expect_root(), server.expect_root());
        let s = Arc::clone(&server);
        let waiting = tokio::spawn(async move {
            s.accept_after_handshakes(&unknown, 5, Duration::from_secs(30))
                .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // A handshake begun after the header, still under way, is not waited for.
        let later = server.expect_root();
        a.keep(root(42), binding(5));
        drop(b);
        let (refused, _) = waiting.await.unwrap();
        assert_eq!(refused.err(), Some(Refused::Unknown));
        drop(later);

        // Nothing under way: decided at once, no wait.
        let (refused, waited) = server
            .accept_after_handshakes(&unknown, 5, Duration::from_secs(30))
            .await;
        assert_eq!((refused.err(), waited), (Some(Refused::Unknown), false));
        // A handshake that never settles bounds the wait by the limit.
        let _stuck = server.expect_root();
        let (refused, waited) = server
            .accept_after_handshakes(&unknown, 5, Duration::from_millis(20))
            .await;
        assert_eq!((refused.err(), waited), (Some(Refused::Unknown), true));
    }
}
