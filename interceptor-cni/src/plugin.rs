//! The CNI protocol (spec 1.0 and 1.1; 0.4.0 configs work too): commands, the network config
//! on stdin, `CNI_ARGS`, results and error objects. Pure, except through [`Agent`].

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use serde::Deserialize;
use serde_json::{Value, json};

use crate::agent::{Agent, AgentError, Membership, PodRef};

/// The versions this plugin speaks: every version with `prevResult`, which a chained plugin
/// needs (a main plugin still configured as 0.3.x must not lose its pods to us); 0.4.0 adds
/// CHECK, 1.1 STATUS and GC.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The newest of [`SUPPORTED_VERSIONS`].
pub const NEWEST_VERSION: &str = "1.1.0";

/// A network config is a few KiB; the bound keeps a broken runtime from making us buffer
/// without limit.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

// Error codes of the CNI spec; 100 and up are the plugin's own.
pub const CODE_INCOMPATIBLE_VERSION: u32 = 1;
pub const CODE_INVALID_ENV: u32 = 4;
pub const CODE_IO: u32 = 5;
pub const CODE_DECODE: u32 = 6;
pub const CODE_INVALID_CONFIG: u32 = 7;
/// "Try again later": the runtime retries the sandbox, which is what a mesh pod whose agent is
/// not (yet) reachable needs.
pub const CODE_TRY_AGAIN: u32 = 11;
/// The agent answered and refused (enrollment failed, pod unknown to it, check failed).
pub const CODE_AGENT_REFUSED: u32 = 100;

/// A CNI error object (`code`, `msg`, `details`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn to_json(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// The environment the runtime sets.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub args: String,
}

impl Env {
    pub fn from_process() -> Self {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        Self {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            args: var("CNI_ARGS"),
        }
    }
}

/// Our entry in the `.conflist` (the installer writes it): where the agent and its
/// membership cache are, and which namespaces never involve the agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    #[serde(default)]
    pub cni_version: String,
    #[serde(default)]
    pub prev_result: Option<Value>,
    #[serde(default = "default_admin_socket")]
    pub admin_socket: PathBuf,
    #[serde(default = "default_membership_file")]
    pub membership_file: PathBuf,
    /// Pods in these namespaces pass without asking the agent (istio-cni's
    /// `exclude_namespaces`): the node's own system pods must start while the agent is down.
    #[serde(default = "default_excluded")]
    pub exclude_namespaces: Vec<String>,
    /// How long ADD waits for the agent's answer (enrollment may wait for the cluster
    /// directory to see the pod).
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
}

pub fn default_admin_socket() -> PathBuf {
    PathBuf::from("/run/interceptor/admin.sock")
}
pub fn default_membership_file() -> PathBuf {
    PathBuf::from("/run/interceptor/cni-membership.json")
}
fn default_excluded() -> Vec<String> {
    vec!["kube-system".to_owned()]
}
fn default_timeout() -> u64 {
    20
}

/// The `cniVersion` of a config, for the error object (a config that does not parse gets
/// the newest version we speak).
pub fn config_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| NEWEST_VERSION.to_owned())
}

/// `CNI_ARGS` as key/value pairs (`K1=V1;K2=V2`).
pub fn parse_args(args: &str) -> BTreeMap<String, String> {
    args.split(';')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect()
}

/// Which pod the runtime names, from the keys containerd and CRI-O pass (podman passes only
/// `K8S_POD_NAME`: its containers are in the `default` namespace, as a pod without one is).
pub fn pod_ref(args: &BTreeMap<String, String>) -> Option<PodRef> {
    let name = args.get("K8S_POD_NAME").filter(|n| !n.is_empty())?;
    Some(PodRef {
        namespace: args
            .get("K8S_POD_NAMESPACE")
            .filter(|n| !n.is_empty())
            .cloned()
            .unwrap_or_else(|| "default".to_owned()),
        name: name.clone(),
        uid: args.get("K8S_POD_UID").cloned().unwrap_or_default(),
    })
}

