//! The DaemonSet of `deploy/base` run by podman on this host: each container of its pod spec
//! becomes one `podman run` with the same image, command, arguments, environment, security
//! context, host namespaces and mounts. Only where the node's paths are (CNI dirs, state,
//! sockets) does a test substitute its own directories, so the test exercises the manifest a
//! cluster admin applies rather than a hand-written copy of it.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use serde_json::Value;

/// Label `cargo xtask image` puts on the image: the SHA-256 of the agent binary inside.
const AGENT_SHA256_LABEL: &str = "io.interceptor.agent-sha256";

/// The pod template of `deploy/base/daemonset.yaml`.
pub struct DaemonSet {
    spec: Value,
}

/// This host as the DaemonSet's node: where its volumes come from, and podman's settings.
pub struct Volumes {
    /// podman's `containers.conf` (CNI backend, runc).
    pub containers_conf: PathBuf,
    /// Node path (a `hostPath` volume's `path`) → the directory used instead. Paths not listed
    /// are the node's own (cgroup2, bpffs, /run/netns, /proc/sys/net).
    pub host_paths: BTreeMap<String, PathBuf>,
    /// Volume name of a `configMap` or `secret` → a directory holding its files.
    pub sources: BTreeMap<String, PathBuf>,
    /// `spec.nodeName` for `fieldRef` environment variables.
    pub node_name: String,
}

impl DaemonSet {
    pub fn load() -> Self {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/daemonset.yaml");
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        let ds: Value = yaml_serde::from_str(&text).expect("daemonset.yaml parses");
        DaemonSet {
            spec: ds["spec"]["template"]["spec"].clone(),
        }
    }

    fn container(&self, name: &str) -> &Value {
        self.spec["containers"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == name))
            .unwrap_or_else(|| panic!("no container `{name}` in the DaemonSet"))
    }

    /// The image the container names, with `-dev` appended: the image of the debug binaries
    /// `cargo xtask image --profile dev` builds. Fails loudly when it is missing or was built
    /// from another agent binary than `agent` (the one next to the tests).
    pub fn dev_image(&self, container: &str, agent: &Path) -> String {
        let image = format!(
            "{}-dev",
            self.container(container)["image"].as_str().expect("image")
        );
        let out = Command::new("podman")
            .args(["image", "inspect", "--format"])
            .arg(format!("{{{{index .Labels \"{AGENT_SHA256_LABEL}\"}}}}"))
            .arg(&image)
            .output()
            .expect("podman image inspect");
        assert!(
            out.status.success(),
            "image {image} is missing: build it with `cargo xtask image --profile dev` \
             (`cargo xtask test` does): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let label = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        // sha256sum: this crate's own SHA-256 is unoptimized in test builds (seconds for it).
        let out = Command::new("sha256sum")
            .arg(agent)
            .output()
            .expect("sha256sum");
        let want = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        assert_eq!(
            label,
            want,
            "image {image} holds another agent than {}: rebuild it with \
             `cargo xtask image --profile dev`",
            agent.display()
        );
        image
    }

    /// `podman run` options for `container` (everything between `run` and the image) and the
    /// arguments after the image.
    pub fn podman_args(&self, container: &str, volumes: &Volumes) -> (Vec<String>, Vec<String>) {
        let c = self.container(container);
        let mut opts: Vec<String> = Vec::new();
        // `--flag=value`: boolean flags take their value only in this form.
        let mut opt = |a: &str, b: String| opts.push(format!("{a}={b}"));
        if self.spec["hostNetwork"] == true {
            opt("--network", "host".into());
        }
        if self.spec["hostPID"] == true {
            opt("--pid", "host".into());
        }
        let sc = &c["securityContext"];
        assert_ne!(
            sc["privileged"], true,
            "{container}: privileged (the DaemonSet grants capabilities instead)"
        );
        if let Some(uid) = sc["runAsUser"].as_u64() {
            opt("--user", uid.to_string());
        }
        if sc["readOnlyRootFilesystem"] == true {
            // As a kubelet does it: no tmpfs over /run or /tmp.
            opt("--read-only", "true".into());
            opt("--read-only-tmpfs", "false".into());
        }
        for cap in caps(&sc["capabilities"]["drop"]) {
            opt("--cap-drop", cap);
        }
        for cap in caps(&sc["capabilities"]["add"]) {
            opt("--cap-add", cap);
        }
        if sc["allowPrivilegeEscalation"] == false {
            opt("--security-opt", "no-new-privileges".into());
        }
        if sc["seccompProfile"]["type"] == "Unconfined" {
            opt("--security-opt", "seccomp=unconfined".into());
        }
        if sc["appArmorProfile"]["type"] == "Unconfined" {
            opt("--security-opt", "apparmor=unconfined".into());
        }
        if let Some(t) = sc["seLinuxOptions"]["type"].as_str() {
            opt("--security-opt", format!("label=type:{t}"));
        }
        for env in c["env"].as_array().into_iter().flatten() {
            let name = env["name"].as_str().expect("env name");
            let value = match (&env["value"], &env["valueFrom"]["fieldRef"]["fieldPath"]) {
                (Value::String(v), _) => v.clone(),
                (_, Value::String(f)) if f == "spec.nodeName" => volumes.node_name.clone(),
                other => panic!("{container}: env {name}: unsupported source {other:?}"),
            };
            opt("--env", format!("{name}={value}"));
        }
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let name = m["name"].as_str().expect("mount name");
            let source = self.volume_source(name, volumes);
            let mut options = Vec::new();
            if m["readOnly"] == true {
                options.push("ro");
            }
            match m["mountPropagation"].as_str() {
                Some("HostToContainer") => options.push("rslave"),
                Some("Bidirectional") => options.push("rshared"),
                _ => {}
            }
            let target = m["mountPath"].as_str().expect("mountPath");
            let mut spec = format!("{}:{target}", source.display());
            if !options.is_empty() {
                spec += &format!(":{}", options.join(","));
            }
            opt("--volume", spec);
        }
        if let Some(cmd) = c["command"].as_array() {
            assert_eq!(cmd.len(), 1, "{container}: command with arguments");
            opt("--entrypoint", cmd[0].as_str().expect("command").to_owned());
        }
        let args = c["args"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| a.as_str().expect("arg").to_owned())
            .collect();
        (opts, args)
    }

    /// The host directory behind volume `name`, created when its `hostPath` type says so.
    fn volume_source(&self, name: &str, volumes: &Volumes) -> PathBuf {
        let v = self.spec["volumes"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["name"] == name))
            .unwrap_or_else(|| panic!("no volume `{name}` in the DaemonSet"));
        if let Some(path) = v["hostPath"]["path"].as_str() {
            let dir = volumes
                .host_paths
                .get(path)
                .cloned()
                .unwrap_or_else(|| PathBuf::from(path));
            match v["hostPath"]["type"].as_str() {
                Some("DirectoryOrCreate") => std::fs::create_dir_all(&dir).expect("hostPath dir"),
                Some("Directory") => assert!(dir.is_dir(), "hostPath {} missing", dir.display()),
                other => panic!("volume {name}: hostPath type {other:?} not handled"),
            }
            return dir;
        }
        volumes
            .sources
            .get(name)
            .cloned()
            .unwrap_or_else(|| panic!("volume `{name}`: the test gives no directory for it"))
    }
}

