//! Shipping: `deploy/` (example configs, systemd units, the nginx site and block) checked by
//! the tools that will read them (`sdp config print`, `systemd-analyze verify`, `nginx -t`),
//! and `scripts/deploy.sh` run against real `sshd` processes on loopback, each "host" with an
//! install root of its own. The only stand-in is `systemctl`, which records its calls, since
//! no systemd runs here; ssh, nginx, systemd-sysusers and the files are real.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{SDP, run_sdp};

/// The repository's root, which holds `deploy/` and `scripts/`.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn deploy_dir() -> PathBuf {
    repo().join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A file's SHA-256 by `sha256sum`, as deploy.sh checks it (and much faster than hashing a
/// large binary in a test built without optimisation).
fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(
        out.status.success(),
        "sha256sum {}: {out:?}",
        path.display()
    );
    String::from_utf8_lossy(&out.stdout)[..64].to_owned()
}

/// Whether the programs a test needs are here. Without them the test is skipped, saying what
/// to install; under `CI=true` it fails, since `scripts/test.sh` installs them.
fn have(programs: &[&str]) -> bool {
    let missing: Vec<&str> = programs
        .iter()
        .copied()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let how = format!(
        "{} missing: scripts/test.sh installs them (openssh-server, nginx, systemd)",
        missing.join(", ")
    );
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{how}");
    eprintln!("skipping: {how}");
    false
}

/// [`have`], and root, which the ssh tests need (they start sshd and write install roots
/// owned by others): without it the test is skipped, and fails under `CI=true`.
fn have_as_root(programs: &[&str]) -> bool {
    if !nix::unistd::geteuid().is_root() {
        let how = "the ssh deploy tests need root";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{how}");
        eprintln!("skipping: {how}");
        return false;
    }
    have(programs)
}

/// The block that `deploy.sh` splices into a site, as it renders it: the lines of
/// `sdp-locations.conf` indented by four spaces between the marker lines.
fn rendered_block() -> String {
    let mut out = String::from(
        "    # BEGIN sdp: scripts/deploy.sh replaces what is between these two lines\n",
    );
    for line in read(&deploy_dir().join("nginx/sdp-locations.conf")).lines() {
        if line.is_empty() {
            out.push('\n');
        } else {
            out.push_str(&format!("    {line}\n"));
        }
    }
    out.push_str("    # END sdp\n");
    out
}

/// The lines from `# BEGIN sdp` to `# END sdp` of a site, markers included.
fn marked_section(site: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in site.lines() {
        if line.trim_start().starts_with("# BEGIN sdp") {
            inside = true;
        }
        if inside {
            out.push_str(line);
            out.push('\n');
        }
        if line.trim_start().starts_with("# END sdp") {
            inside = false;
        }
    }
    out
}

/// A self-signed certificate and key for `name`, as PEM files in `dir`.
fn certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (crt, pem) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&crt, cert.pem()).unwrap();
    std::fs::write(&pem, key.serialize_pem()).unwrap();
    (crt, pem)
}

