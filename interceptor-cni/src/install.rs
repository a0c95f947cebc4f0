//! `interceptor-cni install` / `uninstall`: puts the plugin binary in the node's CNI bin
//! directory and keeps our entry at the end of the `plugins` list of the network config the
//! runtime uses (the first `.conf`, `.conflist` or `.json` file in name order, as libcni and
//! containerd pick it). The main plugin's own installer may rewrite that file at any time
//! (Calico, Cilium and flannel do on start-up and upgrade), so the installer keeps polling and
//! chains us again; every write is a temporary file renamed over the target, so the runtime
//! never reads half a file.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{Map, Value, json};

/// Our `type` in the chain, and the binary's name in the CNI bin directory.
pub const PLUGIN_TYPE: &str = "interceptor-cni";

#[derive(Debug, Clone)]
pub struct Options {
    pub bin_dir: Option<PathBuf>,
    pub conf_dir: PathBuf,
    /// Extra fields of our entry (`adminSocket`, `membershipFile`, `excludeNamespaces`, ...).
    pub plugin_config: Map<String, Value>,
    pub poll: Duration,
    pub once: bool,
    /// Leave the chain in place when the installer stops (see README: a DaemonSet update
    /// otherwise opens a window in which pods start unchained).
    pub keep_on_exit: bool,
}

fn parse(args: &[String], uninstall: bool) -> Result<Options, String> {
    let mut o = Options {
        bin_dir: None,
        conf_dir: PathBuf::new(),
        plugin_config: Map::new(),
        poll: Duration::from_secs(1),
        once: false,
        keep_on_exit: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--cni-bin-dir" => o.bin_dir = Some(value(a)?.into()),
            "--cni-conf-dir" => o.conf_dir = value(a)?.into(),
            "--plugin-config" if !uninstall => {
                let v = value(a)?;
                o.plugin_config = match serde_json::from_str(&v) {
                    Ok(Value::Object(m)) => m,
                    _ => return Err(format!("--plugin-config: `{v}` is not a JSON object")),
                };
            }
            "--poll-ms" if !uninstall => {
                let v = value(a)?;
                let ms: u64 = v
                    .parse()
                    .ok()
                    .filter(|ms| *ms > 0)
                    .ok_or_else(|| format!("--poll-ms: `{v}` is not a positive number"))?;
                o.poll = Duration::from_millis(ms);
            }
            "--once" if !uninstall => o.once = true,
            "--keep-on-exit" if !uninstall => o.keep_on_exit = true,
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if o.conf_dir.as_os_str().is_empty() {
        return Err("--cni-conf-dir is required".to_owned());
    }
    if !uninstall && o.bin_dir.is_none() {
        return Err("--cni-bin-dir is required".to_owned());
    }
    Ok(o)
}

pub fn main(args: &[String], uninstall: bool) -> Result<(), String> {
    let o = parse(args, uninstall)?;
    if uninstall {
        let changed = unchain_all(&o.conf_dir)?;
        eprintln!(
            "interceptor-cni: removed from {} config file(s) in {}",
            changed.len(),
            o.conf_dir.display()
        );
        return Ok(());
    }
    // Before anything else: a SIGTERM must reach the wait below, not kill us mid-write.
    crate::sys::block_termination_signals().map_err(|e| format!("block signals: {e}"))?;
    let bin_dir = o.bin_dir.clone().unwrap_or_default();
    let mut last_error = None;
    loop {
        let round = install_binary(&bin_dir).and_then(|_| chain(&o.conf_dir, &o.plugin_config));
        match round {
            Ok(Some(file)) => {
                eprintln!("interceptor-cni: chained into {}", file.display());
                last_error = None;
            }
            Ok(None) => last_error = None,
            Err(e) => {
                // Logged once per distinct error: no main config yet is the normal start of
                // a node whose network plugin comes up after us.
                if last_error.as_ref() != Some(&e) {
                    eprintln!("interceptor-cni: {e}; retrying");
                }
                last_error = Some(e);
            }
        }
        if o.once {
            return last_error.map_or(Ok(()), Err);
        }
        if let Some(sig) = crate::sys::wait_for_signal(o.poll) {
            if o.keep_on_exit {
                eprintln!("interceptor-cni: signal {sig}: exiting, chain left in place");
                return Ok(());
            }
            let changed = unchain_all(&o.conf_dir)?;
            eprintln!(
                "interceptor-cni: signal {sig}: removed from {} config file(s)",
                changed.len()
            );
            return Ok(());
        }
    }
}

/// Copies the running binary to `<bin_dir>/interceptor-cni` unless an identical copy is
/// there; returns whether it wrote.
pub fn install_binary(bin_dir: &Path) -> Result<bool, String> {
    let me = std::fs::read("/proc/self/exe").map_err(|e| format!("read own binary: {e}"))?;
    let target = bin_dir.join(PLUGIN_TYPE);
    if std::fs::read(&target).is_ok_and(|b| b == me) {
        return Ok(false);
    }
    write_atomic(&target, &me, 0o755)?;
    Ok(true)
}

/// Writes `bytes` to a temporary file beside `path` (a dot name with no config extension, so
/// no runtime loads it) and renames it over `path`.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    use std::{io::Write as _, os::unix::fs::PermissionsExt as _};
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or_else(|| "file".to_owned(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("write {}: {e}", path.display()));
    }
    Ok(())
}

