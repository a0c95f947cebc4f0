//! A fake Kubernetes API server for the Kubernetes-mode tests: no real one can be installed
//! on the development and CI machines, so this one speaks the list/watch wire protocol the
//! agent's watchers use, over plain HTTP/1.1 on loopback:
//!
//! * LIST of a collection (`GET /api/v1/pods`, `/apis/GROUP/VERSION/PLURAL`) answers a
//!   `<Kind>List` with `metadata.resourceVersion`; `limit` pages it with a `continue` token
//!   that is served from a snapshot of that resource version, and `410 Gone` (HTTP status and
//!   a `Status` body, reason `Expired`) once that version was compacted.
//! * WATCH (`?watch=true&resourceVersion=N`) answers a chunked stream of
//!   `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":...}` lines: every event after
//!   N, then live ones; `allowWatchBookmarks` gets BOOKMARK events; `timeoutSeconds` ends
//!   the stream. A version older than the compaction point gets an ERROR event carrying a
//!   `Status` of code 410 (what a real server sends), or, in [`Faults::watch_gone_as_http`]
//!   mode, an HTTP 410.
//! * `fieldSelector` on `spec.nodeName` (`=`, `==`, `!=`) and `metadata.name`/`namespace`.
//! * Faults: [`FakeApiServer::drop_streams`] cuts every open connection mid-stream,
//!   [`FakeApiServer::go_down`] / [`FakeApiServer::come_up`] stop listening (closing all
//!   connections) and listen again on the same port, which stays bound in between so nothing
//!   else takes it, [`FakeApiServer::compact`] forgets the event history (the next resume
//!   gets 410 and the client must list again), [`FakeApiServer::send_gone`] sends an ERROR
//!   410 event on every open watch.
//!
//! Custom resources are served in the versions [`FakeApiServer::serve_versions`] lists (the
//! object's `apiVersion` is rewritten to the requested one, as conversion would); others are
//! 404, as for a CRD that is not installed.

use std::{
    collections::{BTreeMap, HashMap},
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::Path,
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// A collection the server knows: `(group, plural)`; the core group is `""`.
type Collection = (String, String);

/// One stored event.
#[derive(Clone)]
struct Stored {
    rv: u64,
    collection: Collection,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    /// Current objects by collection, then `namespace/name`.
    objects: BTreeMap<Collection, BTreeMap<String, Value>>,
    /// Every event since the compaction point.
    history: Vec<Stored>,
    /// Versions at or below this are gone.
    compacted: u64,
    /// Snapshots that paged lists continue from, by resource version.
    snapshots: HashMap<u64, BTreeMap<Collection, Vec<Value>>>,
    /// Served versions of custom resources by `(group, plural)`.
    served: BTreeMap<Collection, Vec<String>>,
    /// Bumped by `drop_streams`/`send_gone`/`restart`: open streams notice and act.
    cut: u64,
    gone: u64,
    /// Every request line, for assertions.
    requests: Vec<String>,
    faults: Faults,
    uid: u64,
}

/// Behaviours tests switch on.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Answer a watch from a compacted version with HTTP 410 instead of an ERROR event.
    pub watch_gone_as_http: bool,
    /// Largest page a list returns, whatever `limit` says (0: as asked).
    pub max_page: usize,
    /// Lists wait while this is set (the client is connected, but not synced).
    pub stall_lists: bool,
    /// The next this many `continue` requests get `410 Gone`, as when the version a paged
    /// list started from was compacted between two pages.
    pub expire_continues: usize,
}

struct Shared {
    inner: Mutex<Inner>,
    changed: Condvar,
    stop: AtomicBool,
    /// Open connections, closed by `drop_streams` and `restart`.
    conns: Mutex<Vec<TcpStream>>,
}

/// The server; stops (closing every connection) when dropped.
pub struct FakeApiServer {
    addr: SocketAddr,
    /// Bound for the server's whole life, listening only while it is up (see
    /// [`Self::go_down`]).
    listener: TcpListener,
    shared: Arc<Shared>,
    accept: Mutex<Option<thread::JoinHandle<()>>>,
}

