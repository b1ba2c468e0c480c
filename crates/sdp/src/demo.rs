//! The demo service of `sdp dev`: a tiny HTTP service the `sdp` binary itself serves, so the
//! demo catalog builds and runs with nothing but this binary.
//!
//! It listens on `$PORT` and answers every path with the checkout's `message.txt`, so two
//! branches answer differently; `/healthz` answers `ok`.

use anyhow::Context;
use axum::Router;
use axum::routing::get;

pub async fn serve() -> anyhow::Result<()> {
    let port: u16 = std::env::var("PORT")
        .context("PORT is not set")?
        .parse()
        .context("PORT is not a port number")?;
    // In a container the port is published from outside, so it must listen on all addresses.
    let host = std::env::var("SDP_DEMO_HOST").unwrap_or_else(|_| "127.0.0.1".to_owned());
    let message = std::fs::read_to_string("message.txt").context("cannot read message.txt")?;
    let service = std::env::var("SDP_SERVICE").unwrap_or_else(|_| "demo".to_owned());
    let listener = tokio::net::TcpListener::bind((host.as_str(), port))
        .await
        .with_context(|| format!("cannot listen on {host}:{port}"))?;
    println!("{service} listening on {host}:{port}");
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(move || {
            let message = message.clone();
            async move { message }
        });
    axum::serve(listener, app).await?;
    Ok(())
}