/// `nginx -t` on a main file of our own that includes `site`, its pid and log in `dir`.
fn nginx_t(dir: &Path, include: &str) -> (bool, String) {
    let conf = dir.join("nginx-test.conf");
    std::fs::write(
        &conf,
        format!(
            "pid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log;\nevents {{}}\nhttp {{\n    include {include};\n}}\n",
            dir = dir.display()
        ),
    )
    .unwrap();
    let out = Command::new("/usr/sbin/nginx")
        .arg("-t")
        .arg("-c")
        .arg(&conf)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify_with_their_hardening() {
    if !have(&["/usr/bin/systemd-analyze"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "sdp-server.service",
        "sdp-agent-gateway.service",
        "sdp-agent-micro.service",
    ] {
        let unit = read(&deploy_dir().join("systemd").join(name));
        for key in [
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "NoNewPrivileges=yes",
            "ExecStart=/usr/local/bin/sdp ",
            "StateDirectory=sdp/",
        ] {
            assert!(unit.contains(key), "{name} lacks {key}");
        }
        let env_file = format!(
            "EnvironmentFile=-/etc/sdp/{}.env",
            name.trim_start_matches("sdp-").trim_end_matches(".service")
        );
        assert!(unit.contains(&env_file), "{name} lacks {env_file}");
        if name == "sdp-agent-micro.service" {
            // Root, to switch to run_as; its Docker access is stated, not implied.
            assert!(!unit.contains("\nUser="), "{name} must run as root");
            assert!(unit.contains("/run/docker.sock") && unit.contains("docker.service"));
        } else {
            assert!(unit.contains("\nUser=sdp\n"), "{name} must run as sdp");
        }
        // verify checks that ExecStart's program exists: the unit as it is, pointed at the
        // binary under test instead of where deploy.sh installs it.
        let copy = dir.path().join(name);
        std::fs::write(
            &copy,
            unit.replace(
                "ExecStart=/usr/local/bin/sdp ",
                &format!("ExecStart={SDP} "),
            ),
        )
        .unwrap();
        let out = Command::new("/usr/bin/systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // An unknown key or a bad value is only a warning, so any output is a failure.
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "systemd-analyze verify {name}: {stderr}"
        );
    }
}

#[test]
fn the_reference_nginx_site_passes_nginx_t_and_holds_the_block_deploy_sh_splices() {
    if !have(&["/usr/sbin/nginx"]) {
        return;
    }
    let site = read(&deploy_dir().join("nginx/sdp.conf"));
    assert_eq!(
        marked_section(&site),
        rendered_block(),
        "deploy/nginx/sdp.conf must hold sdp-locations.conf between its markers, as deploy.sh writes it"
    );
    let block = read(&deploy_dir().join("nginx/sdp-locations.conf"));
    let ws = &block[block.find("location /ws/").unwrap()..];
    for directive in [
        "proxy_http_version 1.1;",
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection \"upgrade\";",
        "proxy_read_timeout 1d;",
        "X-Forwarded-For $proxy_add_x_forwarded_for;",
    ] {
        assert!(ws.contains(directive), "/ws/ lacks {directive}");
    }
    assert!(block.contains("location /api/") && block.contains("location = /"));
    assert!(
        !block.contains("location /metrics"),
        "/metrics stays off the public side"
    );
    assert!(site.contains("server_name *.sandbox.example.com;"));
    assert!(site.contains("proxy_pass http://127.0.0.1:8081;"));
    assert!(site.contains("ssl_certificate "));

    // The site as shipped, with its certificate paths pointing at certificates made here.
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    std::fs::create_dir(&tls).unwrap();
    for name in ["sdp.example.com", "sandbox.example.com"] {
        certificate(&tls, name);
    }
    let copy = dir.path().join("sdp.conf");
    std::fs::write(
        &copy,
        site.replace("/etc/nginx/tls/", &format!("{}/", tls.display())),
    )
    .unwrap();
    assert_ne!(read(&copy), site, "the certificate paths were not found");
    let (ok, stderr) = nginx_t(dir.path(), &copy.display().to_string());
    assert!(ok, "nginx -t: {stderr}");
}

#[test]
fn the_example_configs_are_accepted_by_sdp_config_print() {
    for (file, kind, token) in [
        ("server.toml", "server", "SDP_AGENT_TOKEN"),
        ("agent-gateway.toml", "agent", "SDP_TOKEN"),
        ("agent-micro.toml", "agent", "SDP_TOKEN"),
    ] {
        let path = deploy_dir().join("config").join(file);
        let (code, stdout, stderr) = run_sdp(
            &[
                "config",
                "print",
                "--config",
                path.to_str().unwrap(),
                "--kind",
                kind,
            ],
            &[(token, "an-example-token-of-some-length")],
        );
        assert_eq!(code, 0, "{file}: {stderr}");
        assert!(!stdout.contains("an-example-token"), "{file}: {stdout}");
    }
    // The env files are templates: the token's line is there, commented, with no value.
    for (file, token) in [
        ("server.env", "#SDP_AGENT_TOKEN=\n"),
        ("agent-gateway.env", "#SDP_TOKEN=\n"),
        ("agent-micro.env", "#SDP_TOKEN=\n"),
    ] {
        let text = read(&deploy_dir().join("config").join(file));
        assert!(text.contains(token), "{file}");
        assert!(
            text.lines().all(|l| l.is_empty() || l.starts_with('#')),
            "{file} must set nothing"
        );
    }
}

#[test]
fn deploy_sh_names_no_address_and_refuses_a_password_variable() {
    let script = read(&repo().join("scripts/deploy.sh"));
    let ipv4 = script
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .find(|w| {
            let parts: Vec<&str> = w.split('.').collect();
            parts.len() == 4 && parts.iter().all(|p| p.parse::<u8>().is_ok())
        });
    assert_eq!(ipv4, None, "deploy.sh names an address");
    assert!(!script.contains("sshpass"));

    let dir = tempfile::tempdir().unwrap();
    let inventory = dir.path().join("inventory");
    std::fs::write(&inventory, "somewhere.invalid micro\n").unwrap();
    let out = Command::new("bash")
        .arg(repo().join("scripts/deploy.sh"))
        .arg(&inventory)
        .env("SSHPASS", "hunter2")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("SSHPASS is set") && !stderr.contains("hunter2"),
        "{stderr}"
    );
}

/// A free port on loopback, for an sshd that binds it next.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The operator's side of ssh: a key, known host keys and an ssh config naming them.
struct Keys {
    dir: PathBuf,
    client: PathBuf,
    host: PathBuf,
    known_hosts: PathBuf,
    ssh_config: PathBuf,
}

impl Keys {
    fn new(dir: &Path) -> Keys {
        let keygen = |file: &Path| {
            let out = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "sdp-test", "-f"])
                .arg(file)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
        };
        let (client, host) = (dir.join("client_key"), dir.join("host_key"));
        keygen(&client);
        keygen(&host);
        let known_hosts = dir.join("known_hosts");
        let ssh_config = dir.join("ssh_config");
        std::fs::write(
            &ssh_config,
            format!(
                "Host *\n  User root\n  IdentityFile {}\n  IdentitiesOnly yes\n  UserKnownHostsFile {}\n  StrictHostKeyChecking yes\n",
                client.display(),
                known_hosts.display()
            ),
        )
        .unwrap();
        Keys {
            dir: dir.to_owned(),
            client,
            host,
            known_hosts,
            ssh_config,
        }
    }
}

