//! virtio-fs end to end: `vmm run --rootfs DIR` and `-v HOST:GUEST[:ro]` with a real Linux
//! guest (through `tools/kvm-vm` on a PVM host). Each case runs in its own nested VM; results
//! come back through the case directory, which the nested VM may write.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use skiff_tests::{
    kvm_kind, repo_root, run_script_on_real_kvm, skiff_kernel_and_initrd, vmm_binary, KvmKind,
};

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(st.success(), "{cmd} failed: {st}");
}

/// A busybox-static root filesystem with root and nobody.
fn busybox_root(dir: &Path) {
    skiff_tests::busybox_root(
        dir,
        &[],
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
        "root:x:0:\nnogroup:x:65534:\n",
    );
}

struct Env {
    out: PathBuf,
    vmm: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
}

impl Env {
    fn new(name: &str) -> Env {
        assert_ne!(kvm_kind(), KvmKind::Missing, "needs /dev/kvm");
        let (k, i) = skiff_kernel_and_initrd();
        let out = repo_root()
            .join("target")
            .join(format!("virtio-fs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).unwrap();
        // Copies anyone can read (the rootless case runs vmm as nobody).
        let kernel = out.join("vmlinux");
        let initrd = out.join("initramfs.cpio");
        std::fs::copy(k, &kernel).unwrap();
        std::fs::copy(i, &initrd).unwrap();
        Env {
            out,
            vmm: vmm_binary(),
            kernel,
            initrd,
        }
    }

    fn vmm_run(&self) -> String {
        format!(
            "{} run --console {}/console --kernel {} --initrd {}",
            self.vmm.display(),
            self.out.display(),
            self.kernel.display(),
            self.initrd.display()
        )
    }

    /// Runs `body` in a nested VM (host-side timeout, one retry).
    fn run(&self, name: &str, body: &str) {
        let path = self.out.join("case.sh");
        std::fs::write(&path, format!("set -u\ncd {}\n{body}", self.out.display())).unwrap();
        run_script_on_real_kvm(name, &path, &self.out, 240);
    }

    fn read(&self, f: &str) -> String {
        std::fs::read_to_string(self.out.join(f)).unwrap_or_default()
    }

    fn rc(&self) -> i32 {
        self.read("rc").trim().parse().unwrap_or(-1)
    }

    fn report(&self) -> String {
        format!(
            "rc={} stdout={:?} stderr={:?} console tail={:?}",
            self.rc(),
            self.read("stdout"),
            self.read("stderr"),
            self.read("console")
                .lines()
                .rev()
                .take(8)
                .collect::<Vec<_>>()
        )
    }

    fn done(self) {
        let _ = std::fs::remove_dir_all(&self.out);
    }
}

#[test]
fn rootfs_and_volumes() {
    let e = Env::new("rootfs");
    let root = e.out.join("root");
    busybox_root(&root);
    let (vol, ro) = (e.out.join("vol"), e.out.join("ro"));
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(vol.join("in.txt"), "in-content\n").unwrap();
    std::fs::write(ro.join("ro.txt"), "ro-content\n").unwrap();
    let script = "echo hello > /hello.txt; cat /data/in.txt; echo v > /data/out.txt; \
        mkdir -p /data/d/e; ln -s out.txt /data/link; mv /data/in.txt /data/moved.txt; \
        dd if=/dev/zero of=/data/big bs=1024 count=3072 2>/dev/null; cat /ro/ro.txt; \
        touch /ro/new 2>/tmp/e1; echo touch=$?; cat /tmp/e1; \
        { echo x >> /ro/ro.txt; } 2>/tmp/e2; echo append=$?; cat /tmp/e2; \
        rm /ro/ro.txt 2>/dev/null; echo rm=$?; ls /ro; exit 7";
    e.run(
        "rootfs-and-volumes",
        &format!(
            "{} --rootfs root -v {}:/data -v {}:/ro:ro -- sh -c '{script}' > stdout 2> stderr < /dev/null; echo $? > rc\n",
            e.vmm_run(),
            vol.display(),
            ro.display()
        ),
    );
    let out = e.read("stdout");
    let ok = e.rc() == 7
        && std::fs::read_to_string(root.join("hello.txt"))
            .ok()
            .as_deref()
            == Some("hello\n")
        && std::fs::read_to_string(vol.join("out.txt")).ok().as_deref() == Some("v\n")
        && vol.join("d/e").is_dir()
        && std::fs::read_link(vol.join("link")).ok() == Some(PathBuf::from("out.txt"))
        && vol.join("moved.txt").exists()
        && !vol.join("in.txt").exists()
        && std::fs::metadata(vol.join("big")).map(|m| m.len()).ok() == Some(3 << 20)
        && out.contains("in-content")
        && out.contains("ro-content")
        && out.contains("touch=1")
        && out.contains("append=1")
        && out.contains("rm=1")
        && out.matches("Read-only file system").count() >= 2
        && !ro.join("new").exists()
        && std::fs::read_to_string(ro.join("ro.txt")).ok().as_deref() == Some("ro-content\n");
    assert!(ok, "rootfs/volumes case failed: {}", e.report());
    e.done();
}

#[test]
fn rootless_ownership_in_xattrs() {
    let e = Env::new("xattr");
    let root = e.out.join("root");
    busybox_root(&root);
    // An unprivileged user owns the whole tree on the host and runs the VMM.
    sh(&format!("chown -R 65534:65534 {}", e.out.display()));
    let script =
        "stat -c %u:%g /bin/busybox; mkdir /x; chown 123:456 /x; stat -c \"%u:%g %F\" /x; \
        mknod /null0 c 1 3; stat -c \"%u %F %t,%T\" /null0; echo hi > /null0; echo w=$?";
    e.run(
        "rootless-ownership",
        &format!(
            "chmod 666 /dev/kvm; setpriv --reuid=65534 --regid=65534 --clear-groups {} --rootfs root --xattr-ownership -- sh -c '{script}' > stdout 2> stderr < /dev/null; echo $? > rc\n",
            e.vmm_run()
        ),
    );
    let out = e.read("stdout");
    let x = root.join("x");
    let host_ok = std::fs::metadata(&x)
        .map(|m| m.uid() == 65534 && m.is_dir())
        .unwrap_or(false)
        && std::fs::metadata(root.join("null0"))
            .map(|m| m.is_file() && m.uid() == 65534)
            .unwrap_or(false);
    let xattr = Command::new("python3")
        .args([
            "-c",
            "import os,sys; sys.stdout.write(os.getxattr(sys.argv[1], 'user.containers.override_stat').decode())",
        ])
        .arg(&x)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let ok = e.rc() == 0
        && out.contains("0:0\n")
        && out.contains("123:456 directory")
        && out.contains("0 character special file 1,3")
        && out.contains("w=0")
        && host_ok
        && xattr.starts_with("123:456:");
    assert!(ok, "rootless case failed: {} xattr={xattr:?}", e.report());
    e.done();
}

#[test]
fn debian_rootfs_runs_dpkg() {
    let e = Env::new("debian");
    let out = Command::new(repo_root().join("tools/build-debian-rootfs"))
        .arg("--print-path")
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "tools/build-debian-rootfs failed");
    let cached = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let root = e.out.join("debian");
    sh(&format!("cp -a {cached} {}", root.display()));
    // A local package with a maintainer script.
    let pkg = e.out.join("pkg");
    std::fs::create_dir_all(pkg.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(pkg.join("usr/bin")).unwrap();
    std::fs::write(
        pkg.join("DEBIAN/control"),
        "Package: skiff-hello\nVersion: 1.0\nArchitecture: all\nMaintainer: Skiff <skiff@example.org>\nDescription: test package\n",
    )
    .unwrap();
    std::fs::write(
        pkg.join("DEBIAN/postinst"),
        "#!/bin/sh\nset -e\necho configured > /var/lib/skiff-hello\n",
    )
    .unwrap();
    std::fs::write(
        pkg.join("usr/bin/skiff-hello"),
        "#!/bin/sh\necho hello from a deb\n",
    )
    .unwrap();
    sh(&format!(
        "chmod 755 {p}/DEBIAN/postinst {p}/usr/bin/skiff-hello && dpkg-deb -b {p} {r}/tmp/skiff-hello.deb >/dev/null",
        p = pkg.display(),
        r = root.display()
    ));
    let script = "dpkg --configure -a && dpkg -i /tmp/skiff-hello.deb && skiff-hello && \
        dpkg-query -W -f=\"\\${Status}\\n\" skiff-hello && cat /var/lib/skiff-hello && \
        dpkg -r skiff-hello >/dev/null && echo removed && dpkg -i /tmp/skiff-hello.deb >/dev/null && echo reinstalled";
    e.run(
        "debian-dpkg",
        &format!(
            "{} --memory 512 --rootfs debian -- sh -c '{script}' > stdout 2> stderr < /dev/null; echo $? > rc\n",
            e.vmm_run()
        ),
    );
    let out = e.read("stdout");
    let status = std::fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap_or_default();
    let ok = e.rc() == 0
        && out.contains("hello from a deb")
        && out.contains("install ok installed")
        && out.contains("configured")
        && out.contains("reinstalled")
        && status.contains("Package: skiff-hello")
        && root.join("usr/bin/skiff-hello").exists();
    assert!(ok, "debian case failed: {}", e.report());
    e.done();
}

/// Bad host paths are refused before boot with one line naming the path (no VM needed).
#[test]
fn bad_share_paths_fail_before_boot() {
    let vmm = vmm_binary();
    for (args, needle) in [
        (vec!["--rootfs", "/no/such/rootfs"], "/no/such/rootfs"),
        (vec!["--rootfs", "/etc/passwd"], "/etc/passwd"),
        (vec!["-v", "/no/such/vol:/data"], "/no/such/vol"),
        (vec!["-v", "/tmp:relative"], "absolute"),
        (vec!["-v", "/tmp"], "HOST:GUEST"),
    ] {
        let out = Command::new(&vmm)
            .arg("run")
            .args(["--kernel", "/dev/null", "--initrd", "/dev/null"])
            .args(&args)
            .args(["--", "true"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
