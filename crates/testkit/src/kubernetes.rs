//! The real Kubernetes of `scripts/k8s.sh` in tests. `scripts/test.sh` starts one cluster for
//! the tests that need it and names its folder in `SDP_TEST_K8S_DIR`; each test works in a
//! namespace of its own ([`Cluster::namespace`]), deleted when it is dropped, and gives its
//! agent a kubeconfig bound to the documented Role only ([`Cluster::restricted`]), unless it
//! tests what needs more (namespaces of their own).
//!
//! Without a cluster these tests are skipped, except in CI (`CI=true`), where that fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The repository's root: where `scripts/` and `deploy/` are.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository's root")
}

/// A running cluster.
pub struct Cluster {
    pub dir: PathBuf,
    /// The cluster admin's kubeconfig: for what the test itself reads and changes.
    pub admin: PathBuf,
    kubectl: PathBuf,
}

/// The cluster `scripts/test.sh` started, or `None` (the test returns) when there is none
/// outside CI.
pub fn cluster() -> Option<Cluster> {
    let Some(dir) = std::env::var_os("SDP_TEST_K8S_DIR") else {
        assert!(
            std::env::var("CI").is_err(),
            "no Kubernetes cluster (SDP_TEST_K8S_DIR), and its tests may not be skipped in CI: run them through scripts/test.sh"
        );
        eprintln!("skipped: no Kubernetes cluster (SDP_TEST_K8S_DIR; scripts/test.sh starts one)");
        return None;
    };
    let dir = PathBuf::from(dir);
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"));
    Some(Cluster {
        admin: dir.join("admin.kubeconfig"),
        kubectl: cache.join("sdp-test/k8s/bin/kubectl"),
        dir,
    })
}

/// A namespace of the test's, deleted (with all in it) when dropped.
pub struct TestNamespace {
    pub name: String,
    kubectl: PathBuf,
    admin: PathBuf,
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.admin)
            .args(["delete", "namespace", &self.name, "--wait=false"])
            .output();
    }
}

impl Cluster {
    /// `kubectl` as the cluster admin; panics with its error output when it fails.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.admin)
            .args(args)
            .output()
            .expect("kubectl runs");
        assert!(
            out.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl get <what> -o json` as the admin, with more arguments.
    pub fn get(&self, what: &str, args: &[&str]) -> Value {
        let mut all = vec!["get", what, "-o", "json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.kubectl(&all)).expect("kubectl's JSON")
    }

    /// A new namespace `sdp-it-<8 hex digits>`.
    pub fn namespace(&self) -> TestNamespace {
        let name = format!("sdp-it-{:08x}", rand::random::<u32>());
        self.kubectl(&["create", "namespace", &name]);
        TestNamespace {
            name,
            kubectl: self.kubectl.clone(),
            admin: self.admin.clone(),
        }
    }

    /// A kubeconfig of a ServiceAccount `name` bound in `namespace` to the Role of
    /// `deploy/kubernetes/role.yaml` and nothing else.
    pub fn restricted(&self, name: &str, namespace: &str) -> PathBuf {
        let root = repo_root();
        let out = Command::new(root.join("scripts/k8s.sh"))
            .arg("token")
            .arg(&self.dir)
            .args([name, namespace])
            .arg(root.join("deploy/kubernetes/role.yaml"))
            .output()
            .expect("scripts/k8s.sh runs");
        assert!(
            out.status.success(),
            "k8s.sh token: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .expect("the kubeconfig's path")
                .trim(),
        )
    }

    /// Every object of every kind that can be listed, in every namespace, in full.
    pub fn everything(&self) -> String {
        let kinds = self.kubectl(&["api-resources", "--verbs=list", "-o", "name"]);
        let kinds: Vec<&str> = kinds
            .lines()
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .collect();
        self.kubectl(&["get", &kinds.join(","), "--all-namespaces", "-o", "json"])
    }
}

/// An agent's `[kubernetes]` table for `namespace` (`per-sandbox` too; `None`: the
/// kubeconfig's), as the tests run it: the kit's busybox image, never pulled, pods on the
/// node's network (ports of the agent's `port_range`, reached on 127.0.0.1), the fetch server
/// on a free port of 127.0.0.1.
pub fn agent_table(kubeconfig: &Path, namespace: Option<&str>) -> String {
    let fetch = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let namespace = namespace.map_or(String::new(), |ns| format!("namespace = \"{ns}\"\n"));
    format!(
        "[kubernetes]\nkubeconfig = \"{}\"\n{namespace}image = \"{}\"\nimage_pull_policy = \"Never\"\nhost_network = true\nmemory = \"256Mi\"\ncpu = \"250m\"\nfetch_listen = \"127.0.0.1:{fetch}\"\n",
        kubeconfig.display(),
        crate::docker_image(),
    )
}
