//! Golden tests on the QEMU argv: KVM/TCG × network/no network × debug/quiet.
//!
//! The expected argv lives in `tests/golden/<name>.args`, one argument per line.
//! Regenerate with `UPDATE_GOLDEN=1 cargo test -p qemu-cmd --test golden`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use qemu_cmd::{QemuCommandBuilder, QemuFeatures};
use sandbox_core::VmId;
use sandbox_core::ports::{Accelerator, ConsoleSpec, NetworkAttachment, VmSpec};

fn vm_id() -> VmId {
    serde_json::from_str("\"0123456789ab4def8000000000000042\"").unwrap()
}

fn spec(accel: Accelerator, network: bool, verbose: bool) -> VmSpec {
    let w = PathBuf::from("/run/sbx/vm-0123456789ab");
    VmSpec {
        vm_id: vm_id(),
        work_dir: w.clone(),
        kernel: "/var/cache/sbx/assets/vmlinux".into(),
        initramfs: "/var/cache/sbx/assets/initramfs-python.cpio.zst".into(),
        disk: w.join("overlay.qcow2"),
        memory_mb: 192,
        memory: Default::default(),
        home_disk_mb: None,
        package_layer: None,
        vcpus: 1,
        accelerator: accel,
        agent_socket: w.join("agent.sock"),
        qmp_socket: w.join("qmp.sock"),
        network: network.then(|| NetworkAttachment::UnixStream {
            socket: w.join("net.sock"),
        }),
        console: ConsoleSpec {
            log_path: w.join("console.log"),
            max_bytes: 256 * 1024,
            lines: None,
            verbose,
        },
        kernel_args: Vec::new(),
    }
}

fn features() -> QemuFeatures {
    QemuFeatures {
        sandbox: true,
        io_uring: true,
        exit_with_parent: true,
        qboot_rom: Some("/usr/share/qemu/qboot.rom".into()),
        tsc_deadline: true,
        tsc_khz: Some(2_600_000),
        version_line: "QEMU emulator version 10.0.2".into(),
    }
}

fn check(name: &str, spec: &VmSpec) {
    let features = features();
    let argv = QemuCommandBuilder::new(spec, &features).build();
    let actual: String = argv
        .iter()
        .map(|a| format!("{}\n", a.to_string_lossy()))
        .collect();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.args"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
    assert_eq!(
        actual,
        expected,
        "argv of {name} differs from {}; rerun with UPDATE_GOLDEN=1 if intended",
        path.display()
    );
}

#[test]
fn golden_argv_matrix() {
    for accel in [Accelerator::Kvm, Accelerator::Tcg] {
        for network in [false, true] {
            for verbose in [false, true] {
                let name = format!(
                    "{accel}-{}-{}",
                    if network { "net" } else { "nonet" },
                    if verbose { "debug" } else { "quiet" }
                );
                check(&name, &spec(accel, network, verbose));
            }
        }
    }
}
