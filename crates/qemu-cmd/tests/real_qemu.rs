//! The process layer and the hypervisor against the real QEMU, under TCG, with no guest
//! assets. Skips loudly when QEMU (or qemu-img) is not installed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use probes::{HostProbes, HostReport, ProbeConfig};
use qemu_cmd::{ProcessConfig, QemuHypervisor, QemuProcess, UnshareWrap};
use sandbox_core::VmId;
use sandbox_core::ports::{
    Accelerator, ConsoleSpec, ControlCommand, ControlReply, Hypervisor, NetworkAttachment,
    VmProcess, VmSpec,
};

/// The real host's report, without the KVM canary (TCG is forced).
async fn report() -> Option<HostReport> {
    let cfg = ProbeConfig {
        force_tcg: true,
        cache_dir: None,
        ..ProbeConfig::from_env()
    };
    let report = HostProbes::new(cfg).report().await.clone();
    if report.qemu.is_err() {
        eprintln!("SKIP: QEMU not installed: {:?}", report.qemu);
        return None;
    }
    Some(report)
}

fn qemu_img(path: &Path) -> bool {
    match std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg("64M")
        .status()
    {
        Ok(s) if s.success() => true,
        other => {
            eprintln!("SKIP: qemu-img create failed: {other:?}");
            false
        }
    }
}

fn spec(dir: &Path, network: Option<PathBuf>) -> VmSpec {
    VmSpec {
        vm_id: VmId::new(),
        work_dir: dir.to_path_buf(),
        kernel: dir.join("no-such-vmlinux"),
        initramfs: dir.join("no-such-initramfs"),
        disk: dir.join("overlay.qcow2"),
        memory_mb: 128,
        memory: Default::default(),
        home_disk_mb: None,
        package_layer: None,
        vcpus: 1,
        accelerator: Accelerator::Tcg,
        agent_socket: dir.join("agent.sock"),
        qmp_socket: dir.join("qmp.sock"),
        network: network.map(|socket| NetworkAttachment::UnixStream { socket }),
        console: ConsoleSpec {
            log_path: dir.join("console.log"),
            max_bytes: 64 * 1024,
            lines: None,
            verbose: false,
        },
        kernel_args: Vec::new(),
    }
}

/// QEMU parses and sets up every option (machine, accelerator, sandbox, drive, virtio
/// devices, chardevs, netdev, QMP) before it loads the kernel: a missing kernel as the
/// only error proves the rest of the argv is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_kernel_exits_with_qemu_error_in_stderr_tail() {
    let Some(report) = report().await else { return };
    let hv = QemuHypervisor::from_report(&report).unwrap();
    for network in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        if !qemu_img(&tmp.path().join("overlay.qcow2")) {
            return;
        }
        let _listener = if network {
            Some(tokio::net::UnixListener::bind(tmp.path().join("net.sock")).unwrap())
        } else {
            None
        };
        let spec = spec(tmp.path(), network.then(|| tmp.path().join("net.sock")));
        let vm = hv.launch(&spec).await.unwrap();
        assert!(vm.pid().is_some());
        let exit = tokio::time::timeout(Duration::from_secs(30), vm.wait_exit())
            .await
            .expect("QEMU exits");
        assert_eq!(exit.code, Some(1), "{exit}: {}", vm.stderr_tail());
        assert_eq!(vm.try_exit(), Some(exit));
        let tail = vm.stderr_tail();
        eprintln!("network={network}: {exit}; stderr: {tail}");
        assert!(
            tail.contains("could not open kernel file") && tail.contains("no-such-vmlinux"),
            "{tail}"
        );
        // Idempotent kill of an exited VM.
        vm.kill(Duration::from_millis(100)).await.unwrap();
        // The control interface refuses politely.
        let err = vm.control(ControlCommand::QueryStatus).await.unwrap_err();
        assert!(err.message().contains("already exited"), "{err}");
    }
}

#[tokio::test]
async fn missing_qemu_binary_is_a_permanent_missing_dependency() {
    let tmp = tempfile::tempdir().unwrap();
    let hv = QemuHypervisor::new("/nonexistent/qemu-system-x86_64", Default::default());
    let Err(err) = hv.launch(&spec(tmp.path(), None)).await else {
        panic!("launch of a missing binary succeeded");
    };
    assert_eq!(
        err.kind(),
        sandbox_core::ErrorKind::Permanent(sandbox_core::PermanentCause::MissingDependency)
    );
    assert_eq!(
        err.message(),
        "QEMU not found: install qemu-system-x86 (10.x from bookworm-backports)"
    );
}

