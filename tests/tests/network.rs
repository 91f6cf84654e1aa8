//! Container networking end to end (`vmm run --net`, `-p`, `--dns`, `--hostname`): passt
//! started by the VMM, a tap in a namespace the test makes, and the bad-input cases. Runs
//! `tests/scripts/network.sh` in one nested VM (`tools/kvm-vm` on a PVM host); traffic goes only
//! to 127.0.0.1 and to addresses inside the namespaces the script creates.
#![allow(clippy::unwrap_used)]

use skiff_tests::{
    kvm_kind, repo_root, run_script_on_real_kvm, skiff_kernel_and_initrd, vmm_binary, KvmKind,
};

#[test]
fn containers_get_a_network() {
    assert_ne!(kvm_kind(), KvmKind::Missing, "needs /dev/kvm");
    for tool in ["passt", "ip", "python3"] {
        let found = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(found, "{tool} is missing: tools/setup installs it");
    }
    let (k, i) = skiff_kernel_and_initrd();
    let out = repo_root()
        .join("target")
        .join(format!("network-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let script = out.join("run.sh");
    std::fs::write(
        &script,
        format!(
            "export SKIFF_VMM={} SKIFF_KERNEL={} SKIFF_INITRD={}\nexec bash {} {}\n",
            vmm_binary().display(),
            k.display(),
            i.display(),
            repo_root().join("tests/scripts/network.sh").display(),
            out.display()
        ),
    )
    .unwrap();
    let rc = run_script_on_real_kvm("network", &script, &out, 1500);
    let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap_or_default();
    let rc_of = |n: &str| -> i32 { read(&format!("{n}.rc")).trim().parse().unwrap_or(-1) };
    let outp = |n: &str| read(&format!("{n}.out"));
    let mut failures = Vec::new();
    let mut check = |ok: bool, n: &str| {
        if !ok {
            failures.push(format!(
                "case {n}: rc={} out={:?}",
                rc_of(n),
                outp(n).chars().take(600).collect::<String>()
            ));
        }
    };
    check(rc == 0, "script");
    let served = read("file.txt");
    // Restored (tcp) and booted (tcp_cold) alike; the restored card has the run's MAC address
    // (52:54:00 and the VMM's pid), not the template's.
    for n in ["tcp", "tcp_cold"] {
        let tcp = outp(n);
        let mac = tcp
            .lines()
            .find_map(|l| l.strip_prefix("mac "))
            .unwrap_or_default();
        check(
            rc_of(n) == 0
                && !served.is_empty()
                && tcp.starts_with(&served)
                && tcp.contains("\nbox\nbox\n")
                && tcp.contains("inet 10.0.2.15/24")
                && tcp.contains("default via 10.0.2.2")
                && mac.starts_with("52:54:00:")
                && mac.len() == 17
                && mac != "52:54:00:00:00:01"
                && tcp.contains("snapshot restored") == (n == "tcp")
                && tcp.contains("kernel loaded") == (n == "tcp_cold"),
            n,
        );
    }
    for p in 1..=2 {
        let n = format!("publish{p}");
        check(
            rc_of(&n) == 0 && outp(&n) == format!("from-container-{p}\n"),
            &n,
        );
    }
    check(rc_of("udp") == 0 && outp("udp") == "echo:ping-udp\n", "udp");
    let dns = outp("dns");
    check(
        rc_of("dns") == 0 && dns.contains("nameserver 10.0.2.2") && dns.contains("198.51.100.7"),
        "dns",
    );
    let big = read("big.sha").trim().to_string();
    check(
        rc_of("big_in") == 0 && big.len() == 64 && outp("big_in").starts_with(&big),
        "big_in",
    );
    // Container -> host: the sink's sha256 and byte count equal the file's.
    let want = format!("{big} 268435456");
    check(
        rc_of("big_out") == 0 && big.len() == 64 && read("big_out.sha").trim() == want,
        "big_out",
    );
    check(
        rc_of("tapbig_out") == 0 && big.len() == 64 && read("tapbig_out.sha").trim() == want,
        "tapbig_out",
    );
    let tap = outp("tap");
    check(
        rc_of("tap") == 0
            && tap.starts_with(&served)
            && tap.contains("snapshot restored")
            && tap.contains("mac 52:54:00:")
            && !tap.contains("mac 52:54:00:00:00:01"),
        "tap",
    );
    check(
        rc_of("tapbig") == 0 && big.len() == 64 && outp("tapbig").starts_with(&big),
        "tapbig",
    );
    // Bad input: status 125 and one line naming the problem.
    for (n, needle) in [
        ("bad_port", "-p \"80:x\""),
        ("port_taken", "18090"),
        ("no_passt", "passt is not installed"),
        ("no_tap", "sknosuch"),
        ("bad_net", "bogus"),
    ] {
        let o = outp(n);
        check(
            rc_of(n) == 125 && o.lines().count() == 1 && o.contains(needle),
            n,
        );
    }
    check(
        rc_of("none") == 0 && outp("none").split_whitespace().collect::<Vec<_>>() == ["lo"],
        "none",
    );
    check(read("passt.left").trim().is_empty(), "passt.left");
    check(read("tap.left").trim() == "0", "tap.left");
    assert!(
        failures.is_empty(),
        "network cases failed (artefacts in {}):\n{}",
        out.display(),
        failures.join("\n")
    );
}
