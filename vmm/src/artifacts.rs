//! Where `vmm run` finds the guest kernel and the initramfs with the agent when `--kernel` /
//! `--initrd` are not given. Each is looked up on its own; the first place that has it wins:
//!
//! 1. `$SKIFF_KERNEL` / `$SKIFF_INITRD`;
//! 2. when this `vmm` lives in a Skiff checkout (`target/release/vmm`): the checkout's
//!    `kernel/build.sh --print-path` and `kernel/build-initramfs.sh --print-path`, run once
//!    each (they build on first use, with progress on stderr, and are instant once cached);
//!    if a script fails (a read-only checkout cannot run cargo), the newest artefact in the
//!    cache, with a warning;
//! 3. `kernel` / `initrd` in `/etc/skiff/skiff.toml` (what the shim reads too);
//! 4. the installed ones (`/usr/local/share/skiff/{vmlinux,initramfs.cpio}`, `tools/install`);
//! 5. the newest in the cache (`${SKIFF_CACHE:-~/.cache/skiff}`, what the scripts build).
//!
//! Nothing found is one error naming every place looked at.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::settings_file::{lookup, INSTALLED_INITRD, INSTALLED_KERNEL, SYSTEM_FILE};

/// Errors of [`find`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Neither given nor found.
    #[error("no guest {what} given and none found (looked at: {looked}); pass --{flag}, set {env}, or run tools/install")]
    NotFound {
        /// `kernel` or `initramfs`.
        what: &'static str,
        /// The flag that gives it.
        flag: &'static str,
        /// The variable that gives it.
        env: &'static str,
        /// Where it was looked for.
        looked: String,
    },
}

/// Which artefact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The guest kernel (`vmlinux`).
    Kernel,
    /// The initramfs with the agent.
    Initrd,
}

impl Kind {
    fn what(self) -> &'static str {
        match self {
            Kind::Kernel => "kernel",
            Kind::Initrd => "initramfs",
        }
    }
    fn env(self) -> &'static str {
        match self {
            Kind::Kernel => "SKIFF_KERNEL",
            Kind::Initrd => "SKIFF_INITRD",
        }
    }
    fn flag(self) -> &'static str {
        match self {
            Kind::Kernel => "kernel",
            Kind::Initrd => "initrd",
        }
    }
    fn keys(self) -> &'static [&'static str] {
        match self {
            Kind::Kernel => &["kernel"],
            Kind::Initrd => &["initrd", "initramfs"],
        }
    }
    fn installed(self) -> &'static str {
        match self {
            Kind::Kernel => INSTALLED_KERNEL,
            Kind::Initrd => INSTALLED_INITRD,
        }
    }
    fn script(self) -> &'static str {
        match self {
            Kind::Kernel => "kernel/build.sh",
            Kind::Initrd => "kernel/build-initramfs.sh",
        }
    }
}

/// Where the places of the module docs are (tests point them elsewhere).
#[derive(Debug, Clone)]
pub struct Places {
    /// The checkout this `vmm` belongs to, if any.
    pub checkout: Option<PathBuf>,
    /// The settings file.
    pub settings: PathBuf,
    /// The cache directory.
    pub cache: Option<PathBuf>,
    /// Whether the installed paths are looked at.
    pub installed: bool,
    /// Whether `$SKIFF_KERNEL` / `$SKIFF_INITRD` are looked at.
    pub env: bool,
}

impl Places {
    /// The real places for this process.
    pub fn here() -> Self {
        let checkout = std::env::current_exe().ok().and_then(|exe| {
            exe.ancestors()
                .find(|d| d.join("kernel/build.sh").is_file())
                .map(Path::to_path_buf)
        });
        let cache = std::env::var_os("SKIFF_CACHE")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/skiff")));
        Places {
            checkout,
            settings: PathBuf::from(SYSTEM_FILE),
            cache,
            installed: true,
            env: true,
        }
    }
}

