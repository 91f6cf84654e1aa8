//! `vmm`: boots a guest kernel in a Skiff microVM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand, ValueEnum};
use skiff_vmm::fs_device;
use skiff_vmm::net_device;
use skiff_vmm::run::{self, RunOptions};
use skiff_vmm::seccomp;
use skiff_vmm::timings::Timings;
use skiff_vmm::vm::{self, PitMode, SerialOut, SnapshotAt, VmConfig, DEFAULT_CMDLINE};
use skiff_vmm::vm_control::VmControl;

const AFTER_HELP: &str = "\
Exit status:
  0  the guest powered off or rebooted cleanly (a reboot ends the VM)
  1  the VMM failed (a hypervisor call or device failed)
  2  bad input: missing/truncated/wrong-arch kernel, initrd too big, bad sizes,
     no /dev/kvm or no permission, more vCPUs than the host allows
  3  the guest kernel panicked
  4  the guest crashed its CPU (triple fault) or the hypervisor could not run it

Linux guests: the default command line uses `reboot=k,panic_warm panic=-1`, so a guest
`reboot -f` ends the VM with status 0 and a kernel panic with status 3. The guest init
marks \"userspace reached\" by writing 123 to the boot-timer port (x86: port 0x3f0).

Environment: SKIFF_LOG sets the log filter (default `warn`; e.g. `skiff_vmm=debug`).
SKIFF_SECCOMP=on|off|log sets the seccomp mode when --seccomp is not given. A system call
outside a VMM thread's allowlist ends the VMM with status 159 and one `skiff-vmm: seccomp:`
line naming it on stderr.

Examples:
  vmm --kernel vmlinux --initrd initramfs.cpio --timings
  vmm --kernel vmlinux --rootfs ./rootfs --cmdline 'console=ttyS0 root=rootfs rootfstype=virtiofs rw init=/bin/sh'
  vmm --kernel vmlinux --initrd initramfs.cpio --gdb 127.0.0.1:1234   (then: gdb vmlinux -ex 'target remote :1234')";

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Seccomp {
    On,
    Off,
    Log,
}

