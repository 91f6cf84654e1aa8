//! containerd end to end: Debian's containerd 1.6 and `ctr` run containers with runtime
//! `io.containerd.skiff.v2` (the shim from this repository, which boots one Skiff VM per
//! container). containerd, ctr and the shim all run inside one nested VM (`tools/kvm-vm` on a
//! PVM host), with containerd's root, state and socket in a temp directory there. The image is
//! built locally (busybox-static, `tools/mkoci.py`) and imported: no registry.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use skiff_tests::{
    kvm_kind, repo_root, run_script_on_real_kvm, skiff_kernel_and_initrd, vmm_binary, KvmKind,
};

fn busybox_root(dir: &Path) {
    skiff_tests::busybox_root(
        dir,
        &["proc", "sys", "dev", "home/app"],
        "root:x:0:0:root:/root:/bin/sh\napp:x:1234:1234:app:/home/app:/bin/sh\n",
        "root:x:0:\napp:x:1234:\n",
    );
}

fn image(root: &Path, out: &Path, name: &str, extra: &[&str]) {
    let st = Command::new(repo_root().join("tools/mkoci.py"))
        .arg(root)
        .arg(out)
        .arg(name)
        .args(extra)
        .status()
        .unwrap();
    assert!(st.success(), "mkoci failed");
}

/// The lab prologue: containerd with its own config, root, state and socket under /tmp of
/// the nested VM, the shim on its PATH, both images imported.
fn prologue(out: &Path, shim_dir: &Path, kernel: &Path, initrd: &Path) -> String {
    format!(
        r#"set -u
OUT={out}
LAB=$(mktemp -d /tmp/lab.XXXXXX)
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup
cat > $LAB/config.toml <<EOC
version = 2
root = "$LAB/root"
state = "$LAB/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$LAB/containerd.sock"
[ttrpc]
  address = "$LAB/containerd.sock.ttrpc"
EOC
PATH={shim}:$PATH SKIFF_KERNEL={k} SKIFF_INITRD={i} SKIFF_MEMORY_MIB=256 containerd --config $LAB/config.toml > $OUT/$CASE.containerd.log 2>&1 &
CTRD=$!
for n in $(seq 300); do [ -S $LAB/containerd.sock ] && break; sleep 0.1; done
S=$LAB/containerd.sock
C="timeout 150 ctr -a $S"
R="--runtime io.containerd.skiff.v2"
IMG=docker.io/skiff/busybox:latest
$C images import $OUT/busybox.tar > $OUT/import.log 2>&1 && $C images import $OUT/busybox-user.tar >> $OUT/import.log 2>&1
echo $? > $OUT/import.rc
# res NAME CMD...: stdout+stderr to NAME.out, status to NAME.rc
# A case whose ctr hit its timeout makes the script exit 124: the harness treats it like a
# hung nested VM and retries the case once (loudly).
HUNG=0
res() {{ n=$1; shift; "$@" > $OUT/$n.out 2>&1; r=$?; echo $r > $OUT/$n.rc; echo "case $n: $r" >&2; [ $r = 124 ] && HUNG=1; }}
"#,
        out = out.display(),
        shim = shim_dir.display(),
        k = kernel.display(),
        i = initrd.display(),
    )
}

/// Leaks after a case: shims, shim sockets, mounts under the lab (into NAME.leaks).
fn epilogue(name: &str) -> String {
    format!(
        r#"
sleep 1
{{ pgrep -fa containerd-shim-skiff-v2; ls /run/containerd/s 2>/dev/null; grep $LAB /proc/mounts; }} > $OUT/{name}.leaks 2>&1
kill $CTRD; wait $CTRD
[ $HUNG = 1 ] && exit 124
exit 0
"#
    )
}

struct Lab {
    out: PathBuf,
    prologue: String,
}

