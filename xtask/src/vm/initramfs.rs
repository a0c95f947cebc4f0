//! The guest's whole root file system: a busybox userland, the host's dynamically linked test
//! binaries, agent and network tools with their shared libraries, the kernel modules the tests
//! need, and `/init`, which runs the tests and prints the verdict.
//!
//! The guest never mounts a disk: the kernel unpacks this archive into its rootfs and runs
//! `/init` from it, so the VM needs no image build and no root privileges on the host.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
    fs::{self, File},
    io::Write as _,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
};

use anyhow::{Context as _, Result, bail, ensure};

use super::{
    TestBinary,
    kernel::{Kernel, run},
};

/// What the guest runs, besides its userland.
pub(crate) struct Payload<'a> {
    pub(crate) tests: &'a [TestBinary],
    pub(crate) agent: &'a Path,
    pub(crate) helpers: &'a [TestBinary],
    pub(crate) filter: Option<&'a str>,
}

/// Modules `/init` loads, in order; their dependencies come along through `modules.dep`.
/// Names missing from a kernel are skipped with a note, since module names and built-in
/// choices differ between series (`ctr` is built into 6.12, for example).
const MODULES: &[&str] = &[
    // kTLS and the AEADs it offloads to: AES-GCM (AES-NI, CLMUL GHASH) and ChaCha20-Poly1305.
    "cryptd",
    "crypto_simd",
    "aesni_intel",
    "gcm",
    "ghash_generic",
    "ghash_clmulni_intel",
    "ctr",
    "chacha_x86_64",
    "poly1305_x86_64",
    "chacha20poly1305",
    "tls",
    // Pod-like topologies: network namespaces joined by veth pairs and bridges.
    "veth",
    "bridge",
    "br_netfilter",
    "dummy",
    "tun",
    "macvlan",
    "ipvlan",
    "ifb",
    // nftables redirection, NAT and transparent proxying, which comparisons and fallbacks use.
    "nfnetlink",
    "nf_conntrack",
    "nf_nat",
    "nf_tables",
    "nft_chain_nat",
    "nft_ct",
    "nft_nat",
    "nft_redir",
    "nft_masq",
    "nft_tproxy",
    "nf_tproxy_ipv4",
    "nf_tproxy_ipv6",
    "nft_socket",
    "nft_fib_inet",
    "nft_reject_inet",
    "nft_limit",
    "nft_log",
    "nft_numgen",
    "nft_quota",
    // tc: clsact for BPF classifiers, netem and friends to shape links in tests.
    "sch_ingress",
    "sch_netem",
    "sch_htb",
    "sch_fq",
    "sch_prio",
    "sch_tbf",
    "cls_bpf",
    "cls_u32",
    "cls_matchall",
    "act_bpf",
    "act_mirred",
    "act_gact",
    // Socket diagnostics for `ss`.
    "inet_diag",
    "tcp_diag",
    "udp_diag",
    "raw_diag",
    "unix_diag",
    "netlink_diag",
    "af_packet_diag",
    "tcp_bbr",
];

/// Host tools worth having in the guest when the host has them; they override busybox's
/// reduced applets of the same name because `/usr/bin` comes first on the guest's PATH.
const HOST_TOOLS: &[&str] = &[
    "ip", "tc", "ss", "nft", "tcpdump", "curl", "bpftool", "strace", "ethtool",
];

