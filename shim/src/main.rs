//! `containerd-shim-skiff-v2`: not implemented yet (see the containerd shim issue).

fn main() {
    eprintln!("containerd-shim-skiff-v2: not implemented yet; see docs/ARCHITECTURE.md");
    std::process::exit(2);
}
