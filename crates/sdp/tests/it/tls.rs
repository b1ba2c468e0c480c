//! Agents reach the control plane over `wss://`, verifying its certificate, and refuse plain
//! `ws://` to another host unless told the network is private.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio_rustls::rustls;

use sdp_testkit::{PASSWORD, TestEnv, USER};

use crate::SDP;

/// TLS in front of the control plane, as nginx is in production: it terminates TLS with a
/// certificate for `localhost` and `127.0.0.1` signed by a test CA (`ca_file`), and forwards
/// the bytes to the control plane's port.
struct TlsProxy {
    addr: SocketAddr,
    ca_file: PathBuf,
    /// TLS handshakes completed.
    sessions: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsProxy {
    async fn start(env: &TestEnv) -> TlsProxy {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
        let ca_file = env.dir.path().join("control-plane-ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server: SocketAddr = env.url.trim_start_matches("http://").parse().unwrap();
        let sessions = Arc::new(AtomicUsize::new(0));
        let counted = sessions.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let counted = counted.clone();
                tokio::spawn(async move {
                    // A client that does not trust the certificate ends here.
                    let Ok(mut tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    counted.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(server).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
                });
            }
        });
        TlsProxy {
            addr,
            ca_file,
            sessions,
            task,
        }
    }

    fn url(&self, host: &str) -> String {
        format!("wss://{host}:{}/ws/agent", self.addr.port())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_with_the_ca_file_connects_over_wss_and_a_login_works_through_it() {
    let mut env = TestEnv::builder(SDP).no_agents().start().await;
    let proxy = TlsProxy::start(&env).await;
    for (name, host) in [("tls-by-name", "localhost"), ("tls-by-ip", "127.0.0.1")] {
        let extra = format!("ca_file = \"{}\"\n", proxy.ca_file.display());
        let agent = env.spawn_agent_with(name, "micro", &proxy.url(host), &extra);
        env.agents.push(agent);
    }
    env.wait_for_agents(2).await;
    assert!(proxy.sessions.load(Ordering::SeqCst) >= 2);

    // Logins are git jobs: they reach an agent only through the proxy.
    let login = env.login().await;
    assert!(!login.is_empty());
    let agents = env.get("/api/agents", Some(&login)).await.json();
    let names: Vec<&str> = agents
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tls-by-ip", "tls-by-name"]);
    for agent in &mut env.agents {
        agent.wait_for_line("connected over wss://", |l| {
            l.contains("connected to the control plane") && l.contains("wss://")
        });
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_without_the_ca_file_refuses_a_certificate_it_does_not_trust_and_says_why() {
    let mut env = TestEnv::builder(SDP).no_agents().start().await;
    let proxy = TlsProxy::start(&env).await;
    // It trusts the system's certificates, here the HTTPS baseline's CA only
    // (`SSL_CERT_FILE`): not the one that signed the proxy's.
    let mut agent = env.spawn_agent_with("doubter", "micro", &proxy.url("localhost"), "");
    let line = agent.wait_for_line("why it is not connected", |l| {
        l.contains("not connected to the control plane")
    });
    assert!(
        line.contains("certificate is not trusted") && line.contains("ca_file"),
        "{line}"
    );
    env.agents.push(agent);
    assert_eq!(proxy.sessions.load(Ordering::SeqCst), 0);
    assert_eq!(env.health().await["agents"], 0);
    let reply = env.login_as(USER, PASSWORD).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
}

/// `sdp agent` (which would dial) or `sdp config print` (which only validates) with a config
/// whose `server` is `server`, plus `extra`; returns the exit status and standard error.
fn run_with_config(env: &TestEnv, command: &str, server: &str, extra: &str) -> (i32, String) {
    let path = env.dir.path().join(format!("{command}-agent.toml"));
    std::fs::write(
        &path,
        format!(
            "server = \"{server}\"\nrole = \"micro\"\nname = \"remote\"\nruntime = \"process\"\nwork_dir = \"{}\"\n{extra}",
            env.dir.path().join("remote").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(SDP);
    for (key, _) in std::env::vars() {
        if key.starts_with("SDP_") {
            cmd.env_remove(key);
        }
    }
    match command {
        "agent" => cmd.arg("agent"),
        _ => cmd.args(["config", "print"]),
    };
    let out = cmd
        .arg("--config")
        .arg(&path)
        .env("SDP_TOKEN", "t")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_ws_to_another_host_is_refused_at_start_unless_insecure() {
    let env = TestEnv::builder(SDP).no_agents().start().await;
    // Never dialled: the agent stops at its configuration, and with `insecure` only the
    // configuration is checked.
    let remote = "ws://10.1.2.3:8080/ws/agent";
    let (status, stderr) = run_with_config(&env, "agent", remote, "");
    assert_eq!(status, 2, "{stderr}");
    assert!(
        stderr.contains("passwords") && stderr.contains("insecure = true"),
        "{stderr}"
    );
    let (status, stderr) = run_with_config(&env, "config", remote, "");
    assert_eq!(status, 2, "{stderr}");
    let (status, stderr) = run_with_config(&env, "config", remote, "insecure = true\n");
    assert_eq!(status, 0, "{stderr}");
    // Loopback needs no exception.
    let (status, stderr) = run_with_config(&env, "config", &env.ws_url(), "");
    assert_eq!(status, 0, "{stderr}");
}
