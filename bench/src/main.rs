//! `interceptor-bench`: the orchestrator (`run`) and the small programs it starts inside the
//! pods (`serve`, `http-load`, `churn`, `idle`, `http-get`). One binary, so the VM needs only
//! this file next to the agent and the Debian tools.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use interceptor_bench::{
    apps,
    modes::Mode,
    runner::{self, Plan},
    topology::Layout,
    workloads::{Params, Workload},
};

#[derive(Parser)]
#[command(
    name = "interceptor-bench",
    about = "interceptor vs HAProxy mTLS sidecars vs plaintext, side by side"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the benchmark (root): build the topology, run every mode in interleaved rounds,
    /// write results.{json,md,svg}.
    Run(RunArgs),
    /// HTTP (1 KiB body) and echo servers, until killed.
    Serve {
        #[arg(long)]
        http: SocketAddr,
        #[arg(long)]
        echo: SocketAddr,
    },
    /// Open-loop fixed-rate HTTP/1.1 load; JSON report on stdout.
    HttpLoad {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        #[arg(long, default_value_t = 16)]
        conns: usize,
        /// Measured seconds (after the warm-up).
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
    },
    /// New connection per request for DURATION seconds; JSON report on stdout.
    Churn {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// Client threads, each connecting one connection after another.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Also report the rate per window of this many seconds.
        #[arg(long)]
        window: Option<f64>,
        /// 64 bytes echoed, then the client closes first (target: the echo server), instead
        /// of one HTTP request with `Connection: close`.
        #[arg(long)]
        echo: bool,
        /// Stop after this many connections per thread (or at DURATION, whichever is first).
        #[arg(long)]
        count: Option<u64>,
        /// Offer this many connections per second in all, on a fixed schedule, instead of
        /// one after another as fast as they complete.
        #[arg(long)]
        rate: Option<f64>,
    },
    /// Open COUNT echo connections, print `ready N`, hold them.
    Idle {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, default_value_t = 600)]
        hold_secs: u64,
    },
    /// Re-render results.{md,svg} (and the summary in results.json) from a saved results.json,
    /// e.g. one a VM run printed.
    Render {
        /// Directory holding results.json; the renderings are written next to it.
        dir: PathBuf,
    },
    /// Cost of the hybrid post-quantum key exchange against x25519 alone (and secp256r1):
    /// new connections/s and CPU per connection over loopback, handshake CPU, hello sizes.
    /// Unprivileged; a Markdown table on stdout (`--json` for the raw report).
    Kx {
        /// Seconds per variant per round.
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[arg(long)]
        json: bool,
    },
    /// How policy load (reload) time and the per-connection decision grow with 10, 1 000 and
    /// 10 000 AuthorizationPolicies. Unprivileged; writes scale-policy.{json,md,svg} to OUT.
    ScalePolicy {
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[arg(long, default_value = "target/bench/scaling")]
        out: PathBuf,
    },
    /// The same-node fast path's two loopback legs joined by splice, by an sk_skb verdict
    /// and by sk_msg, side by side (root): 64 B round trips.
    LegsProbe {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Comma separated subset of: direct, splice, sk_skb, sk_msg.
        #[arg(long, value_delimiter = ',')]
        variants: Vec<String>,
    },
    /// The userspace relay's cost per byte and per round trip, counted: a flow through two
    /// relays over loopback on one thread, for `valgrind --tool=callgrind` or `strace -c -f`
    /// (two runs of different sizes; their difference is the cost of what lies between).
    /// Unprivileged; JSON on stdout.
    RelayCost {
        /// MiB moved one way through one flow.
        #[arg(long, default_value_t = 64)]
        bulk_mb: u64,
        /// 64-byte round trips on a second flow.
        #[arg(long, default_value_t = 10_000)]
        round_trips: u64,
        /// The relays' buffer size in KiB (default: the agent's).
        #[arg(long)]
        buffer_kib: Option<usize>,
    },
    /// The `forward` mode's forwarder: relays each LISTEN's connections to its TARGET, a
    /// blocking thread per direction, no TLS, until killed.
    Forward {
        /// LISTEN=TARGET (socket addresses), once per listener.
        #[arg(long = "route", required = true)]
        routes: Vec<interceptor_bench::forward::Route>,
    },
    /// One GET on a new connection; prints the body.
    HttpGet {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Measured rounds (at least 5 for a result; --quick defaults to 2).
    #[arg(long)]
    rounds: Option<usize>,
    /// Short durations and 2 rounds: a smoke run, not a result.
    #[arg(long)]
    quick: bool,
    /// Modes, comma separated: plaintext, ktls, relay, haproxy, skmsg, relay-full, local,
    /// local-skmsg, ztunnel, ztunnel-1stream, relay-base, forward (default: all).
    #[arg(long, value_delimiter = ',')]
    modes: Vec<String>,
    /// Workloads, comma separated: iperf1 iperf4 rr64 rr1k http churn idle (default: all), and
    /// the opt-in churn2 (2 client threads), sustained, scale.
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Topologies, comma separated: same-node, cross-node (default: both).
    #[arg(long, value_delimiter = ',')]
    topology: Vec<String>,
    /// The agent binary (release build of `interceptor`).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// A second agent build, run as mode `relay-base`: a change to the agent measured
    /// before and after in the same rounds.
    #[arg(long)]
    baseline_agent: Option<PathBuf>,
    /// `tuning.meshSpares` for the agent under test (`--agent`; never the baseline, which
    /// may predate the knob): spare mesh sessions per (pod, server, endpoint). 0: none.
    #[arg(long, default_value_t = 0)]
    mesh_spares: u32,
    /// `tuning.workerThreads` for the agent under test (`--agent`; never the baseline): the
    /// runtime's worker threads. 0: the agent's default (one per CPU).
    #[arg(long, default_value_t = 0)]
    worker_threads: u16,
    /// `tuning.connectionKeys: derived` for the agent under test (`--agent`; never the
    /// baseline): per-connection keys derived from an earlier mesh session.
    #[arg(long)]
    derived_keys: bool,
    /// `tuning.connectionKeys: derived` for the baseline agent too (`--baseline-agent`, a
    /// version that has the key): a change to derived connections measured against the same
    /// mode before it.
    #[arg(long)]
    baseline_derived_keys: bool,
    /// `tuning.relayAppLeg: skMsg` for the agent under test (`--agent`; never the baseline):
    /// the apps' sends reach the agent's ends of their loopback connections by sk_msg.
    #[arg(long)]
    app_leg_skmsg: bool,
    /// `tuning.runtime: perThread` for the agent under test (`--agent`; never the baseline):
    /// one single-threaded runtime per flow thread (`--worker-threads` of them), each
    /// accepted connection kept on one.
    #[arg(long)]
    per_thread_runtime: bool,
    /// `tuning.runtime: perCpu` for the agent under test (never the baseline): a runtime per
    /// CPU, its thread pinned there, each connection on the runtime of the CPU its packets
    /// arrive on. Overrides `--per-thread-runtime`.
    #[arg(long)]
    per_cpu_runtime: bool,
    /// `tuning.schedSliceUs` for the agent under test (never the baseline): the flow threads'
    /// fair-scheduler slice in µs (100–100000; 0, the default, leaves the key out).
    #[arg(long, default_value_t = 0)]
    sched_slice_us: u32,
    /// `tuning.relayBusyPollUs` for the agent under test (never the baseline): how long its
    /// userspace relay spins for a reply after forwarding a small message, in µs (at most
    /// 1000; 0, the default, leaves the key out).
    #[arg(long, default_value_t = 0)]
    relay_busy_poll_us: u32,
    /// ztunnel binary for the `ztunnel` and `ztunnel-1stream` modes (default: `ZTUNNEL_BIN`;
    /// without either they are reported unavailable). bench/README.md says how to build one.
    #[arg(long)]
    ztunnel: Option<PathBuf>,
    /// Output directory for results and logs.
    #[arg(long, default_value = "target/bench/host")]
    out: PathBuf,
    /// Pin the client pod (and its sidecar) to CPU 0 and the server pod to CPU 1.
    #[arg(long)]
    pin: bool,
    /// Offered HTTP rate (requests/s over all connections).
    #[arg(long)]
    http_rate: Option<f64>,
    /// Idle flows held open for the memory measurement.
    #[arg(long)]
    idle_flows: Option<usize>,
    /// Seconds per bulk (iperf3) run.
    #[arg(long)]
    iperf_secs: Option<u64>,
    /// Skip the warm-up pass.
    #[arg(long)]
    no_warmup: bool,
    /// churn / churn2: stop after N connections per client thread instead of after the
    /// usual seconds (at most 600 s): a fixed amount of work, e.g. for an agent run under
    /// `valgrind --tool=callgrind` or `strace -c` (bench/README.md, "Per-connection work").
    #[arg(long)]
    churn_count: Option<u64>,
    /// sustained: offer this many connections per second (per phase, in all) instead of
    /// closed-loop churn, so the first and last windows' cost per connection compare at the
    /// same load (bench/README.md "Sustained churn at a fixed rate").
    #[arg(long)]
    sustained_rate: Option<f64>,
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("interceptor-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Run(args) => run(args),
        Cmd::Serve { http, echo } => apps::serve(http, echo),
        Cmd::HttpLoad {
            target,
            rate,
            conns,
            duration,
            warmup,
        } => {
            let r = apps::http_load(
                target,
                rate,
                conns,
                Duration::from_secs_f64(duration),
                Duration::from_secs_f64(warmup),
            )?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Cmd::Churn {
            target,
            duration,
            threads,
            window,
            echo,
            count,
            rate,
        } => {
            let shape = apps::ChurnShape {
                duration: Duration::from_secs_f64(duration),
                threads,
                window: window.map(Duration::from_secs_f64),
                echo,
                count,
                rate,
            };
            let r = apps::churn_with(target, &shape)?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Cmd::Idle {
            target,
            count,
            hold_secs,
        } => apps::idle(target, count, Duration::from_secs(hold_secs)),
        Cmd::Render { dir } => {
            let text = std::fs::read(dir.join("results.json"))
                .with_context(|| format!("read {}/results.json", dir.display()))?;
            let mut report: interceptor_bench::report::Report =
                serde_json::from_slice(&text).context("parse results.json")?;
            for l in &mut report.layouts {
                l.summarise();
            }
            runner::write(&report, &dir)?;
            println!("{}", report.markdown());
            Ok(())
        }
        Cmd::LegsProbe {
            secs,
            rounds,
            mut variants,
        } => {
            if variants.is_empty() {
                variants = interceptor_bench::legs::VARIANTS
                    .map(str::to_owned)
                    .to_vec();
            }
            let samples = interceptor_bench::legs::run(secs, rounds, &variants)?;
            println!("{}", serde_json::to_string(&samples)?);
            print!("{}", interceptor_bench::legs::markdown(&samples, &variants));
            Ok(())
        }
        Cmd::Kx { secs, rounds, json } => {
            let r = interceptor_bench::kx::run(secs, rounds)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", r.markdown());
            }
            Ok(())
        }
        Cmd::ScalePolicy { rounds, out } => {
            let r = interceptor_bench::scale_policy::run(rounds)?;
            std::fs::create_dir_all(&out).with_context(|| format!("{}", out.display()))?;
            std::fs::write(
                out.join("scale-policy.json"),
                serde_json::to_vec_pretty(&r)?,
            )?;
            std::fs::write(out.join("scale-policy.md"), r.markdown())?;
            std::fs::write(out.join("scale-policy.svg"), r.svg())?;
            print!("{}", r.markdown());
            Ok(())
        }
        Cmd::RelayCost {
            bulk_mb,
            round_trips,
            buffer_kib,
        } => {
            let r = interceptor_bench::relay_cost::run(
                bulk_mb,
                round_trips,
                buffer_kib.map(|k| k << 10),
            )?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Cmd::Forward { routes } => interceptor_bench::forward::run(&routes),
        Cmd::HttpGet { target, path } => {
            let body = apps::http_get(target, &path, Duration::from_secs(10))?;
            print!("{body}");
            Ok(())
        }
    }
}

fn run(args: RunArgs) -> Result<()> {
    let mut params = if args.quick {
        Params::quick()
    } else {
        Params::full()
    };
    if let Some(r) = args.http_rate {
        params.http_rate = r;
    }
    if let Some(n) = args.idle_flows {
        params.idle_flows = n;
    }
    params.churn_count = args.churn_count;
    params.sustained_rate = args.sustained_rate;
    if let Some(s) = args.iperf_secs {
        params.iperf_secs = s;
    }
    let modes = if args.modes.is_empty() {
        Mode::ALL.to_vec()
    } else {
        let mut m = args
            .modes
            .iter()
            .map(|s| Mode::parse(s))
            .collect::<Result<Vec<_>>>()?;
        // Keep the round order fixed whatever order they were named in.
        m.sort_by_key(|m| Mode::ALL.iter().position(|x| x == m));
        m.dedup();
        m
    };
    let workloads = if args.workloads.is_empty() {
        Workload::ALL.to_vec()
    } else {
        args.workloads
            .iter()
            .map(|s| Workload::parse(s))
            .collect::<Result<Vec<_>>>()?
    };
    let layouts = if args.topology.is_empty() {
        vec![Layout::SameNode, Layout::CrossNode]
    } else {
        args.topology
            .iter()
            .map(|s| Layout::parse(s))
            .collect::<Result<Vec<_>>>()?
    };
    let plan = Plan {
        rounds: args.rounds.unwrap_or(if args.quick { 2 } else { 5 }),
        quick: args.quick,
        modes,
        workloads,
        layouts,
        agent: args.agent,
        baseline_agent: args.baseline_agent,
        mesh_spares: args.mesh_spares,
        worker_threads: args.worker_threads,
        derived_keys: args.derived_keys,
        baseline_derived_keys: args.baseline_derived_keys,
        app_leg_skmsg: args.app_leg_skmsg,
        per_thread_runtime: args.per_thread_runtime,
        per_cpu_runtime: args.per_cpu_runtime,
        sched_slice_us: args.sched_slice_us,
        relay_busy_poll_us: args.relay_busy_poll_us,
        ztunnel: args.ztunnel,
        out: args.out.clone(),
        pin: args.pin,
        params,
        warmup: !args.no_warmup,
    };
    let report = runner::run(&plan)?;
    runner::write(&report, &args.out).context("write results")?;
    println!();
    println!("{}", report.markdown());
    println!(
        "bench: results in {}/results.{{json,md,svg}}",
        args.out.display()
    );
    // Partial results are written above; the exit status still says the run was cut short.
    interceptor_bench::procs::check_interrupted()
}
