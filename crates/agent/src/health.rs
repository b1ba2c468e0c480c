//! An instance's health path, as the agent checks it: while it starts (until it answers 200
//! or the health timeout passes) and, once healthy, every `health_interval`.

use std::time::Duration;

/// How long one check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Between checks while an instance starts.
const STARTING_POLL: Duration = Duration::from_millis(100);

/// One check: `Ok` on a 200, else what came back.
pub async fn check(
    http: &reqwest::Client,
    host: &str,
    port: u16,
    path: &str,
) -> Result<(), String> {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let url = format!("http://{host}:{port}{path}");
    match http.get(&url).timeout(CHECK_TIMEOUT).send().await {
        Ok(resp) if resp.status() == reqwest::StatusCode::OK => Ok(()),
        Ok(resp) => Err(format!("status {}", resp.status().as_u16())),
        Err(e) if e.is_connect() => Err("connection refused".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Checks until a 200, or `timeout` passes: then says why, for people.
pub async fn wait_healthy(
    http: &reqwest::Client,
    host: &str,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::from("no answer");
    while tokio::time::Instant::now() < deadline {
        match check(http, host, port, path).await {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
        tokio::time::sleep(STARTING_POLL).await;
    }
    Err(format!(
        "did not become healthy within {}s: {path} gave {last}",
        timeout.as_secs()
    ))
}