/// A real sshd on a loopback port of its own, logging to a file. Its sessions get a PATH
/// whose first folder holds a recording `systemctl` stand-in for this host.
struct Sshd {
    port: u16,
    child: Child,
    log: PathBuf,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sshd {
    /// `authorize_key`: whether the operator's key is authorized; without it the host offers
    /// only passwords, which deploy.sh must never use.
    fn start(keys: &Keys, name: &str, authorize_key: bool, systemctl_log: &Path) -> Sshd {
        std::fs::create_dir_all("/run/sshd").unwrap();
        let dir = keys.dir.join(name);
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let systemctl = bin.join("systemctl");
        std::fs::write(
            &systemctl,
            format!(
                "#!/bin/sh\n# A recording stand-in for systemctl: no systemd runs in the test.\necho \"{name} $*\" >>{}\n",
                systemctl_log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&systemctl, std::fs::Permissions::from_mode(0o755)).unwrap();
        let authorized = dir.join("authorized_keys");
        let key = read(&keys.client.with_extension("pub"));
        std::fs::write(&authorized, if authorize_key { key } else { String::new() }).unwrap();
        let port = free_port();
        let passwords = if authorize_key { "no" } else { "yes" };
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nPidFile {dir}/sshd.pid\n\
                 AuthorizedKeysFile {authorized}\nPubkeyAuthentication yes\n\
                 PasswordAuthentication {passwords}\nKbdInteractiveAuthentication {passwords}\n\
                 PermitRootLogin yes\nStrictModes no\nUsePAM no\n\
                 SetEnv PATH={bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
                 LogLevel VERBOSE\n",
                host = keys.host.display(),
                dir = dir.display(),
                authorized = authorized.display(),
                bin = bin.display(),
            ),
        )
        .unwrap();
        let log = dir.join("sshd.log");
        let child = Command::new("/usr/sbin/sshd")
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut sshd = Sshd { port, child, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = sshd.child.try_wait() {
                panic!("sshd exited ({status}): {}", read(&sshd.log));
            }
            assert!(
                Instant::now() < deadline,
                "sshd did not listen: {}",
                read(&sshd.log)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let host_key = read(&keys.host.with_extension("pub"));
        let mut known = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&keys.known_hosts)
            .unwrap();
        writeln!(known, "[127.0.0.1]:{port} {}", host_key.trim()).unwrap();
        sshd
    }
}

/// Builds `dist/sdp-<version>-x86_64-linux.tar.gz` as scripts/build.sh lays it out: the
/// binary under test (with `extra` appended, to make a different build), this repository's
/// `deploy/` and SHA256SUMS over both.
fn release(dir: &Path, version: &str, extra: &[u8]) -> PathBuf {
    fn copy_dir(from: &Path, to: &Path, files: &mut Vec<PathBuf>, base: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &target, files, base);
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
                files.push(target.strip_prefix(base).unwrap().to_owned());
            }
        }
    }
    let name = format!("sdp-{version}-x86_64-linux");
    let stage = dir.join(format!("stage-{version}"));
    let top = stage.join(&name);
    std::fs::create_dir_all(&top).unwrap();
    std::fs::copy(SDP, top.join("sdp")).unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(top.join("sdp"))
        .unwrap()
        .write_all(extra)
        .unwrap();
    let mut files = vec![PathBuf::from("sdp")];
    copy_dir(&deploy_dir(), &top.join("deploy"), &mut files, &top);
    files.sort();
    let sums: String = files
        .iter()
        .map(|f| format!("{}  {}\n", sha256(&top.join(f)), f.display()))
        .collect();
    std::fs::write(top.join("SHA256SUMS"), sums).unwrap();
    let tarball = dir.join(format!("{name}.tar.gz"));
    let out = Command::new("tar")
        .args(["-I", "gzip -1", "-cf"])
        .arg(&tarball)
        .arg("-C")
        .arg(&stage)
        .arg(&name)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    std::fs::remove_dir_all(&stage).unwrap();
    tarball
}

