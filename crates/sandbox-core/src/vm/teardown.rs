//! Releasing everything one VM holds, exactly once, on every path.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, warn};

use super::VmId;
use crate::manager::Ports;
use crate::ports::{GuestConnection, LimitHandle, NetworkHandle, Overlay, VmProcess};

/// Releases everything one VM holds. Runs once: explicitly, or from `Drop` on a
/// cancellation or panic path.
pub(crate) struct Teardown {
    pub(crate) vm_id: VmId,
    pub(crate) ports: Ports,
    pub(crate) kill_grace: Duration,
    pub(crate) process: Option<Arc<dyn VmProcess>>,
    pub(crate) conn: Option<Arc<dyn GuestConnection>>,
    pub(crate) network: Option<NetworkHandle>,
    pub(crate) limits: Option<LimitHandle>,
    pub(crate) overlay: Option<Overlay>,
    pub(crate) work_dir: Option<PathBuf>,
    pub(crate) slot: Option<OwnedSemaphorePermit>,
    /// Set on the copy handed to a background task by `Drop`: if that task is dropped
    /// unrun (runtime shutting down), clean up synchronously instead of spawning again.
    pub(crate) in_background: bool,
}

impl Teardown {
    pub(crate) fn new(vm_id: VmId, ports: Ports, kill_grace: Duration) -> Self {
        Self {
            vm_id,
            ports,
            kill_grace,
            process: None,
            conn: None,
            network: None,
            limits: None,
            overlay: None,
            work_dir: None,
            slot: None,
            in_background: false,
        }
    }

    pub(crate) fn take(&mut self) -> Teardown {
        Teardown {
            vm_id: self.vm_id,
            ports: self.ports.clone(),
            kill_grace: self.kill_grace,
            process: self.process.take(),
            conn: self.conn.take(),
            network: self.network.take(),
            limits: self.limits.take(),
            overlay: self.overlay.take(),
            work_dir: self.work_dir.take(),
            slot: self.slot.take(),
            in_background: self.in_background,
        }
    }

    /// Best-effort synchronous cleanup when no runtime can run the async one: the VM
    /// process dies with its handle (kill-on-drop) and with its parent; the work dir goes.
    fn release_sync(&mut self) {
        if let Some(dir) = self.work_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
        self.conn = None;
        self.process = None;
        self.network = None;
        self.limits = None;
        self.overlay = None;
        self.slot = None;
    }

    fn is_empty(&self) -> bool {
        self.process.is_none()
            && self.conn.is_none()
            && self.network.is_none()
            && self.limits.is_none()
            && self.overlay.is_none()
            && self.work_dir.is_none()
            && self.slot.is_none()
    }

    /// Releases in reverse order of acquisition. Failures are logged, never stop the rest.
    pub(crate) async fn run(mut self) {
        let vm = self.vm_id;
        if let Some(conn) = self.conn.take() {
            conn.close().await;
        }
        if let Some(process) = self.process.take()
            && let Err(e) = process.kill(self.kill_grace).await
        {
            warn!(vm_id = %vm, error = %e, "killing the VM process failed");
        }
        if let Some(net) = self.network.take()
            && let Some(proxy) = &self.ports.network
            && let Err(e) = proxy.stop(&net).await
        {
            warn!(vm_id = %vm, error = %e, "stopping the VM network failed");
        }
        if let Some(limits) = self.limits.take()
            && let Err(e) = self.ports.limiter.remove(&limits).await
        {
            warn!(vm_id = %vm, error = %e, "removing the VM limits failed");
        }
        if let Some(overlay) = self.overlay.take()
            && let Err(e) = self.ports.overlays.release(&overlay).await
        {
            warn!(vm_id = %vm, error = %e, "releasing the overlay failed");
        }
        if let Some(dir) = self.work_dir.take() {
            // A dying VM process may still close files in it: retry briefly.
            for attempt in 0..5u32 {
                match tokio::fs::remove_dir_all(&dir).await {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if attempt == 4 => {
                        warn!(vm_id = %vm, dir = %dir.display(), error = %e, "removing the work dir failed");
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }
        // The slot goes last: capacity is free only once everything else is.
        drop(self.slot.take());
        debug!(vm_id = %vm, "VM torn down");
    }
}

impl Drop for Teardown {
    fn drop(&mut self) {
        if self.is_empty() {
            return;
        }
        if self.in_background {
            self.release_sync();
            return;
        }
        let mut rest = self.take();
        rest.in_background = true;
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(rest.run());
            }
            Err(_) => rest.release_sync(),
        }
    }
}
