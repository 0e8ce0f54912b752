//! `cargo xtask`: developer tasks for sbx (guest assets, VM tests, benchmarks).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use xtask::assets::{self, BuildOptions, ImageChoice, Only};

/// Developer tasks for sbx.
#[derive(Debug, Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build the guest kernel, agent, initramfs and base images into the asset cache
    /// (content-keyed: unchanged inputs rebuild nothing).
    Assets {
        /// Build only this asset (plus the agent where it is a dependency).
        #[arg(long, value_enum)]
        only: Option<Only>,
        /// Which base images to build.
        #[arg(long, value_enum, default_value = "all")]
        image: ImageChoice,
        /// Cache directory [default: ~/.cache/sbx/assets].
        #[arg(long, env = assets::DIR_ENV)]
        dir: Option<PathBuf>,
    },
    /// Boot each base image under QEMU, ping the agent, power off; print spawn→pong time
    /// and QEMU peak RSS beside the Debian cloud kernel baseline.
    BootSmoke {
        /// Which images to boot.
        #[arg(long, value_enum, default_value = "all")]
        image: ImageChoice,
        /// Boots per image (the median is reported).
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// Cache directory [default: ~/.cache/sbx/assets].
        #[arg(long, env = assets::DIR_ENV)]
        dir: Option<PathBuf>,
    },
    /// Run the end-to-end tests over real microVMs (builds nothing: run `assets` first).
    Itest {
        /// Extra arguments for the test binary (e.g. a test name filter).
        args: Vec<String>,
    },
    /// Man pages of the `sbx` CLI (clap_mangen) into target/man (or --out).
    Man {
        /// Output directory [default: target/man].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Benchmarks: JSON on stdout and in target/bench/latest.json.
    Bench {
        /// A short pass (fewer samples), to check the bench itself.
        #[arg(long)]
        quick: bool,
        /// Run only this section (repeatable; default: all).
        #[arg(long, value_enum)]
        only: Vec<xtask::bench::Section>,
        /// Cache directory [default: ~/.cache/sbx/assets].
        #[arg(long, env = assets::DIR_ENV)]
        dir: Option<PathBuf>,
    },
}

/// The test binaries of the `sbx` crate that boot real VMs.
const VM_TEST_BINARIES: &[&str] = &[
    "vm",
    "vm_serve",
    "vm_net",
    "vm_cli",
    "vm_guest",
    "vm_packages",
    "vm_mcp",
    "vm_session",
];

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn assets_dir(dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match dir {
        Some(d) => Ok(d),
        None => assets::default_dir(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Assets { only, image, dir } => assets::build(&BuildOptions {
            dir: assets_dir(dir)?,
            only,
            images: image.images(),
        }),
        Cmd::BootSmoke { image, runs, dir } => {
            let found = assets::locate(&assets_dir(dir)?)?;
            let report =
                runtime()?.block_on(xtask::smoke::run(&found, &image.images(), runs.max(1)))?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Cmd::Itest { args } => {
            let found = assets::locate(&assets::default_dir()?)?;
            for image in assets::Image::ALL {
                found.image(image)?;
            }
            let status = std::process::Command::new(env!("CARGO"))
                .args(["test", "--locked", "-p", "sbx"])
                .args(VM_TEST_BINARIES.iter().flat_map(|t| ["--test", t]))
                .args(["--", "--ignored", "--test-threads", "1"])
                .args(&args)
                .env("SBX_ASSETS_DIR", &found.dir)
                .status()?;
            anyhow::ensure!(status.success(), "VM integration tests failed");
            Ok(())
        }
        Cmd::Man { out } => {
            let out = out.unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/man")
            });
            let status = std::process::Command::new(env!("CARGO"))
                .args(["run", "-q", "--locked", "-p", "sbx", "--", "man-pages"])
                .arg(&out)
                .status()?;
            anyhow::ensure!(status.success(), "sbx man-pages failed");
            Ok(())
        }
        Cmd::Bench { quick, only, dir } => {
            let found = assets::locate(&assets_dir(dir)?)?;
            let size = if quick {
                xtask::bench::BenchSize::quick()
            } else {
                xtask::bench::BenchSize::standard()
            };
            let report = runtime()?.block_on(xtask::bench::run(&found, size, &only))?;
            let text = serde_json::to_string_pretty(&report)?;
            let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
            std::fs::create_dir_all(&out)?;
            std::fs::write(out.join("latest.json"), &text)?;
            println!("{text}");
            Ok(())
        }
    }
}
