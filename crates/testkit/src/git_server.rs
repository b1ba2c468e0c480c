//! A real git smart-HTTP server for tests: `git http-backend` behind Basic auth, answering 401
//! with `WWW-Authenticate` to a wrong or missing password, as Bitbucket does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use base64::Engine;
use tokio::io::AsyncWriteExt;

use crate::shop::{SHOP_SERVICES, shop_files};

/// Repositories only some users may read, as Bitbucket's permissions say: name to users.
type Grants = Arc<Mutex<HashMap<String, Vec<String>>>>;

#[derive(Clone)]
struct Shared {
    root: PathBuf,
    users: Arc<Mutex<HashMap<String, String>>>,
    grants: Grants,
    /// Per repository, the git commands that contacted it (see [`GitServer::contacts`]).
    contacts: Arc<Mutex<HashMap<String, usize>>>,
}

pub struct GitServer {
    pub addr: SocketAddr,
    pub root: PathBuf,
    users: Arc<Mutex<HashMap<String, String>>>,
    grants: Grants,
    contacts: Arc<Mutex<HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GitServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GitServer {
    /// Serves the bare repositories under `root` on a free loopback port.
    pub async fn start(root: &Path) -> GitServer {
        GitServer::start_on(root, std::net::Ipv4Addr::LOCALHOST.into()).await
    }

    /// Serves the bare repositories under `root` on a free port of `ip`, an address of this
    /// host (the gateway of a Docker network, for agents in containers).
    pub async fn start_on(root: &Path, ip: std::net::IpAddr) -> GitServer {
        std::fs::create_dir_all(root).unwrap();
        let shared = Shared {
            root: root.to_owned(),
            users: Arc::default(),
            grants: Arc::default(),
            contacts: Arc::default(),
        };
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        GitServer {
            addr,
            root: root.to_owned(),
            users: shared.users,
            grants: shared.grants,
            contacts: shared.contacts,
            task,
        }
    }

    /// From now on only `users` may read repository `name`; the others get 403, as from
    /// Bitbucket for a repository they have no permission on.
    pub fn grant_only(&self, name: &str, users: &[&str]) {
        self.grants.lock().unwrap().insert(
            name.to_owned(),
            users.iter().map(|u| (*u).to_owned()).collect(),
        );
    }

    pub fn add_user(&self, user: &str, password: &str) {
        self.users
            .lock()
            .unwrap()
            .insert(user.to_owned(), password.to_owned());
    }

    /// The clone URL of `name` (no credentials in it, as in production).
    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{name}.git", self.addr)
    }

    pub fn repo_path(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.git"))
    }

    /// Creates a bare repository `name` whose branches each hold a `message.txt`.
    pub fn create_repo(&self, name: &str, branches: &[&str]) {
        self.create_repo_with(name, branches, |branch| {
            vec![("message.txt".into(), format!("{name} on {branch}\n"))]
        });
    }