/// The pod's addresses: `ips[].address` of the previous result, without the prefix length.
pub fn prev_ips(prev: &Value) -> Result<Vec<IpAddr>, CniError> {
    let Some(ips) = prev.get("ips").and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    ips.iter()
        .map(|ip| {
            let cidr = ip.get("address").and_then(Value::as_str).unwrap_or("");
            let addr = cidr.split('/').next().unwrap_or("");
            addr.parse().map_err(|_| {
                CniError::new(
                    CODE_DECODE,
                    "prevResult has an address that is not an IP",
                    format!("ips[].address = `{cidr}`"),
                )
            })
        })
        .collect()
}

/// One CNI invocation: `Ok(Some(json))` is printed, `Ok(None)` prints nothing.
pub fn run(env: &Env, stdin: &[u8], agent: &dyn Agent) -> Result<Option<Value>, CniError> {
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            CODE_DECODE,
            "cannot parse the network configuration",
            e.to_string(),
        )
    })?;
    if env.command == "VERSION" {
        return Ok(Some(json!({
            "cniVersion": NEWEST_VERSION,
            "supportedVersions": SUPPORTED_VERSIONS,
        })));
    }
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            CODE_INCOMPATIBLE_VERSION,
            format!("cniVersion `{}` is not supported", conf.cni_version),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    let args = parse_args(&env.args);
    match env.command.as_str() {
        "ADD" => add(env, &conf, &args, agent),
        "DEL" => del(env, &conf, &args, agent).map(|()| None),
        "CHECK" => check(env, &conf, &args, agent).map(|()| None),
        // Whether ADD can be served: always, since ADD decides per pod (a mesh pod while the
        // agent is down fails its own ADD; a "not ready" here would stop every pod).
        "STATUS" => Ok(None),
        // Enrollments of sandboxes that no longer exist are the agent's to drop: DEL removes
        // them, and the agent forgets a pod whose netns is gone.
        "GC" => Ok(None),
        "" => Err(CniError::new(
            CODE_INVALID_ENV,
            "CNI_COMMAND is not set",
            "interceptor-cni runs as a CNI plugin; see `interceptor-cni --help`",
        )),
        other => Err(CniError::new(
            CODE_INVALID_ENV,
            format!("unknown CNI_COMMAND `{other}`"),
            "ADD, DEL, CHECK, STATUS, GC and VERSION are supported",
        )),
    }
}

/// The result handed on: `prevResult` unchanged, labelled with the config's version.
fn pass(conf: &NetConf) -> Result<Option<Value>, CniError> {
    let Some(mut prev) = conf.prev_result.clone() else {
        return Err(no_prev_result());
    };
    if let Some(obj) = prev.as_object_mut() {
        obj.insert("cniVersion".to_owned(), json!(conf.cni_version));
    }
    Ok(Some(prev))
}

fn no_prev_result() -> CniError {
    CniError::new(
        CODE_INVALID_CONFIG,
        "interceptor-cni must be chained after the pod's network plugin",
        "the network configuration has no prevResult",
    )
}

