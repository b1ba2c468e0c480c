//! Deploy time against doing it by hand (issue 16, goal 2), with the real binary, git server
//! and Go toolchain of the integration tests (their test kit, `sdp-testkit`) and the kit's
//! realistic Go service (`fixtures/shop`: 3,500 lines, its modules vendored). Run with
//! `bench/deploy.sh` (or `cargo bench -p sdp --bench deploy`; `ROUNDS=N` sets the number of
//! rounds, 5 by default); it prints figures, it asserts nothing about speed.
//!
//! Each round pushes a new revision of the service (a commit no one built), then measures:
//!
//! 1. **by hand**: `git clone` of the branch from the same git server with the same Basic
//!    auth, the catalog's own build command (`SHOP_BUILD`) with a Go cache of its own, the binary started,
//!    `GET /health` polled every 10 ms until 200; wall-clock time;
//! 2. **a new sandbox** of that commit (user alice);
//! 3. **a second sandbox** of the same commit by another user (bob);
//! 4. **an unchanged redeploy** of the first sandbox;
//! 5. new sandboxes of `shop-b` and `shop-c` (new commits too): with the first, the three
//!    single-service times;
//! 6. **a sandbox of three services** (`shop`, `shop-b`, `shop-c`, new commits of all three).
//!
//! A sandbox's time is its deployment's `created_at`..`finished_at` as the API reports it (the
//! request accepted until the routes are in place and the deployment is `ready`).
//!
//! Caches, the same for both sides: before the rounds, each side builds the service once
//! (the agent in a warm-up sandbox of all three services, the hand in a clone of its own), so
//! each has a warm Go build cache of its own (standard library and the vendored modules) and
//! the agent its git mirrors. A new revision changes the file every package of the service
//! depends on, so both compile the service's own ten packages and link it, and neither
//! compiles a vendored one (the build has `-trimpath`, so the checkout's directory is not
//! part of the cache key). The hand clones anew each time (a person's fresh clone); the agent
//! fetches into its mirror.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use sdp_testkit::{
    PASSWORD, SHOP_BUILD, SHOP_REVISION_FILE, SHOP_SERVICES, TestEnv, USER, shop_revision_source,
};
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The second user, who deploys the commit alice's sandbox already runs.
const OTHER: &str = "bob";
const OTHER_PASSWORD: &str = "another correct horse";

/// How often the hand polls the service's health path (the agent polls every 100 ms).
const HAND_POLL: Duration = Duration::from_millis(10);

/// An askpass program for the hand's clone: the credentials come from its environment, as
/// they reach the agent's git, never from the command line or a file.
const ASKPASS: &str = "#!/bin/sh\ncase \"$1\" in\n  Username*) printf '%s\\n' \"$HAND_USER\" ;;\n  *) printf '%s\\n' \"$HAND_PASSWORD\" ;;\nesac\n";

fn parse(ts: &str) -> OffsetDateTime {
    OffsetDateTime::parse(ts, &Rfc3339).expect("RFC 3339")
}

