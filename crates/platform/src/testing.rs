//! (feature `test-util`) What tests of the services share about their logs: [`LogBuffer`], a
//! `tracing` writer that keeps the lines in memory so a test can read what a service said.
//! Never used by the binaries.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

/// A `MakeWriter` collecting log lines in memory; clones share the lines.
#[derive(Clone, Default)]
pub struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl LogBuffer {
    /// A buffer that receives, until the guard is dropped, what this thread logs at the levels
    /// `filter` lets through (an `EnvFilter` directive such as `info` or
    /// `info,projector=debug`), as plain text lines. A test on a current-thread runtime sees
    /// what the service it runs logs.
    pub fn capture(filter: &str) -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = Self::default();
        let guard = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_writer(logs.clone())
                .with_ansi(false)
                .with_env_filter(filter)
                .finish(),
        );
        (logs, guard)
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// How many lines logged so far contain `text`.
    pub fn lines_containing(&self, text: &str) -> usize {
        self.text()
            .lines()
            .filter(|line| line.contains(text))
            .count()
    }
}

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = LogBuffer;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