fn add(
    env: &Env,
    conf: &NetConf,
    args: &BTreeMap<String, String>,
    agent: &dyn Agent,
) -> Result<Option<Value>, CniError> {
    let prev = conf.prev_result.as_ref().ok_or_else(no_prev_result)?;
    // A sandbox no pod name is known for has no identity to give it: not a mesh pod.
    let Some(pod) = pod_ref(args) else {
        return pass(conf);
    };
    if conf.exclude_namespaces.contains(&pod.namespace) {
        return pass(conf);
    }
    if env.netns.is_empty() {
        return Err(CniError::new(
            CODE_INVALID_ENV,
            "CNI_NETNS is not set on ADD",
            format!("pod {}/{}", pod.namespace, pod.name),
        ));
    }
    let ips = prev_ips(prev)?;
    match agent.enroll(conf, &pod, &env.netns, &ips, &env.container_id) {
        Ok(_) => pass(conf),
        Err(AgentError::Refused(message)) => Err(CniError::new(
            CODE_AGENT_REFUSED,
            format!(
                "the interceptor agent refused to enroll pod {}/{}",
                pod.namespace, pod.name
            ),
            message,
        )),
        Err(AgentError::HandingOver(message)) => Err(handing_over("enroll", &pod, message)),
        Err(AgentError::Unreachable(why)) => match agent.cached_membership(conf, &pod.namespace) {
            Membership::Outside => pass(conf),
            known => Err(CniError::new(
                CODE_TRY_AGAIN,
                format!(
                    "pod {}/{} must be in the mesh but the interceptor agent is unreachable; \
                     not starting it unprotected",
                    pod.namespace, pod.name
                ),
                format!(
                    "{why}; namespace `{}` is {} in {}",
                    pod.namespace,
                    match known {
                        Membership::Mesh => "in the mesh",
                        _ => "unknown",
                    },
                    conf.membership_file.display()
                ),
            )),
        },
    }
}

/// DEL is idempotent and must not keep a sandbox from being torn down: an agent that is down
/// forgets the pod by itself once its netns is gone, so unreachable is not an error.
fn del(
    env: &Env,
    conf: &NetConf,
    args: &BTreeMap<String, String>,
    agent: &dyn Agent,
) -> Result<(), CniError> {
    let Some(pod) = pod_ref(args) else {
        return Ok(());
    };
    if conf.exclude_namespaces.contains(&pod.namespace) {
        return Ok(());
    }
    match agent.unenroll(conf, &pod, &env.container_id) {
        Ok(_) => Ok(()),
        Err(AgentError::Unreachable(why)) => {
            eprintln!(
                "interceptor-cni: DEL {}/{}: agent unreachable ({why}); it drops the pod when \
                 its netns is gone",
                pod.namespace, pod.name
            );
            Ok(())
        }
        Err(AgentError::Refused(message)) => Err(CniError::new(
            CODE_AGENT_REFUSED,
            format!(
                "the interceptor agent could not unenroll pod {}/{}",
                pod.namespace, pod.name
            ),
            message,
        )),
        Err(AgentError::HandingOver(message)) => Err(handing_over("unenroll", &pod, message)),
    }
}

/// The agent was handing over to a successor for longer than the plugin asks: the runtime
/// should try again (the successor will answer), never start the pod unenrolled.
fn handing_over(what: &str, pod: &PodRef, message: String) -> CniError {
    CniError::new(
        CODE_TRY_AGAIN,
        format!(
            "cannot {what} pod {}/{}: the interceptor agent is handing over to its successor \
             (an upgrade)",
            pod.namespace, pod.name
        ),
        message,
    )
}