/// Builds `<work_dir>/initramfs.cpio` from scratch and returns its path.
pub(crate) fn build(work_dir: &Path, kernel: &Kernel, payload: &Payload<'_>) -> Result<PathBuf> {
    let root = fresh_root(work_dir, &["tests"])?;

    let mut installer = Installer::new(&root);
    install_busybox(&mut installer)?;
    for tool in HOST_TOOLS {
        match which::which(tool) {
            Ok(path) => installer.executable(&path, &format!("usr/bin/{tool}"), false)?,
            Err(_) => println!("vm-test: note: host has no {tool}; the guest will lack it too"),
        }
    }
    installer.executable(payload.agent, "bin/interceptor", true)?;
    for helper in payload.helpers {
        installer.executable(&helper.path, &format!("bin/{}", helper.name), true)?;
    }
    for test in payload.tests {
        installer.executable(&test.path, &format!("tests/{}", test.name), true)?;
    }
    let modules = install_modules(&root, kernel)?;
    write_etc(&root)?;
    write_init(&root, &init_script(&modules, payload.tests, payload.filter))?;

    let archive = work_dir.join("initramfs.cpio");
    pack(&root, &archive)?;
    let size = fs::metadata(&archive)
        .with_context(|| format!("failed to stat {}", archive.display()))?
        .len();
    println!(
        "vm-test: initramfs {} ({:.1} MiB, {} modules)",
        archive.display(),
        size as f64 / (1024.0 * 1024.0),
        modules.len()
    );
    Ok(archive)
}

/// Builds `<work_dir>/initramfs.cpio` like [`build`], but with caller-chosen executables
/// (`(source, destination inside the guest)`, shared libraries copied along) and a caller-
/// written `/init`, which receives the module names it must load. The benchmark's guest
/// (`cargo xtask bench --vm`) is built this way.
pub(crate) fn build_custom(
    work_dir: &Path,
    kernel: &Kernel,
    executables: &[(&Path, &str)],
    init: impl FnOnce(&[String]) -> String,
) -> Result<PathBuf> {
    let root = fresh_root(work_dir, &[])?;
    let mut installer = Installer::new(&root);
    install_busybox(&mut installer)?;
    for tool in HOST_TOOLS {
        if let Ok(path) = which::which(tool) {
            installer.executable(&path, &format!("usr/bin/{tool}"), false)?;
        }
    }
    for (source, dest) in executables {
        let strip = !dest.starts_with("usr/");
        installer.executable(source, dest, strip)?;
    }
    let modules = install_modules(&root, kernel)?;
    write_etc(&root)?;
    write_init(&root, &init(&modules))?;
    let archive = work_dir.join("initramfs.cpio");
    pack(&root, &archive)?;
    Ok(archive)
}

/// Empties `<work_dir>/root` and gives it the guest's directory skeleton plus `extra_dirs`.
fn fresh_root(work_dir: &Path, extra_dirs: &[&str]) -> Result<PathBuf> {
    let root = work_dir.join("root");
    if root.exists() {
        fs::remove_dir_all(&root)
            .with_context(|| format!("failed to remove {}", root.display()))?;
    }
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "lib64", "etc", "proc", "sys", "dev", "tmp", "run",
        "root", "var/tmp",
    ]
    .iter()
    .chain(extra_dirs)
    {
        create_dir(&root.join(dir))?;
    }
    Ok(root)
}

/// Writes the guest's PID 1, `/init`, executable.
fn write_init(root: &Path, script: &str) -> Result<()> {
    let path = root.join("init");
    fs::write(&path, script).context("failed to write /init")?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
        .context("failed to make /init executable")
}

fn create_dir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("failed to create {}", path.display()))
}

/// Copies executables into the root together with every shared library `ldd` names, at the
/// same absolute paths, so the guest's dynamic loader finds them without an `ld.so.cache`.
struct Installer<'a> {
    root: &'a Path,
    libraries: BTreeSet<PathBuf>,
}

impl<'a> Installer<'a> {
    fn new(root: &'a Path) -> Self {
        Self {
            root,
            libraries: BTreeSet::new(),
        }
    }

