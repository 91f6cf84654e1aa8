//! VM settings for one container, from (later wins):
//! 1. built-in defaults (1 vCPU, 512 MiB, the installed kernel and initramfs);
//! 2. the system file `/etc/skiff/skiff.toml` (written by `tools/install`);
//! 3. the environment containerd was started with (`SKIFF_KERNEL`, `SKIFF_INITRD`,
//!    `SKIFF_CPUS`, `SKIFF_MEMORY_MIB`, `SKIFF_CONSOLE`);
//! 4. the runtime options containerd passes in `CreateTaskRequest.options` as
//!    `runtimeoptions.v1.Options` — `ConfigPath` (a file, e.g. `ctr run --runtime-config-path F`
//!    or `ConfigPath` in the CRI runtime's `options` table) and/or `ConfigBody` (inline text);
//! 5. OCI annotations `io.skiff.vm.cpus` and `io.skiff.vm.memory_mib` (e.g. `ctr run
//!    --annotation io.skiff.vm.cpus=2`, or pod annotations CRI passes through
//!    `pod_annotations = ["io.skiff.*"]`). Annotations cannot change the kernel.
//!
//! The file format is a TOML subset: `key = value` lines, `#` comments, integers and
//! double-quoted strings. Keys: `kernel`, `initrd`, `cpus`, `memory_mib`, `agent_timeout_s`,
//! `console_log`, `boot_slots` (how many VMs boot at once on the host, 0 = no limit; default
//! `$SKIFF_BOOT_SLOTS`, else the number of CPUs: see `skiff_vmm::boot_slots`), `warm_start`
//! (1, the default: restore VMs from a template, see `skiff_vmm::template`; 0: boot every VM
//! cold; also `$SKIFF_WARM_START`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_shim::protos::protobuf::{well_known_types::any::Any, CodedInputStream};

pub use skiff_vmm::settings_file::{
    INSTALLED_INITRD as DEFAULT_INITRD, INSTALLED_KERNEL as DEFAULT_KERNEL, SYSTEM_FILE,
};
/// Annotation: number of vCPUs.
pub const ANNOTATION_CPUS: &str = "io.skiff.vm.cpus";
/// Annotation: guest memory in MiB.
pub const ANNOTATION_MEMORY: &str = "io.skiff.vm.memory_mib";

/// A setting that could not be used; the message names the source and the key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{source_name}: line {line}: {msg}")]
    Syntax {
        source_name: String,
        line: usize,
        msg: String,
    },
    #[error("{0}: {1}")]
    Read(String, std::io::Error),
    #[error("runtime options: {0}")]
    Options(String),
    #[error("annotation {key}={value:?}: {msg}")]
    Annotation {
        key: String,
        value: String,
        msg: String,
    },
    #[error("Skiff guest {0} not installed: {1} missing (run tools/install, or set `kernel`/`initrd` in {SYSTEM_FILE} or SKIFF_KERNEL/SKIFF_INITRD)")]
    MissingKernel(&'static str, String),
}

/// The resolved settings.
#[derive(Debug, Clone, PartialEq)]
pub struct VmSettings {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cpus: u32,
    pub memory_mib: u64,
    pub agent_timeout: Duration,
    pub console: Option<PathBuf>,
    pub boot_slots: Option<usize>,
    pub warm_start: bool,
}

impl Default for VmSettings {
    fn default() -> Self {
        VmSettings {
            kernel: PathBuf::from(DEFAULT_KERNEL),
            initrd: PathBuf::from(DEFAULT_INITRD),
            cpus: 1,
            memory_mib: 512,
            agent_timeout: Duration::from_secs(60),
            console: None,
            boot_slots: None,
            warm_start: true,
        }
    }
}

impl VmSettings {
    /// Resolves the settings for one container (see the module docs for the order).
    pub fn resolve(
        options: Option<&Any>,
        annotations: Option<&HashMap<String, String>>,
    ) -> Result<Self, Error> {
        let mut s = VmSettings::default();
        if Path::new(SYSTEM_FILE).is_file() {
            s.apply_file(Path::new(SYSTEM_FILE))?;
        }
        s.apply_env()?;
        if let Some(any) = options {
            let (path, body) = decode_runtime_options(any)?;
            if let Some(p) = path {
                s.apply_file(Path::new(&p))?;
            }
            if let Some(b) = body {
                s.apply_text("runtime options ConfigBody", &b)?;
            }
        }
        if let Some(a) = annotations {
            s.apply_annotations(a)?;
        }
        for (what, p) in [("kernel", &s.kernel), ("initramfs", &s.initrd)] {
            if !p.is_file() {
                return Err(Error::MissingKernel(what, p.display().to_string()));
            }
        }
        Ok(s)
    }

