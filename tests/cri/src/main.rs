//! `skiff-cri`: drives containerd's CRI (v1) the way kubelet does, for the pod tests and the
//! pod benchmark: one pod with two containers sharing its network.
//!
//! `skiff-cri --socket SOCK --handler H --image IMG --out DIR` runs:
//! RunPodSandbox (runtime handler H) → CreateContainer + StartContainer `web` (busybox httpd on
//! :80) → CreateContainer + StartContainer `client` (fetches `http://127.0.0.1:80/` over the
//! pod's shared network, up to 10 s) → ContainerStatus until `client` exited → ExecSync in
//! `web` → a container whose entrypoint is missing (its error) → the containers' CRI log files
//! → StopPodSandbox → RemovePodSandbox → what is left.
//! Every call has a deadline. It prints one JSON object (also `DIR/result.json`) with what it
//! saw and the times (ms): `pod_ready_ms` (RunPodSandbox), `first_running_ms` (RunPodSandbox
//! start → `web` started). The caller decides what is right (a test, or runc as the anchor).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use serde_json::json;
use tonic::transport::{Channel, Endpoint, Uri};

/// The `web` container's memory limit (64 MiB).
const WEB_MEMORY_LIMIT: i64 = 64 << 20;

/// Deadline of one CRI call (RunPodSandbox boots a VM in a nested, emulated host).
const CALL: Duration = Duration::from_secs(180);

fn usage() -> &'static str {
    "usage: skiff-cri --socket CONTAINERD_SOCK --handler RUNTIME_HANDLER --image IMAGE --out DIR [--name POD]\n\
     Drives containerd's CRI as kubelet would: one pod (RunPodSandbox with the handler), an httpd\n\
     container and a client fetching from it over localhost, ExecSync, logs, Stop/RemovePodSandbox.\n\
     Prints a JSON summary (and writes DIR/result.json). The image must already be in containerd's\n\
     k8s.io namespace (ctr -n k8s.io images import)."
}

async fn connect(socket: PathBuf) -> Result<Channel> {
    let ch = Endpoint::try_from("http://[::]:50051")?
        .connect_timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .context("connecting to containerd's CRI socket")?;
    Ok(ch)
}

/// A request with the call deadline.
fn req<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.set_timeout(CALL);
    r
}

fn container_config(name: &str, image: &str, script: &str, log_path: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: vec!["sh".into(), "-c".into(), script.into()],
        log_path: log_path.into(),
        linux: Some(cri::LinuxContainerConfig::default()),
        ..Default::default()
    }
}

struct Args {
    socket: PathBuf,
    handler: String,
    image: String,
    out: PathBuf,
    name: String,
}

fn parse() -> Result<Option<Args>> {
    let (mut socket, mut handler, mut image, mut out) = (None, None, None, None);
    let mut name = "skiff-pod".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--socket" => socket = Some(PathBuf::from(val()?)),
            "--handler" => handler = Some(val()?),
            "--image" => image = Some(val()?),
            "--out" => out = Some(PathBuf::from(val()?)),
            "--name" => name = val()?,
            "-h" | "--help" => {
                println!("{}", usage());
                return Ok(None);
            }
            other => bail!("unknown argument {other:?}\n{}", usage()),
        }
    }
    Ok(Some(Args {
        socket: socket.context(usage())?,
        handler: handler.context(usage())?,
        image: image.context(usage())?,
        out: out.context(usage())?,
        name,
    }))
}

/// Processes whose name starts with `containerd-shim` (comm is cut at 15 bytes).
fn shim_processes() -> usize {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("comm"))
                        .is_ok_and(|c| c.starts_with("containerd-shim"))
                })
                .count()
        })
        .unwrap_or(0)
}

fn read_log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

