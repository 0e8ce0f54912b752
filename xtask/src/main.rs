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
    // `boot-smoke [--image raw|python|javascript|all]` goes here (issue 3 §2): it finds
    // the assets with `xtask::assets::locate(&assets::default_dir()?)` and boots each image.
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Assets { only, image, dir } => {
            let dir = match dir {
                Some(d) => d,
                None => assets::default_dir()?,
            };
            assets::build(&BuildOptions {
                dir,
                only,
                images: image.images(),
            })
        }
    }
}