/// What a tree holds: each path's mode, inode, change time and content checksum (or link
/// target). Equal snapshots mean nothing was written, replaced or created.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let what = if meta.is_dir() {
                walk(root, &path, out);
                "dir".to_owned()
            } else if meta.is_symlink() {
                std::fs::read_link(&path).unwrap().display().to_string()
            } else {
                sha256(&path)
            };
            out.insert(
                path.strip_prefix(root).unwrap().to_owned(),
                format!(
                    "{:o} {} {}.{} {what}",
                    meta.mode(),
                    meta.ino(),
                    meta.mtime(),
                    meta.mtime_nsec()
                ),
            );
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Watches the process list while deploy.sh runs: any command line holding one of `needles`
/// (a password tool, a secret) is kept.
struct ProcessWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProcessWatch {
    fn start(needles: Vec<String>) -> ProcessWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, found) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                    let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                        continue;
                    };
                    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                    if needles.iter().any(|n| cmdline.contains(n.as_str())) {
                        found.lock().unwrap().push(cmdline);
                    }
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        });
        ProcessWatch {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        self.seen.lock().unwrap().clone()
    }
}

/// One run of deploy.sh: its exit status and output (stdout and stderr, interleaved as
/// printed).
struct Run {
    code: Option<i32>,
    output: String,
}

