//! `cargo xtask fuzz`: libFuzzer runs of the agent's input parsers (`fuzz/`, built with
//! `cargo +nightly fuzz`). CI runs every target for a few seconds (`--smoke`) from the seed
//! corpora; a longer `--time` run keeps what it learns in `target/fuzz/corpus` for next time.
//!
//! Seeds come from the tree, so they follow the tests: the YAML fixtures (raw string literals)
//! of the policy and config tests, the README and deploy configs, plus the small hand-made
//! files in `fuzz/seeds/`.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{display, run};

/// Every target in `fuzz/Cargo.toml`, cheapest first.
pub(crate) const TARGETS: &[&str] = &["peek", "admin", "config", "policy", "record"];

/// Per-target seconds for `--smoke` (CI).
pub(crate) const SMOKE_SECS: u64 = 25;

#[derive(Debug, clap::Args)]
pub(crate) struct FuzzArgs {
    /// Run each target for SMOKE_SECS seconds (what CI does).
    #[arg(long, conflicts_with = "time")]
    pub(crate) smoke: bool,
    /// Run each target for this many seconds.
    #[arg(long)]
    pub(crate) time: Option<u64>,
    /// Only these targets (default: all).
    #[arg(long = "target", value_name = "NAME")]
    pub(crate) targets: Vec<String>,
}

/// What one target did.
struct Outcome {
    target: &'static str,
    execs: u64,
    secs: f64,
}

pub(crate) fn fuzz(root: &Path, args: &FuzzArgs) -> Result<()> {
    let secs = match (args.smoke, args.time) {
        (_, Some(t)) => t,
        (true, None) => SMOKE_SECS,
        (false, None) => bail!("say how long: --smoke or --time SECONDS"),
    };
    for t in &args.targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!(
                "unknown fuzz target `{t}`; the targets are {}",
                TARGETS.join(", ")
            );
        }
    }
    let targets: Vec<&'static str> = TARGETS
        .iter()
        .copied()
        .filter(|t| args.targets.is_empty() || args.targets.iter().any(|a| a == t))
        .collect();

    let started = Instant::now();
    run(root, cargo_fuzz().args(["build", "--debug-assertions"]))?;
    eprintln!("fuzz targets built in {:.0?}", started.elapsed());

    let work = root.join("target/fuzz");
    let mut seeded = Vec::new();
    for target in targets {
        let seeds = work.join("seeds").join(target);
        write_seeds(root, target, &seeds)?;
        seeded.push((target, seeds));
    }
    // The targets run side by side: each is bounded by time, not by work, so running them in
    // turn only multiplied the wall time (five targets took 135 s of CI in turn).
    let results = std::thread::scope(|scope| {
        let running: Vec<_> = seeded
            .iter()
            .map(|(target, seeds)| {
                let work = &work;
                scope.spawn(move || (*target, run_target(root, work, target, seeds, secs)))
            })
            .collect();
        running
            .into_iter()
            .map(|run| run.join())
            .collect::<Vec<_>>()
    });
    let mut outcomes = Vec::new();
    let mut failures = Vec::new();
    for result in results {
        // A crash in one target does not hide what the others would find.
        match result {
            Ok((_, Ok(o))) => outcomes.push(o),
            Ok((target, Err(e))) => {
                eprintln!("{e:#}");
                failures.push(target);
            }
            Err(_) => bail!("a fuzz target's runner thread panicked"),
        }
    }
    let mut summary = String::from("fuzz summary:\n");
    for o in &outcomes {
        let _ = writeln!(
            summary,
            "  {:<8} {:>12} execs in {:>5.0} s ({:.0}/s)",
            o.target,
            o.execs,
            o.secs,
            o.execs as f64 / o.secs.max(1.0)
        );
    }
    let total: u64 = outcomes.iter().map(|o| o.execs).sum();
    let _ = writeln!(summary, "  total    {total:>12} execs");
    eprint!("{summary}");
    if !failures.is_empty() {
        bail!("fuzz targets failed: {}", failures.join(", "));
    }
    Ok(())
}

