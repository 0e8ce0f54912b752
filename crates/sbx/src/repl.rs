//! `sbx session`: an interactive session on a terminal.
//!
//! One VM and its interpreter for the whole session: each input (a line, or a block: a
//! Python line ending in `:` continues until an empty line, open brackets and a trailing
//! `\` continue in every language) is one exec, with its output streamed as it comes.
//! Line editing and history come from rustyline. Ctrl-C at the prompt clears the input;
//! during an exec it cancels that exec in the guest and the session lives on (its
//! REPL restarts, as after a timeout: variables are lost, files and background processes
//! stay). Ctrl-D (or the end of standard input) closes the session and destroys the VM.

use std::io::Write;
use std::sync::Arc;

use futures::FutureExt;
use rustyline::DefaultEditor;
use rustyline::error::ReadlineError;
use sandbox_core::{ErrorKind, ExecRequest, Language, OutputCallbacks, RunOptions, SessionRequest};
use tokio::signal::unix::{SignalKind, signal};

use crate::{Sbx, SbxConfig};

const EXIT_USAGE: i32 = 2;
const EXIT_SANDBOX: i32 = 125;

/// Arguments of `sbx session`.
#[derive(Debug, Clone, clap::Args)]
pub struct SessionArgs {
    /// python, javascript or raw.
    #[arg(short, long, default_value = "python")]
    pub language: String,
    /// Timeout of each input, in seconds (1-300).
    #[arg(short, long, default_value_t = 30)]
    pub timeout: u32,
    /// Guest memory in MB (≥ 128).
    #[arg(short, long, default_value_t = 192)]
    pub memory: u32,
    /// Disk-backed home directory of MB (64-4096); default: a tmpfs of 40 % of the memory.
    #[arg(long = "disk", value_name = "MB")]
    pub disk: Option<u32>,
    /// Seconds without input before the session closes itself (10-3600).
    #[arg(long, default_value_t = 3600)]
    pub idle_timeout: u32,
}

/// The prompt of `language`, and the one of a continuation line.
pub fn prompts(language: Language) -> (&'static str, &'static str) {
    match language {
        Language::Python => (">>> ", "... "),
        Language::Javascript => ("> ", "... "),
        Language::Raw => ("$ ", "> "),
    }
}

/// Whether `buffer` (the lines typed so far, without the final newline) is an unfinished
/// input: open brackets, a trailing backslash, or a Python block not yet closed by an
/// empty line.
pub fn needs_more(language: Language, buffer: &str) -> bool {
    let last = buffer.lines().last().unwrap_or("");
    if last.trim_end().ends_with('\\') {
        return true;
    }
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in buffer.chars() {
        if escaped {
            escaped = false;
            continue;
        }
        match (quote, c) {
            (_, '\\') => escaped = true,
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"' | '`') => quote = Some(c),
            (None, '(' | '[' | '{') => depth += 1,
            (None, ')' | ']' | '}') => depth -= 1,
            (None, _) => {}
        }
    }
    if depth > 0 {
        return true;
    }
    if language == Language::Python {
        let first_block = buffer.lines().any(|l| l.trim_end().ends_with(':'));
        // A block ends with an empty line.
        return first_block && !buffer.ends_with('\n') && !last.trim().is_empty();
    }
    false
}

fn streaming() -> OutputCallbacks {
    OutputCallbacks {
        on_stdout: Some(Arc::new(|chunk: &[u8]| {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(chunk);
            let _ = out.flush();
        })),
        on_stderr: Some(Arc::new(|chunk: &[u8]| {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(chunk);
            let _ = err.flush();
        })),
    }
}

/// Reads one input (with continuation lines) on a blocking thread; gives the editor back.
async fn read_input(
    mut editor: DefaultEditor,
    language: Language,
) -> (DefaultEditor, Result<String, ReadlineError>) {
    let (first, more) = prompts(language);
    let joined = tokio::task::spawn_blocking(move || {
        let mut buffer = String::new();
        let mut prompt = first;
        loop {
            match editor.readline(prompt) {
                Ok(line) => {
                    if !buffer.is_empty() {
                        buffer.push('\n');
                    }
                    buffer.push_str(&line);
                    if !needs_more(language, &buffer) {
                        break;
                    }
                    prompt = more;
                }
                // The end of input inside a block runs what was typed.
                Err(ReadlineError::Eof) if !buffer.is_empty() => break,
                Err(e) => return (editor, Err(e)),
            }
        }
        if !buffer.trim().is_empty() {
            let _ = editor.add_history_entry(buffer.as_str());
        }
        (editor, Ok(buffer))
    })
    .await;
    match joined {
        Ok(r) => r,
        Err(e) => (
            // The thread panicked: no editor to give back; a fresh one ends the session.
            match DefaultEditor::new() {
                Ok(ed) => ed,
                Err(_) => std::process::exit(EXIT_SANDBOX),
            },
            Err(ReadlineError::Io(std::io::Error::other(e.to_string()))),
        ),
    }
}