/// Every podman call is bounded.
fn podman(containers_conf: &Path, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("60")
        .arg("podman")
        .args(args)
        .env("CONTAINERS_CONF", containers_conf)
        .output()
        .expect("run podman")
}

fn caps(list: &Value) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|c| c.as_str().expect("capability").to_owned())
        .collect()
}

/// One container of the DaemonSet, started detached; removed on drop.
pub struct PodContainer {
    pub name: String,
    containers_conf: PathBuf,
}

impl PodContainer {
    /// `podman run -d` of `container` from `image` with the DaemonSet's options, the extra
    /// `run_opts` (cgroup parent, limits) and `extra_args` after the manifest's arguments.
    pub fn run(
        ds: &DaemonSet,
        container: &str,
        image: &str,
        name: &str,
        volumes: &Volumes,
        run_opts: &[&str],
        extra_args: &[&str],
    ) -> PodContainer {
        let (opts, args) = ds.podman_args(container, volumes);
        let pod = PodContainer {
            name: name.to_owned(),
            containers_conf: volumes.containers_conf.clone(),
        };
        let mut cmd = vec!["run".to_owned(), "-d".into(), "--name".into(), name.into()];
        cmd.extend(opts);
        cmd.extend(run_opts.iter().map(|s| (*s).to_owned()));
        cmd.push(image.to_owned());
        cmd.extend(args);
        cmd.extend(extra_args.iter().map(|s| (*s).to_owned()));
        let out = pod.podman(&cmd.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            out.status.success(),
            "podman {}: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        pod
    }

    /// `podman run --rm` of `container` with the DaemonSet's options but `args` in place of
    /// its arguments, to the end (an operator's one-off command with the pod's mounts).
    pub fn run_to_end(
        ds: &DaemonSet,
        container: &str,
        image: &str,
        volumes: &Volumes,
        args: &[&str],
    ) -> Output {
        let (opts, _) = ds.podman_args(container, volumes);
        let mut cmd = vec!["run".to_owned(), "--rm".into()];
        cmd.extend(opts);
        cmd.extend(
            [
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
            ]
            .map(String::from),
        );
        cmd.push(image.to_owned());
        cmd.extend(args.iter().map(|s| (*s).to_owned()));
        podman(
            &volumes.containers_conf,
            &cmd.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    }

    pub fn podman(&self, args: &[&str]) -> Output {
        podman(&self.containers_conf, args)
    }

    /// What the container wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        let out = self.podman(&["logs", &self.name]);
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    pub fn running(&self) -> bool {
        let out = self.podman(&["inspect", "--format", "{{.State.Running}}", &self.name]);
        String::from_utf8_lossy(&out.stdout).trim() == "true"
    }

    /// `podman exec` in the container, as `kubectl exec` would.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut cmd = vec!["exec", &self.name];
        cmd.extend_from_slice(args);
        self.podman(&cmd)
    }

    /// Sends `signal` and waits for the exit; the exit code.
    pub fn stop_with(&self, signal: &str) -> i32 {
        let out = self.podman(&["kill", "--signal", signal, &self.name]);
        assert!(
            out.status.success(),
            "podman kill {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let out = self.podman(&["wait", &self.name]);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("podman wait {}: {out:?}", self.name))
    }

    /// Starts the stopped container again: a new process with the same mounts and state
    /// directories, as a kubelet restarts a failed container.
    pub fn restart(&self) {
        let out = self.podman(&["start", &self.name]);
        assert!(
            out.status.success(),
            "podman start {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Waits until `ready` holds, failing with the container's logs if it exits or takes
    /// longer than `limit`.
    pub fn wait_until(&self, limit: Duration, what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            if ready() {
                return;
            }
            assert!(
                self.running(),
                "{} exited before {what}:\n{}",
                self.name,
                self.logs()
            );
            assert!(
                Instant::now() < deadline,
                "{}: not {what} within {limit:?}:\n{}",
                self.name,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PodContainer {
    fn drop(&mut self) {
        let _ = self.podman(&["rm", "-f", "-t", "0", &self.name]);
    }
}
