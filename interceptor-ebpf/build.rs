//! Rebuild the eBPF object whenever the linker changes: a new bpf-linker can emit different
//! BTF, and cargo cannot see that on its own.
fn main() {
    let linker =
        which::which("bpf-linker").expect("bpf-linker is not on PATH; run `cargo xtask setup`");
    println!("cargo:rerun-if-changed={}", linker.display());
}
