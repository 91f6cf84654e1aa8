//! `skiff-agent`: the guest's PID 1 (a static binary in the initramfs Skiff builds).
//!
//! Today it brings the guest up and proves the boot path: it mounts the pseudo-filesystems,
//! stamps the VMM's boot timer ("userspace reached"), prints `SKIFF-AGENT: userspace reached`,
//! and reboots the VM (with the default `reboot=k` that ends the VMM with status 0).
//!
//! Kernel command line options it reads:
//! - `skiff.exit=panic`: exit PID 1 instead of rebooting (the kernel panics; tests use this).
//! - `skiff.agent=hang`: never become ready (sleep forever; tests of a guest that hangs use it).
//! - `skiff.agent=serve`: dial the host on vsock port 1024 (CID 2), send Hello and serve the
//!   control protocol (`skiff-protocol`); reboot (RB_AUTOBOOT) when the host sends Shutdown or
//!   the control connection closes.

use skiff_agent::sys;

fn main() {
    let agent_start = sys::boottime_us();
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
    if cmdline.split_whitespace().any(|w| w == "skiff.agent=hang") {
        println!("SKIFF-AGENT: hanging as asked (skiff.agent=hang)");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
    if cmdline.split_whitespace().any(|w| w == "skiff.agent=serve") {
        serve(agent_start);
    }
    sys::sync();
    if let Err(e) = sys::reboot() {
        eprintln!("SKIFF-AGENT: reboot failed: {e}");
        std::process::exit(1);
    }
}

/// Dials the host's control port and serves until Shutdown or disconnect.
fn serve(agent_start: u64) {
    use skiff_protocol::{CONTROL_PORT, HOST_CID};
    let conn = match sys::vsock_connect(HOST_CID, CONTROL_PORT) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("SKIFF-AGENT: cannot reach the host on vsock port {CONTROL_PORT}: {e}");
            return;
        }
    };
    let stamps = vec![
        ("agent_start".to_string(), agent_start),
        ("control_connected".to_string(), sys::boottime_us()),
    ];
    let dialer = Box::new(|port: u32| sys::vsock_connect(HOST_CID, port));
    match skiff_agent::serve_connection(conn, dialer, skiff_agent::Config::detect(true), stamps) {
        Ok(end) => println!("SKIFF-AGENT: control connection ended ({end:?})"),
        Err(e) => eprintln!("SKIFF-AGENT: control connection failed: {e}"),
    }
}
