//! Litestream's command lines, as its documentation spells them.
//!
//! Litestream parses flags with Go's `flag` package, where `-config` and
//! `--config` are the same flag and `-config=x` works too. clap reads a
//! single dash as a cluster of short flags, so `-config` would be `-c
//! -o -n ...`. Before clap sees the arguments, a single-dash word that is
//! the name of one of walstream's long flags gets its second dash; nothing
//! else is touched (values of flags, positionals, anything after `--`).

use std::collections::HashMap;
use std::ffi::OsString;

/// The long flags of a command and its subcommands, and whether each takes
/// a value.
pub fn long_flags(cmd: &clap::Command) -> HashMap<String, bool> {
    let mut out = HashMap::new();
    collect(cmd, &mut out);
    out
}

fn collect(cmd: &clap::Command, out: &mut HashMap<String, bool>) {
    for a in cmd.get_arguments() {
        if let Some(long) = a.get_long() {
            out.insert(long.to_string(), a.get_action().takes_values());
        }
    }
    for s in cmd.get_subcommands() {
        collect(s, out);
    }
}

/// Rewrites `-name` and `-name=value` to `--name`, `--name=value` where
/// `name` is one of `flags` (the first argument, the program, is kept).
pub fn normalize(args: Vec<OsString>, flags: &HashMap<String, bool>) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut value_next = false;
    let mut rest = false;
    for (i, arg) in args.into_iter().enumerate() {
        if i == 0 || rest || value_next {
            value_next = false;
            out.push(arg);
            continue;
        }
        let Some(s) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        if s == "--" {
            rest = true;
            out.push(arg);
            continue;
        }
        let dashes = s.len() - s.trim_start_matches('-').len();
        let name = s.trim_start_matches('-');
        let (key, has_value) = match name.split_once('=') {
            Some((k, _)) => (k, true),
            None => (name, false),
        };
        let takes = flags.get(key).copied();
        match (dashes, takes) {
            (1 | 2, Some(takes)) if key.len() > 1 => {
                value_next = takes && !has_value;
                out.push(OsString::from(format!("--{name}")));
            }
            // A short flag that takes a value (`-o out.db`).
            (1, _) if s == "-o" => {
                value_next = true;
                out.push(arg);
            }
            _ => out.push(arg),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Vec<String> {
        let flags: HashMap<String, bool> = [
            ("config", true),
            ("exec", true),
            ("if-db-not-exists", false),
            ("timestamp", true),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        normalize(args.iter().map(OsString::from).collect(), &flags)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect()
    }

    #[test]
    fn single_dash_long_flags_get_their_second_dash() {
        assert_eq!(
            run(&[
                "w",
                "replicate",
                "-config",
                "/etc/l.yml",
                "-exec",
                "-config x"
            ]),
            [
                "w",
                "replicate",
                "--config",
                "/etc/l.yml",
                "--exec",
                "-config x"
            ]
        );
        assert_eq!(
            run(&[
                "w",
                "restore",
                "-config=/c.yml",
                "-if-db-not-exists",
                "-o",
                "-config",
                "db"
            ]),
            [
                "w",
                "restore",
                "--config=/c.yml",
                "--if-db-not-exists",
                "-o",
                "-config",
                "db"
            ]
        );
        // Unknown words, positionals and everything after `--` stay as they
        // are.
        assert_eq!(
            run(&["w", "-nope", "x", "--", "-config"]),
            ["w", "-nope", "x", "--", "-config"]
        );
    }
}
