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
//! - `skiff.template=1` (with `serve`): the VM is being made into a template. Once up, the
//!   agent writes 200 to the boot timer (the VMM then saves the VM and ends it) and dials the
//!   host until it answers, every millisecond for at most 10 minutes of guest time. Nobody
//!   listens while the template is made; a VM restored from it goes on dialing, and its host
//!   (which does listen) gets the connection at once. The host then sends `Reseed`.

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

/// The boot-timer value that asks the VMM to save a template (`vmm --snapshot-on-stamp`).
const TEMPLATE_STAMP: u8 = 200;

/// Dials the host's control port and serves until Shutdown or disconnect.
fn serve(agent_start: u64) {
    use skiff_protocol::{CONTROL_PORT, HOST_CID};
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline.split_whitespace().any(|w| w == "skiff.template=1") {
        serve_template(agent_start);
        return;
    }
    let conn = match sys::vsock_connect(HOST_CID, CONTROL_PORT, true) {
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
    let dialer = Box::new(|port: u32| sys::vsock_connect(HOST_CID, port, true));
    match skiff_agent::serve_connection(conn, dialer, skiff_agent::Config::detect(true), stamps) {
        Ok(end) => println!("SKIFF-AGENT: control connection ended ({end:?})"),
        Err(e) => eprintln!("SKIFF-AGENT: control connection failed: {e}"),
    }
}

/// Template mode (see the module docs): asks for the snapshot, then dials until a host
/// answers, and dials again while a connection dies before the host sent anything (the
/// vsock transport reset of a restored VM can end the first one). At most 10 minutes of guest
/// time and a million connection attempts.
fn serve_template(agent_start: u64) {
    use skiff_protocol::{CONTROL_PORT, HOST_CID};
    if let Err(e) = sys::boot_timer_stamp(TEMPLATE_STAMP) {
        eprintln!("SKIFF-AGENT: boot timer: {e}");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    for _ in 0..1_000_000 {
        // The kernel's 2 s default here: this loop dials until a host listens.
        let conn = match sys::vsock_connect(HOST_CID, CONTROL_PORT, false) {
            Ok(c) => c,
            Err(e) if std::time::Instant::now() >= deadline => {
                eprintln!("SKIFF-AGENT: no host on vsock port {CONTROL_PORT} in 10 min: {e}");
                return;
            }
            Err(_) => {
                std::thread::sleep(std::time::Duration::from_millis(1));
                continue;
            }
        };
        let stamps = vec![
            ("agent_start".to_string(), agent_start),
            ("control_connected".to_string(), sys::boottime_us()),
        ];
        let dialer = Box::new(|port: u32| sys::vsock_connect(HOST_CID, port, true));
        let served = skiff_agent::serve_connection_tracked(
            conn,
            dialer,
            skiff_agent::Config::detect(true),
            stamps,
        );
        if !served.any_request && std::time::Instant::now() < deadline {
            continue;
        }
        match served.end {
            Ok(end) => println!("SKIFF-AGENT: control connection ended ({end:?})"),
            Err(e) => eprintln!("SKIFF-AGENT: control connection failed: {e}"),
        }
        return;
    }
}