fn cargo_fuzz() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(["+nightly", "fuzz"]);
    cmd
}

/// Runs one target for `secs` seconds: new inputs go to `target/fuzz/corpus/<target>`, the
/// seeds are read only. Fails naming the crashing input, which libFuzzer saved.
fn run_target(
    root: &Path,
    work: &Path,
    target: &'static str,
    seeds: &Path,
    secs: u64,
) -> Result<Outcome> {
    let corpus = work.join("corpus").join(target);
    let artifacts = work.join("artifacts").join(target);
    let logs = work.join("logs");
    for d in [&corpus, &artifacts, &logs] {
        std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
    }
    let log = logs.join(format!("{target}.log"));
    let mut cmd = cargo_fuzz();
    cmd.args(["run", "--debug-assertions", target])
        .arg(&corpus)
        .arg(seeds);
    let fixed = root.join("fuzz/seeds").join(target);
    if fixed.is_dir() {
        cmd.arg(fixed);
    }
    cmd.arg("--")
        .arg(format!("-max_total_time={secs}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(format!(
            "-dict={}",
            root.join("fuzz/dict").join(dict(target)).display()
        ))
        // Inputs bigger than any real ClientHello record, admin line or config file the
        // tests use; larger ones only slow the search down.
        .arg("-max_len=16384")
        // Six developers share two cores here and CI runners are small: a target that grows
        // past this is a finding (a YAML bomb), not a reason to swap.
        .arg("-rss_limit_mb=1024")
        // Likewise an input that takes this long (on a loaded machine) is a finding.
        .arg("-timeout=30")
        .arg("-print_final_stats=1");
    let out = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
    eprintln!(
        "+ [{}] {} (log: {})",
        crate::elapsed(),
        display(&cmd),
        log.display()
    );
    let started = Instant::now();
    let status = cmd
        .current_dir(root)
        .stdout(out.try_clone()?)
        .stderr(out)
        .status()
        .with_context(|| format!("cannot start {}", display(&cmd)))?;
    let secs = started.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    if !status.success() {
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "fuzz target `{target}` failed ({status}); the input is in {}; log {}:\n{}",
            artifacts.display(),
            log.display(),
            tail.join("\n")
        );
    }
    let execs = text
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("no exec count in {}", log.display()))?;
    Ok(Outcome {
        target,
        execs,
        secs,
    })
}

fn dict(target: &str) -> &'static str {
    match target {
        "peek" | "record" => "tls.dict",
        "admin" => "json.dict",
        _ => "yaml.dict",
    }
}

/// (Re)writes the seeds drawn from the tree for `target` into `dir`.
fn write_seeds(root: &Path, target: &str, dir: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut seeds: Vec<String> = Vec::new();
    match target {
        "policy" => {
            for file in rust_files(&root.join("interceptor/src/policy/tests"))?
                .into_iter()
                .chain([
                    root.join("interceptor/src/intercept/enforce.rs"),
                    root.join("tests/tests/policy_e2e.rs"),
                ])
            {
                seeds.extend(
                    string_literals(&read(&file)?)
                        .into_iter()
                        .filter(|s| s.contains("kind:")),
                );
            }
        }
        "config" => {
            seeds.extend(
                string_literals(&read(&root.join("interceptor/src/config.rs"))?)
                    .into_iter()
                    .filter(|s| s.contains('\n') && s.contains(": ")),
            );
            seeds.extend(yaml_blocks(&read(&root.join("README.md"))?));
            seeds.extend(indented_block(
                &read(&root.join("deploy/base/configmap.yaml"))?,
                "node.yaml: |",
            ));
        }
        _ => {}
    }
    for (i, s) in seeds.iter().enumerate() {
        let path = dir.join(format!("tree-{i:03}"));
        std::fs::write(&path, s).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
}

fn rust_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    files.sort();
    Ok(files)
}

