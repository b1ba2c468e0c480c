//! The kubernetes runtime against a real cluster (`scripts/k8s.sh`, started by
//! `scripts/test.sh` for these tests only): the Go service is built on the agent's host, its
//! pod fetches the checkout from the agent and runs in the kit's busybox image on the node's
//! network. Unless a test needs more, the agent has only the Role of
//! `deploy/kubernetes/role.yaml`.

use std::process::Command;
use std::time::Duration;

use sdp_testkit::kubernetes::{Cluster, TestNamespace, agent_table, cluster};
use sdp_testkit::{AGENT_TOKEN, TestEnv};
use serde_json::Value;

use crate::SDP;

/// Pods start in seconds, and the kubelet waits before it starts a crashed container again.
async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    sdp_testkit::eventually(what, Duration::from_secs(120), check).await
}

/// A test environment whose micro agent runs instances in `namespace` with `kubeconfig`.
async fn kube_env(kubeconfig: &std::path::Path, namespace: Option<&str>) -> TestEnv {
    TestEnv::builder(SDP)
        .repos(&["orders"])
        .gateway(true)
        .health_timeout("90s")
        .kubernetes(agent_table(kubeconfig, namespace))
        .start()
        .await
}

/// The cluster, a namespace of the test's, and a kubeconfig bound there to the documented
/// Role only.
fn restricted_setup() -> Option<(Cluster, TestNamespace, std::path::PathBuf)> {
    let cluster = cluster()?;
    let namespace = cluster.namespace();
    // A ServiceAccount of the test's own: tests run side by side in one cluster.
    let kubeconfig = cluster.restricted(&namespace.name, &namespace.name);
    Some((cluster, namespace, kubeconfig))
}

/// The pods of sandbox `id` in `namespace`, as the cluster has them.
fn pods(cluster: &Cluster, namespace: &str, id: &str) -> Vec<Value> {
    cluster.get(
        "pods",
        &["-n", namespace, "-l", &format!("sdp.sandbox={id}")],
    )["items"]
        .as_array()
        .unwrap()
        .clone()
}

