//! The API against its own document: schemathesis (from PyPI; `scripts/test.sh` installs it)
//! reads `GET /api/openapi.json` of a real server, sends each operation requests generated
//! from it, valid and not, and checks every answer against the document. That the document
//! lists exactly the served routes is a unit test of `sdp-server` (`api::openapi`).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use sdp_testkit::{InProcessEnv, TestEnv};

use crate::SDP;

/// Where `scripts/test.sh` tells the tests schemathesis is.
const SCHEMATHESIS_VAR: &str = "SDP_TEST_SCHEMATHESIS";

/// The longest the fuzzing may take; it usually needs well under a minute.
const FUZZ_TIMEOUT: Duration = Duration::from_secs(150);

/// The schemathesis executable: `SDP_TEST_SCHEMATHESIS`, else where `scripts/test.sh` puts
/// it. `None` when it is not installed and this is not CI; in CI its absence fails the test.
fn schemathesis() -> Option<PathBuf> {
    let path = match std::env::var_os(SCHEMATHESIS_VAR) {
        Some(path) => PathBuf::from(path),
        None => {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
            cache.join("sdp-test/venv/bin/schemathesis")
        }
    };
    if path.is_file() {
        return Some(path);
    }
    let how = format!(
        "schemathesis is not installed at {}: run scripts/test.sh, which installs it (pip install \
         'schemathesis>=4,<5' in a venv) and sets {SCHEMATHESIS_VAR}",
        path.display()
    );
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{how}");
    eprintln!("skipping: {how}");
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_document_is_served_as_json_to_a_session_only() {
    let env = InProcessEnv::builder().start().await;
    let reply = env.get("/api/openapi.json", None).await;
    assert_eq!(reply.status, 401, "{}", reply.body);
    let token = env.login().await;
    let reply = env.get("/api/openapi.json", Some(&token)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.headers["content-type"], "application/json");
    let doc = reply.json();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(
        doc["paths"]["/api/sandboxes/{id}"]["delete"].is_object(),
        "{doc}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fuzzing_the_api_from_its_document_finds_no_server_error_and_no_answer_outside_it() {
    let Some(schemathesis) = schemathesis() else {
        return;
    };
    // A catalog whose repositories all answer, as in a real deployment: the kit's others are
    // made to fail (a git server that hangs, repositories that do not exist), which the API
    // rightly answers 504 `agent_timeout` and 502 `repo_unreachable`.
    let env = TestEnv::builder(SDP)
        .catalog(&["orders", "billing"])
        .repos(&["orders", "billing"])
        .gateway(true)
        // With a secret, deliveries reach the signature check (401) instead of 404.
        .webhooks("0", "2s")
        .start()
        .await;
    let token = env.login().await;

    // Something for the answers to hold, so that their schemas are checked on real data: a
    // ready sandbox named as the document's examples name one (`demo`), its deployment with
    // its steps, runtime log and history, and the router's decisions for it, one of them
    // matching no route (no service, no upstream).
    let (sandbox, deployment) = env.deploy(&token, "demo", &["orders@feature/x"]).await;
    assert_eq!(deployment["state"], "ready", "{deployment}");
    assert_eq!(sandbox["state"], "ready", "{sandbox}");
    for (path, status) in [("/orders/1", 200), ("/nowhere", 404)] {
        let routed = env
            .http
            .get(format!("{}{path}", env.router_url()))
            .header("x-sdp-sandbox", "demo")
            .send()
            .await
            .unwrap();
        assert_eq!(routed.status(), status, "{path} through the router");
    }

    // The session goes to schemathesis through its environment and a config file that names
    // it, never its command line.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        "[headers]\nAuthorization = \"Bearer ${SDP_FUZZ_TOKEN}\"\n",
    )
    .unwrap();
    // The document needs a session too: it is read here and handed over as a file.
    let reply = env.get("/api/openapi.json", Some(&token)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let document = dir.path().join("openapi.json");
    std::fs::write(&document, &reply.body).unwrap();
    let started = Instant::now();
    let run = tokio::process::Command::new(&schemathesis)
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(&document)
        .args(["--url", &env.url])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance",
        ])
        // Bounded, so that the whole test stays within about two minutes on two cores.
        .args(["--max-examples", "100", "--workers", "2"])
        // Logging out would end the session the run uses; everything else, deleting the
        // sandbox included, is fair game.
        .args(["--exclude-path", "/api/logout"])
        // Requests carry the session above, not made-up credentials the document's security
        // schemes would otherwise generate.
        .args(["--generation-with-security-parameters", "false"])
        .args(["--generation-database", "none", "--no-color"])
        .env("SDP_FUZZ_TOKEN", &token)
        // The server is on loopback: no proxy of the environment may stand in between.
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(FUZZ_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| panic!("schemathesis did not finish within {FUZZ_TIMEOUT:?}"))
        .expect("schemathesis runs");
    let report = format!(
        "schemathesis ({:?}, {:.0?}):\n{}\n{}",
        out.status,
        started.elapsed(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Its output masks the Authorization header; if it ever did not, the test says so without
    // printing the token.
    let leaked = report.contains(&token);
    let report = report.replace(&token, "[session token]");
    assert!(out.status.success(), "{report}");
    assert!(!leaked, "the session token showed in schemathesis's output");
    eprintln!("{report}");
}
