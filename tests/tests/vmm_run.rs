//! `vmm run` end to end: a real Linux guest (through `tools/kvm-vm` on a PVM host), the agent
//! as PID 1 dialing back over virtio-vsock, a container from the initramfs's busybox rootfs.
//! The cases run in one nested VM (one L1 boot, host-side timeout, retried if L1 wedges); each
//! `vmm run` has its own guest, restored from a template (warm start, the default) made by the
//! first of them.
#![allow(clippy::unwrap_used)]

use skiff_tests::{
    kvm_kind, repo_root, resumable_cases, run_script_on_real_kvm, skiff_kernel_and_initrd,
    vmm_binary, KvmKind,
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
    // All cases one after the other in one nested VM (one L1 boot, host-side timeout, retried
    // if L1 wedges), with warm start on (the default): the first `vmm run` makes the template
    // (in L1's own /tmp, see run_script_on_real_kvm), the others restore it.
    // A retry after a wedged L1 runs only the cases that had not finished (and the last one
    // that had).
    for (name, _) in &scripts {
        std::fs::create_dir_all(out.join(name)).unwrap();
    }
    let subshells: Vec<(&str, String)> = scripts
        .iter()
        .map(|(n, b)| (*n, format!("( {b} )")))
        .collect();
    let all = format!("set -u\n{}", resumable_cases(&out, &subshells, 1));
    let path = out.join("cases.sh");
    std::fs::write(&path, all).unwrap();
    run_script_on_real_kvm("vmm-run-cases", &path, &out, 900);

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

/// Warm start (issue 14): the first run makes a template, later ones restore it and are each
/// their own machine (fresh entropy, the clock), other inputs make other templates, a damaged
/// template gives one warning and a cold boot, and two makers at once leave one template.
#[test]
fn warm_start_templates() {
    assert_ne!(kvm_kind(), KvmKind::Missing, "needs /dev/kvm");
    let (k, i) = skiff_kernel_and_initrd();
    let vmm = vmm_binary();
    let out = repo_root()
        .join("target")
        .join(format!("warm-start-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let script = format!(
        r#"set -u
T=/tmp/skiff-templates; export SKIFF_TEMPLATES=$T
V={vmm}; K={k}; I={i}; O={o}
run() {{ n=$1; shift; "$V" run --timings --kernel "${{KK:-$K}}" --initrd "$I" "$@" > $O/$n.out 2> $O/$n.err < /dev/null; echo $? > $O/$n.rc; }}
count() {{ ls "$T" | wc -l > $O/$1.count; }}
probe='head -c 16 /dev/urandom | od -An -tx1 | tr -d " \n"; echo; date +%s'
run make -- true; count make
for r in r1 r2; do date +%s > $O/$r.before; run $r -- sh -c "$probe"; date +%s > $O/$r.after; done
count restored
run mem --memory 320 -- true; count mem
cp "$K" /tmp/kernel-copy; KK=/tmp/kernel-copy run kernel -- true; count kernel
"$V" template create --kernel "$K" --initrd "$I" > $O/create.out 2> $O/create.err; echo $? > $O/create.rc
d=$(cat $O/create.out)
truncate -s 8192 "$d/memory"; run truncated -- echo ok
run remade -- echo ok2; count remade
python3 -c 'import sys; p=sys.argv[1]; b=bytearray(open(p,"rb").read()); b[len(b)//2]^=0x10; open(p,"wb").write(bytes(b))' "$d/state"
run flipped -- echo ok3
"$V" template rm > $O/rm.out; count rm
run c1 -- echo one & run c2 -- echo two & wait
count concurrent
"$V" template ls > $O/ls.out 2>&1
"#,
        vmm = vmm.display(),
        k = k.display(),
        i = i.display(),
        o = out.display(),
    );
    let path = out.join("warm.sh");
    std::fs::write(&path, script).unwrap();
    run_script_on_real_kvm("warm-start", &path, &out, 900);

    let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap_or_default();
    let rc = |n: &str| read(&format!("{n}.rc")).trim().parse::<i32>().unwrap_or(-1);
    let count = |n: &str| {
        read(&format!("{n}.count"))
            .trim()
            .parse::<i32>()
            .unwrap_or(-1)
    };
    let show = |n: &str| {
        format!(
            "{n}: rc={} out={:?} err={:?}",
            rc(n),
            read(&format!("{n}.out")),
            read(&format!("{n}.err"))
                .chars()
                .take(1500)
                .collect::<String>()
        )
    };
    let mut failures = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            failures.push(what);
        }
    };
    check(
        rc("make") == 0 && read("make.err").contains("template made") && count("make") == 1,
        format!(
            "the first run makes a template: {} count={}",
            show("make"),
            count("make")
        ),
    );
    let mut randoms = Vec::new();
    for r in ["r1", "r2"] {
        let o = read(&format!("{r}.out"));
        let mut l = o.lines();
        let rnd = l.next().unwrap_or("").to_string();
        let guest: i64 = l.next().unwrap_or("").trim().parse().unwrap_or(-1);
        let before: i64 = read(&format!("{r}.before")).trim().parse().unwrap_or(0);
        let after: i64 = read(&format!("{r}.after")).trim().parse().unwrap_or(0);
        check(
            rc(r) == 0
                && read(&format!("{r}.err")).contains("snapshot restored")
                && !read(&format!("{r}.err")).contains("template made"),
            format!("restored, not booted: {}", show(r)),
        );
        // Restored whole: no warning (one was "KVM refused an optional paravirtual MSR",
        // when vCPU state went in before guest memory was registered).
        check(
            !read(&format!("{r}.err")).contains("WARN"),
            format!("a restore without warnings: {}", show(r)),
        );
        check(
            rnd.len() == 32 && rnd.bytes().all(|b| b.is_ascii_hexdigit()),
            format!("16 random bytes: {}", show(r)),
        );
        // Within 2 s of the host's clock (the host's is read just before and after the run).
        check(
            guest >= before - 2 && guest <= after + 2,
            format!(
                "guest clock {guest} outside [{before}-2, {after}+2]: {}",
                show(r)
            ),
        );
        randoms.push(rnd);
    }
    check(
        randoms[0] != randoms[1],
        format!("two clones read the same /dev/urandom bytes: {randoms:?}"),
    );
    check(
        count("restored") == 1,
        format!("restores made no template: count={}", count("restored")),
    );
    check(
        rc("mem") == 0 && read("mem.err").contains("template made") && count("mem") == 2,
        format!(
            "another memory size makes another template: {} count={}",
            show("mem"),
            count("mem")
        ),
    );
    check(
        rc("kernel") == 0 && read("kernel.err").contains("template made") && count("kernel") == 3,
        format!(
            "another kernel makes another template: {} count={}",
            show("kernel"),
            count("kernel")
        ),
    );
    check(
        rc("create") == 0
            && read("create.out")
                .trim()
                .starts_with("/tmp/skiff-templates/"),
        format!(
            "vmm template create: rc={} out={:?} err={:?}",
            rc("create"),
            read("create.out"),
            read("create.err")
        ),
    );
    for (n, text) in [("truncated", "ok\n"), ("flipped", "ok3\n")] {
        let err = read(&format!("{n}.err"));
        let warnings = err
            .lines()
            .filter(|l| l.contains("warning: no usable VM template"))
            .count();
        check(
            rc(n) == 0
                && read(&format!("{n}.out")) == text
                && warnings == 1
                && !err.contains("snapshot restored"),
            format!(
                "a damaged template: one warning and a cold boot: {}",
                show(n)
            ),
        );
    }
    check(
        rc("remade") == 0 && read("remade.err").contains("template made") && count("remade") == 3,
        format!(
            "the damaged template is replaced: {} count={}",
            show("remade"),
            count("remade")
        ),
    );
    check(
        count("rm") == 0,
        format!("template rm: {:?} count={}", read("rm.out"), count("rm")),
    );
    check(
        rc("c1") == 0 && rc("c2") == 0 && read("c1.out") == "one\n" && read("c2.out") == "two\n",
        format!(
            "two makers at once both succeed: {} / {}",
            show("c1"),
            show("c2")
        ),
    );
    let ls = read("ls.out");
    check(
        count("concurrent") == 1 && ls.lines().count() == 1 && !ls.contains("unusable"),
        format!(
            "two makers leave one valid template: count={} ls={ls:?}",
            count("concurrent")
        ),
    );
    if failures.is_empty() {
        eprintln!(
            "first run (template made):\n{}\nrestored run:\n{}",
            read("make.err"),
            read("r1.err")
        );
        let _ = std::fs::remove_dir_all(&out);
    }
    assert!(failures.is_empty(), "failed:\n{}", failures.join("\n"));
}