    /// `strip_debug` drops DWARF from our own debug builds, which would otherwise make the
    /// archive several times larger; symbol names stay, so backtraces still name functions.
    fn executable(&mut self, source: &Path, dest: &str, strip_debug: bool) -> Result<()> {
        let target = self.root.join(dest);
        if strip_debug && which::which("strip").is_ok() {
            run(Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(&target)
                .arg(source))?;
        } else {
            fs::copy(source, &target).with_context(|| {
                format!(
                    "failed to copy {} to {}",
                    source.display(),
                    target.display()
                )
            })?;
        }
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("failed to make {} executable", target.display()))?;
        for library in shared_libraries(source)? {
            if self.libraries.insert(library.clone()) {
                let relative = library.strip_prefix("/").unwrap_or(&library);
                let copy = self.root.join(relative);
                if let Some(parent) = copy.parent() {
                    create_dir(parent)?;
                }
                fs::copy(&library, &copy).with_context(|| {
                    format!("failed to copy {} into the initramfs", library.display())
                })?;
            }
        }
        Ok(())
    }
}

/// The libraries (and dynamic loader) `ldd` resolves for `binary`; none for static ones.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("failed to run ldd {}", binary.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() || stdout.contains("statically linked") {
        ensure!(
            stdout.contains("not a dynamic executable")
                || stderr.contains("not a dynamic executable")
                || stdout.contains("statically linked"),
            "ldd {} failed: {}",
            binary.display(),
            stderr.trim()
        );
        return Ok(Vec::new());
    }
    let mut libraries = Vec::new();
    for line in stdout.lines() {
        let line = line.trim();
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2
        // (0x...)" or, for the vDSO, a bare name that has no file.
        let path = match line.split_once("=>") {
            Some((name, resolved)) => {
                let resolved = resolved.trim();
                if resolved.starts_with("not found") {
                    bail!(
                        "{} needs {}, which ldd cannot find",
                        binary.display(),
                        name.trim()
                    );
                }
                resolved.split_whitespace().next()
            }
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

fn install_busybox(installer: &mut Installer<'_>) -> Result<()> {
    let busybox = which::which("busybox").context("busybox is not on PATH")?;
    installer.executable(&busybox, "bin/busybox", false)?;
    let output = Command::new(&busybox)
        .arg("--list")
        .output()
        .context("failed to run busybox --list")?;
    ensure!(output.status.success(), "busybox --list failed");
    for applet in String::from_utf8_lossy(&output.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        let link = installer.root.join("bin").join(applet);
        symlink("busybox", &link).with_context(|| format!("failed to link {}", link.display()))?;
    }
    // The kernel's module autoloader runs /sbin/modprobe.
    for applet in ["modprobe", "poweroff"] {
        let link = installer.root.join("sbin").join(applet);
        symlink("../bin/busybox", &link)
            .with_context(|| format!("failed to link {}", link.display()))?;
    }
    Ok(())
}

/// One module as `modules.dep` lists it, paths relative to the release's module directory.
struct ModuleEntry {
    path: String,
    depends: Vec<String>,
}

/// Copies the wanted modules and their hard and soft dependencies, decompressed because
/// busybox `modprobe` cannot read `.ko.xz`, and indexes them with `depmod`. Returns the
/// names `/init` should load.
fn install_modules(root: &Path, kernel: &Kernel) -> Result<Vec<String>> {
    let source = &kernel.modules_dir;
    let dep = read(&source.join("modules.dep"))?;
    let mut by_path = HashMap::new();
    let mut by_name = HashMap::new();
    for line in dep.lines() {
        let Some((path, depends)) = line.split_once(':') else {
            continue;
        };
        by_name.insert(module_name(path), path.to_owned());
        by_path.insert(
            path.to_owned(),
            ModuleEntry {
                path: path.to_owned(),
                depends: depends.split_whitespace().map(str::to_owned).collect(),
            },
        );
    }
    let builtin: BTreeSet<String> = read(&source.join("modules.builtin"))?
        .lines()
        .map(module_name)
        .collect();
    let softdeps = read_softdeps(&source.join("modules.softdep"))?;
    let aliases = read_aliases(&source.join("modules.alias"))?;
    // Soft dependencies may name an alias (`libcrc32c` wants "crc32c"), so resolve both ways.
    let resolve = |name: &str| -> Vec<String> {
        match by_name.get(name) {
            Some(path) => vec![path.clone()],
            None => aliases
                .get(name)
                .into_iter()
                .flatten()
                .filter_map(|module| by_name.get(module).cloned())
                .collect(),
        }
    };

    let mut load = Vec::new();
    let mut needed = BTreeMap::new();
    for wanted in MODULES {
        let name = wanted.replace('-', "_");
        let Some(path) = by_name.get(&name) else {
            if !builtin.contains(&name) {
                println!(
                    "vm-test: note: kernel {} has no module {name}",
                    kernel.release
                );
            }
            continue;
        };
        let mut soft_first = Vec::new();
        let mut queue = vec![path.clone()];
        while let Some(path) = queue.pop() {
            let Some(entry) = by_path.get(&path) else {
                continue;
            };
            if needed.insert(path.clone(), entry).is_some() {
                continue;
            }
            queue.extend(entry.depends.iter().cloned());
            let soft = softdeps.get(&module_name(&path)).into_iter().flatten();
            for soft_path in soft.flat_map(|name| resolve(name)) {
                soft_first.push(module_name(&soft_path));
                queue.push(soft_path);
            }
        }
        // Busybox modprobe ignores soft dependencies, so /init loads them explicitly first.
        for module in soft_first.into_iter().rev().chain([name]) {
            if !load.contains(&module) {
                load.push(module);
            }
        }
    }

    let dest = root.join("lib/modules").join(&kernel.release);
    for entry in needed.values() {
        let from = source.join(&entry.path);
        let to = dest.join(uncompressed_path(&entry.path));
        if let Some(parent) = to.parent() {
            create_dir(parent)?;
        }
        decompress(&from, &to)?;
    }
    for index in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        let from = source.join(index);
        if from.exists() {
            fs::copy(&from, dest.join(index))
                .with_context(|| format!("failed to copy {}", from.display()))?;
        }
    }
    run(Command::new("depmod")
        .arg("-b")
        .arg(root)
        .arg(&kernel.release))?;
    Ok(load)
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("failed to read {}", path.display()))
}

