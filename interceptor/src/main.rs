//! The `interceptor` binary: parse the command line, set up logging, dispatch.

#![deny(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use interceptor::{
    admin::{self, Request, Response},
    app, ca,
    config::{Config, RuntimeShape, Tuning, Workload},
    identity::TrustDomain,
    intercept::{self, table},
    probe, runtimes,
};

#[derive(Parser)]
#[command(
    name = "interceptor",
    version,
    about = "Transparent mutual TLS for pods, eBPF-steered, kernel-TLS accelerated"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show what this kernel offers and which data path the agent will use.
    Probe {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Treat missing kernel TLS as an error (as `ktls: required` does).
        #[arg(long)]
        require_ktls: bool,
    },
    /// Run the node agent.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Take the listeners of the agent running on this node (its `handover.socket`)
        /// instead of binding new ones, so the upgrade refuses no connection; starts afresh
        /// when none is running.
        #[arg(long)]
        takeover: bool,
    },
    /// Enroll a pod on a running agent (takes effect for new connections at once).
    Enroll {
        #[arg(long)]
        name: String,
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        service_account: String,
        /// k=v, repeatable.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[arg(long)]
        cgroup: PathBuf,
        #[arg(long)]
        netns: PathBuf,
        /// Repeatable.
        #[arg(long = "ip", required = true)]
        ips: Vec<std::net::IpAddr>,
        #[arg(long, default_value = DEFAULT_ADMIN)]
        admin_socket: PathBuf,
    },
    /// Remove a pod from a running agent: its new connections use plain networking again.
    Unenroll {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = DEFAULT_ADMIN)]
        admin_socket: PathBuf,
    },
    /// List open flows on a running agent.
    Flows {
        #[arg(long)]
        json: bool,
        /// Show the eBPF and refusal counters instead.
        #[arg(long)]
        stats: bool,
        /// Include recently closed flows.
        #[arg(long)]
        all: bool,
        #[arg(long, default_value = DEFAULT_ADMIN)]
        admin_socket: PathBuf,
    },
    /// Manage the built-in certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCmd,
    },
    /// Istio security policy (PeerAuthentication, DestinationRule, AuthorizationPolicy).
    Policy {
        #[command(subcommand)]
        command: PolicyCmd,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Validate the `*.yaml`/`*.yml` files of a directory offline, as the agent would load
    /// them: exits non-zero naming file, document and field; prints warnings.
    Check {
        /// The policy directory (`policyDir` of the node config).
        dir: PathBuf,
        /// A directory DestinationRule certificate files may be read from (`policy.certDirs`
        /// of the node config); repeatable. Without it, such a rule is invalid, as in an agent
        /// with no `policy.certDirs`.
        #[arg(long = "cert-dir")]
        cert_dirs: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create a self-signed root as signer and trust bundle (`ca-key.pem` mode 0600,
    /// `ca-cert.pem`, `cert-chain.pem`, `root-cert.pem`).
    Init {
        #[arg(long)]
        trust_domain: String,
        #[arg(long)]
        dir: PathBuf,
        /// Replace an existing CA (every issued certificate stops being trusted).
        #[arg(long)]
        force: bool,
    },
    /// Mint an intermediate signed by the CA in --root-dir into a node's CA directory; the
    /// roots of --root-dir are added to the roots the directory already trusts.
    Intermediate {
        /// The CA that signs the intermediate (its key is read, never copied).
        #[arg(long)]
        root_dir: PathBuf,
        /// The node's CA directory (`caDir`).
        #[arg(long)]
        dir: PathBuf,
        /// Lifetime, such as `365d` or `720h`; clipped to the root's.
        #[arg(long, default_value = "365d")]
        ttl: String,
        /// Needed when the root carries no spiffe:// URI SAN (Istio's roots do not).
        #[arg(long)]
        trust_domain: Option<String>,
        /// Replace the signer already in --dir (a running agent picks the new one up).
        #[arg(long)]
        force: bool,
    },
    /// Print subject, issuer, SPIFFE trust domain and validity of every file in a CA
    /// directory, and whether the agent would accept it; exits non-zero if not.
    Status {
        #[arg(long)]
        dir: PathBuf,
        /// The node's trust domain, for CAs without a spiffe:// URI SAN.
        #[arg(long)]
        trust_domain: Option<String>,
    },
}

const DEFAULT_ADMIN: &str = "/run/interceptor/admin.sock";

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("label `{s}` is not k=v"))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    multi_thread(0, None)
}