/// Runs `scripts/deploy.sh ARGS` as an operator would, but with no terminal and no ssh agent,
/// and an askpass program that records being asked: it must never be.
fn deploy_sh(keys: &Keys, args: &[&str]) -> Run {
    let askpass = keys.dir.join("askpass");
    if !askpass.exists() {
        std::fs::write(
            &askpass,
            format!(
                "#!/bin/sh\necho asked >>{}\nexit 1\n",
                keys.dir.join("askpass-asked").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&askpass, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let log = keys.dir.join("deploy-output");
    let file = std::fs::File::create(&log).unwrap();
    let mut child = Command::new("bash")
        .arg(repo().join("scripts/deploy.sh"))
        .arg("--ssh-config")
        .arg(&keys.ssh_config)
        .args(args)
        .env_remove("SSH_AUTH_SOCK")
        .env("SSH_ASKPASS", &askpass)
        .env("SSH_ASKPASS_REQUIRE", "force")
        .env("DISPLAY", ":0")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("deploy.sh {args:?} did not finish in 300 s: {}", read(&log));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Run {
        code,
        output: read(&log),
    }
}

/// Two hosts as the original deployment had them: the control plane, the gateway agent and
/// nginx on one, a micro agent on the other.
struct Hosts {
    _dir: tempfile::TempDir,
    keys: Keys,
    a: Sshd,
    b: Sshd,
    root_a: PathBuf,
    root_b: PathBuf,
    systemctl_log: PathBuf,
    inventory: PathBuf,
}

impl Hosts {
    fn start() -> Hosts {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::new(dir.path());
        let systemctl_log = dir.path().join("systemctl.log");
        let a = Sshd::start(&keys, "a", true, &systemctl_log);
        let b = Sshd::start(&keys, "b", true, &systemctl_log);
        let (root_a, root_b) = (dir.path().join("root-a"), dir.path().join("root-b"));
        std::fs::create_dir_all(&root_b).unwrap();
        // Host a's nginx as its operator set it up: a TLS site of their own, which deploy.sh
        // only adds its block to, and a main file that includes it.
        let sites = root_a.join("etc/nginx/sites-available");
        std::fs::create_dir_all(&sites).unwrap();
        let tls = dir.path().join("tls");
        std::fs::create_dir(&tls).unwrap();
        let (crt, key) = certificate(&tls, "sdp.test");
        std::fs::write(
            sites.join("sdp"),
            format!(
                "server {{\n    listen 127.0.0.1:{port} ssl;\n    server_name sdp.test;\n    ssl_certificate {crt};\n    ssl_certificate_key {key};\n\n    location / {{\n        return 404;\n    }}\n}}\n",
                port = free_port(),
                crt = crt.display(),
                key = key.display()
            ),
        )
        .unwrap();
        std::fs::write(
            root_a.join("etc/nginx/nginx.conf"),
            format!(
                "pid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\nevents {{}}\nhttp {{\n    include {}/*;\n}}\n",
                sites.display(),
                d = dir.path().display()
            ),
        )
        .unwrap();
        let inventory = dir.path().join("inventory");
        std::fs::write(
            &inventory,
            format!(
                "# the gateway host, and a deploy host\n\
                 127.0.0.1 control,gateway,nginx port={} prefix={} nginx_site=/etc/nginx/sites-available/sdp\n\
                 \n127.0.0.1 micro port={} prefix={}   # the micro agent\n",
                a.port,
                root_a.display(),
                b.port,
                root_b.display()
            ),
        )
        .unwrap();
        Hosts {
            _dir: dir,
            keys,
            a,
            b,
            root_a,
            root_b,
            systemctl_log,
            inventory,
        }
    }

    fn run(&self, args: &[&str]) -> Run {
        let mut all = args.to_vec();
        all.push(self.inventory.to_str().unwrap());
        deploy_sh(&self.keys, &all)
    }

    /// Everything to read when an assertion fails.
    fn context(&self, run: &Run) -> String {
        format!(
            "deploy.sh exited {:?}:\n{}\n--- systemctl calls:\n{}\n--- sshd a:\n{}\n--- sshd b:\n{}",
            run.code,
            run.output,
            std::fs::read_to_string(&self.systemctl_log).unwrap_or_default(),
            read(&self.a.log),
            read(&self.b.log)
        )
    }

    fn systemctl_calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.systemctl_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn snapshots(&self) -> (BTreeMap<PathBuf, String>, BTreeMap<PathBuf, String>) {
        (snapshot(&self.root_a), snapshot(&self.root_b))
    }
}

/// The position of `call` among `calls`, which must hold it.
fn position(calls: &[String], call: &str) -> usize {
    calls
        .iter()
        .position(|c| c == call)
        .unwrap_or_else(|| panic!("no systemctl call `{call}` in {calls:#?}"))
}

/// The control plane is restarted before any agent, across hosts.
fn assert_restart_order(calls: &[String]) {
    let server = position(calls, "a restart sdp-server.service");
    let gateway = position(calls, "a restart sdp-agent-gateway.service");
    let micro = position(calls, "b restart sdp-agent-micro.service");
    assert!(server < gateway && server < micro, "{calls:#?}");
}

#[test]
fn deploy_sh_installs_upgrades_and_rolls_back_over_ssh_with_keys_only() {
    if !have_as_root(&["/usr/sbin/sshd", "/usr/bin/ssh", "/usr/sbin/nginx"]) {
        return;
    }
    let hosts = Hosts::start();
    let dist = hosts.keys.dir.join("dist");
    std::fs::create_dir(&dist).unwrap();
    let first = release(&dist, "0.1.0", b"");
    let second = release(&dist, "0.1.1", b"\nanother build\n");
    let first_sum = sha256(SDP.as_ref());
    let (root_a, root_b) = (&hosts.root_a, &hosts.root_b);

    // An operator put the gateway agent's token in place before the first deploy.
    let token = hex::encode(rand::random::<[u8; 16]>());
    let gateway_env = root_a.join("etc/sdp/agent-gateway.env");
    std::fs::create_dir_all(gateway_env.parent().unwrap()).unwrap();
    std::fs::write(&gateway_env, format!("SDP_TOKEN={token}\n")).unwrap();
    std::fs::set_permissions(&gateway_env, std::fs::Permissions::from_mode(0o600)).unwrap();
    let site = root_a.join("etc/nginx/sites-available/sdp");
    let site_before = read(&site);
    let watch = ProcessWatch::start(vec!["sshpass".into(), token.clone()]);

    // The first run installs everything.
    let run = hosts.run(&["--tarball", first.to_str().unwrap()]);
    let ctx = hosts.context(&run);
    assert_eq!(run.code, Some(0), "{ctx}");
    for root in [root_a, root_b] {
        let bin = root.join("usr/local/bin/sdp");
        assert_eq!(sha256(&bin), first_sum, "{ctx}");
        assert_eq!(std::fs::metadata(&bin).unwrap().mode() & 0o7777, 0o755);
        assert!(!root.join("usr/local/bin/sdp.previous").exists(), "{ctx}");
        assert!(!root.join("usr/local/bin/sdp.new").exists(), "{ctx}");
        assert!(!root.join("var/lib/sdp/restart-pending").exists(), "{ctx}");
    }
    for (root, from, to) in [
        (
            root_a,
            "systemd/sdp-server.service",
            "etc/systemd/system/sdp-server.service",
        ),
        (
            root_a,
            "systemd/sdp-agent-gateway.service",
            "etc/systemd/system/sdp-agent-gateway.service",
        ),
        (root_a, "config/server.toml", "etc/sdp/server.toml"),
        (
            root_a,
            "config/agent-gateway.toml",
            "etc/sdp/agent-gateway.toml",
        ),
        (root_a, "config/server.env", "etc/sdp/server.env"),
        (root_a, "sysusers/sdp.conf", "etc/sysusers.d/sdp.conf"),
        (
            root_b,
            "systemd/sdp-agent-micro.service",
            "etc/systemd/system/sdp-agent-micro.service",
        ),
        (
            root_b,
            "config/agent-micro.toml",
            "etc/sdp/agent-micro.toml",
        ),
        (root_b, "config/agent-micro.env", "etc/sdp/agent-micro.env"),
        (
            root_b,
            "sysusers/sdp-run.conf",
            "etc/sysusers.d/sdp-run.conf",
        ),
    ] {
        assert_eq!(
            read(&root.join(to)),
            read(&deploy_dir().join(from)),
            "{to}: {ctx}"
        );
    }
    for env in [
        root_a.join("etc/sdp/server.env"),
        root_b.join("etc/sdp/agent-micro.env"),
    ] {
        assert_eq!(
            std::fs::metadata(&env).unwrap().mode() & 0o777,
            0o600,
            "{}",
            env.display()
        );
    }
    assert_eq!(
        read(&gateway_env),
        format!("SDP_TOKEN={token}\n"),
        "a config was overwritten"
    );
    assert!(
        !root_b
            .join("etc/systemd/system/sdp-server.service")
            .exists(),
        "{ctx}"
    );
    // The users, made by the real systemd-sysusers in each root.
    for (root, user) in [(root_a, "sdp:"), (root_b, "sdp-run:")] {
        let passwd = read(&root.join("etc/passwd"));
        assert!(passwd.lines().any(|l| l.starts_with(user)), "{passwd}");
    }
    assert!(
        run.output
            .contains("/etc/sdp/server.env has no SDP_AGENT_TOKEN= line"),
        "{ctx}"
    );
    assert!(
        !run.output.contains("/etc/sdp/agent-gateway.env has no"),
        "{ctx}"
    );
    // The block is in the site once, nginx accepts the result, and the site as it was is kept.
    let spliced = read(&site);
    assert_eq!(spliced.matches("# BEGIN sdp").count(), 1, "{spliced}");
    assert_eq!(marked_section(&spliced), rendered_block());
    assert!(
        spliced.contains("return 404;"),
        "the operator's site is kept: {spliced}"
    );
    let backups: Vec<_> = std::fs::read_dir(root_a.join("var/backups/sdp"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(backups.len(), 1, "{backups:?}");
    assert_eq!(read(&backups[0]), site_before);
    let (ok, stderr) = nginx_t(&hosts.keys.dir, &site.display().to_string());
    assert!(ok, "{stderr}");
    let calls = hosts.systemctl_calls();
    assert_restart_order(&calls);
    assert!(position(&calls, "a daemon-reload") < position(&calls, "a restart sdp-server.service"));
    assert!(
        position(&calls, "b daemon-reload") < position(&calls, "b restart sdp-agent-micro.service")
    );
    position(
        &calls,
        "a enable sdp-server.service sdp-agent-gateway.service",
    );
    position(&calls, "a try-reload-or-restart nginx.service");

    // The second run finds nothing to do, and touches nothing.
    let before = hosts.snapshots();
    let run = hosts.run(&["--tarball", first.to_str().unwrap()]);
    let ctx = hosts.context(&run);
    assert_eq!(run.code, Some(0), "{ctx}");
    assert!(
        run.output
            .contains("nothing to do: every host is up to date"),
        "{ctx}"
    );
    assert_eq!(hosts.snapshots(), before, "{ctx}");
    assert_eq!(hosts.systemctl_calls(), calls, "no restart: {ctx}");

    // A new release replaces the binary by a rename, keeping the one before, and leaves the
    // operator's edited config alone.
    let server_toml = root_a.join("etc/sdp/server.toml");
    let mut edited = read(&server_toml);
    edited.push_str("# the operator's own line\n");
    std::fs::write(&server_toml, &edited).unwrap();
    let old_inode = std::fs::metadata(root_a.join("usr/local/bin/sdp"))
        .unwrap()
        .ino();
    let run = hosts.run(&["--tarball", second.to_str().unwrap()]);
    let ctx = hosts.context(&run);
    assert_eq!(run.code, Some(0), "{ctx}");
    let new_sum = {
        let built = hosts.keys.dir.join("second-build");
        std::fs::copy(SDP, &built).unwrap();
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&built)
            .unwrap();
        file.write_all(b"\nanother build\n").unwrap();
        sha256(&built)
    };
    for root in [root_a, root_b] {
        assert_eq!(sha256(&root.join("usr/local/bin/sdp")), new_sum, "{ctx}");
        assert_eq!(
            sha256(&root.join("usr/local/bin/sdp.previous")),
            first_sum,
            "{ctx}"
        );
        assert!(!root.join("usr/local/bin/sdp.new").exists());
    }
    let bin = std::fs::metadata(root_a.join("usr/local/bin/sdp")).unwrap();
    let previous = std::fs::metadata(root_a.join("usr/local/bin/sdp.previous")).unwrap();
    assert_eq!(
        previous.ino(),
        old_inode,
        "the old binary was written over, not renamed away"
    );
    assert_ne!(bin.ino(), old_inode);
    assert_eq!(read(&server_toml), edited, "a config was overwritten");
    assert_eq!(read(&site), spliced, "the block had not changed");
    let upgrade_calls = hosts.systemctl_calls()[calls.len()..].to_vec();
    assert_restart_order(&upgrade_calls);

    // A dry run prints what it would do and changes nothing.
    let before = hosts.snapshots();
    let calls = hosts.systemctl_calls();
    let run = hosts.run(&["--dry-run", "--tarball", first.to_str().unwrap()]);
    let ctx = hosts.context(&run);
    assert_eq!(run.code, Some(0), "{ctx}");
    assert!(
        run.output
            .contains("to do: binary /usr/local/bin/sdp: replace"),
        "{ctx}"
    );
    assert!(
        run.output.contains(
            "to do: restart sdp-server.service sdp-agent-gateway.service (control planes first"
        ),
        "{ctx}"
    );
    assert!(run.output.contains("dry run: nothing was changed"), "{ctx}");
    assert_eq!(hosts.snapshots(), before, "{ctx}");
    assert_eq!(hosts.systemctl_calls(), calls, "{ctx}");

    // A rollback puts the previous binary back, and restarts in the same order.
    let run = hosts.run(&["--rollback"]);
    let ctx = hosts.context(&run);
    assert_eq!(run.code, Some(0), "{ctx}");
    for root in [root_a, root_b] {
        assert_eq!(sha256(&root.join("usr/local/bin/sdp")), first_sum, "{ctx}");
        assert_eq!(
            sha256(&root.join("usr/local/bin/sdp.previous")),
            new_sum,
            "{ctx}"
        );
    }
    assert_restart_order(&hosts.systemctl_calls()[calls.len()..]);

    // A host with no previous binary: the rollback fails before it changes anything.
    let fresh = hosts.keys.dir.join("root-fresh");
    std::fs::create_dir(&fresh).unwrap();
    let inventory = hosts.keys.dir.join("inventory-fresh");
    std::fs::write(
        &inventory,
        format!(
            "127.0.0.1 micro port={} prefix={}\n",
            hosts.b.port,
            fresh.display()
        ),
    )
    .unwrap();
    let run = deploy_sh(&hosts.keys, &["--rollback", inventory.to_str().unwrap()]);
    assert_eq!(run.code, Some(1), "{}", run.output);
    assert!(
        run.output.contains("has no previous binary"),
        "{}",
        run.output
    );
    assert_eq!(snapshot(&fresh), BTreeMap::new());

    let seen = watch.finish();
    assert!(
        seen.is_empty(),
        "a password tool or the token in a command line: {seen:#?}"
    );
    assert!(
        !hosts.keys.dir.join("askpass-asked").exists(),
        "ssh asked for a password"
    );
}

#[test]
fn deploy_sh_fails_without_prompting_when_a_host_takes_no_key() {
    if !have_as_root(&["/usr/sbin/sshd", "/usr/bin/ssh"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new(dir.path());
    let systemctl_log = dir.path().join("systemctl.log");
    // This host offers passwords (and keyboard-interactive) but knows no key of ours.
    let sshd = Sshd::start(&keys, "passwords", false, &systemctl_log);
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let inventory = dir.path().join("inventory");
    std::fs::write(
        &inventory,
        format!(
            "127.0.0.1 micro port={} prefix={}\n",
            sshd.port,
            root.display()
        ),
    )
    .unwrap();
    let started = Instant::now();
    let run = deploy_sh(&keys, &["--rollback", inventory.to_str().unwrap()]);
    let ctx = format!("{}\n--- sshd:\n{}", run.output, read(&sshd.log));
    assert_eq!(run.code, Some(1), "{ctx}");
    assert!(
        run.output.contains("cannot log in to 127.0.0.1") && run.output.contains("with a key"),
        "{ctx}"
    );
    assert!(
        run.output.contains("Permission denied"),
        "ssh's own reason: {ctx}"
    );
    assert!(started.elapsed() < Duration::from_secs(60), "{ctx}");
    assert!(
        !dir.path().join("askpass-asked").exists(),
        "ssh asked for a password: {ctx}"
    );
    assert!(!std::fs::exists(&systemctl_log).unwrap());
    assert_eq!(snapshot(&root), BTreeMap::new());
}

#[test]
fn deploy_sh_puts_the_site_back_when_nginx_refuses_the_block() {
    if !have_as_root(&["/usr/sbin/sshd", "/usr/bin/ssh", "/usr/sbin/nginx"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new(dir.path());
    let systemctl_log = dir.path().join("systemctl.log");
    let sshd = Sshd::start(&keys, "nginx", true, &systemctl_log);
    // The operator's site already routes /api/ elsewhere: the block's `location /api/` is a
    // duplicate that nginx -t refuses.
    let root = dir.path().join("root");
    let sites = root.join("etc/nginx/sites-available");
    std::fs::create_dir_all(&sites).unwrap();
    let site = sites.join("default");
    std::fs::write(
        &site,
        "server {\n    listen 127.0.0.1:1;\n    location /api/ {\n        return 404;\n    }\n}\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/nginx/nginx.conf"),
        format!(
            "pid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\nevents {{}}\nhttp {{\n    include {}/*;\n}}\n",
            sites.display(),
            d = dir.path().display()
        ),
    )
    .unwrap();
    let before = read(&site);
    let inventory = dir.path().join("inventory");
    std::fs::write(
        &inventory,
        format!(
            "127.0.0.1 nginx port={} prefix={} nginx_site=/etc/nginx/sites-available/default\n",
            sshd.port,
            root.display()
        ),
    )
    .unwrap();
    let dist = dir.path().join("dist");
    std::fs::create_dir(&dist).unwrap();
    let tarball = release(&dist, "0.1.0", b"");
    let run = deploy_sh(
        &keys,
        &[
            "--tarball",
            tarball.to_str().unwrap(),
            inventory.to_str().unwrap(),
        ],
    );
    let ctx = format!("{}\n--- sshd:\n{}", run.output, read(&sshd.log));
    assert_eq!(run.code, Some(1), "{ctx}");
    assert!(
        run.output
            .contains("nginx -t refused /etc/nginx/sites-available/default")
            && run.output.contains("duplicate location"),
        "{ctx}"
    );
    assert_eq!(read(&site), before, "the site must be as it was: {ctx}");
    assert!(
        !std::fs::exists(&systemctl_log).unwrap(),
        "no reload: {ctx}"
    );
    assert!(
        !root.join("usr/local/bin/sdp").exists(),
        "the nginx role installs no binary"
    );
}