    /// Creates a bare repository `name` whose branch `b` holds the files `files(b)`, each
    /// branch starting from `main`.
    pub fn create_repo_with(
        &self,
        name: &str,
        branches: &[&str],
        files: impl Fn(&str) -> Vec<(String, String)>,
    ) {
        let bare = self.repo_path(name);
        let work = self.root.join(format!(".{name}.work"));
        run_git(
            &self.root,
            &["init", "-q", "--bare", "-b", "main", bare.to_str().unwrap()],
        );
        run_git(
            &self.root,
            &["init", "-q", "-b", "main", work.to_str().unwrap()],
        );
        for (i, branch) in branches.iter().enumerate() {
            if i > 0 {
                run_git(&work, &["checkout", "-q", "-b", branch, "main"]);
            }
            for (path, content) in files(branch) {
                let path = work.join(path);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, content).unwrap();
            }
            run_git(&work, &["add", "."]);
            run_git(
                &work,
                &["commit", "-q", "-m", &format!("{name} on {branch}")],
            );
            run_git(
                &work,
                &[
                    "push",
                    "-q",
                    bare.to_str().unwrap(),
                    &format!("HEAD:refs/heads/{branch}"),
                ],
            );
        }
        std::fs::remove_dir_all(&work).unwrap();
    }

    /// Creates repository `name` of the kit's catalog with its branches: `orders` (a Go
    /// service on `main`, `feature/x`, `release/1.0`, `broken` and `unhealthy`), `billing` (a
    /// Go service on `main` and `feature/y`), `payments` and `stuck` (a `message.txt` on
    /// `main`), `chatty` and `steady` (the log benchmark's emitter on `main`), `talker` (a
    /// service that prints while it serves, on `main`), `shop`, `shop-b` and `shop-c` (the
    /// realistic Go service of [`crate::shop`] on `main`, its revision their name).
    pub fn create_catalog_repo(&self, name: &str) {
        match name {
            "orders" => self.create_repo_with(
                name,
                &["main", "feature/x", "release/1.0", "broken", "unhealthy"],
                |branch| go_service(name, branch),
            ),
            "billing" => self.create_repo_with(name, &["main", "feature/y"], |branch| {
                go_service(name, branch)
            }),
            "payments" | STUCK_REPO => self.create_repo(name, &["main"]),
            "chatty" | "steady" => self.create_repo_with(name, &["main"], |_| {
                vec![("emit.py".into(), STEADY_EMITTER.into())]
            }),
            "talker" => {
                self.create_repo_with(name, &["main"], |_| vec![("talk.py".into(), TALKER.into())])
            }
            "api-gateway" => self.create_repo_with(name, &["main", "add-header"], go_gateway),
            shop if SHOP_SERVICES.contains(&shop) => {
                self.create_repo_with(name, &["main"], |_| shop_files(name))
            }
            other => panic!(
                "{other} is no repository of the kit's catalog (orders, billing, payments, stuck, chatty, steady, talker, api-gateway, shop, shop-b, shop-c): create it with create_repo"
            ),
        }
    }

    /// Adds a commit to `branch` of `name` that changes `message.txt`.
    pub fn push_change(&self, name: &str, branch: &str, message: &str) {
        self.push_file(name, branch, "message.txt", message);
    }

    /// Adds a commit to `branch` of `name` that writes `content` to `path`; returns the new
    /// tip.
    pub fn push_file(&self, name: &str, branch: &str, path: &str, content: &str) -> String {
        let work = self.root.join(format!(".{name}.change"));
        let _ = std::fs::remove_dir_all(&work);
        run_git(
            &self.root,
            &[
                "clone",
                "-q",
                "-b",
                branch,
                self.repo_path(name).to_str().unwrap(),
                work.to_str().unwrap(),
            ],
        );
        std::fs::write(work.join(path), content).unwrap();
        run_git(&work, &["add", path]);
        run_git(&work, &["commit", "-q", "-m", &format!("change {path}")]);
        run_git(&work, &["push", "-q", "origin", branch]);
        std::fs::remove_dir_all(&work).unwrap();
        self.heads(name)
            .into_iter()
            .find(|(b, _)| b == branch)
            .map(|(_, commit)| commit)
            .expect("the branch just pushed")
    }

    /// How many git commands have contacted repository `name` (a login's probe, a fetch):
    /// each begins with a request for the refs without credentials, which git sends only
    /// once the 401 asks for them.
    pub fn contacts(&self, name: &str) -> usize {
        self.contacts
            .lock()
            .unwrap()
            .get(name)
            .copied()
            .unwrap_or(0)
    }

    /// What `git ls-remote --heads` of the bare repository says, as (branch, commit) pairs.
    pub fn heads(&self, name: &str) -> Vec<(String, String)> {
        heads_of(&self.repo_path(name))
    }
}

pub fn heads_of(repo: &Path) -> Vec<(String, String)> {
    let out = Command::new("git")
        .args(["ls-remote", "--heads"])
        .arg(repo)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut heads: Vec<(String, String)> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (sha, r) = l.split_once('\t')?;
            Some((r.strip_prefix("refs/heads/")?.to_owned(), sha.to_owned()))
        })
        .collect();
    heads.sort();
    heads
}

