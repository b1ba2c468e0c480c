//! The demo service of `sdp dev`: a tiny HTTP service the `sdp` binary itself serves, so the
//! demo catalog builds and runs with nothing but this binary, and its build, which prints a
//! build's log.
//!
//! It listens on `$PORT` and answers every path with the checkout's `message.txt`, so two
//! branches answer differently; `/healthz` answers `ok`.

use std::io::Write;
use std::time::{Duration, Instant};

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

const RESET: &str = "\x1b[0m";
const BOLD: &str = "\x1b[1m";
const DIM: &str = "\x1b[2m";
const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const BLUE_BOLD: &str = "\x1b[1;34m";
const GREEN_BOLD: &str = "\x1b[1;32m";

/// The demo build of `sdp dev`: it prints what a real build prints, at about the pace of
/// one, so that a newcomer's first deployment shows the log view at work: coloured lines,
/// a progress bar redrawn with carriage returns, a few hundred lines of compiler output,
/// warnings on stderr, tests and a summary. It builds nothing: the service is this binary.
pub fn build(service: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    let pause = |ms| std::thread::sleep(Duration::from_millis(ms));
    writeln!(
        out,
        "{BLUE_BOLD}==>{RESET} {BOLD}Building {service}{RESET} (go1.22.5 linux/amd64)"
    )?;
    writeln!(out, "{DIM}$ go mod download{RESET}")?;
    for module in MODULES {
        writeln!(out, "{GREEN}go: downloading{RESET} {module}")?;
        pause(30);
    }
    // Drawn over and over on one line, as a terminal shows it; the last drawing stays.
    const WIDTH: usize = 30;
    for step in 0..=WIDTH {
        let bar = format!("{:<WIDTH$}", "#".repeat(step));
        write!(
            out,
            "\rRestoring the build cache [{bar}] {:>3}%",
            step * 100 / WIDTH
        )?;
        out.flush()?;
        pause(35);
    }
    writeln!(out)?;
    writeln!(
        out,
        "{DIM}$ go build -o .sdp/bin/app ./cmd/{service}{RESET}"
    )?;
    let packages = PACKAGES.len() * 10;
    for i in 0..packages {
        let package = PACKAGES[i % PACKAGES.len()];
        writeln!(
            out,
            "{GREEN}   compiling{RESET} {service}/internal/{package}/v{}",
            i / PACKAGES.len() + 1
        )?;
        if i % 40 == 17 {
            writeln!(
                err,
                "{YELLOW}warning{RESET}: internal/{package}/cache.go:{}:2: {BOLD}ioutil.ReadAll{RESET} is deprecated: use io.ReadAll",
                40 + i
            )?;
        }
        pause(if i % 25 == 0 { 60 } else { 6 });
    }
    writeln!(out, "{DIM}$ go test ./...{RESET}")?;
    for (i, package) in PACKAGES.iter().enumerate() {
        if i == 5 {
            writeln!(
                out,
                "{YELLOW}--- SKIP{RESET}: TestAgainstStaging (0.00s)\n    needs STAGING_URL"
            )?;
        }
        writeln!(
            out,
            "{GREEN}ok  {RESET}\t{service}/internal/{package}\t0.{:03}s",
            (i * 37) % 900 + 12
        )?;
        pause(20);
    }
    writeln!(
        out,
        "{GREEN_BOLD}✔ built{RESET} .sdp/bin/app in {:.1}s",
        started.elapsed().as_secs_f64()
    )?;
    out.flush()?;
    Ok(())
}

const MODULES: &[&str] = &[
    "github.com/go-chi/chi/v5 v5.0.12",
    "github.com/jackc/pgx/v5 v5.5.5",
    "github.com/prometheus/client_golang v1.19.0",
    "go.opentelemetry.io/otel v1.24.0",
    "go.opentelemetry.io/otel/trace v1.24.0",
    "github.com/rs/zerolog v1.32.0",
    "golang.org/x/sync v0.6.0",
    "golang.org/x/net v0.22.0",
    "google.golang.org/grpc v1.62.1",
    "google.golang.org/protobuf v1.33.0",
    "github.com/stretchr/testify v1.9.0",
    "gopkg.in/yaml.v3 v3.0.1",
];

const PACKAGES: &[&str] = &[
    "api",
    "auth",
    "cache",
    "config",
    "db",
    "events",
    "handlers",
    "health",
    "metrics",
    "middleware",
    "models",
    "queue",
    "repository",
    "routes",
    "server",
    "service",
    "storage",
    "telemetry",
    "templates",
    "validate",
];