/// `kernel/net/tls/tls.ko.xz` -> `tls`; `-` and `_` are interchangeable in module names.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

fn uncompressed_path(path: &str) -> &str {
    path.strip_suffix(".xz")
        .or_else(|| path.strip_suffix(".zst"))
        .or_else(|| path.strip_suffix(".gz"))
        .unwrap_or(path)
}

/// Parses `softdep <module> pre: a b post: c` lines into module -> every named dependency.
fn read_softdeps(path: &Path) -> Result<HashMap<String, Vec<String>>> {
    let mut softdeps = HashMap::new();
    if !path.exists() {
        return Ok(softdeps);
    }
    for line in read(path)?.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("softdep") {
            continue;
        }
        let Some(module) = words.next() else { continue };
        let deps = words
            .filter(|w| !w.ends_with(':'))
            .map(|w| w.replace('-', "_"));
        softdeps
            .entry(module.replace('-', "_"))
            .or_insert_with(Vec::new)
            .extend(deps);
    }
    Ok(softdeps)
}

/// Parses the literal (wildcard-free) `alias <name> <module>` lines of `modules.alias`.
fn read_aliases(path: &Path) -> Result<HashMap<String, Vec<String>>> {
    let mut aliases: HashMap<String, Vec<String>> = HashMap::new();
    if !path.exists() {
        return Ok(aliases);
    }
    for line in read(path)?.lines() {
        let mut words = line.split_whitespace();
        let (Some("alias"), Some(alias), Some(module)) = (words.next(), words.next(), words.next())
        else {
            continue;
        };
        if !alias.contains(['*', '?', '[']) {
            aliases
                .entry(alias.replace('-', "_"))
                .or_default()
                .push(module.replace('-', "_"));
        }
    }
    Ok(aliases)
}