pub fn run_git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .current_dir(dir)
        .args([
            "-c",
            "user.name=Test",
            "-c",
            "user.email=test@example.invalid",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn authorized(shared: &Shared, headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    let users = shared.users.lock().unwrap();
    (users.get(user).map(String::as_str) == Some(password)).then(|| user.to_owned())
}

/// The files of a real Go service for branch `branch`: it answers every path with
/// `<name> on <branch> in <sandbox>`, and `/healthz` with ok. Under its route `/<name>` it
/// also has `headers` (what it was sent and from where, as JSON), `slow?ms=N`, `upload` (the body's size and
/// SHA-256), `download?mb=N`, `upgrade` (switches to a protocol `echo` that sends back every byte), and
/// `call?path=P` (GET P through the gateway, passing on
/// `X-SDP-Sandbox` as a service in a sandbox should). Branch `broken` does not compile, and
/// branch `unhealthy` answers 500 on `/healthz`.
pub fn go_service(name: &str, branch: &str) -> Vec<(String, String)> {
    let health_status = if branch == "unhealthy" { 500 } else { 200 };
    let broken = if branch == "broken" {
        "this is not Go\n"
    } else {
        ""
    };
    let main = format!(
        r#"package main

import (
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"time"
)

{broken}
func main() {{
	http.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {{
		w.WriteHeader({health_status})
		fmt.Fprintln(w, "health")
	}})
	http.HandleFunc("/{name}/headers", func(w http.ResponseWriter, r *http.Request) {{
		json.NewEncoder(w).Encode(map[string]interface{{}}{{"from": "{name} on {branch}", "host": r.Host, "remote": r.RemoteAddr, "headers": r.Header}})
	}})
	http.HandleFunc("/{name}/slow", func(w http.ResponseWriter, r *http.Request) {{
		ms, _ := strconv.Atoi(r.URL.Query().Get("ms"))
		time.Sleep(time.Duration(ms) * time.Millisecond)
		fmt.Fprintf(w, "{name} on {branch} after %dms\n", ms)
	}})
	http.HandleFunc("/{name}/upload", func(w http.ResponseWriter, r *http.Request) {{
		h := sha256.New()
		n, err := io.Copy(h, r.Body)
		if err != nil {{
			w.WriteHeader(500)
			fmt.Fprintln(w, err)
			return
		}}
		fmt.Fprintf(w, "%d %x\n", n, h.Sum(nil))
	}})
	http.HandleFunc("/{name}/download", func(w http.ResponseWriter, r *http.Request) {{
		mb, _ := strconv.Atoi(r.URL.Query().Get("mb"))
		chunk := make([]byte, 1<<20)
		for i := range chunk {{
			chunk[i] = byte(i % 251)
		}}
		for i := 0; i < mb; i++ {{
			w.Write(chunk)
		}}
	}})
	http.HandleFunc("/{name}/upgrade", func(w http.ResponseWriter, r *http.Request) {{
		conn, buf, err := w.(http.Hijacker).Hijack()
		if err != nil {{
			return
		}}
		defer conn.Close()
		buf.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
		buf.Flush()
		io.Copy(conn, buf)
	}})
	http.HandleFunc("/{name}/call", func(w http.ResponseWriter, r *http.Request) {{
		req, _ := http.NewRequest("GET", os.Getenv("SDP_GATEWAY_URL")+r.URL.Query().Get("path"), nil)
		if s := r.Header.Get("X-SDP-Sandbox"); s != "" {{
			req.Header.Set("X-SDP-Sandbox", s)
		}}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {{
			w.WriteHeader(502)
			fmt.Fprintln(w, err)
			return
		}}
		defer resp.Body.Close()
		w.Header().Set("X-Inner-Route", resp.Header.Get("X-SDP-Route"))
		io.Copy(w, resp.Body)
	}})
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {{
		fmt.Fprintf(w, "{name} on {branch} in %s\n", os.Getenv("SDP_SANDBOX"))
	}})
	fmt.Println("{name} listening on", os.Getenv("PORT"))
	fmt.Fprintln(os.Stderr, "{name} says hello on stderr")
	if err := http.ListenAndServe(":"+os.Getenv("PORT"), nil); err != nil {{
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}}
}}
"#
    );
    vec![
        (
            "go.mod".into(),
            format!("module example.com/{name}\n\ngo 1.19\n"),
        ),
        ("main.go".into(), main),
        ("message.txt".into(), format!("{name} on {branch}\n")),
    ]
}

