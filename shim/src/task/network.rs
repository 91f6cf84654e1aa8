//! The task's network namespace on the host joined to the VM's card at Start, and the OCI
//! hooks run on the host (see [`crate::netns`]).

use super::*;

impl TaskService {
    /// At Start: joins the network namespace's interface (the CNI one, if any) to the VM's
    /// card and gives the guest its addressing (see [`netns`]). Without a namespace of its
    /// own, nothing to do.
    pub(super) fn wire_network(&self, id: &str, sandbox: &Sandbox) -> TtrpcResult<()> {
        let (path, bundle) = {
            let st = self.inner.lock();
            let c = st.container(id)?;
            match &c.net {
                Some(n) if n.wired.is_none() => (n.path.clone(), c.bundle.clone()),
                _ => return Ok(()),
            }
        };
        let iface = netns::wire(&path, netns::TAP)
            .map_err(|e| rpc_err(Code::INTERNAL, format!("container network: {e}")))?;
        if let Some(i) = &iface {
            // For `shim delete` after a crash.
            let _ = std::fs::write(
                bundle.join(NET_FILE),
                format!("{}\n{}\n", path.display(), i.name),
            );
            tracing::info!(
                interface = i.name.as_str(),
                addresses = ?i.addresses,
                "container network joined to the VM"
            );
            let mut st = self.inner.lock();
            if let Some(n) = st.containers.get_mut(id).and_then(|c| c.net.as_mut()) {
                n.wired = Some(i.name.clone());
            }
        }
        let find = sandbox
            .net_card_mac()
            .map(|(now, _)| now)
            .unwrap_or_default();
        sandbox
            .client()
            .configure_network(&netns::guest_config(iface.as_ref(), &find))
            .map_err(agent_err("configuring the container network"))
    }

    /// Runs the spec's `kind` hooks with the task in `status`; a failure is logged.
    pub(super) fn run_hooks_warn(&self, id: &str, kind: &str, status: &str) {
        let (spec, pid, bundle) = {
            let st = self.inner.lock();
            let Some(c) = st.containers.get(id) else {
                return;
            };
            (c.spec.clone(), c.pid, c.bundle.clone())
        };
        let Some(h) = spec.hooks() else {
            return;
        };
        let hooks = match kind {
            "poststart" => h.poststart().clone().unwrap_or_default(),
            _ => h.poststop().clone().unwrap_or_default(),
        };
        let state = netns::hook_state(&spec, id, status, pid, &bundle);
        if let Err(e) = netns::run_hooks(kind, &hooks, &state) {
            tracing::warn!("{e}");
        }
    }
}