/// Finds the kernel and the initramfs (see the module docs); `given` ones are kept as they are.
pub fn find(kernel: Option<&Path>, initrd: Option<&Path>) -> Result<(PathBuf, PathBuf), Error> {
    let places = Places::here();
    let k = match kernel {
        Some(k) => k.to_path_buf(),
        None => find_one(Kind::Kernel, &places)?,
    };
    let i = match initrd {
        Some(i) => i.to_path_buf(),
        None => find_one(Kind::Initrd, &places)?,
    };
    Ok((k, i))
}

/// Finds one artefact (see the module docs).
pub fn find_one(kind: Kind, places: &Places) -> Result<PathBuf, Error> {
    let mut looked = Vec::new();
    if places.env {
        if let Some(v) = std::env::var_os(kind.env()).filter(|v| !v.is_empty()) {
            return Ok(v.into());
        }
        looked.push(format!("${}", kind.env()));
    }
    let newest = || places.cache.as_deref().and_then(|c| newest_cached(kind, c));
    if let Some(root) = &places.checkout {
        let script = root.join(kind.script());
        match run_script(&script) {
            Ok(p) => return Ok(p),
            Err(why) => {
                if let Some(p) = newest() {
                    tracing::debug!(
                        "{} failed ({why}); using the newest cached {}: {}",
                        script.display(),
                        kind.what(),
                        p.display()
                    );
                    eprintln!(
                        "vmm: warning: {} failed ({why}); using the newest cached {}: {}",
                        script.display(),
                        kind.what(),
                        p.display()
                    );
                    return Ok(p);
                }
                looked.push(format!("{} ({why})", script.display()));
            }
        }
    }
    if let Some(v) = lookup(&places.settings, kind.keys()) {
        let p = PathBuf::from(v);
        if p.is_file() {
            return Ok(p);
        }
        looked.push(format!(
            "{} ({} = {} is missing)",
            places.settings.display(),
            kind.keys()[0],
            p.display()
        ));
    } else {
        looked.push(places.settings.display().to_string());
    }
    if places.installed {
        let p = Path::new(kind.installed());
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        looked.push(kind.installed().to_string());
    }
    if let Some(p) = newest() {
        return Ok(p);
    }
    if let Some(c) = &places.cache {
        looked.push(format!("the cache {}", c.display()));
    }
    Err(Error::NotFound {
        what: kind.what(),
        flag: kind.flag(),
        env: kind.env(),
        looked: looked.join(", "),
    })
}

/// Runs a build script with `--print-path` once: it builds when needed and prints where the
/// artefact is (the kernel script prints its output directory). It says nothing while it
/// builds, so a run that takes longer than a cached one gets a progress line here.
fn run_script(script: &Path) -> Result<PathBuf, String> {
    use std::io::Read;
    let mut child = std::process::Command::new(script)
        .arg("--print-path")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run it: {e}"))?;
    let start = std::time::Instant::now();
    let mut next_note = std::time::Duration::from_secs(3);
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => {}
            Err(e) => return Err(format!("waiting for it: {e}")),
        }
        if start.elapsed() >= next_note {
            eprintln!(
                "vmm: {} is building (first use of these inputs: a kernel takes 6-11 minutes \
                 on 2 cores), {} s so far",
                script.display(),
                start.elapsed().as_secs()
            );
            next_note += std::time::Duration::from_secs(30);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut printed = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut printed);
    }
    if !status.success() {
        return Err(format!("it ended with {status}"));
    }
    let p = PathBuf::from(printed.lines().last().unwrap_or("").trim());
    let p = if p.is_dir() { p.join("vmlinux") } else { p };
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!("it printed {:?}, not a file", printed.trim()))
    }
}