/// The files of the company's API gateway for branch `branch`, a real Go reverse proxy: it
/// routes by `config/routes.json` (SPEC §5's routes file, longest prefix first), reads it
/// again on SIGHUP, answers `/_gateway` with what it loaded (generation, loads, routes) and a
/// sandbox's service that is down with 503. Branch `add-header` adds
/// `X-Company-Gateway: add-header` to every answer. `routes.tmpl` renders the same JSON, for
/// a catalog entry with `routes_format = "template"`.
pub fn go_gateway(branch: &str) -> Vec<(String, String)> {
    let header = if branch == "add-header" {
        "w.Header().Set(\"X-Company-Gateway\", \"add-header\")"
    } else {
        ""
    };
    let main = format!(
        r#"package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
)

type route struct {{
	Prefix   string  `json:"prefix"`
	Service  string  `json:"service"`
	Target   string  `json:"target"`
	Upstream *string `json:"upstream"`
	State    string  `json:"state,omitempty"`
}}

type table struct {{
	Sandbox    string  `json:"sandbox"`
	Generation uint64  `json:"generation"`
	Routes     []route `json:"routes"`
}}

var (
	mu      sync.RWMutex
	current table
	loads   int
)

func load() {{
	data, err := os.ReadFile("config/routes.json")
	if err != nil {{
		fmt.Fprintln(os.Stderr, "cannot read the routes:", err)
		return
	}}
	var t table
	if err := json.Unmarshal(data, &t); err != nil {{
		fmt.Fprintln(os.Stderr, "bad routes:", err)
		return
	}}
	mu.Lock()
	current = t
	loads++
	n := loads
	mu.Unlock()
	fmt.Printf("loaded %d routes of generation %d (load %d)\n", len(t.Routes), t.Generation, n)
}}

func matches(prefix, path string) bool {{
	p := strings.TrimSuffix(prefix, "/")
	return p == "" || path == p || strings.HasPrefix(path, p+"/")
}}

func main() {{
	load()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	go func() {{
		for range hup {{
			load()
		}}
	}}()
	http.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {{
		fmt.Fprintln(w, "ok")
	}})
	http.HandleFunc("/_gateway", func(w http.ResponseWriter, r *http.Request) {{
		mu.RLock()
		defer mu.RUnlock()
		json.NewEncoder(w).Encode(map[string]interface{{}}{{"sandbox": current.Sandbox, "generation": current.Generation, "loads": loads, "routes": current.Routes}})
	}})
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {{
		{header}
		mu.RLock()
		t := current
		mu.RUnlock()
		for _, rt := range t.Routes {{
			if !matches(rt.Prefix, r.URL.Path) {{
				continue
			}}
			if rt.Upstream == nil {{
				w.WriteHeader(503)
				fmt.Fprintf(w, "%s is %s\n", rt.Service, rt.State)
				return
			}}
			u, err := url.Parse(*rt.Upstream)
			if err != nil {{
				w.WriteHeader(502)
				fmt.Fprintln(w, err)
				return
			}}
			w.Header().Set("X-Gateway-Target", rt.Target)
			httputil.NewSingleHostReverseProxy(u).ServeHTTP(w, r)
			return
		}}
		w.WriteHeader(404)
		fmt.Fprintln(w, "the company gateway has no route for", r.URL.Path)
	}})
	fmt.Println("gateway on {branch} listening on", os.Getenv("PORT"))
	if err := http.ListenAndServe(":"+os.Getenv("PORT"), nil); err != nil {{
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}}
}}
"#
    );
    let template = r#"{"sandbox": "{{ sandbox }}", "generation": {{ generation }}, "routes": [{% for r in routes %}{% if not loop.first %}, {% endif %}{"prefix": "{{ r.prefix }}", "service": "{{ r.service }}", "target": "{{ r.target }}", "upstream": {% if r.upstream %}"{{ r.upstream }}"{% else %}null{% endif %}, "state": "{{ r.state or '' }}"}{% endfor %}]}
"#;
    vec![
        (
            "go.mod".into(),
            "module example.com/gateway\n\ngo 1.19\n".into(),
        ),
        ("main.go".into(), main),
        ("routes.tmpl".into(), template.into()),
    ]
}