async fn run(a: Args) -> Result<serde_json::Value> {
    std::fs::create_dir_all(&a.out)?;
    let logs = a.out.join("logs");
    std::fs::create_dir_all(&logs)?;
    let ch = connect(a.socket.clone()).await?;
    let mut rt = RuntimeServiceClient::new(ch);
    let version = rt
        .version(req(cri::VersionRequest {
            version: "v1".into(),
        }))
        .await
        .context("Version")?
        .into_inner();
    let pod_config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: a.name.clone(),
            uid: format!("{}-uid", a.name),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: a.name.clone(),
        log_directory: logs.display().to_string(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Pod as i32,
                    pid: cri::NamespaceMode::Container as i32,
                    ipc: cri::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let t0 = Instant::now();
    let pod = rt
        .run_pod_sandbox(req(cri::RunPodSandboxRequest {
            config: Some(pod_config.clone()),
            runtime_handler: a.handler.clone(),
        }))
        .await
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id;
    let pod_ready_ms = t0.elapsed().as_secs_f64() * 1e3;
    eprintln!("skiff-cri: pod {pod} ready in {pod_ready_ms:.0} ms");
    let mut result = json!({
        "runtime": format!("{} {}", version.runtime_name, version.runtime_version),
        "handler": a.handler,
        "pod": pod,
        "pod_ready_ms": pod_ready_ms,
    });
    // From here on the pod is removed whatever happens.
    let flow = pod_flow(&mut rt, &a, &pod, &pod_config, t0, &logs, &mut result).await;
    if let Err(e) = &flow {
        result["error"] = json!(format!("{e:#}"));
    }
    let stop = rt
        .stop_pod_sandbox(req(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        }))
        .await;
    result["stop"] = json!(stop
        .as_ref()
        .map(|_| "ok".to_string())
        .unwrap_or_else(|e| e.to_string()));
    let remove = rt
        .remove_pod_sandbox(req(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        }))
        .await;
    result["remove"] = json!(remove
        .as_ref()
        .map(|_| "ok".to_string())
        .unwrap_or_else(|e| e.to_string()));
    let pods_left = rt
        .list_pod_sandbox(req(cri::ListPodSandboxRequest::default()))
        .await
        .map(|r| r.into_inner().items.len())
        .context("ListPodSandbox")?;
    let containers_left = rt
        .list_containers(req(cri::ListContainersRequest::default()))
        .await
        .map(|r| r.into_inner().containers.len())
        .context("ListContainers")?;
    result["pods_left"] = json!(pods_left);
    result["containers_left"] = json!(containers_left);
    Ok(result)
}

