//! Real QEMU attaches to the gateway socket with `-netdev stream` (no guest needed: the VM
//! is started paused). Skips, loudly, when `qemu-system-x86_64` is not installed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use netproxy::{NetProxy, ProxyConfig};
use sandbox_core::VmId;
use sandbox_core::ports::{NetworkAttachment, NetworkPolicy, NetworkProxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_netdev_stream_connects() {
    let qemu = "qemu-system-x86_64";
    if std::process::Command::new(qemu)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!("SKIPPED qemu_netdev_stream_connects: {qemu} is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let proxy = NetProxy::new(ProxyConfig::default());
    let vm_id = VmId::new();
    let h = proxy
        .start(
            vm_id,
            &NetworkPolicy::PortsOnly { ports: vec![] },
            dir.path(),
        )
        .await
        .unwrap();
    let NetworkAttachment::UnixStream { socket } = &h.attachment;
    let netdev = format!(
        "stream,id=net0,server=off,addr.type=unix,addr.path={}",
        socket.display()
    );
    let mut child = tokio::process::Command::new(qemu)
        .args(["-M", "microvm", "-nodefaults", "-display", "none", "-S"])
        .args([
            "-netdev",
            &netdev,
            "-device",
            "virtio-net-device,netdev=net0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while proxy.stats(&vm_id).unwrap().attachments == 0 {
        if let Ok(Some(status)) = child.try_wait() {
            let out = child.wait_with_output().await.unwrap();
            panic!(
                "QEMU exited ({status}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(Instant::now() < deadline, "QEMU never connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().await.unwrap();
    proxy.stop(&h).await.unwrap();
}