/// Prints `rate` lines a second for `seconds` seconds, in bursts of 100.
pub const STEADY_EMITTER: &str = r#"import sys, time
rate, seconds = int(sys.argv[1]), float(sys.argv[2])
start = time.monotonic()
for i in range(int(rate * seconds)):
    sys.stdout.write(f"line {i} of a steady build\n")
    if i % 100 == 99:
        sys.stdout.flush()
        delay = start + (i + 1) / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
sys.stdout.flush()
"#;

/// Serves `talker on <SDP_SANDBOX>` on every path of `PORT`, and prints `tick N` every 20 ms
/// (`TICK_SECONDS`, if set) to stdout, flushed. SIGPIPE is left at its default, so a write to a pipe nobody reads
/// ends it, as it does most programs.
pub const TALKER: &str = r#"import os, signal, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
signal.signal(signal.SIGPIPE, signal.SIG_DFL)

class Answer(BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"talker on {os.environ['SDP_SANDBOX']}\n".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

def tick():
    i = 0
    pause = float(os.environ.get("TICK_SECONDS", "0.02"))
    while True:
        sys.stdout.write(f"tick {i}\n")
        sys.stdout.flush()
        i += 1
        if pause:
            time.sleep(pause)

threading.Thread(target=tick, daemon=True).start()
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Answer).serve_forever()
"#;

/// Repositories under this name never answer, like a git server that hangs.
pub const STUCK_REPO: &str = "stuck";

async fn handle(State(shared): State<Shared>, req: Request) -> Response {
    let path = req.uri().path().trim_start_matches('/');
    let repo = path
        .split_once(".git/")
        .map_or(path, |(name, _)| name)
        .to_owned();
    if req.uri().path().ends_with("/info/refs")
        && !req.headers().contains_key(header::AUTHORIZATION)
    {
        *shared
            .contacts
            .lock()
            .unwrap()
            .entry(repo.clone())
            .or_default() += 1;
    }
    if req.uri().path().starts_with(&format!("/{STUCK_REPO}.git/")) {
        tokio::time::sleep(std::time::Duration::from_secs(600)).await;
    }
    let Some(user) = authorized(&shared, req.headers()) else {
        return Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header(header::WWW_AUTHENTICATE, "Basic realm=\"git\"")
            .body(Body::from("Unauthorized\n"))
            .unwrap();
    };
    let denied = shared
        .grants
        .lock()
        .unwrap()
        .get(&repo)
        .is_some_and(|allowed| !allowed.contains(&user));
    if denied {
        return Response::builder()
            .status(StatusCode::FORBIDDEN)
            .body(Body::from("Forbidden\n"))
            .unwrap();
    }
    let (parts, body) = req.into_parts();
    let body: Bytes = axum::body::to_bytes(body, 256 << 20).await.unwrap();
    let header = |name: header::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let mut child = tokio::process::Command::new("git")
        .arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", &shared.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("PATH_INFO", parts.uri.path())
        .env("QUERY_STRING", parts.uri.query().unwrap_or(""))
        .env("CONTENT_TYPE", header(header::CONTENT_TYPE))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", header(header::CONTENT_ENCODING))
        .env(
            "GIT_PROTOCOL",
            header(header::HeaderName::from_static("git-protocol")),
        )
        .env("REMOTE_USER", user)
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&body).await;
    });
    let out = child.wait_with_output().await.unwrap();
    let _ = writer.await;
    cgi_response(&out.stdout)
}

/// Turns CGI output (headers, a blank line, the body) into a response.
fn cgi_response(raw: &[u8]) -> Response {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4))
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2)));
    let Some((end, sep)) = split else {
        return Response::builder()
            .status(StatusCode::BAD_GATEWAY)
            .body(Body::from("bad CGI output"))
            .unwrap();
    };
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut builder = Response::builder().status(StatusCode::OK);
    for line in head.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code: u16 = value
                .split_whitespace()
                .next()
                .and_then(|c| c.parse().ok())
                .unwrap_or(500);
            builder = builder.status(code);
        } else if let Ok(v) = HeaderValue::from_str(value) {
            builder = builder.header(name, v);
        }
    }
    builder.body(Body::from(raw[end + sep..].to_vec())).unwrap()
}