fn secs(d: time::Duration) -> f64 {
    d.as_seconds_f64()
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A deployment's total time and the summed time of each of its steps (over its services).
struct Timed {
    total: f64,
    fetching: f64,
    building: f64,
    starting: f64,
    commit: Vec<String>,
}

fn timed(d: &Value) -> Timed {
    assert_eq!(d["state"], "ready", "{d}");
    let total =
        parse(d["finished_at"].as_str().unwrap()) - parse(d["created_at"].as_str().unwrap());
    let step = |name: &str| -> f64 {
        d["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["step"] == name)
            .filter_map(|s| {
                let end = s["ended_at"].as_str()?;
                Some(secs(parse(end) - parse(s["started_at"].as_str().unwrap())))
            })
            .sum()
    };
    Timed {
        total: secs(total),
        fetching: step("fetching"),
        building: step("building"),
        starting: step("starting"),
        commit: d["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["commit"].as_str().unwrap_or_default().to_owned())
            .collect(),
    }
}

/// The hand's own folders: a Go cache and the askpass program.
struct Hand {
    root: PathBuf,
    askpass: PathBuf,
}

/// What doing it by hand took, step by step (seconds).
struct HandTimes {
    clone: f64,
    build: f64,
    /// CPU seconds (user and system) the build took, all its processes together.
    build_cpu: f64,
    start: f64,
}

/// CPU seconds of the children waited for so far.
fn children_cpu() -> f64 {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .expect("getrusage");
    let seconds = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    seconds(usage.user_time()) + seconds(usage.system_time())
}

impl HandTimes {
    fn total(&self) -> f64 {
        self.clone + self.build + self.start
    }
}

impl Hand {
    fn new(root: &Path) -> Hand {
        std::fs::create_dir_all(root.join("go-build")).unwrap();
        let askpass = root.join("askpass.sh");
        std::fs::write(&askpass, ASKPASS).unwrap();
        std::fs::set_permissions(
            &askpass,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        Hand {
            root: root.to_owned(),
            askpass,
        }
    }

    /// Clones `url`'s `main`, builds it, starts it and waits for its health.
    async fn deploy(&self, url: &str, round: &str) -> HandTimes {
        let checkout = self.root.join(format!("checkout-{round}"));
        let start = Instant::now();
        let clone = tokio::process::Command::new("git")
            .args(["clone", "-q", "--single-branch", "--branch", "main", url])
            .arg(&checkout)
            .env("GIT_ASKPASS", &self.askpass)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("HAND_USER", USER)
            .env("HAND_PASSWORD", PASSWORD)
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        assert!(
            clone.status.success(),
            "git clone: {}",
            String::from_utf8_lossy(&clone.stderr)
        );
        let cloned = start.elapsed();
        let cpu_before = children_cpu();
        let build = tokio::process::Command::new("sh")
            .args(["-c", SHOP_BUILD])
            .current_dir(&checkout)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &self.root)
            .env("GOCACHE", self.root.join("go-build"))
            .env("GOPATH", self.root.join("go"))
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        assert!(
            build.status.success(),
            "go build: {}",
            String::from_utf8_lossy(&build.stderr)
        );
        let built = start.elapsed();
        let build_cpu = children_cpu() - cpu_before;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut service = tokio::process::Command::new(checkout.join(".sdp/bin/app"))
            .current_dir(&checkout)
            .env("PORT", port.to_string())
            .env("BASE_PATH", "/shop")
            .env("SDP_SANDBOX", "by-hand")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let http = reqwest::Client::new();
        let health = format!("http://127.0.0.1:{port}/health");
        loop {
            if let Ok(r) = http.get(&health).send().await
                && r.status() == 200
            {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "the hand-made service never became healthy"
            );
            tokio::time::sleep(HAND_POLL).await;
        }
        let healthy = start.elapsed();
        service.kill().await.unwrap();
        std::fs::remove_dir_all(&checkout).unwrap();
        HandTimes {
            clone: cloned.as_secs_f64(),
            build: (built - cloned).as_secs_f64(),
            build_cpu,
            start: (healthy - built).as_secs_f64(),
        }
    }
}

/// Pushes a new revision of `service` to its `main`: a commit no one built. The revision
/// names the service: the three repositories hold the same source, and the same revision in
/// two of them would be one build to Go's cache.
fn push_revision(env: &TestEnv, service: &str, label: &str) -> String {
    env.git.push_file(
        service,
        "main",
        SHOP_REVISION_FILE,
        &shop_revision_source(&format!("{service}-{label}")),
    )
}

/// Deletes `names` (owned by `token`'s user) and waits until their agent has torn them down,
/// so that no teardown runs during the next measurement.
async fn delete_all(env: &TestEnv, token: &str, names: &[String]) {
    let mut checkouts = Vec::new();
    for name in names {
        let sandbox = env
            .get(&format!("/api/sandboxes/{name}"), Some(token))
            .await
            .json();
        checkouts.push(
            env.agent_work_dir("micro-0")
                .join("checkouts")
                .join(sandbox["id"].as_str().unwrap()),
        );
        let reply = env.delete_sandbox(token, name).await;
        assert_eq!(reply.status, 202, "{}", reply.body);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while checkouts.iter().any(|c| c.exists()) {
        assert!(Instant::now() < deadline, "the teardown never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One round's figures, in seconds.
struct Round {
    hand: HandTimes,
    new: Timed,
    second: Timed,
    redeploy: Timed,
    singles: [f64; 3],
    three: Timed,
}

async fn round(env: &TestEnv, hand: &Hand, alice: &str, bob: &str, i: usize) -> Round {
    let commit = push_revision(env, "shop", &format!("round-{i}"));
    let url = env.git.url("shop");
    // Alternate which side goes first, so that neither always finds the other's pages in
    // the page cache.
    let (hand_times, new) = if i.is_multiple_of(2) {
        let h = hand.deploy(&url, &i.to_string()).await;
        let (_, d) = env.deploy(alice, &format!("new-{i}"), &["shop@main"]).await;
        (h, timed(&d))
    } else {
        let (_, d) = env.deploy(alice, &format!("new-{i}"), &["shop@main"]).await;
        (hand.deploy(&url, &i.to_string()).await, timed(&d))
    };
    assert_eq!(new.commit, [commit.as_str()]);
    let (_, d) = env
        .deploy(bob, &format!("second-{i}"), &["shop@main"])
        .await;
    let second = timed(&d);
    assert_eq!(second.commit, [commit.as_str()]);
    let d = env
        .redeploy_and_wait(alice, &format!("new-{i}"), &["shop@main"])
        .await;
    let redeploy = timed(&d);
    assert_eq!(redeploy.commit, [commit.as_str()]);

    let mut singles = [new.total, 0.0, 0.0];
    for (k, service) in SHOP_SERVICES.iter().enumerate().skip(1) {
        push_revision(env, service, &format!("round-{i}"));
        let (_, d) = env
            .deploy(
                alice,
                &format!("single-{service}-{i}"),
                &[&format!("{service}@main")],
            )
            .await;
        singles[k] = timed(&d).total;
    }
    for service in SHOP_SERVICES {
        push_revision(env, service, &format!("round-{i}-three"));
    }
    let selections: Vec<String> = SHOP_SERVICES.iter().map(|s| format!("{s}@main")).collect();
    let selections: Vec<&str> = selections.iter().map(String::as_str).collect();
    let (_, d) = env.deploy(alice, &format!("three-{i}"), &selections).await;
    let three = timed(&d);

    let mut mine: Vec<String> = ["new", "three"]
        .iter()
        .map(|n| format!("{n}-{i}"))
        .collect();
    mine.extend(SHOP_SERVICES[1..].iter().map(|s| format!("single-{s}-{i}")));
    delete_all(env, alice, &mine).await;
    delete_all(env, bob, &[format!("second-{i}")]).await;
    Round {
        hand: hand_times,
        new,
        second,
        redeploy,
        singles,
        three,
    }
}

fn figure(name: &str, value: &str, goal: &str, met: bool) {
    println!(
        "figure|{name}|{value}|{goal}|{}",
        if met { "met" } else { "NOT met" }
    );
}

fn report(rounds: &[Round]) {
    let all = |f: &dyn Fn(&Round) -> f64| rounds.iter().map(f).collect::<Vec<f64>>();
    let show = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let hand = all(&|r| r.hand.total());
    let new = all(&|r| r.new.total);
    let second = all(&|r| r.second.total);
    let redeploy = all(&|r| r.redeploy.total);
    let three = all(&|r| r.three.total);
    let slowest = all(&|r| r.singles.iter().copied().fold(0.0, f64::max));
    let sum = all(&|r| r.singles.iter().sum());
    let new_ratio = median(&all(&|r| r.new.total / r.hand.total()));
    let second_ratio = median(&all(&|r| r.second.total / r.hand.total()));
    let three_ratio = median(&all(&|r| {
        r.three.total / r.singles.iter().copied().fold(0.0, f64::max)
    }));
    let three_of_sum = median(&all(&|r| r.three.total / r.singles.iter().sum::<f64>()));

    println!(
        "deploy time of the shop (3,500 lines of Go, 3 vendored modules), {} rounds, medians; sandboxes: the deployment's created_at..finished_at; by hand: wall clock",
        rounds.len()
    );
    println!(
        "caches: each side built the service once before (its own warm Go build cache: standard library and vendored modules; the agent's git mirrors); every round is a new commit, so both compile the service's 10 packages and link"
    );
    println!(
        "by hand (clone, build, start until /health answers): {:.2} s [{}] = clone {:.2} + build {:.2} + start {:.2}",
        median(&hand),
        show(&hand),
        median(&all(&|r| r.hand.clone)),
        median(&all(&|r| r.hand.build)),
        median(&all(&|r| r.hand.start)),
    );
    let steps = |f: &dyn Fn(&Round) -> &Timed| {
        format!(
            "fetching {:.2} + building {:.2} + starting {:.2}",
            median(&all(&|r| f(r).fetching)),
            median(&all(&|r| f(r).building)),
            median(&all(&|r| f(r).starting)),
        )
    };
    println!(
        "new sandbox of a commit no one built: {:.2} s [{}] ({}); {new_ratio:.2}x by hand",
        median(&new),
        show(&new),
        steps(&|r| &r.new),
    );
    println!(
        "second sandbox of that commit, another user: {:.2} s [{}] ({}); {second_ratio:.2}x by hand",
        median(&second),
        show(&second),
        steps(&|r| &r.second),
    );
    println!(
        "unchanged redeploy: {:.3} s [{}] ({})",
        median(&redeploy),
        show(&redeploy),
        steps(&|r| &r.redeploy),
    );
    println!(
        "sandbox of three services: {:.2} s [{}] ({}); slowest single {:.2} s, sum of singles {:.2} s; {three_ratio:.2}x the slowest, {three_of_sum:.2}x the sum",
        median(&three),
        show(&three),
        steps(&|r| &r.three),
        median(&slowest),
        median(&sum),
    );
    // What the machine allows: the builds are compiles, bound by CPU; three of them need
    // three times one's CPU time, spread over the machine's cores at best.
    let cpu = median(&all(&|r| r.hand.build_cpu));
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    println!(
        "one build takes {cpu:.2} CPU-s in {:.2} s of wall clock; three take about {:.2} CPU-s, at least {:.2} s on this machine's {cores} cores ({:.2}x the slowest single)",
        median(&all(&|r| r.hand.build)),
        3.0 * cpu,
        3.0 * cpu / cores as f64,
        3.0 * cpu / cores as f64 / median(&slowest),
    );
    figure(
        "deploy: new sandbox of a commit no one built",
        &format!(
            "{new_ratio:.2}x by hand ({:.2} s; by hand {:.2} s)",
            median(&new),
            median(&hand)
        ),
        "<= 1.1x",
        new_ratio <= 1.1,
    );
    figure(
        "deploy: second sandbox of a built commit",
        &format!("{second_ratio:.2}x by hand ({:.2} s)", median(&second)),
        "< 0.2x",
        second_ratio < 0.2,
    );
    figure(
        "deploy: unchanged redeploy",
        &format!("{:.3} s", median(&redeploy)),
        "< 1 s",
        median(&redeploy) < 1.0,
    );
    figure(
        "deploy: sandbox of three services",
        &format!(
            "{three_ratio:.2}x the slowest single ({:.2} s; slowest {:.2} s, sum {:.2} s)",
            median(&three),
            median(&slowest),
            median(&sum)
        ),
        "<= 1.2x the slowest",
        three_ratio <= 1.2,
    );
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let env = TestEnv::builder(env!("CARGO_BIN_EXE_sdp"))
        .repos(&SHOP_SERVICES)
        .catalog(&SHOP_SERVICES)
        .gateway(true)
        .log("info")
        .job_timeout("60s")
        .health_timeout("60s")
        .start()
        .await;
    env.git.add_user(OTHER, OTHER_PASSWORD);
    let alice = env.login().await;
    let bob = env.login_as(OTHER, OTHER_PASSWORD).await;
    assert_eq!(bob.status, 200, "{}", bob.body);
    let bob = bob.typed::<sdp_api::LoginResponse>().token;

    // Warm-up, not counted: each side builds the first commit once.
    let hand = Hand::new(&env.dir.path().join("hand"));
    let warm_hand = hand.deploy(&env.git.url("shop"), "warm-up").await;
    let selections: Vec<String> = SHOP_SERVICES.iter().map(|s| format!("{s}@main")).collect();
    let selections: Vec<&str> = selections.iter().map(String::as_str).collect();
    let (_, warm) = env.deploy(&alice, "warm-up", &selections).await;
    let warm = timed(&warm);
    println!(
        "warm-up (cold Go caches, not counted): by hand {:.2} s, sandbox of three services {:.2} s",
        warm_hand.total(),
        warm.total
    );
    delete_all(&env, &alice, &["warm-up".to_owned()]).await;

    let mut results = Vec::new();
    for i in 0..rounds {
        let r = round(&env, &hand, &alice, &bob, i).await;
        println!(
            "round {i}: by hand {:.2} s, new {:.2} s, second {:.2} s, redeploy {:.3} s, singles {:.2}/{:.2}/{:.2} s, three {:.2} s",
            r.hand.total(),
            r.new.total,
            r.second.total,
            r.redeploy.total,
            r.singles[0],
            r.singles[1],
            r.singles[2],
            r.three.total
        );
        results.push(r);
    }
    report(&results);
}