const CORE: &[(&str, &str)] = &[
    ("pods", "Pod"),
    ("namespaces", "Namespace"),
    ("services", "Service"),
];

fn kind_of(group: &str, plural: &str) -> Option<&'static str> {
    match (group, plural) {
        ("", p) => CORE.iter().find(|(c, _)| *c == p).map(|(_, k)| *k),
        ("discovery.k8s.io", "endpointslices") => Some("EndpointSlice"),
        ("security.istio.io", "peerauthentications") => Some("PeerAuthentication"),
        ("security.istio.io", "authorizationpolicies") => Some("AuthorizationPolicy"),
        ("networking.istio.io", "destinationrules") => Some("DestinationRule"),
        _ => None,
    }
}

fn collection_of(object: &Value) -> Collection {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let group = api_version
        .split_once('/')
        .map_or("", |(g, _)| g)
        .to_owned();
    let kind = object["kind"].as_str().unwrap_or_default();
    let plural = match kind {
        "Pod" => "pods",
        "Namespace" => "namespaces",
        "Service" => "services",
        "EndpointSlice" => "endpointslices",
        "PeerAuthentication" => "peerauthentications",
        "AuthorizationPolicy" => "authorizationpolicies",
        "DestinationRule" => "destinationrules",
        other => panic!("the fake API server does not serve kind {other}"),
    };
    (group, plural.to_owned())
}

fn object_key(object: &Value) -> String {
    format!(
        "{}/{}",
        object["metadata"]["namespace"].as_str().unwrap_or_default(),
        object["metadata"]["name"].as_str().unwrap_or_default()
    )
}