/// Runs `sbx session`; returns the exit status (0 after Ctrl-D, 2 on usage errors, 125
/// when the sandbox fails or the session is lost).
pub async fn main(args: SessionArgs, config: SbxConfig) -> i32 {
    let language: Language = match args.language.parse() {
        Ok(l) => l,
        Err(_) => {
            eprintln!(
                "sbx session: --language {:?}: expected python, javascript or raw",
                args.language
            );
            return EXIT_USAGE;
        }
    };
    let mut req = SessionRequest::new(language);
    req.memory_mb = args.memory;
    req.disk_mb = args.disk;
    req.idle_timeout_secs = args.idle_timeout;
    if let Err(e) = req.clone().validate() {
        eprintln!("sbx session: {e}");
        return EXIT_USAGE;
    }
    let mut probe = ExecRequest::new("1");
    probe.timeout_secs = args.timeout;
    if let Err(e) = probe.validate(language) {
        eprintln!("sbx session: {e}");
        return EXIT_USAGE;
    }
    // Installed before anything else, so a Ctrl-C during an exec reaches us, not the
    // default handler that would end the process.
    let mut sigint = match signal(SignalKind::interrupt()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sbx session: cannot handle Ctrl-C: {e}");
            return EXIT_SANDBOX;
        }
    };
    let mut editor = match DefaultEditor::new() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("sbx session: cannot open the terminal: {e}");
            return EXIT_SANDBOX;
        }
    };
    eprintln!("sbx session: starting a {language} microVM...");
    let sbx = match Sbx::start(config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sbx session: {e}");
            return EXIT_SANDBOX;
        }
    };
    let session = match sbx.scheduler().session(req, RunOptions::default()).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sbx session: {e}");
            sbx.stop().await;
            return if e.kind() == ErrorKind::Input {
                EXIT_USAGE
            } else {
                EXIT_SANDBOX
            };
        }
    };
    eprintln!(
        "sbx session: {language} ready (session {}). Ctrl-C interrupts, Ctrl-D exits.",
        session.id()
    );
    let callbacks = streaming();
    let status = loop {
        let (ed, input) = read_input(editor, language).await;
        editor = ed;
        let code = match input {
            Ok(code) if code.trim().is_empty() => continue,
            Ok(code) => code,
            Err(ReadlineError::Interrupted) => {
                eprintln!("^C");
                continue;
            }
            Err(ReadlineError::Eof) => break 0,
            Err(e) => {
                eprintln!("sbx session: reading input: {e}");
                break EXIT_SANDBOX;
            }
        };
        // A Ctrl-C from before this exec is not meant for it.
        while sigint.recv().now_or_never().is_some() {}
        let mut exec = ExecRequest::new(code);
        exec.timeout_secs = args.timeout;
        let outcome = tokio::select! {
            r = session.exec(exec, &callbacks) => Some(r),
            _ = sigint.recv() => None,
        };
        match outcome {
            None => {
                // The exec future is dropped: the guest cancels it.
                eprintln!(
                    "\nKeyboardInterrupt: the exec was cancelled; the session lives on (its \
                     REPL restarts: variables are lost, files stay)"
                );
            }
            Some(Ok(r)) => {
                if !r.stdout.is_empty() && !r.stdout.ends_with('\n') {
                    println!();
                }
                if r.exit_code != 0 && !r.timed_out() {
                    eprintln!("[exit {}]", r.exit_code);
                }
            }
            Some(Err(e)) => {
                eprintln!("sbx session: {e}");
                if session.is_closed() {
                    break EXIT_SANDBOX;
                }
            }
        }
    };
    session.close().await;
    sbx.stop().await;
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuation_rules() {
        let py = Language::Python;
        assert!(!needs_more(py, "x = 1"));
        assert!(needs_more(py, "def f():"));
        assert!(needs_more(py, "def f():\n    return 1"));
        assert!(!needs_more(py, "def f():\n    return 1\n"));
        assert!(needs_more(py, "x = [1,"));
        assert!(!needs_more(py, "x = [1,\n2]"));
        assert!(!needs_more(py, "s = '(('"));
        assert!(needs_more(py, "x = 1 + \\"));
        let js = Language::Javascript;
        assert!(needs_more(js, "function f() {"));
        assert!(!needs_more(js, "function f() {\n return 1 }"));
        assert!(
            !needs_more(js, "if (x) y():"),
            "a colon only matters in Python"
        );
        let raw = Language::Raw;
        assert!(needs_more(raw, "for i in 1 2; do {"));
        assert!(!needs_more(raw, "echo \"}\""));
        assert_eq!(prompts(py).0, ">>> ");
    }
}
