//! The control plane's configuration in both tiers: the same knobs and the same catalog, so
//! that a test reads the same whether its server is a process or in the test's own.

use std::path::Path;

use crate::BASE_DOMAIN;
use crate::env::Options;
use crate::shop::{SHOP_BUILD, SHOP_RUN, SHOP_SERVICES};

/// Where the catalog's repositories and baselines are.
pub(crate) struct Upstreams {
    /// `http://host:port` of the git server; a repository is `<git>/<name>.git`.
    pub git: String,
    /// What `orders` and `billing` fall back to.
    pub baseline: String,
    /// `host:port` of the HTTPS baseline, whose certificate names `localhost`.
    pub tls_baseline: String,
    /// The sandbox router's URL (`SDP_GATEWAY_URL`, the sandboxes' URLs).
    pub router: String,
}

impl Upstreams {
    pub fn repo(&self, name: &str) -> String {
        format!("{}/{name}.git", self.git)
    }
}

/// The server's config file: `keys` (top-level `key = value` lines) before the kit's own,
/// `tables` (say `[[services]]`) after it.
pub(crate) fn server_toml(
    listen: &str,
    data_dir: &Path,
    o: &Options,
    up: &Upstreams,
    keys: &str,
    tables: &str,
) -> String {
    let tls_port = up.tls_baseline.rsplit(':').next().unwrap_or("9");
    // `extra`: more keys of the entry (its restart policy, its health interval). Each entry
    // comes with its name, for `Options::catalog` to choose among them.
    let watched = |name: &'static str, repo: &str, build: &str, run: &str, extra: &str| {
        // The two Go services fall back to the local baseline; the others to a port where
        // nothing listens.
        let baseline = match name {
            "orders" | "billing" => up.baseline.clone(),
            "secure" => format!("https://localhost:{tls_port}"),
            "untrusted" => format!("https://{}", up.tls_baseline),
            _ => "http://127.0.0.1:9".to_owned(),
        };
        let entry = format!(
            "[[services]]\nname = \"{name}\"\nrepo = \"{}\"\nbuild = \"{build}\"\nrun = \"{run}\"\nport = 8080\nhealth = \"/healthz\"\nroutes = [\"/{name}\"]\nbaseline = \"{baseline}\"\nenv = {{ GREETING = \"hi\" }}\n{extra}\n",
            up.repo(repo)
        );
        (name, entry)
    };
    let service = |name: &'static str, build: &str, run: &str| watched(name, name, build, run, "");
    // Written only when a test sets them: the server's own defaults otherwise.
    let knobs: String = [
        ("idle_after", o.idle_after),
        ("wake_timeout", o.wake_timeout),
    ]
    .iter()
    .filter_map(|(key, value)| value.map(|v| format!("{key} = \"{v}\"\n")))
    .collect();
    let catalog = [
        // Real Go services; the echo shows the build's output in the log.
        service(
            "orders",
            "echo building $SDP_SERVICE && CGO_ENABLED=0 go build -o .sdp/bin/app .",
            "./.sdp/bin/app",
        ),
        service(
            "billing",
            "CGO_ENABLED=0 go build -o .sdp/bin/app .",
            "./.sdp/bin/app",
        ),
        service("payments", "true", "true"),
        service("stuck", "true", "true"),
        // For the log pipeline benchmark: a build that prints as fast as it can, and one
        // that prints 10,000 lines a second for 5 seconds.
        service(
            "chatty",
            "seq -f 'line %g of the chatty build' 1 100000",
            "true",
        ),
        service("steady", "python3 emit.py 10000 5", "true"),
        // Never deployed: their baselines are the HTTPS one.
        service("secure", "true", "true"),
        service("untrusted", "true", "true"),
        // A branch's own script, for the isolation tests' hostile builds (the test creates
        // the repository).
        service("hostile", "sh hostile.sh", "true"),
        // A service that prints a line every 20 ms while it serves, and dies of SIGPIPE
        // when its output is a pipe nobody reads, as most programs do.
        // Checked often, so that the supervision tests see a crash or a hang soon.
        watched(
            "talker",
            "talker",
            "true",
            "python3 talk.py",
            "health_interval = \"300ms\"\n",
        ),
        // The same service, left down when it dies.
        watched(
            "fragile",
            "talker",
            "true",
            "python3 talk.py",
            "health_interval = \"300ms\"\nrestart = \"never\"\n",
        ),
        // The Go service, left down when it dies (Docker's supervision).
        watched(
            "brittle",
            "orders",
            "CGO_ENABLED=0 go build -o .sdp/bin/app .",
            "./.sdp/bin/app",
            "restart = \"never\"\n",
        ),
        // The same service printing as fast as it can: the runtime log's bound.
        watched(
            "torrent",
            "talker",
            "true",
            "TICK_SECONDS=0 python3 talk.py",
            "",
        ),
    ];
    // The company's API gateway, deployed on the gateway agent: reloaded by SIGHUP from its
    // JSON routes file; and the same repository as `edge`, its routes rendered from the
    // branch's template, reloaded by a restart.
    let gateway = |name: &'static str, keys: &str| {
        let entry = format!(
            "[[services]]\nname = \"{name}\"\nkind = \"gateway\"\nrepo = \"{}\"\nbuild = \"CGO_ENABLED=0 go build -o .sdp/bin/gw .\"\nrun = \"./.sdp/bin/gw\"\nport = 8080\nhealth = \"/healthz\"\nroutes_file = \"config/routes.json\"\n{keys}\n",
            up.repo("api-gateway")
        );
        (name, entry)
    };
    let gateways = [
        gateway("api-gateway", "reload = \"signal:HUP\"\n"),
        gateway(
            "edge",
            "routes_format = \"template\"\nroutes_template = \"routes.tmpl\"\nreload = \"restart\"\n",
        ),
    ];
    // The realistic Go service of the deploy benchmark, under three names (one repository
    // each), its API under its own route.
    let shops = SHOP_SERVICES.map(|name| {
        let entry = format!(
            "[[services]]\nname = \"{name}\"\nrepo = \"{}\"\nbuild = \"{SHOP_BUILD}\"\nrun = \"{SHOP_RUN}\"\nport = 8080\nhealth = \"/health\"\nroutes = [\"/{name}\"]\nbaseline = \"http://127.0.0.1:9\"\nenv = {{ BASE_PATH = \"/{name}\" }}\n",
            up.repo(name)
        );
        (name, entry)
    });
    // Gateways and shops only where a test asks for them: a sandbox that selects a gateway
    // needs a gateway agent able to build Go, and a shop's repository is there only for the
    // tests that create it (their first build is a long one).
    let services: String = catalog
        .into_iter()
        .filter(|(name, _)| o.catalog.is_none_or(|only| only.contains(name)))
        .chain(
            gateways
                .into_iter()
                .chain(shops)
                .filter(|(name, _)| o.catalog.is_some_and(|only| only.contains(name))),
        )
        .map(|(_, entry)| entry)
        .collect();
    let webhooks = o.webhooks.as_deref().unwrap_or_default();
    format!(
        "{keys}{knobs}\nlisten = \"{listen}\"\ndata_dir = \"{}\"\nsession_ttl = \"{}\"\nsandbox_ttl = \"{}\"\njob_timeout = \"{}\"\nagent_timeout = \"{}\"\n\n[git]\nprobe_repo = \"{}\"\n\n[gateway]\nbase_domain = \"{BASE_DOMAIN}\"\npublic_url = \"{}\"\n\n{webhooks}\n{services}\n{tables}",
        data_dir.display(),
        o.session_ttl,
        o.sandbox_ttl,
        o.job_timeout,
        o.agent_timeout,
        up.repo("probe"),
        up.router,
    )
}
