//! Kubernetes pods through containerd's CRI, one VM per pod: `skiff-cri` (tests/cri, a CRI v1
//! client) drives containerd 1.6's CRI plugin as kubelet would, with Debian's bridge CNI, in
//! the nested VM (`tools/kvm-vm`), for runc (the behaviour to match) and for Skiff in one
//! containerd: RunPodSandbox → an httpd container and a client fetching from it on the pod's
//! localhost → a container whose entrypoint is missing → ExecSync → CRI logs →
//! StopPodSandbox → RemovePodSandbox, then what is left on the host.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use skiff_tests::*;

fn json(dir: &Path, name: &str) -> serde_json::Value {
    let p = dir.join(format!("result-{name}.out"));
    let text = std::fs::read_to_string(&p).unwrap_or_default();
    serde_json::from_str(&text).unwrap_or_else(|e| {
        let err =
            std::fs::read_to_string(dir.join(format!("result-{name}.err"))).unwrap_or_default();
        panic!(
            "{}: not skiff-cri's JSON ({e}): {text:?}\nstderr: {err}",
            p.display()
        )
    })
}

/// The parts of `left-NAME.out` (`== part` headers) that are not empty.
fn leftovers(dir: &Path, name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join(format!("left-{name}.out")))
        .unwrap_or_else(|_| "== (no leftover report)\n?".into());
    let mut bad = Vec::new();
    let mut part = String::new();
    for line in text.lines() {
        if let Some(p) = line.strip_prefix("== ") {
            part = p.to_string();
        } else if !line.trim().is_empty() {
            bad.push(format!("{part}: {line}"));
        }
    }
    bad
}

#[test]
fn cri_pod_one_vm_per_pod() {
    assert_ne!(kvm_kind(), KvmKind::Missing, "needs /dev/kvm");
    let root = repo_root();
    let cri = root.join("target/release/skiff-cri");
    assert!(
        cri.exists(),
        "{} is missing: cargo build --release --manifest-path tests/cri/Cargo.toml --target-dir target (tools/test does)",
        cri.display()
    );
    assert!(
        root.join("target/release/containerd-shim-skiff-v2")
            .exists(),
        "build the shim first: cargo build --release -p skiff-shim"
    );
    let (k, i) = skiff_kernel_and_initrd();
    let out = root
        .join("target")
        .join(format!("cri-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let script = out.join("cri.sh");
    std::fs::write(
        &script,
        format!(
            "exec bash {}/tests/cri/pod-in-l1.sh 'runc skiff' {} {} {}\n",
            root.display(),
            out.display(),
            k.display(),
            i.display()
        ),
    )
    .unwrap();
    let rc = run_script_on_real_kvm_mem("cri", &script, &out, 1500, None);
    assert_eq!(
        rc,
        0,
        "the nested run failed (rc {rc}); see {}",
        out.display()
    );
    let mut report = Vec::new();
    for h in ["runc", "skiff"] {
        let r = json(&out, h);
        eprintln!("{h}: {r}");
        let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
        let n = |k: &str| r[k].as_i64().unwrap_or(-1);
        let mut bad = Vec::new();
        if !r["error"].is_null() {
            bad.push(format!("the flow failed: {}", r["error"]));
        }
        if n("client_exit") != 0 || !s("client_log").contains("got: hello-from-the-pod") {
            bad.push(format!(
                "the client did not fetch from the pod's localhost:80 (exit {}, log {:?})",
                n("client_exit"),
                s("client_log")
            ));
        }
        // CRI's log format: "<RFC3339Nano> stdout F <line>".
        if !s("web_log")
            .lines()
            .any(|l| l.ends_with(" stdout F web-up") && l.starts_with("20"))
        {
            bad.push(format!("web's CRI log lacks its line: {:?}", s("web_log")));
        }
        if s("web_state") != "CONTAINER_RUNNING" {
            bad.push(format!(
                "web is {} after its sibling failed (want CONTAINER_RUNNING)",
                s("web_state")
            ));
        }
        if !s("broken_error").contains("/no/such/entrypoint") {
            bad.push(format!(
                "a missing entrypoint gave no clear error: {:?}",
                s("broken_error")
            ));
        }
        if n("exec_exit") != 5
            || !s("exec_stdout").contains("hello-from-the-pod")
            || !s("exec_stdout").contains(&format!("pod-{h}"))
            || !s("exec_stdout").contains(&(64u64 << 20).to_string())
        {
            bad.push(format!(
                "ExecSync: exit {} stdout {:?} (want 5, the page, the pod's host name and web's own 64 MiB memory.max)",
                n("exec_exit"),
                s("exec_stdout")
            ));
        }
        if n("shims_running") != 1 {
            bad.push(format!(
                "{} shim processes for one pod (want 1)",
                n("shims_running")
            ));
        }
        if s("stop") != "ok" || s("remove") != "ok" {
            bad.push(format!(
                "Stop/RemovePodSandbox: {} / {}",
                s("stop"),
                s("remove")
            ));
        }
        if n("pods_left") != 0 || n("containers_left") != 0 {
            bad.push(format!(
                "{} pods and {} containers left",
                n("pods_left"),
                n("containers_left")
            ));
        }
        bad.extend(leftovers(&out, h).into_iter().map(|l| format!("left: {l}")));
        report.push(format!(
            "{h}: pod ready {:.0} ms, first container running {:.0} ms",
            r["pod_ready_ms"].as_f64().unwrap_or(-1.0),
            r["first_running_ms"].as_f64().unwrap_or(-1.0)
        ));
        assert!(
            bad.is_empty(),
            "{h}:\n  {}\n(see {}, containerd.log there)",
            bad.join("\n  "),
            out.display()
        );
    }
    eprintln!("{}", report.join("\n"));
}