impl FakeApiServer {
    /// Listens on a free loopback port. Istio kinds are served in `v1` (and `v1beta1`, plus
    /// `v1alpha3` for DestinationRule) unless [`Self::serve_versions`] says otherwise.
    pub fn start() -> Self {
        let listener = bind_own_port();
        let addr = listener.local_addr().expect("local addr");
        let mut inner = Inner {
            rv: 100,
            compacted: 0,
            ..Default::default()
        };
        for (group, plural, versions) in [
            (
                "security.istio.io",
                "peerauthentications",
                &["v1", "v1beta1"][..],
            ),
            (
                "security.istio.io",
                "authorizationpolicies",
                &["v1", "v1beta1"],
            ),
            (
                "networking.istio.io",
                "destinationrules",
                &["v1", "v1beta1", "v1alpha3"],
            ),
        ] {
            inner.served.insert(
                (group.to_owned(), plural.to_owned()),
                versions.iter().map(|v| (*v).to_owned()).collect(),
            );
        }
        let shared = Arc::new(Shared {
            inner: Mutex::new(inner),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let accept = Mutex::new(Some(spawn_accept(&listener, Arc::clone(&shared))));
        Self {
            addr,
            listener,
            shared,
            accept,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes a kubeconfig for this server (plain HTTP, no credentials) to `path`.
    pub fn write_kubeconfig(&self, path: &Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: \
             http://{}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: \
             fake\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.addr
        );
        std::fs::write(path, text).expect("write kubeconfig");
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Which versions of a custom resource are served (empty: its CRD is not installed).
    pub fn serve_versions(&self, group: &str, plural: &str, versions: &[&str]) {
        self.lock().served.insert(
            (group.to_owned(), plural.to_owned()),
            versions.iter().map(|v| (*v).to_owned()).collect(),
        );
    }

    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
        self.shared.changed.notify_all();
    }

    /// Creates or replaces an object (ADDED or MODIFIED); returns its resource version.
    pub fn apply(&self, mut object: Value) -> u64 {
        let collection = collection_of(&object);
        kind_of(&collection.0, &collection.1).expect("known kind");
        let key = object_key(&object);
        let mut inner = self.lock();
        inner.rv += 1;
        let rv = inner.rv;
        let existing = inner
            .objects
            .get(&collection)
            .and_then(|m| m.get(&key))
            .cloned();
        let meta = object["metadata"].as_object_mut().expect("metadata");
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        let (uid, created) = match &existing {
            Some(old) => (
                old["metadata"]["uid"].clone(),
                old["metadata"]["creationTimestamp"].clone(),
            ),
            None => {
                inner.uid += 1;
                (
                    json!(format!("00000000-0000-0000-0000-{:012}", inner.uid)),
                    json!(format!(
                        "2026-01-01T00:{:02}:{:02}Z",
                        (rv / 60) % 60,
                        rv % 60
                    )),
                )
            }
        };
        let meta = object["metadata"].as_object_mut().expect("metadata");
        meta.entry("uid").or_insert(uid);
        meta.entry("creationTimestamp").or_insert(created);
        let event = if existing.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        inner
            .objects
            .entry(collection.clone())
            .or_default()
            .insert(key, object.clone());
        inner.history.push(Stored {
            rv,
            collection,
            kind: event_kind(event),
            object,
        });
        drop(inner);
        self.shared.changed.notify_all();
        rv
    }

    /// Deletes an object (DELETED with its last state at a new version); false if absent.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> bool {
        let probe = json!({"apiVersion": api_version, "kind": kind,
                           "metadata": {"namespace": namespace, "name": name}});
        let collection = collection_of(&probe);
        let key = object_key(&probe);
        let mut inner = self.lock();
        let Some(mut object) = inner
            .objects
            .get_mut(&collection)
            .and_then(|m| m.remove(&key))
        else {
            return false;
        };
        inner.rv += 1;
        let rv = inner.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        inner.history.push(Stored {
            rv,
            collection,
            kind: "DELETED",
            object,
        });
        drop(inner);
        self.shared.changed.notify_all();
        true
    }

    /// Cuts every open connection (watch streams mid-stream, idle keep-alive ones) without a
    /// final chunk, as a crashed proxy or a network fault would.
    pub fn drop_streams(&self) {
        self.lock().cut += 1;
        for c in self
            .shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = c.shutdown(Shutdown::Both);
        }
        self.shared.changed.notify_all();
    }

    /// Forgets the event history: watches resuming from before now get 410 Gone.
    pub fn compact(&self) {
        let mut inner = self.lock();
        inner.compacted = inner.rv;
        inner.history.clear();
        inner.snapshots.clear();
    }

    /// Sends an ERROR event with a 410 `Status` on every open watch, then ends it.
    pub fn send_gone(&self) {
        self.compact();
        self.lock().gone += 1;
        self.shared.changed.notify_all();
    }

    /// Stops listening and closes every connection, as a stopped API server would (a connect
    /// is refused); objects may still be changed (etcd lives on) until [`Self::come_up`]. The
    /// port stays bound to this server: were it released, a client's own connect to it could
    /// be given it as its source port (a TCP self-connect) or another test could bind it, and
    /// the server could not come back on it.
    pub fn go_down(&self) {
        self.stop_accepting();
        self.drop_streams();
    }

    /// Listens again on the same port.
    pub fn come_up(&self) {
        self.shared.stop.store(false, Ordering::SeqCst);
        // SAFETY: `listen` on a socket this server owns for its whole life; no memory passed.
        let rc = unsafe { libc::listen(self.listener.as_raw_fd(), 128) };
        assert_eq!(
            rc,
            0,
            "listen again on {}: {}",
            self.addr,
            std::io::Error::last_os_error()
        );
        *self.accept.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(spawn_accept(&self.listener, Arc::clone(&self.shared)));
    }

    fn stop_accepting(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Stops the listening (queued connections are reset) and wakes the accept loop, whose
        // `accept` fails; the socket keeps its port (it was bound to it by number).
        // SAFETY: `shutdown` on a socket this server owns for its whole life.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        let accept = self.accept.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = accept {
            let _ = t.join();
        }
    }

    /// Request lines received so far (`GET /api/v1/pods?...`).
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    /// The stored objects of a collection (`""` for the core group), as a client would get
    /// them from an unpaged list.
    pub fn objects(&self, group: &str, plural: &str) -> Vec<Value> {
        self.lock()
            .objects
            .get(&(group.to_owned(), plural.to_owned()))
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The current resource version.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop_accepting();
        self.drop_streams();
    }
}

fn event_kind(event: &str) -> &'static str {
    match event {
        "ADDED" => "ADDED",
        "MODIFIED" => "MODIFIED",
        _ => "DELETED",
    }
}

