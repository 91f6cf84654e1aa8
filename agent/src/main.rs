//! `skiff-agent`: the guest's PID 1 (a static binary in the initramfs Skiff builds).
//!
//! Today it brings the guest up and proves the boot path: it mounts the pseudo-filesystems,
//! stamps the VMM's boot timer ("userspace reached"), prints `SKIFF-AGENT: userspace reached`,
//! and reboots the VM (with the default `reboot=k` that ends the VMM with status 0).
//! The container runtime side (vsock, OCI spec, stdio) comes with the container issue.
//!
//! Kernel command line options it reads:
//! - `skiff.exit=panic`: exit PID 1 instead of rebooting (the kernel panics; tests use this).

mod sys;

fn main() {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mounted = sys::mount_pseudo_filesystems();
    // Stamp the boot timer as early as possible: this is the "userspace reached" phase.
    let stamped = sys::boot_timer_stamp(123);
    let cmdline = if cmdline.is_empty() {
        std::fs::read_to_string("/proc/cmdline").unwrap_or_default()
    } else {
        cmdline
    };
    let uptime = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    println!(
        "SKIFF-AGENT: userspace reached (uptime {uptime} s, pid {})",
        std::process::id()
    );
    if let Err(e) = mounted {
        eprintln!("SKIFF-AGENT: mount failed: {e}");
    }
    if let Err(e) = stamped {
        eprintln!("SKIFF-AGENT: boot timer: {e}");
    }
    if cmdline.split_whitespace().any(|w| w == "skiff.exit=panic") {
        println!("SKIFF-AGENT: exiting PID 1 as asked (skiff.exit=panic)");
        std::process::exit(1);
    }
    sys::sync();
    if let Err(e) = sys::reboot() {
        eprintln!("SKIFF-AGENT: reboot failed: {e}");
        std::process::exit(1);
    }
}
