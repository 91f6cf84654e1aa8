//! Wires the devices crate's virtio-net device into a VM slot: a backend (Unix stream or
//! datagram socket, Linux tap), its own event-loop thread, and a virtio-mmio transport on the
//! MMIO bus. Nothing goes on the kernel command line beyond the slot's `virtio_mmio.device=`
//! entry, which `vm::run_with_devices` adds for every device (the FDT on aarch64).

use std::path::{Path, PathBuf};

use skiff_devices::event_loop::{EventLoop, RunningLoop};
use skiff_devices::virtio::net::backend::NetBackend;
use skiff_devices::virtio::net::{DgramBackend, Net, NetConfig, StreamBackend, TapBackend};

use crate::vm::MmioDeviceFactory;

/// Errors setting up the network card.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The `--net` value is not one of the accepted forms.
    #[error("--net {0:?}: expected none, stream:PATH, dgram:PATH or tap:NAME")]
    Spec(String),
    /// The backend could not be opened (no listener at the path, no such tap, no permission).
    #[error("--net {spec}: {source}")]
    Backend {
        /// The `--net` value.
        spec: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The device or its event loop could not be created.
    #[error("virtio-net device: {0}")]
    Device(String),
}

/// Where the guest's network card is plugged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetSpec {
    /// No network card.
    None,
    /// A listening Unix stream socket, frames with a 4-byte big-endian length (passt `-s`,
    /// gvproxy `-listen-qemu unix://`).
    Stream(PathBuf),
    /// A Unix datagram socket, one frame per datagram (gvproxy `-listen-vfkit unixgram://`,
    /// vmnet-helper).
    Dgram(PathBuf),
    /// A Linux tap interface (created if the VMM may; needs CAP_NET_ADMIN).
    Tap(String),
}

impl NetSpec {
    fn describe(&self) -> String {
        match self {
            NetSpec::None => "none".into(),
            NetSpec::Stream(p) => format!("stream:{}", p.display()),
            NetSpec::Dgram(p) => format!("dgram:{}", p.display()),
            NetSpec::Tap(n) => format!("tap:{n}"),
        }
    }
}

/// Parses `none`, `stream:PATH`, `dgram:PATH` or `tap:NAME`.
pub fn parse_net(s: &str) -> Result<NetSpec, Error> {
    let bad = || Error::Spec(s.to_string());
    if s == "none" {
        return Ok(NetSpec::None);
    }
    let (kind, arg) = s.split_once(':').ok_or_else(bad)?;
    if arg.is_empty() {
        return Err(bad());
    }
    match kind {
        "stream" => Ok(NetSpec::Stream(arg.into())),
        "dgram" => Ok(NetSpec::Dgram(arg.into())),
        "tap" if arg.len() < 16 && !arg.contains('/') => Ok(NetSpec::Tap(arg.into())),
        _ => Err(bad()),
    }
}

/// A locally administered MAC `52:54:00:xx:xx:xx`, the low bytes from the process id.
pub fn default_mac() -> [u8; 6] {
    let p = std::process::id().to_be_bytes();
    [0x52, 0x54, 0x00, p[1], p[2], p[3]]
}

/// Where a `dgram:` backend binds its own end (the peer answers to it). Left behind when the
/// VMM exits; replaced by the next VMM with the same pid.
fn dgram_local_path() -> PathBuf {
    std::env::temp_dir().join(format!("skiff-net-{}.sock", std::process::id()))
}

fn open_backend(spec: &NetSpec) -> std::io::Result<Option<Box<dyn NetBackend>>> {
    Ok(Some(match spec {
        NetSpec::None => return Ok(None),
        NetSpec::Stream(p) => Box::new(StreamBackend::connect(p)?),
        NetSpec::Dgram(p) => Box::new(DgramBackend::connect(&dgram_local_path(), p)?),
        NetSpec::Tap(n) => {
            // An existing tap only: TUNSETIFF would otherwise create a new, unconnected one.
            if !Path::new("/sys/class/net").join(n).exists() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no network interface {n:?} in this network namespace (create it first: ip tuntap add {n} mode tap)"),
                ));
            }
            Box::new(TapBackend::open(n)?)
        }
    }))
}

/// Creates (or opens) the tap `name` inside the network namespace `netns` (a
/// `/proc/PID/ns/net` link or a bind mount of one, e.g. `/var/run/netns/NAME`) and returns it
/// as a backend. The tap is made on a short-lived thread that enters the namespace, so the
/// caller's own namespace is untouched; the descriptor works from any namespace afterwards.
#[cfg(target_os = "linux")]
pub fn open_tap_in_netns(netns: &Path, name: &str) -> std::io::Result<TapBackend> {
    let ns = std::fs::File::open(netns)?;
    let name = name.to_owned();
    std::thread::Builder::new()
        .name("tap-in-netns".into())
        .spawn(move || {
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&ns),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )?;
            TapBackend::open(&name)
        })?
        .join()
        .map_err(|_| std::io::Error::other("the tap thread panicked"))?
}