    fn apply_env(&mut self) -> Result<(), Error> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if let Some(v) = env("SKIFF_KERNEL") {
            self.kernel = v.into();
        }
        if let Some(v) = env("SKIFF_INITRD") {
            self.initrd = v.into();
        }
        if let Some(v) = env("SKIFF_CONSOLE") {
            self.console = Some(v.into());
        }
        for (var, key) in [
            ("SKIFF_CPUS", "cpus"),
            ("SKIFF_MEMORY_MIB", "memory_mib"),
            ("SKIFF_WARM_START", "warm_start"),
        ] {
            if let Some(v) = env(var) {
                self.set(key, &v).map_err(|msg| Error::Syntax {
                    source_name: format!("environment {var}"),
                    line: 0,
                    msg,
                })?;
            }
        }
        Ok(())
    }

    fn apply_file(&mut self, path: &Path) -> Result<(), Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Read(path.display().to_string(), e))?;
        self.apply_text(&path.display().to_string(), &text)
    }

    /// Applies `key = value` lines.
    pub fn apply_text(&mut self, source_name: &str, text: &str) -> Result<(), Error> {
        for e in skiff_vmm::settings_file::entries(text) {
            let err = |line: usize, msg: String| Error::Syntax {
                source_name: source_name.to_string(),
                line,
                msg,
            };
            let (n, k, v) = e.map_err(|(n, msg)| err(n, msg))?;
            self.set(k, v).map_err(|msg| err(n, msg))?;
        }
        Ok(())
    }

    fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let number = |what: &str| -> Result<u64, String> {
            value
                .parse::<u64>()
                .map_err(|_| format!("{what} must be a whole number, got {value:?}"))
        };
        match key {
            "kernel" => self.kernel = value.into(),
            "initrd" | "initramfs" => self.initrd = value.into(),
            "console_log" => self.console = (!value.is_empty()).then(|| value.into()),
            "cpus" => {
                let n = number("cpus")?;
                if n == 0 || n > 64 {
                    return Err(format!("cpus must be 1..=64, got {n}"));
                }
                self.cpus = n as u32;
            }
            "memory_mib" => {
                let n = number("memory_mib")?;
                if !(64..=1 << 20).contains(&n) {
                    return Err(format!("memory_mib must be 64..=1048576, got {n}"));
                }
                self.memory_mib = n;
            }
            "agent_timeout_s" => {
                let n = number("agent_timeout_s")?;
                if n == 0 {
                    return Err("agent_timeout_s must be at least 1".into());
                }
                self.agent_timeout = Duration::from_secs(n);
            }
            "boot_slots" => {
                let n = number("boot_slots")?;
                if n > 4096 {
                    return Err(format!("boot_slots must be 0..=4096, got {n}"));
                }
                self.boot_slots = Some(n as usize);
            }
            "warm_start" => {
                self.warm_start = match value {
                    "1" | "true" => true,
                    "0" | "false" => false,
                    _ => return Err(format!("warm_start must be 0 or 1, got {value:?}")),
                }
            }
            other => {
                return Err(format!(
                    "unknown key {other:?} (known: kernel, initrd, cpus, memory_mib, agent_timeout_s, console_log, boot_slots, warm_start)"
                ))
            }
        }
        Ok(())
    }

    fn apply_annotations(&mut self, a: &HashMap<String, String>) -> Result<(), Error> {
        for (key, field) in [(ANNOTATION_CPUS, "cpus"), (ANNOTATION_MEMORY, "memory_mib")] {
            if let Some(v) = a.get(key) {
                self.set(field, v.trim()).map_err(|msg| Error::Annotation {
                    key: key.into(),
                    value: v.clone(),
                    msg,
                })?;
            }
        }
        Ok(())
    }
}