/// Every object of any listed kind carrying sandbox `id`'s label, in any namespace.
fn labelled(cluster: &Cluster, id: &str) -> Vec<String> {
    let kinds = cluster.kubectl(&[
        "api-resources",
        "--verbs=list",
        "--namespaced",
        "-o",
        "name",
    ]);
    let kinds: Vec<&str> = kinds.lines().filter(|k| !k.trim().is_empty()).collect();
    let found = cluster.get(
        &kinds.join(","),
        &["--all-namespaces", "-l", &format!("sdp.sandbox={id}")],
    );
    found["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| format!("{}/{}", o["kind"], o["metadata"]["name"]))
        .collect()
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `docker kill` of the service container of pod `uid`: the kubelet sees it end.
fn kill_service_container(uid: &str) {
    let id = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=io.kubernetes.pod.uid={uid}"),
        "--filter",
        "label=io.kubernetes.container.name=service",
    ]);
    assert!(!id.is_empty(), "no running service container of pod {uid}");
    docker(&["kill", &id]);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_only_the_documented_role_a_branch_runs_in_a_labelled_pod_that_answers_through_the_router_holds_no_password_and_leaves_nothing()
 {
    let Some((cluster, namespace, kubeconfig)) = restricted_setup() else {
        return;
    };
    let ns = namespace.name.as_str();
    let env = kube_env(&kubeconfig, Some(ns)).await;
    let canary = format!("canary-{:032x}", rand::random::<u128>());
    env.git.add_user("dora", &canary);
    let token = env.token_for("dora", &canary).await;
    let (sandbox, deployment) = env.deploy(&token, "kube", &["orders@feature/x"]).await;
    assert_eq!(deployment["state"], "ready", "{deployment}");
    let answer = "orders on feature/x in kube\n";
    let upstream = sandbox["services"][0]["upstream"].as_str().unwrap();
    assert_eq!(env.answer(upstream).await, answer);
    let routed = env.through_router("kube", "/orders/1").await;
    assert_eq!((routed.status, routed.body.as_str()), (200, answer));

    let id = sandbox["id"].as_str().unwrap();
    let pods = pods(&cluster, ns, id);
    assert_eq!(pods.len(), 1, "{pods:?}");
    let pod = &pods[0];
    let labels = &pod["metadata"]["labels"];
    assert_eq!(labels["sdp.sandbox"], id);
    assert_eq!(labels["sdp.service"], "orders");
    assert_eq!(labels["sdp.deployment"], deployment["id"]);
    assert_eq!(labels["sdp.agent"], env.micro[0].as_str());
    let deployments = cluster.get(
        "deployments",
        &["-n", ns, "-l", &format!("sdp.sandbox={id}")],
    );
    assert_eq!(
        deployments["items"][0]["metadata"]["labels"]["sdp.deployment"],
        deployment["id"]
    );
    // The catalog's run in the checkout, with the contract's environment, never as root and
    // with no credential of the cluster.
    let container = &pod["spec"]["containers"][0];
    assert_eq!(container["workingDir"], "/src");
    let env_vars: Vec<(String, String)> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_owned(),
                v["value"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    for name in [
        "PORT",
        "SDP_SANDBOX",
        "SDP_SERVICE",
        "SDP_GATEWAY_URL",
        "GREETING",
    ] {
        assert!(
            env_vars.iter().any(|(n, _)| n == name),
            "{name} missing from {env_vars:?}"
        );
    }
    assert!(env_vars.contains(&("SDP_SANDBOX".into(), "kube".into())));
    assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);

    // Nothing the cluster holds, read back in full, has the user's password.
    let everything = cluster.everything();
    assert!(
        everything.contains(id),
        "the dump holds the sandbox's objects"
    );
    assert!(
        !everything.contains(&canary),
        "the user's password is in the cluster"
    );

    // The checkout's grant served this pod once: not again, not with another secret, not
    // to a pod that is not the instance's.
    let init = &pod["spec"]["initContainers"][0]["env"];
    let value = |name: &str| {
        init.as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .and_then(|v| v["value"].as_str())
            .unwrap()
            .replace("$$", "$")
    };
    let (url, grant, secret) = (
        value("SDP_FETCH_URL"),
        value("SDP_FETCH_GRANT"),
        value("SDP_FETCH_SECRET"),
    );
    let (name, uid) = (
        pod["metadata"]["name"].as_str().unwrap(),
        pod["metadata"]["uid"].as_str().unwrap(),
    );
    let fetch = |secret: String, query: String| {
        let url = format!("{url}/v1/checkouts/{grant}?{query}");
        async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth(secret)
                .send()
                .await
                .unwrap()
        }
    };
    let again = fetch(secret.clone(), format!("pod={name}&uid={uid}")).await;
    assert_eq!(again.status(), 403);
    assert!(
        again
            .text()
            .await
            .unwrap()
            .contains("fetched its checkout already")
    );
    let wrong = fetch("0".repeat(64), format!("pod={name}&uid=other")).await;
    assert_eq!(wrong.status(), 401);
    let stranger = fetch(secret.clone(), "pod=stranger&uid=1234".into()).await;
    assert_eq!(stranger.status(), 403);

    let log = env.deployment_log(&token, &deployment).await;
    assert!(log.contains("[orders/stdout] orders listening on"), "{log}");

    let gone = env.delete_sandbox(&token, "kube").await;
    assert!(gone.status < 300, "{}", gone.body);
    eventually(
        "nothing in the cluster carries the sandbox's label",
        || async { labelled(&cluster, id).is_empty().then_some(()) },
    )
    .await;
    // And the grant ended with it.
    let after = fetch(secret, format!("pod={name}&uid=fresh")).await;
    assert_eq!(after.status(), 401);
    env.assert_secret_nowhere(&canary);
}

/// The router's answer for `path` in `sandbox`, once it is a 200.
async fn answers(env: &TestEnv, sandbox: &str, path: &str) -> String {
    eventually("the router answers", || async {
        let r = env.through_router(sandbox, path).await;
        (r.status == 200).then_some(r.body)
    })
    .await
}

