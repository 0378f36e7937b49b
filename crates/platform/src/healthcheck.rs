//! A tiny HTTP probe for Docker `HEALTHCHECK`: containers have no curl.
//!
//! Binaries expose it as a `healthcheck` subcommand: `command-service healthcheck` sends
//! `GET /healthz` to the service's own port on the loopback interface and exits 0 on a 2xx.
//! It speaks just enough HTTP/1.1 to read a status line; it never follows redirects.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::db::describe_io;

/// Whole-probe deadline; Docker's own timeout should be longer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Sends `GET path` to the port of `listen_addr` (e.g. `0.0.0.0:8080`) on loopback and returns
/// exit code 0 on a 2xx, 1 otherwise (printing one line to stderr).
pub async fn probe(listen_addr: &str, path: &str) -> ExitCode {
    match tokio::time::timeout(PROBE_TIMEOUT, probe_status(listen_addr, path)).await {
        Ok(Ok(status)) if (200..300).contains(&status) => ExitCode::SUCCESS,
        Ok(Ok(status)) => {
            eprintln!("unhealthy: GET {path} answered {status}");
            ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            eprintln!("unhealthy: {}", crate::config::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!(
                "unhealthy: GET {path} timed out after {} s",
                PROBE_TIMEOUT.as_secs()
            );
            ExitCode::FAILURE
        }
    }
}

/// The address to probe: the listen address, with an unspecified IP replaced by loopback.
pub fn probe_target(listen_addr: &str) -> anyhow::Result<SocketAddr> {
    let addr: SocketAddr = match listen_addr.parse() {
        Ok(addr) => addr,
        // A host name (`localhost:8080`): only its port matters.
        Err(_) => {
            let port = listen_addr
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .ok_or_else(|| anyhow!("invalid LISTEN_ADDR: no port in {listen_addr:?}"))?;
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
        }
    };
    if addr.ip().is_unspecified() {
        return Ok(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            addr.port(),
        ));
    }
    Ok(addr)
}

/// Sends the request and returns the response's status code.
pub async fn probe_status(listen_addr: &str, path: &str) -> anyhow::Result<u16> {
    let target = probe_target(listen_addr)?;
    let mut stream = TcpStream::connect(target)
        .await
        .map_err(|e| anyhow!("cannot connect to {target}: {}", describe_io(&e)))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\nUser-Agent: healthcheck\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .context("cannot send the probe")?;
    // The status line fits in the first few bytes; read until a line end or 1 KiB.
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 1024 {
        let n = stream
            .read(&mut chunk)
            .await
            .context("cannot read the response")?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let line = line.lines().next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    match (
        parts.next(),
        parts.next().and_then(|s| s.parse::<u16>().ok()),
    ) {
        (Some(version), Some(status)) if version.starts_with("HTTP/") => Ok(status),
        _ => bail!("not an HTTP response: {line:?}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_listen_address_is_probed_on_loopback() {
        assert_eq!(
            probe_target("0.0.0.0:8080").unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(
            probe_target("[::]:8081").unwrap(),
            "127.0.0.1:8081".parse().unwrap()
        );
        assert_eq!(
            probe_target("localhost:8082").unwrap(),
            "127.0.0.1:8082".parse().unwrap()
        );
        assert!(probe_target("nonsense").is_err());
    }
}
