//! Heap allocations a resumed mesh offer costs the connection path: counted by this test
//! binary's allocator on the calling thread, while `MeshClient::offer` chooses the config of
//! the next connection and the connection is built from it (the ClientHello included).
//! A resumed offer lends a config that a previous connection gave back, so choosing it
//! allocates nothing once the pool holds one; what remains is rustls' own connection.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use interceptor::{
    ca::{Ca, CertificateAuthority as _, DEFAULT_LEAF_TTL},
    handshake::{
        CryptoPolicy, MeshCrypto, MeshSuite, SessionResumption, mesh_client_with, mesh_roots,
        server_config_with,
    },
    identity::TrustDomain,
};
use rustls::{ClientConnection, Connection, ServerConnection, pki_types::ServerName};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is passed to the system allocator unchanged; the counter is a
// thread-local `Cell` (no allocation, no lock).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's layout, as `GlobalAlloc::alloc` requires.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: as for `dealloc` and `alloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

fn transfer(from: &mut Connection, to: &mut Connection) {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).unwrap();
    }
    let mut rest = &buf[..];
    while !rest.is_empty() {
        to.read_tls(&mut rest).unwrap();
        to.process_new_packets().unwrap();
    }
}

#[test]
fn a_resumed_offer_allocates_nothing_once_a_config_is_back() {
    let td: TrustDomain = "cluster.local".parse().unwrap();
    let ca = Ca::generate(&td).unwrap();
    let roots = mesh_roots(ca.roots()).unwrap();
    let client_leaf = ca
        .issue(
            &"spiffe://cluster.local/ns/a/sa/client".parse().unwrap(),
            DEFAULT_LEAF_TTL,
        )
        .unwrap();
    let server_id = "spiffe://cluster.local/ns/b/sa/server".parse().unwrap();
    let server_leaf = ca.issue(&server_id, DEFAULT_LEAF_TTL).unwrap();
    let crypto = MeshCrypto::new(
        CryptoPolicy::default(),
        &[MeshSuite::Aes128Gcm, MeshSuite::Aes256Gcm],
    )
    .unwrap();
    let rules = SessionResumption::new(Duration::from_secs(60), Arc::new(AtomicU64::new(1)));
    let mc = mesh_client_with(
        &client_leaf,
        Arc::clone(&roots),
        &td,
        &server_id,
        &crypto,
        &rules,
    )
    .unwrap();
    let server = server_config_with(&server_leaf, roots, &td, &crypto, &rules).unwrap();
    let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)).into());

    const ROUNDS: u64 = 50;
    let (mut choosing, mut building) = (Vec::new(), Vec::new());
    for round in 0..=ROUNDS {
        let before = allocations();
        let offer = mc.offer(&name);
        let chosen = allocations();
        let mut c: Connection = ClientConnection::new(offer.config, name.clone())
            .unwrap()
            .into();
        let built = allocations();
        assert_eq!(offer.resuming, round > 0, "round {round}");
        if round > 1 {
            // Round 1 fills the pool; from round 2 on a config comes back each time.
            choosing.push(chosen - before);
            building.push(built - chosen);
        }
        let mut s: Connection = ServerConnection::new(Arc::clone(&server)).unwrap().into();
        while c.is_handshaking() || s.is_handshaking() || s.wants_write() {
            transfer(&mut c, &mut s);
            transfer(&mut s, &mut c);
        }
        assert_eq!(
            (c.handshake_kind(), round > 0),
            (
                Some(if round > 0 {
                    rustls::HandshakeKind::Resumed
                } else {
                    rustls::HandshakeKind::Full
                }),
                round > 0
            )
        );
    }
    let per = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len() as f64;
    eprintln!(
        "allocations per resumed connection: choosing the offer {:.1}, building the \
         connection {:.1} ({} rounds)",
        per(&choosing),
        per(&building),
        choosing.len()
    );
    assert!(
        choosing.iter().all(|n| *n == 0),
        "a resumed offer allocated: {choosing:?}"
    );
}