/// The crashes the sandbox's log tells of `orders`, and whether it runs now.
async fn crashes(env: &TestEnv, token: &str, sandbox: &str) -> (Vec<String>, bool) {
    let log = env
        .get(
            &format!("/api/sandboxes/{sandbox}/logs?service=orders"),
            Some(token),
        )
        .await
        .body;
    let crashes = log
        .lines()
        .filter_map(|l| Some(l.split_once("orders crashed: ")?.1.to_owned()))
        .collect();
    let running = env.sandbox_service(token, sandbox, "orders").await["state"] == "running";
    (crashes, running)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_killed_or_deleted_behind_the_agents_back_is_restarted_by_kubernetes_and_followed_across_an_agent_restart()
 {
    let Some((cluster, namespace, kubeconfig)) = restricted_setup() else {
        return;
    };
    let ns = namespace.name.as_str();
    let mut env = kube_env(&kubeconfig, Some(ns)).await;
    let token = env.login().await;
    let (sandbox, deployment) = env.deploy(&token, "phoenix", &["orders@feature/x"]).await;
    assert_eq!(deployment["state"], "ready", "{deployment}");
    let id = sandbox["id"].as_str().unwrap().to_owned();
    let answer = "orders on feature/x in phoenix\n";
    let first = pods(&cluster, ns, &id);
    let first_uid = first[0]["metadata"]["uid"].as_str().unwrap().to_owned();

    // Its pod deleted: the Deployment makes another, which fetches its checkout itself.
    cluster.kubectl(&[
        "delete",
        "pod",
        "-n",
        ns,
        first[0]["metadata"]["name"].as_str().unwrap(),
        "--wait=false",
    ]);
    let replaced = eventually("a new pod serves", || async {
        let (crashes, running) = crashes(&env, &token, "phoenix").await;
        let fresh: Vec<Value> = pods(&cluster, ns, &id)
            .into_iter()
            .filter(|p| p["metadata"]["uid"] != first_uid.as_str())
            .collect();
        (running && crashes.len() == 1 && fresh.len() == 1).then_some((crashes, fresh))
    })
    .await;
    let (crashed, fresh) = replaced;
    assert!(crashed[0].contains("was deleted"), "{crashed:?}");
    let uid = fresh[0]["metadata"]["uid"].as_str().unwrap().to_owned();
    assert_eq!(answers(&env, "phoenix", "/orders/1").await, answer);

    // Its container killed: the kubelet starts it again in the same pod.
    kill_service_container(&uid);
    let crashed = eventually("the crash is reported and it runs again", || async {
        let (crashes, running) = crashes(&env, &token, "phoenix").await;
        (running && crashes.len() == 2).then_some(crashes)
    })
    .await;
    assert_eq!(crashed[1], "killed by SIGKILL", "{crashed:?}");
    let s = env.sandbox_service(&token, "phoenix", "orders").await;
    assert_eq!(s["restarts"], 2, "{s}");
    assert_eq!(answers(&env, "phoenix", "/orders/2").await, answer);

    // The agent killed and started again: it finds the pod by its labels and keeps it, and
    // the restart the pod had before is not told again.
    env.agents[0].kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let agent = env.micro[0].clone();
    env.start_agent(&agent, "micro", AGENT_TOKEN);
    env.wait_for_agents(1).await;
    assert_eq!(answers(&env, "phoenix", "/orders/3").await, answer);
    let kept = pods(&cluster, ns, &id);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0]["metadata"]["uid"], uid.as_str(), "the pod was kept");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (crashed, running) = crashes(&env, &token, "phoenix").await;
    assert_eq!((crashed.len(), running), (2, true), "{crashed:?}");

    // Still followed: the next crash is reported by the new agent.
    kill_service_container(&uid);
    eventually(
        "the new agent reports the next crash and the return",
        || async {
            let (crashes, running) = crashes(&env, &token, "phoenix").await;
            (running && crashes.len() == 3).then_some(())
        },
    )
    .await;
    assert_eq!(answers(&env, "phoenix", "/orders/4").await, answer);

    env.delete_sandbox(&token, "phoenix").await;
    eventually(
        "nothing in the cluster carries the sandbox's label",
        || async { labelled(&cluster, &id).is_empty().then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_namespace_per_sandbox_is_made_for_its_pods_and_deleted_with_it() {
    let Some(cluster) = cluster() else {
        return;
    };
    // Namespaces are the cluster's: this needs the admin (or the per-sandbox ClusterRole).
    let env = kube_env(&cluster.admin, Some("per-sandbox")).await;
    let token = env.login().await;
    let (sandbox, deployment) = env.deploy(&token, "own-ns", &["orders@feature/x"]).await;
    assert_eq!(deployment["state"], "ready", "{deployment}");
    let id = sandbox["id"].as_str().unwrap();
    let namespace = format!("sdp-{}", id.replace('_', "-"));
    let ns = cluster.get("namespace", &[&namespace]);
    assert_eq!(ns["metadata"]["labels"]["sdp.sandbox"], id);
    assert_eq!(pods(&cluster, &namespace, id).len(), 1);
    let routed = env.through_router("own-ns", "/orders/1").await;
    assert_eq!(
        (routed.status, routed.body.as_str()),
        (200, "orders on feature/x in own-ns\n")
    );

    env.delete_sandbox(&token, "own-ns").await;
    eventually("the sandbox's namespace is gone", || async {
        let names = cluster.kubectl(&["get", "namespaces", "-o", "name"]);
        (!names.contains(&namespace)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_that_must_not_restart_is_a_bare_pod_left_crashed_and_the_router_answers_503() {
    let Some((cluster, namespace, kubeconfig)) = restricted_setup() else {
        return;
    };
    let ns = namespace.name.as_str();
    // No `namespace`: the agent takes its kubeconfig's, the one its Role is bound in.
    let env = kube_env(&kubeconfig, None).await;
    let token = env.login().await;
    let (sandbox, deployment) = env.deploy(&token, "glass", &["brittle@main"]).await;
    assert_eq!(deployment["state"], "ready", "{deployment}");
    let id = sandbox["id"].as_str().unwrap();
    let pods = pods(&cluster, ns, id);
    assert_eq!(
        pods[0]["metadata"]["ownerReferences"],
        Value::Null,
        "a bare pod"
    );
    assert_eq!(pods[0]["spec"]["restartPolicy"], "Never");

    kill_service_container(pods[0]["metadata"]["uid"].as_str().unwrap());
    let crashed = eventually("the crash is reported", || async {
        let s = env.sandbox_service(&token, "glass", "brittle").await;
        (s["state"] == "crashed").then_some(s)
    })
    .await;
    assert_eq!(crashed["restarts"], 0, "{crashed}");
    let down = env.through_router("glass", "/brittle/1").await;
    assert_eq!(down.status, 503, "{}", down.body);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = env.sandbox_service(&token, "glass", "brittle").await;
    assert_eq!(later["state"], "crashed", "{later}");
    env.delete_sandbox(&token, "glass").await;
    eventually(
        "nothing in the cluster carries the sandbox's label",
        || async { labelled(&cluster, id).is_empty().then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_whose_image_cannot_be_had_fails_the_deployment_with_the_clusters_reason_and_leaves_nothing()
 {
    let Some((cluster, namespace, kubeconfig)) = restricted_setup() else {
        return;
    };
    let ns = namespace.name.as_str();
    let table = agent_table(&kubeconfig, Some(ns))
        .replace(sdp_testkit::docker_image(), "sdp-test/absent:1");
    let env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .gateway(true)
        .health_timeout("90s")
        .kubernetes(table)
        .start()
        .await;
    let token = env.login().await;
    let (sandbox, deployment) = env.deploy(&token, "nowhere", &["orders@feature/x"]).await;
    assert_eq!(deployment["state"], "failed", "{deployment}");
    let error = deployment["error"].to_string();
    assert!(error.contains("ErrImageNeverPull"), "{deployment}");
    // Given up on at the cluster's word, not at the end of the health timeout.
    assert!(!error.contains("not ready within"), "{deployment}");
    let id = sandbox["id"].as_str().unwrap();
    eventually(
        "nothing in the cluster carries the sandbox's label",
        || async { labelled(&cluster, id).is_empty().then_some(()) },
    )
    .await;
}
