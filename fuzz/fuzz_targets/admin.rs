//! The admin socket is root-only, but what arrives on it is still untrusted bytes (a buggy or
//! hostile client on the node). Each input goes through the real server ([`admin::serve`]
//! over a Unix socket, with a handler that echoes): every answer must be one well-formed
//! response line. Each line is also parsed directly, as the server does: a request must
//! survive the CLI's serialisation, and an enroll request must get through the one workload
//! validation with an answer, never a panic.
#![no_main]

use std::{path::PathBuf, sync::OnceLock};

use interceptor::{
    admin::{self, Handler, Request, Response},
    config::{Workload, check_workloads},
    identity::TrustDomain,
};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

struct Echo;

impl Handler for Echo {
    async fn handle(&self, req: Request) -> Response {
        Response::Ok {
            message: format!("{req:?}"),
        }
    }
}

struct Server {
    rt: tokio::runtime::Runtime,
    path: PathBuf,
}

/// One server per fuzzing process, as the agent has one.
fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let path = std::env::temp_dir()
            .join(format!("interceptor-fuzz-admin-{}", std::process::id()))
            .join("admin.sock");
        let listener = rt.block_on(async { admin::bind(&path) }).expect("bind");
        rt.spawn(admin::serve(listener, std::sync::Arc::new(Echo)));
        Server { rt, path }
    })
}

fn existing() -> Workload {
    serde_json::from_str(
        r#"{"name":"sleep","namespace":"foo","serviceAccount":"sleep","cgroup":"/sys/fs/cgroup/sleep","netns":"/run/netns/sleep","ips":["10.88.0.2"]}"#,
    )
    .expect("built-in workload")
}

fn through_the_server(data: &[u8]) {
    let s = server();
    let answers = s.rt.block_on(async {
        let mut stream = tokio::net::UnixStream::connect(&s.path)
            .await
            .expect("connect");
        stream.write_all(data).await.expect("send");
        stream.shutdown().await.expect("shutdown");
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.expect("read");
        out
    });
    let lines = data.split(|&b| b == b'\n').count();
    let mut answered = 0;
    for line in answers.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        answered += 1;
        serde_json::from_slice::<Response>(line)
            .unwrap_or_else(|e| panic!("malformed answer {e}: {}", String::from_utf8_lossy(line)));
    }
    assert!(answered <= lines, "{answered} answers to {lines} lines");
}

fuzz_target!(|data: &[u8]| {
    through_the_server(data);
    let trust_domain: TrustDomain = "cluster.local".parse().expect("trust domain");
    let existing = existing();
    for line in data.split(|&b| b == b'\n') {
        let Ok(req) = serde_json::from_slice::<Request>(line) else {
            // The CLI's side: whatever the agent answered.
            let _ = serde_json::from_slice::<Response>(line);
            continue;
        };
        let json = serde_json::to_value(&req).expect("a request serialises");
        let back: Request =
            serde_json::from_value(json.clone()).unwrap_or_else(|e| panic!("{e}: {json}"));
        assert_eq!(serde_json::to_value(&back).expect("serialises"), json);
        if let Request::Enroll { workload } = req {
            let pods = [
                ("workloads[0]".to_owned(), &existing),
                (format!("workload `{}`", workload.name), &workload),
            ];
            if let Err(e) = check_workloads(&trust_domain, &pods, &[], &[]) {
                assert!(!e.is_empty());
            }
        }
    }
});