fn decompress(from: &Path, to: &Path) -> Result<()> {
    let tool = match from.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => {
            fs::copy(from, to).with_context(|| format!("failed to copy {}", from.display()))?;
            return Ok(());
        }
    };
    let out = File::create(to).with_context(|| format!("failed to create {}", to.display()))?;
    let status = Command::new(tool)
        .arg("-dc")
        .arg(from)
        .stdout(out)
        .status()
        .with_context(|| format!("failed to run {tool} on {}", from.display()))?;
    ensure!(
        status.success(),
        "{tool} -dc {} failed: {status}",
        from.display()
    );
    Ok(())
}

/// Enough of /etc for name resolution of localhost and for tools that look up users.
fn write_etc(root: &Path) -> Result<()> {
    let files = [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        (
            "etc/hosts",
            "127.0.0.1\tlocalhost vm\n::1\tlocalhost ip6-localhost\n",
        ),
        (
            "etc/nsswitch.conf",
            "passwd: files\ngroup: files\nhosts: files\n",
        ),
        ("etc/hostname", "vm\n"),
    ];
    for (path, contents) in files {
        fs::write(root.join(path), contents).with_context(|| format!("failed to write /{path}"))?;
    }
    Ok(())
}

/// Quotes `value` for the guest's POSIX shell.
pub(crate) fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// The guest's PID 1. It must never exit (the kernel would panic), so every failure is
/// counted and reported, and it always ends in `poweroff -f`.
fn init_script(modules: &[String], tests: &[TestBinary], filter: Option<&str>) -> String {
    let mut script = String::from(INIT_PRELUDE);
    let _ = writeln!(script, "MODULES={}", shell_quote(&modules.join(" ")));
    let names: Vec<_> = tests.iter().map(|t| t.name.as_str()).collect();
    let _ = writeln!(script, "TESTS={}", shell_quote(&names.join(" ")));
    let _ = writeln!(script, "FILTER={}", shell_quote(filter.unwrap_or("")));
    script.push('\n');
    script.push_str(SYSTEM_MOUNTS);
    script.push_str(INIT_BODY);
    script
}