impl From<Seccomp> for seccomp::Mode {
    fn from(s: Seccomp) -> Self {
        match s {
            Seccomp::On => seccomp::Mode::On,
            Seccomp::Off => seccomp::Mode::Off,
            Seccomp::Log => seccomp::Mode::Log,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Pit {
    Auto,
    On,
    Off,
}

/// Boot a guest kernel in a Skiff microVM (firmware-free: the VMM loads the kernel itself),
/// or run a command as a container in a fresh VM (`vmm run`).
#[derive(Debug, Parser)]
#[command(
    name = "vmm",
    version,
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Guest kernel: an x86_64 vmlinux ELF (entered through its PVH note when it has one) or
    /// a bzImage; an arm64 Image on aarch64 hosts.
    #[arg(long, value_name = "K", required_unless_present = "restore")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk (cpio, optionally compressed as the kernel supports).
    #[arg(long, value_name = "I")]
    initrd: Option<PathBuf>,
    /// Kernel command line (replaces the default: `console=ttyS0 quiet reboot=k,panic_warm
    /// panic=-1 pci=off nomodules`, plus `root=rootfs rootfstype=virtiofs rw|ro` with
    /// --rootfs).
    #[arg(long, value_name = "S")]
    cmdline: Option<String>,
    /// Boot on host directory DIR as the guest's root filesystem: virtio-fs with tag
    /// `rootfs`, named on the default command line (`root=rootfs rootfstype=virtiofs rw`;
    /// `:ro` mounts it read-only and refuses writes). No --initrd is needed with a kernel that
    /// has virtio-fs built in (Skiff's has); the kernel runs DIR's /sbin/init (or
    /// `init=/bin/sh` on --cmdline).
    #[arg(long, value_name = "DIR[:ro]")]
    rootfs: Option<String>,
    /// Do not read stdin. By default the guest's serial console reads the VMM's stdin: on a
    /// terminal in raw mode (Ctrl-A x stops the VM, Ctrl-A Ctrl-A sends Ctrl-A; the
    /// terminal is restored however the VM ends), from a pipe as it comes.
    #[arg(long)]
    no_input: bool,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u32,
    /// Wait for GDB on ADDR (`HOST:PORT`, or a Unix socket path containing `/`) before the
    /// guest's first instruction: `gdb vmlinux -ex 'target remote ADDR'`. vCPUs are GDB
    /// threads; software and hardware breakpoints, single steps, registers, memory by virtual
    /// address (through the guest's page tables), Ctrl-C. Detaching lets the guest run on.
    /// x86_64 (KVM) only.
    #[arg(long, value_name = "ADDR")]
    gdb: Option<String>,
    /// Share host directory DIR with the guest over virtio-fs under mount tag TAG (the guest
    /// runs `mount -t virtiofs TAG /mnt`); `:ro` refuses writes. Repeatable, up to 10.
    #[arg(long, value_name = "TAG=DIR[:ro]")]
    share: Vec<String>,
    /// Guest RAM in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 128)]
    memory: u64,
    /// Network card (virtio-net, MAC 52:54:00 + pid): `stream:PATH` connects to a Unix stream
    /// socket with 4-byte length framing (passt -s, gvproxy -listen-qemu), `dgram:PATH` to a
    /// Unix datagram socket (gvproxy -listen-vfkit, vmnet-helper), `tap:NAME` opens a Linux tap.
    #[arg(
        long,
        value_name = "none|stream:PATH|dgram:PATH|tap:NAME",
        default_value = "none"
    )]
    net: String,
    /// The card's MTU, told to the guest (VIRTIO_NET_F_MTU; the guest cannot raise its eth0
    /// above it): 65520 suits passt, 1500 gvproxy and most taps. 68..=65536.
    #[arg(long, value_name = "BYTES", default_value_t = skiff_devices::virtio::net::DEFAULT_MTU)]
    mtu: u16,
    /// Print per-phase boot timings to stderr when the VM ends.
    #[arg(long)]
    timings: bool,
    /// Write the guest's serial console to FILE instead of stdout (capped at 1 MiB: a full FILE
    /// is renamed to FILE.1 and a new one started).
    #[arg(long, value_name = "FILE")]
    serial: Option<PathBuf>,
    /// Create the legacy i8254 PIT: `auto` = only for Linux kernels (they calibrate against
    /// it); tiny guests boot faster without it.
    #[arg(long, value_enum, default_value_t = Pit::Auto)]
    pit: Pit,
    /// Seccomp allowlists on the VMM's threads (Linux): `on` ends the VMM on a call outside
    /// them (status 159), `log` only has the kernel log such calls (dmesg), `off` installs
    /// none. Default: $SKIFF_SECCOMP, else `on`.
    #[arg(long, value_enum, value_name = "MODE")]
    seccomp: Option<Seccomp>,
    /// Save the VM as a snapshot in DIR (created) when the guest writes --snapshot-on-stamp
    /// to the boot timer, then end the VM (status 0). Guest RAM goes to DIR/memory (sparse),
    /// the rest to DIR/state (versioned, checksummed). VMs with --share/--net cannot be saved
    /// yet.
    #[arg(long, value_name = "DIR")]
    snapshot_to: Option<PathBuf>,
    /// The boot-timer value (x86: port 0x3f0) that asks for the snapshot.
    #[arg(
        long,
        value_name = "V",
        default_value_t = 200,
        requires = "snapshot_to"
    )]
    snapshot_on_stamp: u8,
    /// Restore the snapshot in DIR and run it from where it was saved (instead of booting a
    /// kernel: vCPUs, memory size and the guest come from the snapshot). Guest RAM is mapped
    /// copy-on-write from DIR/memory, which is never changed. A damaged snapshot or one made
    /// by another Skiff version is refused (status 2).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "snapshot_to"])]
    restore: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run CMD as a container in a fresh VM, with this terminal's stdio, forwarded signals and
    /// CMD's exit status (125 when vmm run itself fails, 126/127 when CMD cannot be run).
    Run(RunArgs),
    /// Manage the VM templates warm start restores (`vmm template ls|rm|create`).
    Template(TemplateArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Guest kernel (default: the one Skiff built; built on first use).
    #[arg(long, value_name = "K")]
    kernel: Option<PathBuf>,
    /// Initramfs with the Skiff agent (default: the one Skiff built).
    #[arg(long, value_name = "I")]
    initrd: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u32,
    /// Guest RAM in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 256)]
    memory: u64,
    /// Set an environment variable in the container (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory inside the container.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    workdir: Option<String>,
    /// Run as UID[:GID] inside the container.
    #[arg(short = 'u', long = "user", value_name = "UID[:GID]")]
    user: Option<String>,
    /// Allocate a terminal for the container (its size follows this terminal's).
    #[arg(short = 't', long = "tty")]
    tty: bool,
    /// Keep stdin open and forward it to the container.
    #[arg(short = 'i', long = "interactive")]
    interactive: bool,
    /// Print per-phase timings (VMM start to container exit) to stderr.
    #[arg(long)]
    timings: bool,
    /// Write the guest console (kernel and agent messages) to FILE.
    #[arg(long, value_name = "FILE")]
    console: Option<PathBuf>,
    /// Append ARG to the guest kernel command line (repeatable).
    #[arg(long = "kernel-arg", value_name = "ARG")]
    kernel_arg: Vec<String>,
    /// Use host directory DIR as the container's root filesystem (shared over virtio-fs;
    /// writes go to DIR). Default: the busybox root in Skiff's initramfs.
    #[arg(long, value_name = "DIR")]
    rootfs: Option<PathBuf>,
    /// Share host directory HOST at GUEST in the container over virtio-fs, read-write or
    /// read-only (`:ro`: writes fail with EROFS). Repeatable, up to 8 (9 without --rootfs).
    #[arg(short = 'v', long = "volume", value_name = "HOST:GUEST[:ro]")]
    volume: Vec<String>,
    /// Keep guest file ownership (uid, gid, mode, device numbers) in the host xattr
    /// `user.containers.override_stat` instead of changing host owners: lets a user without
    /// root share an image whose files belong to root in the guest.
    #[arg(long)]
    xattr_ownership: bool,
    /// The container's network: `passt` (default when passt is installed: outbound TCP/UDP
    /// and DNS without root; the host's 127.0.0.1 is 10.0.2.2 in the container), `none`
    /// (loopback only), `tap:NAME` (an existing Linux tap; give --ip/--gateway),
    /// `stream:PATH` or `dgram:PATH` (a passt/gvproxy socket).
    #[arg(long, value_name = "passt|none|tap:NAME|stream:PATH|dgram:PATH")]
    net: Option<String>,
    /// Publish a container port on the host, as `docker run -p` (passt only; repeatable).
    #[arg(
        short = 'p',
        long = "publish",
        value_name = "[HOSTIP:]HOSTPORT:CONTAINERPORT[/tcp|/udp]"
    )]
    publish: Vec<String>,
    /// The container's host name (default: the agent's, "skiff").
    #[arg(long, value_name = "NAME")]
    hostname: Option<String>,
    /// DNS server for the container's /etc/resolv.conf (repeatable; default: passt's
    /// forwarder to the host's resolver).
    #[arg(long, value_name = "IP")]
    dns: Vec<String>,
    /// The container's address for tap/stream/dgram networks (default 10.0.2.15/24).
    #[arg(long, value_name = "ADDR/PREFIX")]
    ip: Option<String>,
    /// The default gateway for tap/stream/dgram networks (default 10.0.2.2).
    #[arg(long, value_name = "IP")]
    gateway: Option<String>,
    /// How long the guest agent may take to come up, in seconds (nested or heavily loaded
    /// hosts boot slowly).
    #[arg(long, value_name = "SECS", default_value_t = 180)]
    agent_timeout: u64,
    /// At most N of this user's VMs boot at once on this host; the others wait for a slot
    /// before starting (a running VM holds none). 0 = no limit. Default: $SKIFF_BOOT_SLOTS,
    /// else the number of CPUs.
    #[arg(long, value_name = "N")]
    boot_slots: Option<usize>,
    /// Seccomp allowlists on the VMM's threads (Linux): `on` ends the VMM on a call outside
    /// them (status 159), `log` only has the kernel log such calls (dmesg), `off` installs
    /// none. Default: $SKIFF_SECCOMP, else `on`.
    #[arg(long, value_enum, value_name = "MODE")]
    seccomp: Option<Seccomp>,
    /// Boot the guest kernel instead of restoring a template (also SKIFF_WARM_START=0). By
    /// default the VM is restored from a template: a snapshot of a VM whose agent was up,
    /// kept in ~/.cache/skiff/templates (or $SKIFF_TEMPLATES) per Skiff version, kernel,
    /// initramfs, vCPUs, memory, kernel arguments and number of volumes, and made by the
    /// first run that needs it (one cold boot). A damaged template or a cache that cannot
    /// take one gives one warning line and a cold boot. A VM with a network card restores a
    /// template with one (per kind: passt, tap, stream or dgram) and gets its own MAC address.
    #[arg(long)]
    cold: bool,
    /// The command to run, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<String>,
}