/// A loopback listener bound to its port by number: Linux keeps a port bound that way
/// through a `shutdown` of the listening socket, so [`FakeApiServer::go_down`] never gives it
/// up (one bound to port 0 would lose it there).
fn bind_own_port() -> TcpListener {
    let mut last = None;
    for _ in 0..20 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|probe| probe.local_addr())
            .expect("pick a free loopback port")
            .port();
        match TcpListener::bind(("127.0.0.1", port)) {
            Ok(listener) => return listener,
            // Taken between the probe and the bind.
            Err(e) => last = Some(e),
        }
    }
    panic!("bind fake API server: {last:?}");
}

fn spawn_accept(listener: &TcpListener, shared: Arc<Shared>) -> thread::JoinHandle<()> {
    let listener = listener.try_clone().expect("clone the listener");
    thread::spawn(move || {
        for conn in listener.incoming() {
            if shared.stop.load(Ordering::SeqCst) {
                return;
            }
            let Ok(conn) = conn else { continue };
            if let Ok(clone) = conn.try_clone() {
                shared
                    .conns
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(clone);
            }
            let shared = Arc::clone(&shared);
            thread::spawn(move || {
                let _ = serve_connection(conn, &shared);
            });
        }
    })
}

/// A parsed request.
struct Request {
    path: String,
    query: BTreeMap<String, String>,
}

fn read_request(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<(String, Request)>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let line = line.trim_end().to_owned();
    let mut content_length = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            return Ok(None);
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            content_length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; content_length];
    reader.read_exact(&mut body)?;
    let target = line.split(' ').nth(1).unwrap_or("/").to_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect();
    Ok(Some((
        line,
        Request {
            path: path.to_owned(),
            query,
        },
    )))
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => out.push(b),
                    Err(_) => out.extend_from_slice(&bytes[i..i + 3]),
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn serve_connection(conn: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    while let Some((line, req)) = read_request(&mut reader)? {
        shared
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .requests
            .push(line);
        let Some((collection, version)) = route(&req.path) else {
            respond(&mut out, 404, &status(404, "NotFound", "no such path"))?;
            continue;
        };
        let served = {
            let inner = shared.inner.lock().unwrap_or_else(|p| p.into_inner());
            collection.0.is_empty()
                || collection.0 == "discovery.k8s.io"
                || inner
                    .served
                    .get(&collection)
                    .is_some_and(|v| v.contains(&version))
        };
        if !served {
            respond(
                &mut out,
                404,
                &status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            )?;
            continue;
        }
        if req
            .query
            .get("watch")
            .is_some_and(|v| v == "true" || v == "1")
        {
            let watched = watch(&mut out, shared, &req, &collection, &version);
            let _ = out.shutdown(Shutdown::Both);
            return watched;
        }
        let (code, body) = list(shared, &req, &collection, &version);
        respond(&mut out, code, &body)?;
    }
    // The accept loop keeps a clone for `drop_streams`: close for the peer now.
    let _ = out.shutdown(Shutdown::Both);
    Ok(())
}

/// `(group, plural)` and version of a collection path.
fn route(path: &str) -> Option<(Collection, String)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, plural) = match parts.as_slice() {
        ["api", version, plural] => ("", *version, *plural),
        ["apis", group, version, plural] => (*group, *version, *plural),
        _ => return None,
    };
    kind_of(group, plural)?;
    Some(((group.to_owned(), plural.to_owned()), version.to_owned()))
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn respond(out: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let text = body.to_string();
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        410 => "Gone",
        _ => "Error",
    };
    write!(
        out,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    )?;
    out.flush()
}

/// The object as served in `version`, with the type fields a list item lacks on a real
/// server left out or kept.
fn served_as(object: &Value, collection: &Collection, version: &str) -> Value {
    let mut object = object.clone();
    if !collection.0.is_empty() {
        object["apiVersion"] = json!(format!("{}/{version}", collection.0));
    }
    object
}