/// The QEMU command line every guest boots with (`cargo xtask vm-test` and `bench --vm`):
/// 2 GiB, two CPUs, the serial console, no network, no reboot, stdin closed (with
/// `-nographic` QEMU would otherwise put the developer's terminal into raw mode). `tcg` is
/// the accelerator without KVM; the caller sets stdout and stderr.
pub(crate) fn qemu_command(kernel: &Path, initrd: &Path, kvm: bool, tcg: &str) -> Command {
    let mut command = Command::new("qemu-system-x86_64");
    if kvm {
        command.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        command.args(["-accel", tcg, "-cpu", "max"]);
    }
    command
        .args([
            "-m",
            "2048",
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4 edd=off"])
        .stdin(Stdio::null());
    command
}

const INIT_PRELUDE: &str = r#"#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=dumb RUST_BACKTRACE=1
export INTERCEPTOR_IN_VM=1 INTERCEPTOR_REQUIRE_PRIVILEGED=1 INTERCEPTOR_AGENT_BIN=/bin/interceptor
"#;

/// The first thing every guest's PID 1 does: the kernel's filesystems, the console as
/// stdio, cgroup v2 and bpffs. Each line ends in a newline.
pub(crate) const SYSTEM_MOUNTS: &str = r#"mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpffs /sys/fs/bpf
"#;

/// Follows [`SYSTEM_MOUNTS`].
const INIT_BODY: &str = r#"mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
hostname vm
ulimit -l unlimited
for m in $MODULES; do
    modprobe "$m" || echo "vm-init: modprobe $m failed"
done
ip link set lo up
echo "vm-init: kernel $(uname -r)"
echo "vm-init: tcp_available_ulp: $(cat /proc/sys/net/ipv4/tcp_available_ulp)"

if [ -n "$FILTER" ]; then set -- "$FILTER"; else set --; fi
passed=0
failed=0
cd /tmp
for t in $TESTS; do
    echo "vm-init: ===== $t"
    rm -f /tmp/rc
    { "/tests/$t" --test-threads=1 --color=never "$@" 2>&1; echo $? >/tmp/rc; } | tee /tmp/log
    rc=$(cat /tmp/rc 2>/dev/null || echo 255)
    counts=$(sed -n 's/^test result: [A-Za-z]*\. \([0-9][0-9]*\) passed; \([0-9][0-9]*\) failed;.*/\1 \2/p' /tmp/log | tail -n 1)
    p=${counts% *}
    f=${counts#* }
    if [ -z "$counts" ]; then p=0; f=0; fi
    if [ "$rc" != 0 ] && [ "$f" = 0 ]; then
        # Crashed or aborted before libtest could report: the binary itself failed.
        f=1
    fi
    passed=$((passed + p))
    failed=$((failed + f))
    if [ "$rc" = 0 ]; then
        echo "vm-init: RESULT $t: ok ($p passed, $f failed)"
    else
        echo "vm-init: RESULT $t: FAILED with exit status $rc ($p passed, $f failed)"
    fi
done

# WARN_ON reports are logged below the console level, so they surface only here.
dmesg | grep -E 'WARNING: CPU:|BUG:|Oops' | head -n 40 | sed 's/^/vm-init: dmesg: /'
echo "VM-VERDICT: $passed passed, $failed failed"
sync
poweroff -f
"#;

/// Packs `root` as an uncompressed newc cpio archive owned by root, in sorted (reproducible)
/// order. Uncompressed because the guest would inflate it under TCG: a few hundred MiB of
/// debug test binaries took seconds of emulated gzip per boot, and QEMU loads the file as is.
fn pack(root: &Path, archive: &Path) -> Result<()> {
    let mut entries = Vec::new();
    collect_entries(root, Path::new("."), &mut entries)?;
    entries.sort();
    let mut list = String::new();
    for entry in &entries {
        list.push_str(entry);
        list.push('\n');
    }

    let out =
        File::create(archive).with_context(|| format!("failed to create {}", archive.display()))?;
    let mut cpio = Command::new("cpio")
        .args(["--quiet", "-o", "-H", "newc", "-R", "0:0"])
        .current_dir(root)
        .stdin(Stdio::piped())
        .stdout(out)
        .spawn()
        .context("failed to run cpio")?;
    let mut cpio_in = cpio.stdin.take().context("cpio's stdin was not captured")?;
    // A thread feeds the list so a full pipe cannot deadlock against cpio's output.
    let feeder = thread::spawn(move || cpio_in.write_all(list.as_bytes()));
    let cpio_status = cpio.wait().context("failed to wait for cpio")?;
    feeder
        .join()
        .map_err(|_| anyhow::anyhow!("the cpio feeder thread panicked"))?
        .context("failed to write the file list to cpio")?;
    ensure!(cpio_status.success(), "cpio failed: {cpio_status}");
    Ok(())
}

fn collect_entries(root: &Path, relative: &Path, entries: &mut Vec<String>) -> Result<()> {
    let dir = root.join(relative);
    for entry in fs::read_dir(&dir).with_context(|| format!("failed to list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("failed to list {}", dir.display()))?;
        let path = relative.join(entry.file_name());
        let Some(name) = path.to_str() else {
            bail!("non-UTF-8 path in the initramfs: {}", path.display());
        };
        entries.push(name.to_owned());
        let file_type = entry
            .file_type()
            .with_context(|| format!("failed to stat {}", entry.path().display()))?;
        if file_type.is_dir() {
            collect_entries(root, &path, entries)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_are_normalised() {
        assert_eq!(module_name("kernel/net/tls/tls.ko.xz"), "tls");
        assert_eq!(
            module_name("kernel/arch/x86/crypto/aesni-intel.ko"),
            "aesni_intel"
        );
        assert_eq!(
            uncompressed_path("kernel/net/tls/tls.ko.xz"),
            "kernel/net/tls/tls.ko"
        );
    }

    #[test]
    fn filter_is_quoted_for_the_shell() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