impl Lab {
    fn new(name: &str) -> Lab {
        assert_ne!(kvm_kind(), KvmKind::Missing, "needs /dev/kvm");
        for tool in ["containerd", "ctr"] {
            let found = Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {tool}"))
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            assert!(
                found,
                "{tool} is missing: tools/setup installs Debian's containerd"
            );
        }
        let (k, i) = skiff_kernel_and_initrd();
        let out = repo_root()
            .join("target")
            .join(format!("containerd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(out.join("vol")).unwrap();
        let root = out.join("image-root");
        busybox_root(&root);
        image(
            &root,
            &out.join("busybox.tar"),
            "docker.io/skiff/busybox:latest",
            &[],
        );
        image(
            &root,
            &out.join("busybox-user.tar"),
            "docker.io/skiff/busybox-user:latest",
            &["--user", "1234:1234", "--workdir", "/home/app"],
        );
        let shim_dir = vmm_binary().parent().unwrap().to_path_buf();
        assert!(
            shim_dir.join("containerd-shim-skiff-v2").exists(),
            "build the shim first: cargo build --release -p skiff-shim"
        );
        let prologue = prologue(&out, &shim_dir, &k, &i);
        Lab { out, prologue }
    }

    /// Runs one case (`body` uses `res NAME CMD...`) in its own nested VM with a fresh
    /// containerd: a wedged nested VM then costs one case's timeout, not the suite's.
    fn run(&self, name: &str, body: &str) {
        let path = self.out.join(format!("{name}.sh"));
        std::fs::write(
            &path,
            format!("CASE={name}\n{}{body}{}", self.prologue, epilogue(name)),
        )
        .unwrap();
        run_script_on_real_kvm(name, &path, &self.out, 240);
    }

    fn leaks(&self, n: &str) -> String {
        std::fs::read_to_string(self.out.join(format!("{n}.leaks")))
            .unwrap_or_else(|_| "(no leak report)".into())
    }

    fn out(&self, n: &str) -> String {
        std::fs::read_to_string(self.out.join(format!("{n}.out"))).unwrap_or_default()
    }

    fn rc(&self, n: &str) -> i32 {
        std::fs::read_to_string(self.out.join(format!("{n}.rc")))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(-1)
    }

    /// The failure report: status, output, and the end of that case's containerd log (the
    /// shim logs there).
    fn show(&self, n: &str) -> String {
        let log = std::fs::read_to_string(self.out.join(format!("{n}.containerd.log")))
            .unwrap_or_default();
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(25)..].join("\n");
        format!(
            "case {n}: rc={} out={:?}\n--- end of {n}.containerd.log ---\n{tail}",
            self.rc(n),
            self.out(n).chars().take(400).collect::<String>()
        )
    }
}

#[test]
fn ctr_runs_containers_in_skiff_vms() {
    let lab = Lab::new("run");
    let vol = lab.out.join("vol");
    std::fs::write(vol.join("in.txt"), "from-host\n").unwrap();
    let v = vol.display();
    let cases: Vec<(&str, String)> = vec![
        ("echo", "res echo $C run --rm $R $IMG t-echo echo hi".into()),
        ("exit42", "res exit42 $C run --rm $R $IMG t-exit sh -c 'exit 42'".into()),
        ("env", "res env $C run --rm $R --env FOO=bar $IMG t-env sh -c 'echo $FOO'".into()),
        ("cwd", "res cwd $C run --rm $R --cwd /tmp $IMG t-cwd pwd".into()),
        ("user", "res user $C run --rm $R docker.io/skiff/busybox-user:latest t-user sh -c 'id -u; pwd'".into()),
        ("bindrw", format!("res bindrw $C run --rm $R --mount type=bind,src={v},dst=/data,options=rbind:rw $IMG t-rw sh -c 'cat /data/in.txt; echo written > /data/out.txt'")),
        ("bindro", format!("res bindro $C run --rm $R --mount type=bind,src={v},dst=/data,options=rbind:ro $IMG t-ro sh -c 'cat /data/in.txt; touch /data/x'")),
        ("burst", "res burst $C run --rm $R $IMG t-burst sh -c 'head -c 10485760 /dev/zero | tr \"\\0\" a'".into()),
        ("tty", "res tty script -qec \"stty rows 30 cols 100; $C run --rm -t $R $IMG t-tty stty size\" /dev/null".into()),
        ("notfound", "res notfound $C run --rm $R $IMG t-nf /no/such/binary".into()),
    ];
    for (name, body) in &cases {
        lab.run(name, &format!("{body}\n"));
    }
    let mut failures = Vec::new();
    let mut check = |ok: bool, n: &str| {
        if !ok {
            failures.push(lab.show(n));
        }
    };
    check(lab.rc("echo") == 0 && lab.out("echo") == "hi\n", "echo");
    check(lab.rc("exit42") == 42, "exit42");
    check(lab.rc("env") == 0 && lab.out("env") == "bar\n", "env");
    check(lab.rc("cwd") == 0 && lab.out("cwd") == "/tmp\n", "cwd");
    check(
        lab.rc("user") == 0 && lab.out("user") == "1234\n/home/app\n",
        "user",
    );
    check(
        lab.rc("bindrw") == 0
            && lab.out("bindrw").contains("from-host")
            && std::fs::read_to_string(vol.join("out.txt")).unwrap_or_default() == "written\n",
        "bindrw",
    );
    check(
        lab.rc("bindro") == 1
            && lab.out("bindro").contains("Read-only file system")
            && !vol.join("x").exists(),
        "bindro",
    );
    let burst = lab.out("burst");
    check(
        lab.rc("burst") == 0 && burst.len() == 10 << 20 && burst.bytes().all(|b| b == b'a'),
        "burst",
    );
    check(
        lab.rc("tty") == 0 && lab.out("tty").contains("30 100"),
        "tty",
    );
    check(
        lab.rc("notfound") != 0 && !lab.out("notfound").is_empty(),
        "notfound",
    );
    for (name, _) in &cases {
        let leaks = lab.leaks(name);
        if !leaks.trim().is_empty() {
            failures.push(format!("case {name} leaked: {leaks:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "failed cases:\n{}",
        failures.join("\n")
    );
}
