//! Running the application as walstream's child (`--exec`, `exec:`).
//!
//! Wrapping the application lets walstream be replicating before the first
//! write and ship the last commits after the application exits. The child's
//! own exit status is passed on (128 + signal number when a signal killed it),
//! because orchestrators decide whether to restart from that code; Litestream
//! exits 1 whatever the child returned.

use std::process::ExitStatus;

use tokio::process::{Child, Command};

use crate::error::{Error, Result};

/// Splits a command line the way a POSIX shell would split words (quotes and
/// backslashes), without running a shell: no expansion, no redirection.
pub fn split(command: &str) -> Result<Vec<String>> {
    let words = shlex::split(command)
        .ok_or_else(|| Error::Invalid(format!("exec: unbalanced quotes in {command:?}")))?;
    if words.is_empty() {
        return Err(Error::Invalid("exec: the command is empty".into()));
    }
    Ok(words)
}

/// The application process.
pub struct App {
    child: Child,
    pid: i32,
    program: String,
}

impl App {
    /// Starts `command`; stdin, stdout and stderr are walstream's own.
    pub fn spawn(command: &str) -> Result<App> {
        let words = split(command)?;
        let child = Command::new(&words[0])
            .args(&words[1..])
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| Error::Invalid(format!("exec: cannot start {:?}: {e}", words[0])))?;
        let pid = child.id().map_or(0, |p| p as i32);
        Ok(App {
            child,
            pid,
            program: words[0].clone(),
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn program(&self) -> &str {
        &self.program
    }

    /// Sends `signal` to the child (ignored once it has exited).
    pub fn signal(&self, signal: i32) {
        if self.pid > 0 {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(self.pid, signal);
            }
        }
    }

    /// Waits for the child and returns the exit code walstream should use.
    pub async fn wait(&mut self) -> Result<u8> {
        let status = self
            .child
            .wait()
            .await
            .map_err(|e| Error::Invalid(format!("exec: waiting for {}: {e}", self.program)))?;
        Ok(exit_code(status))
    }
}

/// The exit code a shell would report for `status`.
pub fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => (128 + sig) as u8,
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_like_a_shell() {
        assert_eq!(
            split(r#"myapp serve --name "a b" 'c d' e\ f"#).unwrap(),
            ["myapp", "serve", "--name", "a b", "c d", "e f"]
        );
        assert!(split("app 'unclosed").is_err());
        assert!(split("   ").is_err());
    }

    #[tokio::test]
    async fn exit_codes_pass_through() {
        let mut app = App::spawn("sh -c 'exit 7'").unwrap();
        assert_eq!(app.wait().await.unwrap(), 7);
        let mut app = App::spawn("sh -c 'kill -TERM $$'").unwrap();
        assert_eq!(app.wait().await.unwrap(), 128 + 15);
        assert!(App::spawn("/nonexistent/app --flag").is_err());
    }
}