/// `runtimeoptions.v1.Options { type_url = 1; config_path = 2; config_body = 3 }` →
/// (config_path, config_body). Other option types (e.g. runc's) are ignored with a log line.
fn decode_runtime_options(any: &Any) -> Result<(Option<String>, Option<String>), Error> {
    if any.value.is_empty() {
        return Ok((None, None));
    }
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        tracing::warn!(
            type_url = any.type_url.as_str(),
            "ignoring runtime options of a type Skiff does not read"
        );
        return Ok((None, None));
    }
    let bad = |e: containerd_shim::protos::protobuf::Error| Error::Options(e.to_string());
    let mut input = CodedInputStream::from_bytes(&any.value);
    let (mut path, mut body) = (None, None);
    while let Some(tag) = input.read_raw_tag_or_eof().map_err(bad)? {
        let (field, wire) = (tag >> 3, tag & 7);
        match (field, wire) {
            (2, 2) => path = Some(input.read_string().map_err(bad)?),
            (3, 2) => {
                let b = input.read_bytes().map_err(bad)?;
                body = Some(
                    String::from_utf8(b)
                        .map_err(|_| Error::Options("ConfigBody is not UTF-8".into()))?,
                );
            }
            (_, 0) => {
                input.read_uint64().map_err(bad)?;
            }
            (_, 2) => {
                input.read_bytes().map_err(bad)?;
            }
            (f, w) => {
                return Err(Error::Options(format!(
                    "unexpected field {f} (wire type {w}) in runtimeoptions.v1.Options"
                )))
            }
        }
    }
    Ok((
        path.filter(|p| !p.is_empty()),
        body.filter(|b| !b.is_empty()),
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn any(fields: &[(u32, &str)]) -> Any {
        let mut value = Vec::new();
        for (f, s) in fields {
            value.push(((f << 3) | 2) as u8);
            value.push(s.len() as u8);
            value.extend_from_slice(s.as_bytes());
        }
        let mut a = Any::new();
        a.type_url = "runtimeoptions.v1.Options".into();
        a.value = value;
        a
    }

    #[test]
    fn file_syntax_and_ranges() {
        let mut s = VmSettings::default();
        s.apply_text(
            "t",
            "# Skiff\ncpus = 2\nmemory_mib = 1024 # MiB\nkernel = \"/k#1\"\n[x]\n",
        )
        .unwrap();
        assert_eq!((s.cpus, s.memory_mib), (2, 1024));
        assert_eq!(s.kernel, PathBuf::from("/k#1"));
        let e = s.apply_text("f.toml", "\n\ncpus = lots").unwrap_err();
        assert_eq!(
            e.to_string(),
            "f.toml: line 3: cpus must be a whole number, got \"lots\""
        );
        assert!(s
            .apply_text("f", "memory_mib = 1")
            .unwrap_err()
            .to_string()
            .contains("64..="));
        assert!(s
            .apply_text("f", "colour = \"red\"")
            .unwrap_err()
            .to_string()
            .contains("unknown key \"colour\""));
        assert!(s.apply_text("f", "cpus").is_err());
    }

    #[test]
    fn runtime_options_and_annotations() {
        let dir = std::env::temp_dir().join(format!("skiff-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (k, i, f) = (dir.join("k"), dir.join("i"), dir.join("skiff.toml"));
        std::fs::write(&k, "k").unwrap();
        std::fs::write(&i, "i").unwrap();
        std::fs::write(
            &f,
            format!(
                "kernel = \"{}\"\ninitrd = \"{}\"\nmemory_mib = 300\n",
                k.display(),
                i.display()
            ),
        )
        .unwrap();
        let opts = any(&[(1, "x"), (2, f.to_str().unwrap()), (3, "cpus = 3")]);
        let mut ann = HashMap::new();
        ann.insert(ANNOTATION_MEMORY.to_string(), "700".to_string());
        let s = VmSettings::resolve(Some(&opts), Some(&ann)).unwrap();
        assert_eq!((s.cpus, s.memory_mib), (3, 700));
        assert_eq!(s.kernel, k);
        ann.insert(ANNOTATION_CPUS.to_string(), "0".to_string());
        let e = VmSettings::resolve(Some(&opts), Some(&ann)).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("annotation io.skiff.vm.cpus=\"0\""));
        // A missing kernel names the path.
        let opts = any(&[(3, "kernel = \"/no/such/vmlinux\"")]);
        let e = VmSettings::resolve(Some(&opts), None).unwrap_err();
        assert!(e.to_string().contains("/no/such/vmlinux missing"), "{e}");
        // Truncated protobuf: an error, not a panic.
        let mut bad = any(&[(2, "abc")]);
        bad.value.truncate(3);
        assert!(VmSettings::resolve(Some(&bad), None).is_err());
        // Other option types are ignored.
        let mut runc = any(&[(2, "abc")]);
        runc.type_url = "containerd.runc.v1.Options".into();
        assert!(decode_runtime_options(&runc).unwrap() == (None, None));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