/// Whether `object` matches a field selector such as `spec.nodeName!=node-a`.
fn selected(object: &Value, selector: Option<&String>) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    selector.split(',').all(|term| {
        let (field, want, equal) = if let Some((f, v)) = term.split_once("!=") {
            (f, v, false)
        } else if let Some((f, v)) = term.split_once("==") {
            (f, v, true)
        } else if let Some((f, v)) = term.split_once('=') {
            (f, v, true)
        } else {
            return true;
        };
        let value = match field {
            "spec.nodeName" => object["spec"]["nodeName"].as_str().unwrap_or_default(),
            "metadata.name" => object["metadata"]["name"].as_str().unwrap_or_default(),
            "metadata.namespace" => object["metadata"]["namespace"].as_str().unwrap_or_default(),
            other => panic!("the fake API server does not support field selector {other}"),
        };
        (value == want) == equal
    })
}

fn list(shared: &Shared, req: &Request, collection: &Collection, version: &str) -> (u16, Value) {
    let mut inner = shared.inner.lock().unwrap_or_else(|p| p.into_inner());
    while inner.faults.stall_lists && !shared.stop.load(Ordering::SeqCst) {
        inner = shared
            .changed
            .wait_timeout(inner, Duration::from_millis(50))
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    let limit: usize = req
        .query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let limit = match inner.faults.max_page {
        0 => limit,
        max if limit == 0 => max,
        max => limit.min(max),
    };
    let (rv, offset) = match req.query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let (rv, offset) = token.split_once(':').unwrap_or(("0", "0"));
            let rv: u64 = rv.parse().unwrap_or(0);
            let expire = inner.faults.expire_continues > 0;
            if expire {
                inner.faults.expire_continues -= 1;
            }
            if expire || rv <= inner.compacted || !inner.snapshots.contains_key(&rv) {
                return (
                    410,
                    status(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent \
                         list result. You can start a new list without the continue parameter.",
                    ),
                );
            }
            (rv, offset.parse().unwrap_or(0))
        }
        None => {
            let rv = inner.rv;
            let snapshot: BTreeMap<Collection, Vec<Value>> = inner
                .objects
                .iter()
                .map(|(c, m)| (c.clone(), m.values().cloned().collect()))
                .collect();
            inner.snapshots.insert(rv, snapshot);
            (rv, 0)
        }
    };
    let all: Vec<Value> = inner.snapshots[&rv]
        .get(collection)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|o| selected(o, req.query.get("fieldSelector")))
        .collect();
    let end = if limit == 0 {
        all.len()
    } else {
        (offset + limit).min(all.len())
    };
    let items: Vec<Value> = all[offset.min(end)..end]
        .iter()
        .map(|o| {
            // A real server leaves apiVersion and kind out of list items.
            let mut o = served_as(o, collection, version);
            if let Some(m) = o.as_object_mut() {
                m.remove("apiVersion");
                m.remove("kind");
            }
            o
        })
        .collect();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if end < all.len() {
        metadata["continue"] = json!(format!("{rv}:{end}"));
    }
    let kind = kind_of(&collection.0, &collection.1).unwrap_or("Unknown");
    let api_version = if collection.0.is_empty() {
        version.to_owned()
    } else {
        format!("{}/{version}", collection.0)
    };
    (
        200,
        json!({"apiVersion": api_version, "kind": format!("{kind}List"),
               "metadata": metadata, "items": items}),
    )
}

fn chunk(out: &mut TcpStream, line: &Value) -> std::io::Result<()> {
    let text = format!("{line}\n");
    write!(out, "{:x}\r\n{text}\r\n", text.len())?;
    out.flush()
}

