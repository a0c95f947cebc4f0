//! The admin socket is root-only, but what arrives on it is still untrusted text (a buggy or
//! hostile client on the node): each line must parse into a request or an error, never a
//! panic, and every request the agent understands must survive the CLI's serialisation.
#![no_main]

use interceptor::admin::{Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The server reads lines as UTF-8 and answers each one.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for line in text.split('\n') {
        match serde_json::from_str::<Request>(line) {
            Ok(req) => {
                let json = serde_json::to_value(&req).expect("a request serialises");
                let back: Request =
                    serde_json::from_value(json.clone()).unwrap_or_else(|e| panic!("{e}: {json}"));
                assert_eq!(serde_json::to_value(&back).expect("serialises"), json);
            }
            Err(e) => {
                let _ = Response::Error {
                    message: format!("bad request: {e}"),
                };
            }
        }
        // The CLI's side: whatever the agent answered.
        let _ = serde_json::from_str::<Response>(line);
    }
});
