//! `llmq-fake-cli`: a stand-in for an agent CLI (Claude Code, Gemini, Codex) with a real
//! option parser that is as permissive as theirs: an option that takes a value takes the next
//! argument even when it starts with `-` (commander, which Claude Code uses, does), and an
//! argument that looks like an option is parsed as one wherever it stands. `--settings` is the
//! option an attacker wants (Claude Code's settings can define hooks that run commands).
//!
//! It prints what it parsed as one JSON object: the options, the positional words and stdin.
//! `--help` prints help instead, as the real CLIs do.

use std::io::Read;

use clap::Parser;

#[derive(Parser)]
#[command(name = "llmq-fake-cli")]
struct Args {
    /// Print mode (a flag, as in Claude Code).
    #[arg(short = 'p', long = "print")]
    print: bool,
    #[arg(short = 'm', long, allow_hyphen_values = true)]
    model: Option<String>,
    /// What an attacker wants to set.
    #[arg(long, allow_hyphen_values = true)]
    settings: Option<String>,
    #[arg(long, allow_hyphen_values = true)]
    prompt: Option<String>,
    #[arg(long, allow_hyphen_values = true)]
    system: Option<String>,
    /// Subcommands and prompts, e.g. `exec -` for Codex.
    words: Vec<String>,
}

fn main() {
    let args = Args::parse();
    let mut stdin = String::new();
    // stdin is /dev/null or a pipe here; an unreadable one is reported as empty.
    let _ = std::io::stdin().read_to_string(&mut stdin);
    let parsed = serde_json::json!({
        "print": args.print,
        "model": args.model,
        "settings": args.settings,
        "prompt": args.prompt,
        "system": args.system,
        "words": args.words,
        "stdin": stdin,
    });
    println!("{parsed}");
}