fn paused_machine(report: &HostReport, dir: &Path) -> ProcessConfig {
    let qemu = report.require_qemu().unwrap();
    let qmp = dir.join("qmp.sock");
    let mut chardev = OsString::from("socket,id=qmp,server=on,wait=off,path=");
    chardev.push(qmp.as_os_str());
    let args: Vec<OsString> = vec![
        "-M".into(),
        "microvm".into(),
        "-accel".into(),
        "tcg,thread=single".into(),
        "-m".into(),
        "32M".into(),
        "-S".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-chardev".into(),
        chardev,
        "-mon".into(),
        "chardev=qmp,mode=control".into(),
    ];
    let mut cfg = ProcessConfig::new(qemu.path.clone(), args);
    cfg.qmp_socket = Some(qmp);
    cfg.qmp_uid = Some(report.current_uid);
    if report.unshare.usable {
        cfg.unshare = report.unshare.program.clone().map(|program| UnshareWrap {
            program,
            net: report.unshare.net,
        });
    }
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qmp_query_cont_stop_quit() {
    let Some(report) = report().await else { return };
    let tmp = tempfile::tempdir().unwrap();
    let vm = QemuProcess::spawn(paused_machine(&report, tmp.path()))
        .await
        .unwrap();
    let status = |r: ControlReply| match r {
        ControlReply::Status { running, status } => (running, status),
        other => panic!("{other:?}"),
    };
    let (running, s) = status(vm.control(ControlCommand::QueryStatus).await.unwrap());
    assert!(!running);
    assert!(s == "prelaunch" || s == "paused", "{s}");
    assert_eq!(
        vm.control(ControlCommand::Cont).await.unwrap(),
        ControlReply::Done
    );
    let (running, s) = status(vm.control(ControlCommand::QueryStatus).await.unwrap());
    assert!(running, "{s}");
    assert_eq!(s, "running");
    vm.control(ControlCommand::Stop).await.unwrap();
    let (running, s) = status(vm.control(ControlCommand::QueryStatus).await.unwrap());
    assert!(!running);
    assert_eq!(s, "paused");
    vm.control(ControlCommand::Quit).await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(10), vm.wait_exit())
        .await
        .unwrap();
    assert_eq!(exit.code, Some(0), "{exit}: {}", vm.stderr_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_drop_leave_no_process() {
    let Some(report) = report().await else { return };
    let tmp = tempfile::tempdir().unwrap();
    let vm = QemuProcess::spawn(paused_machine(&report, tmp.path()))
        .await
        .unwrap();
    // Wait until QEMU is up (QMP answers).
    vm.control(ControlCommand::QueryStatus).await.unwrap();
    let started = std::time::Instant::now();
    vm.kill(Duration::from_secs(3)).await.unwrap();
    eprintln!("kill took {:?}: {:?}", started.elapsed(), vm.try_exit());
    assert!(vm.try_exit().is_some());
    vm.kill(Duration::from_secs(3)).await.unwrap();

    let tmp2 = tempfile::tempdir().unwrap();
    let vm = QemuProcess::spawn(paused_machine(&report, tmp2.path()))
        .await
        .unwrap();
    vm.control(ControlCommand::QueryStatus).await.unwrap();
    let pid = vm.pid().unwrap();
    // The pid is QEMU's own, also under the unshare wrapper.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert!(comm.starts_with("qemu-system"), "{comm}");
    drop(vm);
    let gone = async {
        loop {
            let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false);
            if !alive {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), gone)
        .await
        .expect("dropped QEMU is killed");
}

/// As root: QEMU dropped to another user inside the namespaces; QMP's SO_PEERCRED check
/// expects that user's uid and refuses ours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_as_another_user_and_peer_check_follows() {
    use std::os::unix::fs::PermissionsExt;
    let Some(report) = report().await else { return };
    if report.current_uid != 0 {
        eprintln!("SKIP: not root; cannot switch QEMU to another user");
        return;
    }
    let nobody = 65534;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut cfg = paused_machine(&report, tmp.path());
    cfg.run_as = Some(qemu_cmd::RunAs {
        uid: nobody,
        gid: nobody,
    });
    cfg.qmp_uid = Some(0);
    let vm = QemuProcess::spawn(cfg.clone()).await.unwrap();
    let err = vm.control(ControlCommand::QueryStatus).await.unwrap_err();
    assert!(
        err.message().contains(&format!("uid {nobody}")) && err.message().contains("uid 0"),
        "{err}"
    );
    vm.kill(Duration::from_secs(2)).await.unwrap();

    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut cfg2 = paused_machine(&report, tmp.path());
    cfg2.run_as = cfg.run_as;
    cfg2.qmp_uid = Some(nobody);
    let vm = QemuProcess::spawn(cfg2).await.unwrap();
    let reply = vm.control(ControlCommand::QueryStatus).await;
    assert!(reply.is_ok(), "{reply:?}: {}", vm.stderr_tail());
    let pid = vm.pid().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(uid_line.contains("65534"), "{uid_line}");
    vm.kill(Duration::from_secs(2)).await.unwrap();
}