fn watch(
    out: &mut TcpStream,
    shared: &Shared,
    req: &Request,
    collection: &Collection,
    version: &str,
) -> std::io::Result<()> {
    let from: u64 = req
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = req
        .query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let timeout = req
        .query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(290), Duration::from_secs);
    let selector = req.query.get("fieldSelector");
    let kind = kind_of(&collection.0, &collection.1).unwrap_or("Unknown");
    let (cut0, gone0, too_old, as_http) = {
        let inner = shared.inner.lock().unwrap_or_else(|p| p.into_inner());
        (
            inner.cut,
            inner.gone,
            from != 0 && from < inner.compacted,
            inner.faults.watch_gone_as_http,
        )
    };
    let gone_status = status(410, "Expired", "too old resource version");
    if too_old && as_http {
        return respond(out, 410, &gone_status);
    }
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n"
    )?;
    out.flush()?;
    if too_old {
        chunk(out, &json!({"type": "ERROR", "object": gone_status}))?;
        return write!(out, "0\r\n\r\n");
    }
    let deadline = Instant::now() + timeout;
    let mut sent = from;
    if from == 0 {
        // Not resumed: the current objects as ADDED first.
        let inner = shared.inner.lock().unwrap_or_else(|p| p.into_inner());
        let current: Vec<Value> = inner
            .objects
            .get(collection)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        sent = inner.rv;
        drop(inner);
        for o in current
            .iter()
            .filter(|o| selected(o, selector))
            .map(|o| served_as(o, collection, version))
        {
            chunk(out, &json!({"type": "ADDED", "object": o}))?;
        }
    }
    let mut last_bookmark = Instant::now();
    loop {
        let (events, rv, cut, gone) = {
            let inner = shared.inner.lock().unwrap_or_else(|p| p.into_inner());
            let inner = if inner.history.last().is_none_or(|e| e.rv <= sent)
                && inner.cut == cut0
                && inner.gone == gone0
            {
                shared
                    .changed
                    .wait_timeout(inner, Duration::from_millis(100))
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            } else {
                inner
            };
            let events: Vec<Stored> = inner
                .history
                .iter()
                .filter(|e| e.rv > sent && e.collection == *collection)
                .cloned()
                .collect();
            (events, inner.rv, inner.cut, inner.gone)
        };
        if cut != cut0 || shared.stop.load(Ordering::SeqCst) {
            // Cut mid-stream: no final chunk.
            let _ = out.shutdown(Shutdown::Both);
            return Ok(());
        }
        if gone != gone0 {
            chunk(out, &json!({"type": "ERROR", "object": gone_status}))?;
            return write!(out, "0\r\n\r\n");
        }
        for e in &events {
            if selected(&e.object, selector) {
                let object = served_as(&e.object, collection, version);
                chunk(out, &json!({"type": e.kind, "object": object}))?;
            }
        }
        sent = sent.max(rv);
        if bookmarks && last_bookmark.elapsed() >= Duration::from_millis(500) {
            last_bookmark = Instant::now();
            let api_version = if collection.0.is_empty() {
                version.to_owned()
            } else {
                format!("{}/{version}", collection.0)
            };
            chunk(
                out,
                &json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version,
                        "metadata": {"resourceVersion": sent.to_string()}}}),
            )?;
        }
        if Instant::now() >= deadline {
            return write!(out, "0\r\n\r\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Binds a new TCP socket without `SO_REUSEADDR` to `addr`; the errno if that fails.
    fn plain_bind(addr: SocketAddr) -> Result<(), i32> {
        let SocketAddr::V4(v4) = addr else {
            panic!("loopback v4 expected")
        };
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: a fresh socket, a sockaddr_in that lives across the call with its size,
        // and the fd closed before returning.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0);
            let rc = libc::bind(
                fd,
                (&raw const sin).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            libc::close(fd);
            if rc == 0 { Ok(()) } else { Err(errno) }
        }
    }

    #[test]
    fn a_server_that_went_down_refuses_connects_and_keeps_its_port() {
        let server = FakeApiServer::start();
        let addr = server.addr();
        assert!(TcpStream::connect(addr).is_ok());
        server.go_down();
        let refused = TcpStream::connect(addr).expect_err("a down server refuses connects");
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
        // Nobody else can have the port meanwhile (a plain bind, as a connect's choice of
        // source port or another program's bind would see it).
        assert_eq!(plain_bind(addr), Err(libc::EADDRINUSE));
        server.come_up();
        let mut conn = TcpStream::connect(addr).expect("up again on the same port");
        conn.write_all(b"GET /api/v1/namespaces HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut status = [0u8; 12];
        conn.read_exact(&mut status).unwrap();
        assert_eq!(&status, b"HTTP/1.1 200");
        // Twice, as the restart test does.
        server.go_down();
        server.come_up();
        assert!(TcpStream::connect(addr).is_ok());
    }
}