/// The newest cached artefact: `<cache>/kernel/x86_64-*/vmlinux` of a finished build, or
/// `<cache>/initramfs/*/initramfs.cpio`.
fn newest_cached(kind: Kind, cache: &Path) -> Option<PathBuf> {
    let (dir, file, prefix) = match kind {
        Kind::Kernel => (cache.join("kernel"), "vmlinux", Some("x86_64-")),
        Kind::Initrd => (cache.join("initramfs"), "initramfs.cpio", None),
    };
    let mut best: Option<(SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if prefix.is_some_and(|p| !name.starts_with(p) || name.ends_with("-check")) {
            continue;
        }
        let p = e.path().join(file);
        if kind == Kind::Kernel && !e.path().join("done").is_file() {
            continue;
        }
        let Ok(m) = std::fs::metadata(&p) else {
            continue;
        };
        let t = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        if m.is_file() && best.as_ref().is_none_or(|(bt, _)| t > *bt) {
            best = Some((t, p));
        }
    }
    best.map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("skiff-art-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn places(root: &Path) -> Places {
        Places {
            checkout: None,
            settings: root.join("skiff.toml"),
            cache: Some(root.join("cache")),
            installed: false,
            env: false,
        }
    }

    #[test]
    fn nothing_found_names_every_place() {
        let d = tmp("none");
        let e = find_one(Kind::Initrd, &places(&d)).unwrap_err().to_string();
        assert!(e.contains("no guest initramfs given"), "{e}");
        assert!(e.contains("skiff.toml") && e.contains("the cache"), "{e}");
        assert!(e.contains("--initrd") && e.contains("tools/install"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn settings_file_then_newest_cache() {
        let d = tmp("order");
        let p = places(&d);
        // Two finished kernel builds and an unfinished one: the newest finished wins.
        for (n, done) in [
            ("x86_64-aaaa", true),
            ("x86_64-bbbb", true),
            ("x86_64-cccc", false),
        ] {
            let k = d.join("cache/kernel").join(n);
            std::fs::create_dir_all(&k).unwrap();
            std::fs::write(k.join("vmlinux"), n).unwrap();
            if done {
                std::fs::write(k.join("done"), "").unwrap();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(
            find_one(Kind::Kernel, &p).unwrap(),
            d.join("cache/kernel/x86_64-bbbb/vmlinux")
        );
        // The settings file comes first; a path it names that is missing is skipped.
        std::fs::write(d.join("skiff.toml"), "kernel = \"/no/such/vmlinux\"\n").unwrap();
        assert_eq!(
            find_one(Kind::Kernel, &p).unwrap(),
            d.join("cache/kernel/x86_64-bbbb/vmlinux")
        );
        let mine = d.join("mine");
        std::fs::write(&mine, "k").unwrap();
        std::fs::write(
            d.join("skiff.toml"),
            format!("kernel = \"{}\"\n", mine.display()),
        )
        .unwrap();
        assert_eq!(find_one(Kind::Kernel, &p).unwrap(), mine);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_failing_checkout_script_falls_back_to_the_cache() {
        let d = tmp("script");
        let mut p = places(&d);
        let root = d.join("checkout");
        std::fs::create_dir_all(root.join("kernel")).unwrap();
        let script = root.join("kernel/build-initramfs.sh");
        // A working script is run once and its printed path used.
        let built = d.join("built.cpio");
        std::fs::write(&built, "cpio").unwrap();
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n[ \"$1\" = --print-path ] || exit 9\necho run >> {}/runs\necho {}\n",
                d.display(),
                built.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        p.checkout = Some(root.clone());
        assert_eq!(find_one(Kind::Initrd, &p).unwrap(), built);
        assert_eq!(std::fs::read_to_string(d.join("runs")).unwrap(), "run\n");
        // A failing one (a read-only checkout) falls back to the newest cached initramfs.
        std::fs::write(
            &script,
            "#!/bin/sh\necho 'cargo: read-only' >&2\nexit 101\n",
        )
        .unwrap();
        let c = d.join("cache/initramfs/0123");
        std::fs::create_dir_all(&c).unwrap();
        std::fs::write(c.join("initramfs.cpio"), "cpio").unwrap();
        assert_eq!(
            find_one(Kind::Initrd, &p).unwrap(),
            c.join("initramfs.cpio")
        );
        // With nothing cached the error names the script and why it failed.
        std::fs::remove_dir_all(d.join("cache")).unwrap();
        let e = find_one(Kind::Initrd, &p).unwrap_err().to_string();
        assert!(e.contains("build-initramfs.sh (it ended with"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