async fn pod_flow(
    rt: &mut RuntimeServiceClient<Channel>,
    a: &Args,
    pod: &str,
    pod_config: &cri::PodSandboxConfig,
    t0: Instant,
    logs: &Path,
    result: &mut serde_json::Value,
) -> Result<()> {
    let mut ids = Vec::new();
    for (name, script) in [
        (
            "web",
            "mkdir -p /www; echo hello-from-the-pod > /www/index.html; echo web-up; exec httpd -f -p 80 -h /www",
        ),
        (
            "client",
            "for i in $(seq 50); do r=$(printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 2 127.0.0.1 80 | tail -n 1); \
             [ -n \"$r\" ] && { echo \"got: $r\"; exit 0; }; sleep 0.2; done; echo 'no answer on localhost:80' >&2; exit 3",
        ),
    ] {
        let mut config = container_config(name, &a.image, script, &format!("{name}.log"));
        if name == "web" {
            // Its own limit, applied to its own cgroup (read back through ExecSync).
            config.linux = Some(cri::LinuxContainerConfig {
                resources: Some(cri::LinuxContainerResources {
                    memory_limit_in_bytes: WEB_MEMORY_LIMIT,
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        let id = rt
            .create_container(req(cri::CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(config),
                sandbox_config: Some(pod_config.clone()),
            }))
            .await
            .with_context(|| format!("CreateContainer {name}"))?
            .into_inner()
            .container_id;
        rt.start_container(req(cri::StartContainerRequest {
            container_id: id.clone(),
        }))
        .await
        .with_context(|| format!("StartContainer {name}"))?;
        if name == "web" {
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            result["first_running_ms"] = json!(ms);
            eprintln!("skiff-cri: first container running {ms:.0} ms after RunPodSandbox");
        }
        ids.push(id);
    }
    // One shim process serves the pod (runc's v2 shim and Skiff's group a pod's containers).
    result["shims_running"] = json!(shim_processes());
    let deadline = Instant::now() + Duration::from_secs(120);
    let client_status = loop {
        let s = rt
            .container_status(req(cri::ContainerStatusRequest {
                container_id: ids[1].clone(),
                verbose: false,
            }))
            .await
            .context("ContainerStatus client")?
            .into_inner()
            .status
            .context("ContainerStatus client: no status")?;
        if s.state == cri::ContainerState::ContainerExited as i32 {
            break s;
        }
        if Instant::now() > deadline {
            bail!("the client container did not exit within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    result["client_exit"] = json!(client_status.exit_code);
    // A third container whose entrypoint is missing: a clear error at Create or Start, and the
    // pod's first container keeps running.
    let mut broken = container_config("broken", &a.image, "", "broken.log");
    broken.command = vec!["/no/such/entrypoint".into()];
    let created = rt
        .create_container(req(cri::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(broken),
            sandbox_config: Some(pod_config.clone()),
        }))
        .await;
    let broken_error = match created {
        Err(e) => e.message().to_string(),
        Ok(r) => {
            let id = r.into_inner().container_id;
            let started = rt
                .start_container(req(cri::StartContainerRequest {
                    container_id: id.clone(),
                }))
                .await;
            let _ = rt
                .remove_container(req(cri::RemoveContainerRequest {
                    container_id: id.clone(),
                }))
                .await;
            started
                .err()
                .map(|e| e.message().to_string())
                .unwrap_or_default()
        }
    };
    eprintln!("skiff-cri: missing entrypoint: {broken_error}");
    result["broken_error"] = json!(broken_error);
    let web = rt
        .container_status(req(cri::ContainerStatusRequest {
            container_id: ids[0].clone(),
            verbose: false,
        }))
        .await
        .context("ContainerStatus web")?
        .into_inner()
        .status
        .context("ContainerStatus web: no status")?;
    result["web_state"] = json!(cri::ContainerState::try_from(web.state)
        .map(|s| s.as_str_name().to_string())
        .unwrap_or_default());
    let exec = rt
        .exec_sync(req(cri::ExecSyncRequest {
            container_id: ids[0].clone(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                "cat /www/index.html; hostname; cat /sys/fs/cgroup/memory.max; exit 5".into(),
            ],
            timeout: 60,
        }))
        .await
        .context("ExecSync")?
        .into_inner();
    result["exec_stdout"] = json!(String::from_utf8_lossy(&exec.stdout));
    result["exec_exit"] = json!(exec.exit_code);
    // CRI writes the logs ("<RFC3339Nano> stdout|stderr F|P <line>") as the output arrives.
    tokio::time::sleep(Duration::from_millis(500)).await;
    result["web_log"] = json!(read_log(logs, "web.log"));
    result["client_log"] = json!(read_log(logs, "client.log"));
    for id in &ids {
        let _ = rt
            .stop_container(req(cri::StopContainerRequest {
                container_id: id.clone(),
                timeout: 10,
            }))
            .await;
        let _ = rt
            .remove_container(req(cri::RemoveContainerRequest {
                container_id: id.clone(),
            }))
            .await;
    }
    Ok(())
}

fn main() -> Result<()> {
    let Some(a) = parse()? else {
        return Ok(());
    };
    let out = a.out.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(run(a))?;
    let text = serde_json::to_string_pretty(&result)?;
    std::fs::write(out.join("result.json"), &text)?;
    println!("{text}");
    Ok(())
}