fn check(
    env: &Env,
    conf: &NetConf,
    args: &BTreeMap<String, String>,
    agent: &dyn Agent,
) -> Result<(), CniError> {
    let prev = conf.prev_result.as_ref().ok_or_else(no_prev_result)?;
    let Some(pod) = pod_ref(args) else {
        return Ok(());
    };
    if conf.exclude_namespaces.contains(&pod.namespace) {
        return Ok(());
    }
    let ips = prev_ips(prev)?;
    match agent.check(conf, &pod, &env.netns, &ips, &env.container_id) {
        Ok(_) => Ok(()),
        Err(AgentError::Refused(message)) => Err(CniError::new(
            CODE_AGENT_REFUSED,
            format!(
                "pod {}/{} is not enrolled as it must be",
                pod.namespace, pod.name
            ),
            message,
        )),
        Err(AgentError::HandingOver(message)) => Err(handing_over("check", &pod, message)),
        Err(AgentError::Unreachable(why)) => match agent.cached_membership(conf, &pod.namespace) {
            Membership::Outside => Ok(()),
            _ => Err(CniError::new(
                CODE_TRY_AGAIN,
                format!(
                    "cannot verify mesh pod {}/{}: the interceptor agent is unreachable",
                    pod.namespace, pod.name
                ),
                why,
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// An agent that answers as told and records what it was asked.
    struct Fake {
        reachable: bool,
        refuse: Option<String>,
        cached: Membership,
        calls: RefCell<Vec<String>>,
    }

    impl Fake {
        fn up() -> Self {
            Self {
                reachable: true,
                refuse: None,
                cached: Membership::Unknown,
                calls: RefCell::default(),
            }
        }
        fn down(cached: Membership) -> Self {
            Self {
                reachable: false,
                cached,
                ..Self::up()
            }
        }
        fn answer(&self, call: String) -> Result<String, AgentError> {
            self.calls.borrow_mut().push(call);
            if !self.reachable {
                return Err(AgentError::Unreachable("connection refused".to_owned()));
            }
            match &self.refuse {
                Some(m) => Err(AgentError::Refused(m.clone())),
                None => Ok("ok".to_owned()),
            }
        }
    }

    impl Agent for Fake {
        fn enroll(
            &self,
            _: &NetConf,
            pod: &PodRef,
            netns: &str,
            ips: &[IpAddr],
            id: &str,
        ) -> Result<String, AgentError> {
            self.answer(format!(
                "enroll {}/{} uid={} {netns} {ips:?} {id}",
                pod.namespace, pod.name, pod.uid
            ))
        }
        fn unenroll(&self, _: &NetConf, pod: &PodRef, id: &str) -> Result<String, AgentError> {
            self.answer(format!("unenroll {}/{} {id}", pod.namespace, pod.name))
        }
        fn check(
            &self,
            _: &NetConf,
            pod: &PodRef,
            _: &str,
            _: &[IpAddr],
            id: &str,
        ) -> Result<String, AgentError> {
            self.answer(format!("check {}/{} {id}", pod.namespace, pod.name))
        }
        fn cached_membership(&self, _: &NetConf, _: &str) -> Membership {
            self.cached
        }
    }

    const PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/run/netns/x"}],
        "ips":[{"interface":0,"address":"10.88.0.5/16","gateway":"10.88.0.1"},
               {"interface":0,"address":"fd00::5/64"}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{}}"#;

    fn conf(version: &str) -> Vec<u8> {
        format!(
            r#"{{"cniVersion":"{version}","name":"net","type":"interceptor-cni",
                "excludeNamespaces":["kube-system"],"prevResult":{PREV}}}"#
        )
        .into_bytes()
    }

    fn env(command: &str, args: &str) -> Env {
        Env {
            command: command.to_owned(),
            container_id: "c0ffee".to_owned(),
            netns: "/run/netns/x".to_owned(),
            args: args.to_owned(),
        }
    }

    const POD_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=full;K8S_POD_NAME=sleep;K8S_POD_UID=u-1;\
         K8S_POD_INFRA_CONTAINER_ID=c0ffee";

    #[test]
    fn add_enrolls_and_returns_prev_result_unchanged() {
        let agent = Fake::up();
        let out = run(&env("ADD", POD_ARGS), &conf("1.1.0"), &agent)
            .unwrap()
            .unwrap();
        let mut expected: Value = serde_json::from_str(PREV).unwrap();
        expected["cniVersion"] = json!("1.1.0");
        assert_eq!(out, expected);
        assert_eq!(
            agent.calls.borrow().as_slice(),
            ["enroll full/sleep uid=u-1 /run/netns/x [10.88.0.5, fd00::5] c0ffee"]
        );
    }

    #[test]
    fn add_for_an_unreachable_agent_fails_closed_unless_the_namespace_is_known_outside() {
        for cached in [Membership::Mesh, Membership::Unknown] {
            let agent = Fake::down(cached);
            let err = run(&env("ADD", POD_ARGS), &conf("1.0.0"), &agent).unwrap_err();
            assert_eq!(err.code, CODE_TRY_AGAIN, "{err:?}");
            assert!(err.msg.contains("full/sleep"), "{err:?}");
            assert!(err.details.contains("connection refused"), "{err:?}");
            let j = err.to_json("1.0.0");
            assert_eq!(j["code"], 11);
            assert_eq!(j["cniVersion"], "1.0.0");
        }
        let agent = Fake::down(Membership::Outside);
        assert!(
            run(&env("ADD", POD_ARGS), &conf("1.0.0"), &agent)
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn excluded_namespaces_and_unnamed_sandboxes_never_reach_the_agent() {
        let agent = Fake::down(Membership::Mesh);
        let args = "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns";
        assert!(run(&env("ADD", args), &conf("1.0.0"), &agent).is_ok());
        assert!(run(&env("ADD", "IgnoreUnknown=1"), &conf("1.0.0"), &agent).is_ok());
        assert!(run(&env("DEL", args), &conf("1.0.0"), &agent).is_ok());
        assert!(run(&env("CHECK", args), &conf("1.0.0"), &agent).is_ok());
        assert!(agent.calls.borrow().is_empty());
    }

    #[test]
    fn a_refusal_is_a_cni_error_naming_the_pod() {
        let agent = Fake {
            refuse: Some("pod full/sleep is not in the directory".to_owned()),
            ..Fake::up()
        };
        let err = run(&env("ADD", POD_ARGS), &conf("1.0.0"), &agent).unwrap_err();
        assert_eq!(err.code, CODE_AGENT_REFUSED);
        assert!(err.details.contains("not in the directory"));
        let err = run(&env("CHECK", POD_ARGS), &conf("1.0.0"), &agent).unwrap_err();
        assert_eq!(err.code, CODE_AGENT_REFUSED);
    }

    #[test]
    fn del_is_quiet_and_idempotent_even_without_netns_or_agent() {
        let agent = Fake::down(Membership::Mesh);
        let mut e = env("DEL", POD_ARGS);
        e.netns.clear();
        assert_eq!(run(&e, &conf("1.0.0"), &agent).unwrap(), None);
        let agent = Fake::up();
        assert_eq!(run(&e, &conf("1.0.0"), &agent).unwrap(), None);
        assert_eq!(
            agent.calls.borrow().as_slice(),
            ["unenroll full/sleep c0ffee"]
        );
    }

    #[test]
    fn version_and_bad_input() {
        let agent = Fake::up();
        let v = run(&env("VERSION", ""), br#"{"cniVersion":"1.1.0"}"#, &agent)
            .unwrap()
            .unwrap();
        assert_eq!(v["supportedVersions"], json!(SUPPORTED_VERSIONS));
        assert_eq!(v["cniVersion"], "1.1.0");
        let err = run(&env("ADD", POD_ARGS), &conf("0.2.0"), &agent).unwrap_err();
        assert_eq!(err.code, CODE_INCOMPATIBLE_VERSION);
        let err = run(&env("ADD", POD_ARGS), b"{not json", &agent).unwrap_err();
        assert_eq!(err.code, CODE_DECODE);
        let err = run(
            &env("ADD", POD_ARGS),
            br#"{"cniVersion":"1.0.0","name":"n","type":"interceptor-cni"}"#,
            &agent,
        )
        .unwrap_err();
        assert_eq!(err.code, CODE_INVALID_CONFIG, "{err:?}");
        let err = run(&env("", POD_ARGS), &conf("1.0.0"), &agent).unwrap_err();
        assert_eq!(err.code, CODE_INVALID_ENV);
        assert_eq!(config_version(b"junk"), "1.1.0");
    }

    #[test]
    fn podman_args_name_the_default_namespace() {
        let pod = pod_ref(&parse_args("IgnoreUnknown=1;K8S_POD_NAME=web")).unwrap();
        assert_eq!(
            (pod.namespace.as_str(), pod.name.as_str()),
            ("default", "web")
        );
        assert_eq!(pod_ref(&parse_args("IgnoreUnknown=1")), None);
    }
}
