//! `vmm run` end to end: a real Linux guest (through `tools/kvm-vm` on a PVM host), the agent
//! as PID 1 dialing back over virtio-vsock, a container from the initramfs's busybox rootfs.
//! Each case runs in its own nested VM (one L1 boot, host-side timeout, one retry), and each
//! `vmm run` boots its own guest.
#![allow(clippy::unwrap_used)]

use skiff_tests::{
    kvm_kind, repo_root, run_script_on_real_kvm, skiff_kernel_and_initrd, vmm_binary, KvmKind,
};

struct Case {
    name: &'static str,
    args: &'static str,
    stdin: Option<&'static str>,
}

const CASES: &[Case] = &[
    Case {
        name: "echo",
        args: "-- echo hi",
        stdin: None,
    },
    Case {
        name: "exit0",
        args: "-- true",
        stdin: None,
    },
    Case {
        name: "exit1",
        args: "-- false",
        stdin: None,
    },
    Case {
        name: "exit42",
        args: "-- sh -c 'exit 42'",
        stdin: None,
    },
    // The container's init is PID 1 of its PID namespace: like runc, a `kill -9 $$` from
    // inside is ignored, so the SIGKILL goes to a child and the shell reports it (an init
    // killed by a signal is the `segv` case below).
    Case {
        name: "killed",
        args: "-- sh -c 'sleep 60 & p=$!; kill -9 $p; wait $p'",
        stdin: None,
    },
    // The init itself dying of a signal (SIGSEGV from unbounded recursion) → 128 + 11.
    Case {
        name: "segv",
        args: "-- sh -c 'f(){ f; }; f'",
        stdin: None,
    },
    Case {
        name: "streams",
        args: "-- sh -c 'echo out; echo err >&2'",
        stdin: None,
    },
    Case {
        name: "env",
        args: "-e FOO=bar -e X=1 -- sh -c 'echo $FOO$X'",
        stdin: None,
    },
    Case {
        name: "workdir",
        args: "-w /tmp -- pwd",
        stdin: None,
    },
    Case {
        name: "user",
        args: "-u 1000:1000 -- id",
        stdin: None,
    },
    Case {
        name: "stdin",
        args: "-i -- cat",
        stdin: Some("x\ny\n"),
    },
    Case {
        name: "burst",
        args: "-- sh -c 'head -c 10485760 /dev/zero | tr \"\\\\0\" a'",
        stdin: None,
    },
    Case {
        name: "notfound",
        args: "-- /no/such/binary",
        stdin: None,
    },
    Case {
        name: "timings",
        args: "--timings -- true",
        stdin: None,
    },
    // The guest ticks on the LAPIC's TSC-deadline timer (the vCPU's CPUID offers it), not on
    // the PIT (one in-kernel PIT worker wakeup per tick on the host).
    Case {
        name: "timer",
        args: "-- sh -c 'grep -m1 -o -w tsc_deadline_timer /proc/cpuinfo; cat /sys/devices/system/clockevents/clockevent0/current_device'",
        stdin: None,
    },
    // Run under script(1) so vmm has a terminal of a known size (30x100) to pass on.
    Case {
        name: "tty",
        args: "-t -- stty size",
        stdin: None,
    },
];

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[test]
fn vmm_run_cases() {
    assert_ne!(kvm_kind(), KvmKind::Missing, "needs /dev/kvm");
    let (k, i) = skiff_kernel_and_initrd();
    let vmm = vmm_binary();
    // Results come back through a directory the nested VM may write (outside /tmp).
    let out = repo_root()
        .join("target")
        .join(format!("vmm-run-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let mut scripts: Vec<(&str, String)> = Vec::new();
    for c in CASES {
        let stdin = match c.stdin {
            Some(s) => format!("printf %s {} |", shell_quote(s)),
            None => String::new(),
        };
        let dir = out.join(c.name);
        if c.name == "tty" {
            let inner = format!(
                "stty rows 30 cols 100; {} run --kernel {} --initrd {} {}",
                vmm.display(),
                k.display(),
                i.display(),
                c.args
            );
            scripts.push((
                c.name,
                format!(
                    "script -qec {q} /dev/null > {d}/stdout 2> {d}/stderr < /dev/null; echo $? > {d}/rc\n",
                    d = dir.display(),
                    q = shell_quote(&inner),
                ),
            ));
            continue;
        }
        scripts.push((
            c.name,
            format!(
                "{stdin} {vmm} run --console {d}/console --kernel {k} --initrd {i} {args} > {d}/stdout 2> {d}/stderr {redir}; echo $? > {d}/rc\n",
                d = dir.display(),
                vmm = vmm.display(),
                k = k.display(),
                i = i.display(),
                args = c.args,
                redir = if c.stdin.is_some() { "" } else { "< /dev/null" },
            ),
        ));
    }
    // A guest that never becomes ready: SIGTERM before the container started ends `vmm run`
    // at once with 128 + 15 (no wait for the agent timeout).
    scripts.push((
        "sigterm-before-start",
        format!(
            "t0=$(date +%s); {vmm} run --kernel {k} --initrd {i} --kernel-arg skiff.agent=hang -- true > {d}/stdout 2> {d}/stderr < /dev/null & p=$!; sleep 8; kill -TERM $p; wait $p; echo $? > {d}/rc; echo $(( $(date +%s) - t0 )) > {d}/secs\n",
            d = out.join("sigterm-before-start").display(),
            vmm = vmm.display(),
            k = k.display(),
            i = i.display(),
        ),
    ));
    // Each case in its own nested VM with a host-side timeout (see run_script_on_real_kvm).
    for (name, body) in &scripts {
        let dir = out.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("case.sh");
        std::fs::write(&path, format!("set -u\n{body}")).unwrap();
        run_script_on_real_kvm(name, &path, &dir, 150);
    }

    let read = |name: &str, f: &str| -> String {
        std::fs::read_to_string(out.join(name).join(f)).unwrap_or_default()
    };
    let rc = |name: &str| -> i32 { read(name, "rc").trim().parse().unwrap_or(-1) };
    let show = |name: &str| {
        format!(
            "case {name}: rc={} stdout={:?} stderr={:?}",
            rc(name),
            read(name, "stdout").chars().take(300).collect::<String>(),
            read(name, "stderr").chars().take(600).collect::<String>()
        )
    };
    let mut failures = Vec::new();
    let mut check = |ok: bool, name: &str| {
        if !ok {
            failures.push(show(name));
        }
    };
    check(rc("echo") == 0 && read("echo", "stdout") == "hi\n", "echo");
    check(rc("exit0") == 0, "exit0");
    check(rc("exit1") == 1, "exit1");
    check(rc("exit42") == 42, "exit42");
    check(rc("killed") == 137, "killed");
    check(
        rc("streams") == 0
            && read("streams", "stdout") == "out\n"
            && read("streams", "stderr") == "err\n",
        "streams",
    );
    check(rc("env") == 0 && read("env", "stdout") == "bar1\n", "env");
    check(
        rc("workdir") == 0 && read("workdir", "stdout") == "/tmp\n",
        "workdir",
    );
    check(
        rc("user") == 0 && read("user", "stdout").starts_with("uid=1000"),
        "user",
    );
    check(
        rc("stdin") == 0 && read("stdin", "stdout") == "x\ny\n",
        "stdin",
    );
    let burst = read("burst", "stdout");
    check(
        rc("burst") == 0 && burst.len() == 10 << 20 && burst.bytes().all(|b| b == b'a'),
        "burst",
    );
    check(
        rc("notfound") == 127 && !read("notfound", "stderr").is_empty(),
        "notfound",
    );
    check(
        rc("timings") == 0
            && read("timings", "stderr").contains("agent ready")
            && read("timings", "stderr").contains("container started"),
        "timings",
    );
    check(rc("segv") == 139, "segv");
    check(
        rc("timer") == 0 && read("timer", "stdout") == "tsc_deadline_timer\nlapic-deadline\n",
        "timer",
    );
    let secs: u64 = read("sigterm-before-start", "secs")
        .trim()
        .parse()
        .unwrap_or(999);
    check(
        rc("sigterm-before-start") == 143
            && secs < 60
            && read("sigterm-before-start", "stderr").contains("before the container started"),
        "sigterm-before-start",
    );
    check(
        rc("tty") == 0 && read("tty", "stdout").contains("30 100"),
        "tty",
    );
    if failures.is_empty() {
        eprintln!("{}", read("timings", "stderr"));
        let _ = std::fs::remove_dir_all(&out);
    }
    assert!(
        failures.is_empty(),
        "failed cases:\n{}",
        failures.join("\n")
    );
}
