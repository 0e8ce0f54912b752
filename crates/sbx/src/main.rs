//! The `sbx` command-line interface (work in progress: it does not run code yet).

fn main() {
    eprintln!("sbx: not implemented yet");
    std::process::exit(125);
}