/// The network config files of `dir` in the order the runtime considers them.
fn config_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("read {}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conf" | "conflist" | "json")
                )
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Makes sure the active config ends with our entry. Returns the file written, if any.
///
/// A single-plugin `.conf` is turned into a `.conflist` of the same stem (a chain needs a
/// list), and the `.conf` removed so the runtime reads the list.
pub fn chain(conf_dir: &Path, extra: &Map<String, Value>) -> Result<Option<PathBuf>, String> {
    let Some(active) = config_files(conf_dir)?.into_iter().next() else {
        return Err(format!(
            "no network config in {} yet (waiting for the main plugin)",
            conf_dir.display()
        ));
    };
    let text = std::fs::read(&active).map_err(|e| format!("read {}: {e}", active.display()))?;
    let original: Value = serde_json::from_slice(&text)
        .map_err(|e| format!("{} is not JSON: {e}", active.display()))?;
    let (mut list, target) = if original.get("plugins").is_some() {
        (original.clone(), active.clone())
    } else if original.get("type").is_some() {
        let list = json!({
            "cniVersion": original.get("cniVersion").cloned().unwrap_or(json!("1.0.0")),
            "name": original.get("name").cloned().unwrap_or(json!("k8s-pod-network")),
            "plugins": [original.clone()],
        });
        (list, active.with_extension("conflist"))
    } else {
        return Err(format!(
            "{} is neither a plugin list nor a plugin config",
            active.display()
        ));
    };
    let plugins = list
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| format!("{}: `plugins` is not a list", active.display()))?;
    let mut entry = Map::new();
    entry.insert("type".to_owned(), json!(PLUGIN_TYPE));
    for (k, v) in extra {
        if k != "type" {
            entry.insert(k.clone(), v.clone());
        }
    }
    let entry = Value::Object(entry);
    if plugins.last() == Some(&entry)
        && plugins.iter().filter(|p| is_ours(p)).count() == 1
        && target == active
    {
        return Ok(None);
    }
    plugins.retain(|p| !is_ours(p));
    plugins.push(entry);
    let mut bytes = serde_json::to_vec_pretty(&list).map_err(|e| e.to_string())?;
    bytes.push(b'\n');
    write_atomic(&target, &bytes, 0o644)?;
    if target != active {
        std::fs::remove_file(&active).map_err(|e| format!("remove {}: {e}", active.display()))?;
    }
    Ok(Some(target))
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// Removes our entry from every config file in `dir`; returns the files changed.
pub fn unchain_all(conf_dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut changed = Vec::new();
    for file in config_files(conf_dir)? {
        let Ok(text) = std::fs::read(&file) else {
            continue;
        };
        let Ok(mut list) = serde_json::from_slice::<Value>(&text) else {
            continue;
        };
        let Some(plugins) = list.get_mut("plugins").and_then(Value::as_array_mut) else {
            continue;
        };
        let before = plugins.len();
        plugins.retain(|p| !is_ours(p));
        if plugins.len() == before {
            continue;
        }
        let mut bytes = serde_json::to_vec_pretty(&list).map_err(|e| e.to_string())?;
        bytes.push(b'\n');
        write_atomic(&file, &bytes, 0o644)?;
        changed.push(file);
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Dir {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("icni-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
        fn write(&self, name: &str, v: &Value) {
            std::fs::write(self.0.join(name), serde_json::to_vec(v).unwrap()).unwrap();
        }
        fn read(&self, name: &str) -> Value {
            serde_json::from_slice(&std::fs::read(self.0.join(name)).unwrap()).unwrap()
        }
        fn names(&self) -> Vec<String> {
            let mut n: Vec<String> = std::fs::read_dir(&self.0)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            n.sort();
            n
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn bridge_list(name: &str) -> Value {
        json!({"cniVersion": "1.0.0", "name": name, "plugins": [
            {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
            {"type": "portmap", "capabilities": {"portMappings": true}}]})
    }

    fn types(v: &Value) -> Vec<String> {
        v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn chains_last_in_the_first_config_once_and_survives_a_rewrite() {
        let d = Dir::new("chain");
        d.write("10-main.conflist", &bridge_list("main"));
        d.write("20-other.conflist", &bridge_list("other"));
        std::fs::write(d.0.join("README"), "not a config").unwrap();
        let extra: Map<String, Value> =
            serde_json::from_str(r#"{"adminSocket": "/run/x.sock", "type": "ignored"}"#).unwrap();

        let wrote = chain(&d.0, &extra).unwrap();
        assert_eq!(wrote, Some(d.0.join("10-main.conflist")));
        let v = d.read("10-main.conflist");
        assert_eq!(types(&v), ["bridge", "portmap", "interceptor-cni"]);
        assert_eq!(v["plugins"][2]["adminSocket"], "/run/x.sock");
        assert_eq!(v["name"], "main");
        assert_eq!(types(&d.read("20-other.conflist")), ["bridge", "portmap"]);
        // Idempotent: nothing is written when we are already last.
        assert_eq!(chain(&d.0, &extra).unwrap(), None);

        // The main plugin rewrites its file: chained again, still once.
        d.write("10-main.conflist", &bridge_list("main"));
        assert!(chain(&d.0, &extra).unwrap().is_some());
        assert_eq!(
            types(&d.read("10-main.conflist")),
            ["bridge", "portmap", "interceptor-cni"]
        );
        // ... or puts a plugin after us: we move back to the end.
        let mut v = d.read("10-main.conflist");
        v["plugins"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "tuning"}));
        d.write("10-main.conflist", &v);
        chain(&d.0, &extra).unwrap();
        assert_eq!(
            types(&d.read("10-main.conflist")),
            ["bridge", "portmap", "tuning", "interceptor-cni"]
        );
        // No temporary file is left behind.
        assert_eq!(
            d.names(),
            ["10-main.conflist", "20-other.conflist", "README"]
        );

        let changed = unchain_all(&d.0).unwrap();
        assert_eq!(changed, [d.0.join("10-main.conflist")]);
        assert_eq!(
            types(&d.read("10-main.conflist")),
            ["bridge", "portmap", "tuning"]
        );
        assert!(unchain_all(&d.0).unwrap().is_empty());
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_list() {
        let d = Dir::new("conf");
        d.write(
            "05-flannel.conf",
            &json!({"cniVersion": "0.3.1", "name": "cbr0", "type": "flannel"}),
        );
        let wrote = chain(&d.0, &Map::new()).unwrap();
        assert_eq!(wrote, Some(d.0.join("05-flannel.conflist")));
        assert_eq!(d.names(), ["05-flannel.conflist"]);
        let v = d.read("05-flannel.conflist");
        assert_eq!(types(&v), ["flannel", "interceptor-cni"]);
        assert_eq!(
            (v["name"].as_str(), v["cniVersion"].as_str()),
            (Some("cbr0"), Some("0.3.1"))
        );
    }

    #[test]
    fn waits_for_a_config_and_refuses_garbage() {
        let d = Dir::new("empty");
        let e = chain(&d.0, &Map::new()).unwrap_err();
        assert!(e.contains("no network config"), "{e}");
        std::fs::write(d.0.join("00-bad.conflist"), "{").unwrap();
        let e = chain(&d.0, &Map::new()).unwrap_err();
        assert!(e.contains("00-bad.conflist is not JSON"), "{e}");
        // Nothing was written over it.
        assert_eq!(std::fs::read(d.0.join("00-bad.conflist")).unwrap(), b"{");
    }

    #[test]
    fn the_binary_is_copied_atomically_and_only_when_different() {
        let d = Dir::new("bin");
        assert!(install_binary(&d.0).unwrap());
        assert!(!install_binary(&d.0).unwrap());
        use std::os::unix::fs::PermissionsExt as _;
        let meta = std::fs::metadata(d.0.join(PLUGIN_TYPE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o755);
        std::fs::write(d.0.join(PLUGIN_TYPE), b"old").unwrap();
        assert!(install_binary(&d.0).unwrap());
        assert_eq!(d.names(), [PLUGIN_TYPE]);
    }

    #[test]
    fn arguments_are_checked() {
        let a = |s: &[&str]| s.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        assert!(parse(&a(&["--cni-conf-dir", "/x"]), false).is_err());
        assert!(parse(&a(&["--cni-conf-dir", "/x"]), true).is_ok());
        let e = parse(
            &a(&[
                "--cni-bin-dir",
                "/b",
                "--cni-conf-dir",
                "/x",
                "--plugin-config",
                "[1]",
            ]),
            false,
        )
        .unwrap_err();
        assert!(e.contains("not a JSON object"), "{e}");
        assert!(parse(&a(&["--bogus"]), true).is_err());
    }
}
