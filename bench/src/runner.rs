//! The orchestration: one topology per layout, a warm-up pass, then rounds in which every
//! available mode runs every workload (A B C D E, A B C D E, …), so slow drift of the shared
//! 2-vCPU machine hits all modes alike and ratios can be paired per round (§9.3).

use std::{
    collections::BTreeMap,
    fs,
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    modes::{self, Env, Mode},
    pki, procs,
    report::{Failure, LayoutResults, Report, Sample},
    sysinfo,
    topology::{self, Layout, Topology},
    workloads::{self, Params, Workload},
};

/// What `interceptor-bench run` was asked to do.
#[derive(Debug, Clone)]
pub struct Plan {
    pub rounds: usize,
    pub quick: bool,
    pub modes: Vec<Mode>,
    pub workloads: Vec<Workload>,
    pub layouts: Vec<Layout>,
    pub agent: Option<PathBuf>,
    /// A second agent build for the `relay-base` mode.
    pub baseline_agent: Option<PathBuf>,
    /// `tuning.meshSpares` for the agent under test.
    pub mesh_spares: u32,
    /// `tuning.workerThreads` for the agent under test.
    pub worker_threads: u16,
    /// `tuning.connectionKeys: derived` for the agent under test.
    pub derived_keys: bool,
    /// The same for the baseline agent.
    pub baseline_derived_keys: bool,
    /// `tuning.relayAppLeg: skMsg` for the agent under test.
    pub app_leg_skmsg: bool,
    /// `tuning.runtime: perThread` for the agent under test.
    pub per_thread_runtime: bool,
    /// `tuning.runtime: perCpu` for the agent under test.
    pub per_cpu_runtime: bool,
    /// `tuning.schedSliceUs` for the agent under test (0: not set).
    pub sched_slice_us: u32,
    /// `tuning.relayBusyPollUs` for the agent under test (0: not set).
    pub relay_busy_poll_us: u32,
    /// ztunnel binary for the ztunnel modes (else `ZTUNNEL_BIN`).
    pub ztunnel: Option<PathBuf>,
    pub out: PathBuf,
    pub pin: bool,
    pub params: Params,
    pub warmup: bool,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn run(plan: &Plan) -> Result<Report> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the benchmark needs root (network namespaces, cgroups, eBPF): run it through \
             `cargo xtask bench`"
        );
    }
    procs::install_signal_handlers();
    topology::sweep_stale();
    let nofile = procs::raise_nofile_limit()?;
    if (nofile as usize) < plan.params.idle_flows * 2 + 512 {
        eprintln!(
            "bench: note: open-file limit {nofile} may be too low for {} idle flows",
            plan.params.idle_flows
        );
    }
    let started = now_unix();
    // Per process: a second run writing to the same --out must not delete this run's CA and
    // configs when it starts or ends.
    let work_dir = plan.out.join(format!("work-{}", std::process::id()));
    let log_dir = plan.out.join("logs");
    let _ = fs::remove_dir_all(&work_dir);
    fs::create_dir_all(&work_dir).with_context(|| format!("mkdir {}", work_dir.display()))?;
    fs::create_dir_all(&log_dir)?;
    let agent = plan
        .agent
        .as_ref()
        .filter(|a| a.is_file())
        .map(|a| fs::canonicalize(a).unwrap_or_else(|_| a.clone()));
    let pki = pki::create(&work_dir, agent.as_deref()).context("certificates")?;
    let env = Env {
        agent_bin: agent.clone(),
        baseline_agent_bin: plan
            .baseline_agent
            .as_ref()
            .filter(|a| a.is_file())
            .map(|a| fs::canonicalize(a).unwrap_or_else(|_| a.clone())),
        ztunnel_bin: crate::ztunnel::binary(plan.ztunnel.as_deref())
            .map(|z| fs::canonicalize(&z).unwrap_or(z)),
        mesh_spares: plan.mesh_spares,
        worker_threads: plan.worker_threads,
        derived_keys: plan.derived_keys,
        baseline_derived_keys: plan.baseline_derived_keys,
        app_leg_skmsg: plan.app_leg_skmsg,
        per_thread_runtime: plan.per_thread_runtime,
        per_cpu_runtime: plan.per_cpu_runtime,
        sched_slice_us: plan.sched_slice_us,
        relay_busy_poll_us: plan.relay_busy_poll_us,
        bench_bin: std::env::current_exe().context("own executable")?,
        work_dir: work_dir.clone(),
        log_dir,
        pki,
        pin: plan.pin,
    };
    let machine = sysinfo::collect(agent.as_deref());
    let handoff = match crate::handoff::measure(if plan.quick { 200 } else { 1000 }) {
        Ok(h) => Some(h),
        Err(e) => {
            println!("bench: kTLS hand-off timing failed: {e:#}");
            None
        }
    };
    println!(
        "bench: {} ({} CPUs), kernel {}, tcp ULPs [{}]",
        machine.cpu_model, machine.cpus, machine.kernel, machine.tcp_available_ulp
    );
    let mut unavailable = BTreeMap::new();
    let mut runnable = Vec::new();
    for &m in &plan.modes {
        match modes::availability(m, &env) {
            Ok(()) => runnable.push(m),
            Err(why) => {
                println!("bench: {:<18} {why}", m.label());
                unavailable.insert(m, why);
            }
        }
    }
    println!(
        "bench: modes {}; workloads {}; {} rounds{}",
        runnable
            .iter()
            .map(|m| m.label())
            .collect::<Vec<_>>()
            .join(" "),
        plan.workloads
            .iter()
            .map(|w| w.label())
            .collect::<Vec<_>>()
            .join(" "),
        plan.rounds,
        if plan.pin { ", pinned" } else { "" }
    );

    let mut layouts = Vec::new();
    for &layout in &plan.layouts {
        let mut results = LayoutResults::new(layout);
        results.unavailable = unavailable.clone();
        let outcome = run_layout(plan, &env, layout, &runnable, &mut results);
        results.summarise();
        layouts.push(results);
        if let Err(e) = outcome {
            // An interrupt still writes what was measured so far.
            eprintln!("bench: {} stopped: {e:#}", layout.label());
            if procs::check_interrupted().is_err() {
                break;
            }
        }
    }
    let _ = fs::remove_dir_all(&work_dir);
    Ok(Report {
        started_unix: started,
        finished_unix: now_unix(),
        rounds: plan.rounds,
        quick: plan.quick,
        pinned: plan.pin,
        params: plan.params.clone(),
        machine,
        handoff,
        layouts,
    })
}