/// Creates the card over the tap [`open_tap_in_netns`] opened.
#[cfg(target_os = "linux")]
pub fn create_in_netns(
    netns: &Path,
    tap: &str,
    mac: [u8; 6],
    mtu: u16,
) -> Result<(MmioDeviceFactory, RunningLoop), Error> {
    let backend = open_tap_in_netns(netns, tap).map_err(|source| Error::Backend {
        spec: format!("tap:{tap} in {}", netns.display()),
        source,
    })?;
    let mut config = NetConfig::new(mac);
    config.mtu = mtu;
    create_with_backend(Box::new(backend), config)
}

/// There are no network namespaces outside Linux.
#[cfg(not(target_os = "linux"))]
pub fn create_in_netns(
    netns: &Path,
    tap: &str,
    _mac: [u8; 6],
    _mtu: u16,
) -> Result<(MmioDeviceFactory, RunningLoop), Error> {
    Err(Error::Backend {
        spec: format!("tap:{tap} in {}", netns.display()),
        source: std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "network namespaces are Linux-only",
        ),
    })
}

/// Opens the backend `spec` names and creates the card with `mac`. `Ok(None)` for
/// [`NetSpec::None`]. Keep the returned loop until the VM ends.
pub fn create(
    spec: &NetSpec,
    mac: [u8; 6],
    mtu: u16,
) -> Result<Option<(MmioDeviceFactory, RunningLoop)>, Error> {
    let backend = open_backend(spec).map_err(|source| Error::Backend {
        spec: spec.describe(),
        source,
    })?;
    match backend {
        None => Ok(None),
        Some(b) => {
            let mut config = NetConfig::new(mac);
            config.mtu = mtu;
            create_with_backend(b, config).map(Some)
        }
    }
}

/// Creates the card over an already-open `backend` (e.g. a socketpair shared with passt
/// `--fd`) and starts its event loop. Keep the returned loop until the VM ends.
pub fn create_with_backend(
    backend: Box<dyn NetBackend>,
    config: NetConfig,
) -> Result<(MmioDeviceFactory, RunningLoop), Error> {
    let mut el = EventLoop::new().map_err(|e| Error::Device(e.to_string()))?;
    let net = Net::new(config, backend, &mut el).map_err(|e| Error::Device(e.to_string()))?;
    if let Some(secs) = std::env::var("SKIFF_NET_PROBE_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        let probe = net.probe();
        std::thread::spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_secs(secs.max(1)));
            eprintln!("net-probe: {}", probe.describe());
        });
    }
    let factory: MmioDeviceFactory =
        Box::new(move |mem, irq, saved| crate::vm::transport(Box::new(net), mem, irq, saved));
    // Spawned from the caller's (unfiltered) thread: the loop installs the event-loop
    // seccomp allowlist (sockets, tap read/write, TUNSETOFFLOAD) before it serves the guest.
    let running = el
        .spawn_with(|| {
            crate::seccomp::install(crate::seccomp::Kind::Events).map_err(std::io::Error::other)
        })
        .map_err(|e| Error::Device(e.to_string()))?;
    Ok((factory, running))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn net_specs() {
        assert_eq!(parse_net("none").unwrap(), NetSpec::None);
        assert_eq!(
            parse_net("stream:/run/passt.sock").unwrap(),
            NetSpec::Stream("/run/passt.sock".into())
        );
        assert_eq!(
            parse_net("dgram:/tmp/gv.sock").unwrap(),
            NetSpec::Dgram("/tmp/gv.sock".into())
        );
        assert_eq!(parse_net("tap:tap0").unwrap(), NetSpec::Tap("tap0".into()));
        for bad in [
            "",
            "stream",
            "stream:",
            "tap:a/b",
            "tap:0123456789abcdef",
            "udp:x",
        ] {
            assert!(parse_net(bad).is_err(), "{bad}");
        }
        let m = default_mac();
        assert_eq!(&m[..3], &[0x52, 0x54, 0x00]);
    }

    #[test]
    fn stream_backend_without_a_listener_is_a_clear_error() {
        let e = create(
            &NetSpec::Stream("/nonexistent/skiff.sock".into()),
            default_mac(),
            1500,
        )
        .err()
        .unwrap();
        assert!(
            e.to_string()
                .starts_with("--net stream:/nonexistent/skiff.sock: "),
            "{e}"
        );
    }

    #[test]
    fn stream_backend_connects_and_builds_a_factory() {
        let path = std::env::temp_dir().join(format!("skiff-net-test-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (_factory, running) = create(&NetSpec::Stream(path.clone()), default_mac(), 1500)
            .unwrap()
            .unwrap();
        running.stop().unwrap();
        let _ = std::fs::remove_file(&path);
    }
}
