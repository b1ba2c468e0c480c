use crate::run_sdp as sdp;

/// A server's config file in `dir` that `config print` takes (with `SDP_AGENT_TOKEN` set).
fn server_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("server.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:9000\"\n[git]\nprobe_repo = \"https://git.example.com/p.git\"\n",
    )
    .unwrap();
    path
}

#[test]
fn config_print_shows_the_effective_config_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_file(dir.path());
    let (code, out, err) = sdp(
        &["config", "print", "--config", server.to_str().unwrap()],
        &[
            ("SDP_AGENT_TOKEN", "sup3rs3cret"),
            ("SDP_SESSION_TTL", "2h"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("agent_token = \"[REDACTED]\""), "{out}");
    assert!(!out.contains("sup3rs3cret"), "{out}");
    assert!(out.contains("session_ttl = \"2h\""), "{out}");
    assert!(out.contains("listen = \"127.0.0.1:9000\""), "{out}");

    let agent = dir.path().join("agent.toml");
    std::fs::write(
        &agent,
        "server = \"ws://127.0.0.1:9000/ws/agent\"\nrole = \"micro\"\nruntime = \"process\"\n",
    )
    .unwrap();
    let (code, out, err) = sdp(
        &["config", "print", "--config", agent.to_str().unwrap()],
        &[("SDP_TOKEN", "t0ps3cret")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("token = \"[REDACTED]\""), "{out}");
    assert!(!out.contains("t0ps3cret"), "{out}");
}

#[test]
fn an_unknown_config_key_is_a_usage_error_that_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:9000\"\nsesion_ttl = \"1h\"\n[git]\nprobe_repo = \"/r\"\n",
    )
    .unwrap();
    let (code, _, err) = sdp(
        &["config", "print", "--config", path.to_str().unwrap()],
        &[("SDP_AGENT_TOKEN", "x")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown config key `sesion_ttl`"), "{err}");

    let (code, _, err) = sdp(
        &["server", "--config", path.to_str().unwrap()],
        &[("SDP_AGENT_TOKEN", "x")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("sesion_ttl"), "{err}");
}

#[test]
fn bad_usage_exits_with_status_2() {
    let (code, _, err) = sdp(&["no-such-command"], &[]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = sdp(&["server", "--config", "/nonexistent/sdp.toml"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/nonexistent/sdp.toml"), "{err}");
}

#[test]
fn a_server_whose_probe_repository_asks_no_password_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.toml");
    let data = dir.path().join("data");
    std::fs::write(
        &path,
        format!("listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[git]\nprobe_repo = \"/srv/git/probe.git\"\n", data.display()),
    )
    .unwrap();
    let (code, _, err) = sdp(
        &["server", "--config", path.to_str().unwrap()],
        &[("SDP_AGENT_TOKEN", "x")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("git.probe_repo"), "{err}");
}

#[test]
fn logs_are_json_with_sdp_log_format_and_never_coloured_in_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_file(dir.path());
    let args = ["config", "print", "--config", server.to_str().unwrap()];
    // An SDP_* variable that names no key is warned about: a log line to look at.
    let (code, _, err) = sdp(
        &args,
        &[
            ("SDP_AGENT_TOKEN", "x"),
            ("SDP_NO_SUCH_KEY", "1"),
            ("SDP_LOG_FORMAT", "json"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("SDP_NO_SUCH_KEY"))
        .expect(&err);
    let v: serde_json::Value = serde_json::from_str(line).expect(line);
    assert_eq!(v["level"], "WARN", "{line}");
    assert!(
        !err.contains("SDP_LOG_FORMAT"),
        "the log format is no config key to warn about: {err}"
    );

    let (code, _, err) = sdp(&args, &[("SDP_AGENT_TOKEN", "x"), ("SDP_NO_SUCH_KEY", "1")]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("WARN"), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "no colour codes in a pipe: {err:?}"
    );
}