#[derive(Debug, Args)]
struct TemplateArgs {
    #[command(subcommand)]
    action: TemplateAction,
}

/// `vmm template create --net`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum NetKind {
    None,
    Passt,
    Tap,
    Stream,
    Dgram,
}

#[derive(Debug, Subcommand)]
enum TemplateAction {
    /// List the VM templates in the cache (directory, size on disk, what they hold).
    Ls,
    /// Remove every VM template (the next warm run makes a new one).
    Rm,
    /// Make now (one cold boot) the template a `vmm run` with these options would restore,
    /// unless it exists; prints its directory.
    Create(TemplateCreateArgs),
}

#[derive(Debug, Args)]
struct TemplateCreateArgs {
    /// Guest kernel (default: the one `vmm run` uses).
    #[arg(long, value_name = "K")]
    kernel: Option<PathBuf>,
    /// Initramfs with the Skiff agent (default: the one `vmm run` uses).
    #[arg(long, value_name = "I")]
    initrd: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u32,
    /// Guest RAM in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 256)]
    memory: u64,
    /// Extra guest kernel argument, as `vmm run --kernel-arg` (repeatable).
    #[arg(long = "kernel-arg", value_name = "ARG")]
    kernel_arg: Vec<String>,
    /// For runs with `--rootfs DIR`.
    #[arg(long)]
    rootfs: bool,
    /// For runs with N volumes (`-v`).
    #[arg(long, value_name = "N", default_value_t = 0)]
    volumes: usize,
    /// How long the template VM may take to come up, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 180)]
    agent_timeout: u64,
    /// For runs with this kind of `--net` (a network card as `vmm run --net` makes it: passt
    /// with MTU 65520, tap with offloads, stream/dgram sockets with MTU 1500).
    #[arg(long, value_enum, value_name = "KIND", default_value = "none")]
    net: NetKind,
}

