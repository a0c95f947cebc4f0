//! `interceptor-cni`: a chained CNI plugin and its installer, in one small binary.
//!
//! As a plugin (the runtime sets `CNI_COMMAND`), it runs after the pod's main network plugin,
//! reads the pod's addresses from `prevResult`, asks the node agent over its admin socket to
//! enroll the pod (ADD), to forget it (DEL) or whether it is enrolled (CHECK), and hands
//! `prevResult` back unchanged. The agent then steers the pod's network namespace before any
//! of the pod's containers runs.
//!
//! As `interceptor-cni install`, it copies itself into the node's CNI bin directory, chains
//! itself at the end of the active `.conflist`, keeps it chained while the main plugin
//! rewrites its file, and unchains itself on SIGTERM or `interceptor-cni uninstall`.

#![deny(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod agent;
mod install;
mod plugin;
#[allow(unsafe_code)] // signal mask and wait, each block with its SAFETY comment
mod sys;

use std::io::{Read as _, Write as _};

const USAGE: &str = "\
usage:
  interceptor-cni                       (as a CNI plugin: the runtime sets CNI_COMMAND)
  interceptor-cni install --cni-bin-dir DIR --cni-conf-dir DIR [--plugin-config JSON]
                          [--poll-ms N] [--once] [--keep-on-exit]
  interceptor-cni uninstall --cni-conf-dir DIR";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("install") => exit_with(install::main(&args[1..], false)),
        Some("uninstall") => exit_with(install::main(&args[1..], true)),
        Some("-h" | "--help" | "help") => println!("{USAGE}"),
        Some(other) => {
            eprintln!("interceptor-cni: unknown argument `{other}`\n{USAGE}");
            std::process::exit(2);
        }
        None => plugin_main(),
    }
}

fn exit_with(result: Result<(), String>) {
    if let Err(e) = result {
        eprintln!("interceptor-cni: {e}");
        std::process::exit(1);
    }
}

/// The CNI side: reads the network config from stdin and the environment, writes the result
/// (or a CNI error) to stdout.
fn plugin_main() {
    let env = plugin::Env::from_process();
    let mut stdin = Vec::new();
    let read = std::io::stdin()
        .take(plugin::MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut stdin);
    let outcome = match read {
        Ok(_) => plugin::run(&env, &stdin, &agent::SocketAgent),
        Err(e) => Err(plugin::CniError::new(
            plugin::CODE_IO,
            "cannot read the network configuration from stdin",
            e.to_string(),
        )),
    };
    let version = plugin::config_version(&stdin);
    let (out, code) = match outcome {
        Ok(Some(value)) => (value.to_string(), 0),
        Ok(None) => (String::new(), 0),
        Err(e) => (e.to_json(&version).to_string(), 1),
    };
    let mut stdout = std::io::stdout().lock();
    if !out.is_empty() {
        let _ = writeln!(stdout, "{out}");
    }
    let _ = stdout.flush();
    std::process::exit(code);
}