fn run_layout(
    plan: &Plan,
    env: &Env,
    layout: Layout,
    runnable: &[Mode],
    results: &mut LayoutResults,
) -> Result<()> {
    println!("bench: building the {} topology", layout.label());
    let runnable: Vec<Mode> = runnable
        .iter()
        .copied()
        .filter(|m| m.runs_on(layout))
        .collect();
    let runnable = &runnable[..];
    let topo = Topology::new(layout)?;
    if plan.warmup {
        let warm = plan.params.warmup();
        for &mode in runnable {
            procs::check_interrupted()?;
            println!("[{} warm-up] {}", layout.label(), mode.label());
            if let Err(e) = one_mode(plan, env, &topo, mode, None, &warm, results) {
                procs::check_interrupted()?;
                eprintln!("  warm-up of {} failed: {e:#}", mode.label());
            }
        }
    }
    for round in 1..=plan.rounds {
        for &mode in runnable {
            procs::check_interrupted()?;
            println!(
                "[{} round {round}/{}] {}",
                layout.label(),
                plan.rounds,
                mode.label()
            );
            if let Err(e) = one_mode(plan, env, &topo, mode, Some(round), &plan.params, results) {
                procs::check_interrupted()?;
                eprintln!("  {} failed: {e:#}", mode.label());
                results.failures.push(Failure {
                    round: Some(round),
                    mode,
                    workload: None,
                    message: format!("{e:#}"),
                });
            }
        }
    }
    Ok(())
}

/// Starts a mode, runs every workload, tears the mode down. `round` None is the warm-up,
/// which records nothing.
fn one_mode(
    plan: &Plan,
    env: &Env,
    topo: &Topology,
    mode: Mode,
    round: Option<usize>,
    params: &Params,
    results: &mut LayoutResults,
) -> Result<()> {
    let tag = format!(
        "{}-{}-{}",
        topo.layout.label(),
        mode.label(),
        round.map_or("warmup".to_owned(), |r| format!("r{r}"))
    );
    let mut active = modes::start(mode, topo, env, &tag)?;
    for &w in &plan.workloads {
        procs::check_interrupted()?;
        if w == Workload::Scale {
            // Each idle point on proxies started for it, before anything else ran through
            // them: memory earlier workloads left freed but resident would be reused by the
            // held flows and hide their cost.
            for count in workloads::scale_idle_counts(procs::nofile_limit()?) {
                procs::check_interrupted()?;
                active.teardown()?;
                active = modes::start(mode, topo, env, &format!("{tag}-idle{count}"))?;
                let metrics = workloads::scale_idle(topo, &active, env, count);
                recorded(w, round, mode, metrics, results);
            }
            active.teardown()?;
            active = modes::start(mode, topo, env, &format!("{tag}-scale"))?;
        }
        let metrics = workloads::run(w, topo, &active, env, params);
        recorded(w, round, mode, metrics, results);
    }
    active.teardown()
}

/// Prints a workload's metrics and keeps them (`round` None: the warm-up, kept nowhere), or
/// its failure.
fn recorded(
    w: Workload,
    round: Option<usize>,
    mode: Mode,
    metrics: Result<Vec<workloads::Metric>>,
    results: &mut LayoutResults,
) {
    {
        match metrics {
            Ok(metrics) => {
                println!(
                    "  {:<7} {}",
                    w.label(),
                    metrics
                        .iter()
                        .map(|(k, v)| format!("{k}={}", short_num(*v)))
                        .collect::<Vec<_>>()
                        .join(" ")
                );
                if let Some(round) = round {
                    for (metric, value) in metrics {
                        results.samples.push(Sample {
                            round,
                            mode,
                            workload: w,
                            metric: metric.to_owned(),
                            value,
                        });
                    }
                }
            }
            Err(e) => {
                println!("  {:<7} FAILED: {e:#}", w.label());
                if let Some(round) = round {
                    results.failures.push(Failure {
                        round: Some(round),
                        mode,
                        workload: Some(w),
                        message: format!("{e:#}"),
                    });
                }
            }
        }
    }
}

fn short_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// Writes `results.json`, `results.md` and `results.svg` into `dir`, and
/// `results-scaling.svg` when the run had the `scale` workload.
pub fn write(report: &Report, dir: &std::path::Path) -> Result<()> {
    fs::create_dir_all(dir)?;
    fs::write(dir.join("results.json"), serde_json::to_vec_pretty(report)?)?;
    fs::write(dir.join("results.md"), report.markdown())?;
    fs::write(dir.join("results.svg"), report.svg())?;
    if let Some(svg) = report.scaling_svg() {
        fs::write(dir.join("results-scaling.svg"), svg)?;
    }
    Ok(())
}