/// The value of every string literal (`"…"` with its escapes, `r"…"`, `r#"…"#`) in Rust source,
/// comments skipped. Good enough for test fixtures, not a Rust lexer.
fn string_literals(src: &str) -> Vec<String> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let ident_before = i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                i = src[i..].find('\n').map_or(b.len(), |n| i + n);
            }
            b'\'' => {
                // A char literal ('"', '\'', 'x'); anything else is a lifetime.
                i += match (b.get(i + 1), b.get(i + 2), b.get(i + 3)) {
                    (Some(b'\\'), _, _) => src[i + 2..].find('\'').map_or(1, |n| n + 3),
                    (Some(_), Some(b'\''), _) => 3,
                    _ => 1,
                };
            }
            b'r' if !ident_before => {
                let after = &src[i + 1..];
                let hashes = after.len() - after.trim_start_matches('#').len();
                let Some(body) = after[hashes..].strip_prefix('"') else {
                    i += 1;
                    continue;
                };
                let close = format!("\"{}", "#".repeat(hashes));
                let Some(end) = body.find(&close) else {
                    break;
                };
                out.push(body[..end].to_owned());
                i = src.len() - body.len() + end + close.len();
            }
            b'"' => {
                let (value, len) = unescape(&src[i + 1..]);
                out.push(value);
                i += 1 + len;
            }
            _ => i += 1,
        }
    }
    out
}

/// A `"…"` literal's value from just after its opening quote, and how many bytes it took up to
/// and including the closing quote.
fn unescape(s: &str) -> (String, usize) {
    let mut value = String::new();
    let mut chars = s.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        match c {
            '"' => return (value, at + 1),
            '\\' => match chars.next().map(|(_, c)| c) {
                Some('n') => value.push('\n'),
                Some('t') => value.push('\t'),
                Some('r') => value.push('\r'),
                Some('0') => value.push('\0'),
                Some('\n') => while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {},
                Some('x') => {
                    let hex: String = (0..2)
                        .filter_map(|_| chars.next().map(|(_, c)| c))
                        .collect();
                    if let Ok(v) = u8::from_str_radix(&hex, 16) {
                        value.push(char::from(v));
                    }
                }
                Some('u') => {
                    let mut hex = String::new();
                    for (_, c) in chars.by_ref() {
                        match c {
                            '{' => {}
                            '}' => break,
                            c => hex.push(c),
                        }
                    }
                    if let Some(c) = u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                        value.push(c);
                    }
                }
                Some(c) => value.push(c),
                None => {}
            },
            c => value.push(c),
        }
    }
    (value, s.len())
}

/// The fenced ```yaml blocks of a Markdown file.
fn yaml_blocks(md: &str) -> Vec<String> {
    md.split("```yaml\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .map(str::to_owned)
        .collect()
}

/// The literal block after a line ending in `key` (`node.yaml: |`), de-indented.
fn indented_block(text: &str, key: &str) -> Option<String> {
    let mut lines = text.lines().skip_while(|l| !l.trim_end().ends_with(key));
    let head = lines.next()?;
    let outer = head.len() - head.trim_start().len();
    let body: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > outer)
        .collect();
    let indent = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()?;
    Some(
        body.iter()
            .map(|l| l.get(indent..).unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_literals_of_every_kind() {
        let src = r##"
            let a = r#"x: "q""#; let b = r"y"; // "not this"
            let c = "kind: A\n  b: \"c\"\
                     d\u{e9}"; let q = '"'; let e = '\''; fn f<'a>(s: &'a str) {}
            let d = "for"; bar(r, s);
        "##;
        assert_eq!(
            string_literals(src),
            ["x: \"q\"", "y", "kind: A\n  b: \"c\"d\u{e9}", "for"]
        );
    }

    #[test]
    fn the_deploy_config_block_is_found() {
        let text = "data:\n  node.yaml: |\n    a: 1\n    b:\n      - c\nother: 2\n";
        assert_eq!(
            indented_block(text, "node.yaml: |").as_deref(),
            Some("a: 1\nb:\n  - c")
        );
    }
}