/// One multi-threaded runtime of `workers` threads (one per CPU when 0), each started with
/// `slice` as its scheduler slice when set.
fn multi_thread(
    workers: usize,
    slice: Option<std::time::Duration>,
) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if workers > 0 {
        builder.worker_threads(workers);
    }
    if slice.is_some() {
        builder.on_thread_start(move || runtimes::flow_thread_started(slice));
    }
    Ok(builder.enable_all().build()?)
}

/// The agent's runtime, shaped by `tuning.runtime`: `shared`, one multi-threaded runtime of
/// `tuning.workerThreads` workers for everything; `perThread` (that many, or one per CPU) and
/// `perCpu` (one per allowed CPU, pinned) install single-threaded flow runtimes on threads of
/// their own for the accept loops to hand connections to, and the rest runs on a
/// single-threaded runtime on the main thread.
fn agent_runtime(tuning: &Tuning) -> anyhow::Result<tokio::runtime::Runtime> {
    let workers = usize::from(tuning.worker_threads);
    let slice = (tuning.sched_slice_us > 0)
        .then(|| std::time::Duration::from_micros(tuning.sched_slice_us.into()));
    let flows = match tuning.runtime {
        RuntimeShape::Shared => return multi_thread(workers, slice),
        RuntimeShape::PerThread => runtimes::FlowRuntimes::start(
            if workers > 0 {
                workers
            } else {
                std::thread::available_parallelism().map_or(1, usize::from)
            },
            slice,
        )?,
        RuntimeShape::PerCpu => runtimes::FlowRuntimes::start_per_cpu(slice)?,
    };
    runtimes::install(flows)?;
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Sends one admin request and turns an error response into an error.
fn admin_call(socket: &std::path::Path, req: Request) -> anyhow::Result<Response> {
    match runtime()?.block_on(admin::call(socket, &req))? {
        Response::Error { message, .. } => anyhow::bail!("{message}"),
        other => Ok(other),
    }
}

/// Stale enrollments go to stderr, so `flows --json` stays one JSON document on stdout.
fn print_stale(stale: &[app::Stale]) {
    for s in stale {
        eprintln!(
            "stale enrollment {} (cgroup {}, netns {}): {}",
            s.workload.name,
            s.workload.cgroup.display(),
            s.workload.netns.display(),
            s.reason
        );
    }
}

/// Logs go to stderr, filtered by `INTERCEPTOR_LOG`; access lines (one per connection, see
/// `observability.accessLog`) go to stdout as they are, one JSON or logfmt line each, whatever
/// the log filter says.
fn init_logging() {
    use tracing_subscriber::{
        EnvFilter, Layer as _, filter::filter_fn, fmt, layer::SubscriberExt as _,
        util::SubscriberInitExt as _,
    };
    fn access(m: &tracing::Metadata<'_>) -> bool {
        m.target() == interceptor::telemetry::access::TARGET && *m.level() == tracing::Level::INFO
    }
    let env = EnvFilter::try_from_env("INTERCEPTOR_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::registry()
        .with(
            fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(env)
                .with_filter(filter_fn(|m| !access(m))),
        )
        .with(AccessLines.with_filter(filter_fn(access)))
        .init();
}

/// Writes each access line to stdout as it was rendered, one per line. Its renderers (JSON,
/// logfmt) escape control characters themselves, so the fmt layer's own escaping, one
/// character at a time, was pure cost: ~28 000 instructions per line, one line per flow end
/// (bench/README.md, "Per-connection work, counted").
struct AccessLines;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for AccessLines {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        event.record(&mut AccessLines);
    }
}

impl tracing::field::Visit for AccessLines {
    fn record_str(&mut self, field: &tracing::field::Field, line: &str) {
        if field.name() == "line" {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(line.as_bytes());
            let _ = out.write_all(b"\n");
        }
    }

    fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
}

fn main() -> ExitCode {
    init_logging();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("interceptor: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Probe { json, require_ktls } => {
            let report = probe::run(require_ktls);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(if report.missing.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Cmd::Run { config, takeover } => {
            let text = std::fs::read_to_string(&config)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", config.display()))?;
            let parsed = Config::parse(&config.display().to_string(), &text)?;
            agent_runtime(&parsed.tuning)?.block_on(app::run(parsed, config, takeover))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Enroll {
            name,
            namespace,
            service_account,
            labels,
            cgroup,
            netns,
            ips,
            admin_socket,
        } => {
            let workload = Workload {
                name,
                namespace,
                service_account,
                labels: labels.into_iter().collect(),
                cgroup,
                netns,
                ips,
            };
            if let Response::Ok { message } =
                admin_call(&admin_socket, Request::Enroll { workload })?
            {
                eprintln!("{message}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Unenroll { name, admin_socket } => {
            if let Response::Ok { message } = admin_call(&admin_socket, Request::Unenroll { name })?
            {
                eprintln!("{message}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Flows {
            json,
            stats,
            all,
            admin_socket,
        } => {
            let req = if stats {
                Request::Stats
            } else {
                Request::Flows { all }
            };
            match admin_call(&admin_socket, req)? {
                Response::Flows { flows, stale } if json => {
                    println!("{}", serde_json::to_string_pretty(&flows)?);
                    print_stale(&stale);
                }
                Response::Flows { flows, stale } => {
                    let rows: Vec<table::FlowRow> = flows
                        .into_iter()
                        .filter_map(|v| serde_json::from_value(v).ok())
                        .collect();
                    print!("{}", table::render(&rows));
                    print_stale(&stale);
                }
                Response::Stats { stats } => println!("{}", serde_json::to_string_pretty(&stats)?),
                other => anyhow::bail!("unexpected answer from the agent: {other:?}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Policy {
            command: PolicyCmd::Check { dir, cert_dirs },
        } => match intercept::enforce::check_dir(&dir, &cert_dirs) {
            Ok(warnings) => {
                for w in &warnings {
                    eprintln!("warning: {w}");
                }
                println!(
                    "{}: valid ({} warning{})",
                    dir.display(),
                    warnings.len(),
                    if warnings.len() == 1 { "" } else { "s" }
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{}: invalid policy:\n{e:#}", dir.display());
                Ok(ExitCode::from(1))
            }
        },
        Cmd::Ca {
            command:
                CaCmd::Init {
                    trust_domain,
                    dir,
                    force,
                },
        } => {
            let td: TrustDomain = trust_domain.parse()?;
            let on_existing = if force {
                ca::OnExisting::Replace
            } else {
                ca::OnExisting::Refuse
            };
            ca::Ca::init(&td, &dir, on_existing)?;
            eprintln!("wrote CA for trust domain {td} to {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Ca {
            command:
                CaCmd::Intermediate {
                    root_dir,
                    dir,
                    ttl,
                    trust_domain,
                    force,
                },
        } => {
            let ttl: interceptor::config::Ttl =
                ttl.parse().map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
            let td: Option<TrustDomain> = trust_domain.map(|t| t.parse()).transpose()?;
            let on_existing = if force {
                ca::OnExisting::Replace
            } else {
                ca::OnExisting::Refuse
            };
            let ca = ca::Ca::intermediate(&root_dir, &dir, ttl.0, td.as_ref(), on_existing)?;
            eprintln!(
                "wrote intermediate `{}` (until {}) to {}",
                ca.signer().subject,
                ca::When(ca.signer().not_after),
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Ca {
            command: CaCmd::Status { dir, trust_domain },
        } => {
            let td: Option<TrustDomain> = trust_domain.map(|t| t.parse()).transpose()?;
            let (report, loaded) =
                ca::status::report(&dir, td.as_ref(), std::time::SystemTime::now());
            print!("{report}");
            Ok(if loaded.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