/// `vmm template create`: the template `vmm run` would find for these options.
fn template_create(c: &TemplateCreateArgs) -> anyhow::Result<PathBuf> {
    let (kernel, initrd) = skiff_vmm::artifacts::find(c.kernel.as_deref(), c.initrd.as_deref())?;
    if c.volumes + usize::from(c.rootfs) > skiff_vmm::run::MAX_SHARES {
        anyhow::bail!(
            "--volumes {}: at most {} shares (rootfs and volumes) fit one VM",
            c.volumes,
            skiff_vmm::run::MAX_SHARES
        );
    }
    let tags = c
        .rootfs
        .then(|| "rootfs".to_string())
        .into_iter()
        .chain((0..c.volumes).map(|n| format!("vol{n}")))
        .collect();
    use skiff_vmm::template::NetShape;
    let net = match c.net {
        NetKind::None => None,
        NetKind::Passt => Some(NetShape {
            vnet_hdr: false,
            mtu: skiff_vmm::passt::MTU,
        }),
        NetKind::Tap => Some(NetShape {
            vnet_hdr: true,
            mtu: 1500,
        }),
        NetKind::Stream | NetKind::Dgram => Some(NetShape {
            vnet_hdr: false,
            mtu: 1500,
        }),
    };
    let spec = skiff_vmm::sandbox::template_spec(
        &kernel,
        &initrd,
        c.cpus,
        c.memory,
        &c.kernel_arg,
        tags,
        net,
    );
    let timeout = std::time::Duration::from_secs(c.agent_timeout.max(1));
    match skiff_vmm::template::find_or_make(&spec, timeout)? {
        skiff_vmm::template::Found::Ready(_) => eprintln!("vmm template create: it exists"),
        skiff_vmm::template::Found::Made(_) => eprintln!("vmm template create: made"),
    }
    Ok(skiff_vmm::template::templates_dir().join(skiff_vmm::template::key(&spec)?))
}

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line: clap's first line names the problem.
            let msg = e.render().to_string();
            let mut lines = msg.lines().filter(|l| !l.trim().is_empty());
            let mut line = lines
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ")
                .to_string();
            if line.ends_with(':') {
                // "the following required arguments were not provided:" + the next line.
                line = format!("{line} {}", lines.next().unwrap_or("").trim());
            }
            eprintln!("vmm: error: {line} (see vmm --help)");
            return ExitCode::from(2);
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SKIFF_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .try_init();

    if let Some(Command::Template(t)) = &cli.command {
        return match &t.action {
            TemplateAction::Create(c) => match template_create(c) {
                Ok(dir) => {
                    println!("{}", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vmm template create: error: {e}");
                    ExitCode::from(1)
                }
            },
            TemplateAction::Ls => {
                let all = skiff_vmm::template::list();
                if all.is_empty() {
                    println!(
                        "no templates in {}",
                        skiff_vmm::template::templates_dir().display()
                    );
                }
                for t in all {
                    let what = match t.summary {
                        Ok(s) => s,
                        Err(e) => format!("unusable: {e}"),
                    };
                    println!(
                        "{}  {:.1} MiB on disk  {what}",
                        t.dir.display(),
                        t.disk_bytes as f64 / 1048576.0
                    );
                }
                ExitCode::SUCCESS
            }
            TemplateAction::Rm => match skiff_vmm::template::remove_all() {
                Ok(n) => {
                    println!("removed {n} template(s)");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vmm template rm: error: {e}");
                    ExitCode::from(1)
                }
            },
        };
    }
    if let Some(Command::Run(r)) = cli.command {
        if let Some(m) = r.seccomp {
            seccomp::set_mode(m.into());
        }
        let opts = RunOptions {
            kernel: r.kernel,
            initrd: r.initrd,
            cpus: r.cpus,
            memory_mib: r.memory,
            env: r.env,
            workdir: r.workdir,
            user: r.user,
            tty: r.tty,
            interactive: r.interactive,
            timings: r.timings,
            console: r.console,
            kernel_args: r.kernel_arg,
            rootfs: r.rootfs,
            volumes: r.volume,
            xattr_ownership: r.xattr_ownership,
            net: r.net,
            publish: r.publish,
            hostname: r.hostname,
            dns: r.dns,
            ip: r.ip,
            gateway: r.gateway,
            agent_timeout: std::time::Duration::from_secs(r.agent_timeout.max(1)),
            boot_slots: r.boot_slots,
            // Warm start is the default; --cold or SKIFF_WARM_START=0 boots the kernel.
            cold: r.cold
                || std::env::var("SKIFF_WARM_START").is_ok_and(|v| v == "0" || v == "false"),
            args: r.cmd,
        };
        return match run::run(&opts, Timings::new(start)) {
            Ok(status) => std::process::exit(status),
            Err(e) => {
                eprintln!("vmm run: error: {e}");
                ExitCode::from(125)
            }
        };
    }
    if let Some(m) = cli.seccomp {
        seccomp::set_mode(m.into());
    }
    let kernel = match (cli.kernel, &cli.restore) {
        (Some(k), _) => k,
        (None, Some(_)) => PathBuf::new(),
        (None, None) => {
            eprintln!("vmm: error: --kernel is required (see vmm --help)");
            return ExitCode::from(2);
        }
    };
    let rootfs = match cli.rootfs.as_deref().map(parse_rootfs).transpose() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            return ExitCode::from(2);
        }
    };
    // GDB first: a busy port fails before anything else starts, and the terminal is not in
    // raw mode yet while vmm waits (Ctrl-C still ends it).
    let (gdb, _gdb_listener) = match cli.gdb.as_deref().map(skiff_vmm::gdb::listen) {
        None => (None, None),
        Some(Err(e)) => {
            eprintln!("vmm: error: {e}");
            return ExitCode::from(2);
        }
        Some(Ok(l)) => {
            let a = l.address();
            eprintln!(
                "vmm: waiting for GDB on {a} before the first instruction \
                 (gdb {} -ex 'target remote {a}')",
                kernel.display()
            );
            match l.accept() {
                Ok(c) => (Some(c), Some(l)),
                Err(e) => {
                    eprintln!("vmm: error: {e}");
                    return ExitCode::from(2);
                }
            }
        }
    };
    let cmdline = cli.cmdline.unwrap_or_else(|| match &rootfs {
        Some(r) => format!(
            "{DEFAULT_CMDLINE} root=rootfs rootfstype=virtiofs {}",
            if r.read_only { "ro" } else { "rw" }
        ),
        None => DEFAULT_CMDLINE.to_string(),
    });
    let control = VmControl::new();
    let (serial_in, terminal) = if cli.no_input {
        (None, None)
    } else {
        let (i, t) = skiff_vmm::console::start(control.clone());
        (Some(i), Some(t))
    };
    let restore_terminal = || {
        if let Some(t) = &terminal {
            t.restore();
        }
    };
    let cfg = VmConfig {
        kernel,
        initrd: cli.initrd,
        cmdline,
        serial_in,
        cpus: cli.cpus,
        memory_mib: cli.memory,
        serial: cli.serial.map(SerialOut::File).unwrap_or(SerialOut::Stdout),
        pit: match cli.pit {
            Pit::Auto => PitMode::Auto,
            Pit::On => PitMode::On,
            Pit::Off => PitMode::Off,
        },
        snapshot: cli.snapshot_to.map(|dir| SnapshotAt {
            dir,
            stamp: cli.snapshot_on_stamp,
        }),
        restore: cli.restore.map(vm::RestoreFrom::Dir),
        gdb,
    };
    let mut devices = Vec::new();
    let budget = fs_device::FdBudget::default();
    if let Some(r) = &rootfs {
        match fs_device::create(r, &budget) {
            Ok(d) => devices.push(d),
            Err(e) => {
                restore_terminal();
                eprintln!("vmm: error: --rootfs: {e}");
                return ExitCode::from(2);
            }
        }
    }
    for s in &cli.share {
        match fs_device::parse_share(s).and_then(|s| fs_device::create(&s, &budget)) {
            Ok(d) => devices.push(d),
            Err(e) => {
                restore_terminal();
                eprintln!("vmm: error: {e}");
                return ExitCode::from(2);
            }
        }
    }
    // The card's event loop runs until the process exits.
    let _net_loop = match net_device::parse_net(&cli.net)
        .and_then(|n| net_device::create(&n, net_device::default_mac(), cli.mtu))
    {
        Ok(Some((d, running))) => {
            devices.push(d);
            Some(running)
        }
        Ok(None) => None,
        Err(e) => {
            restore_terminal();
            eprintln!("vmm: error: {e}");
            return ExitCode::from(2);
        }
    };
    let result = vm::run_controlled(&cfg, Timings::new(start), devices, &control);
    restore_terminal();
    match result {
        Ok(res) => {
            if cli.timings {
                eprint!("{}", res.timings.report());
                eprintln!(
                    "  guest exit: {:?} -> status {}",
                    res.exit,
                    res.exit.exit_code()
                );
            }
            // Exit without tearing the VM down first: the kernel frees it with the process.
            std::process::exit(res.exit.exit_code());
        }
        Err(e) => {
            eprintln!("vmm: error: {e}");
            ExitCode::from(if e.is_user_error() { 2 } else { 1 })
        }
    }
}

/// `--rootfs DIR[:ro]`: the root share (tag `rootfs`, the rootfs ownership policy). DIR must
/// be a directory.
fn parse_rootfs(s: &str) -> Result<fs_device::Share, String> {
    let (dir, read_only) = match s.strip_suffix(":ro") {
        Some(d) => (d, true),
        None => (s.strip_suffix(":rw").unwrap_or(s), false),
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(format!("--rootfs {dir}: not a directory")),
        Err(e) => return Err(format!("--rootfs {dir}: {e}")),
    }
    Ok(fs_device::Share {
        tag: "rootfs".into(),
        host: dir.into(),
        read_only,
        xattr_ownership: false,
        policy: fs_device::SharePolicy::Rootfs,
    })
}
