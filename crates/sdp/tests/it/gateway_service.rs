//! A sandbox's own copy of the company's API gateway (a catalog service of `kind =
//! "gateway"`): a real Go reverse proxy built from a branch and run by the real gateway agent,
//! which writes its routes file and reloads it; the built-in router hands it every request of
//! the sandbox.

use std::time::Duration;

use serde_json::Value;

use sdp_testkit::{Reply, TestEnv, wait_until};

use crate::SDP;

async fn through(env: &TestEnv, sandbox: &str, path: &str) -> Reply {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let resp = http
        .get(format!("{}{path}", env.router_url()))
        .header("X-SDP-Sandbox", sandbox)
        .send()
        .await
        .unwrap();
    Reply::from(resp).await
}

fn header<'r>(reply: &'r Reply, name: &str) -> &'r str {
    reply
        .headers
        .get(name)
        .map_or("<none>", |v| v.to_str().unwrap())
}

/// The sandbox's services as the API shows them: service name to upstream.
async fn upstream_of(env: &TestEnv, token: &str, sandbox: &str, service: &str) -> String {
    let reply = env
        .get(&format!("/api/sandboxes/{sandbox}"), Some(token))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == service)
        .and_then(|s| s["upstream"].as_str())
        .unwrap_or_else(|| panic!("{service} has no upstream: {}", reply.body))
        .to_owned()
}

/// The routes file the gateway agent wrote into the gateway's checkout.
fn routes_file(env: &TestEnv, sandbox_id: &str, service: &str) -> Value {
    let path = env
        .agent_work_dir("gateway")
        .join("checkouts")
        .join(sandbox_id)
        .join(service)
        .join("config/routes.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn route_to<'v>(routes: &'v Value, prefix: &str) -> &'v Value {
    routes["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["prefix"] == prefix)
        .unwrap_or_else(|| panic!("no route {prefix} in {routes}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_with_its_own_gateway_on_a_branch_is_served_through_it_and_a_redeploy_reloads_its_routes()
 {
    let env = TestEnv::builder(SDP)
        .repos(&["orders", "api-gateway"])
        .catalog(&["orders", "billing", "api-gateway"])
        .gateway(true)
        .start()
        .await;
    let token = env.login().await;
    let (sandbox, deployment) = env
        .deploy(
            &token,
            "gw",
            &["orders@feature/x", "api-gateway@add-header"],
        )
        .await;
    assert_eq!(deployment["state"], "ready", "{deployment}");
    let sandbox_id = sandbox["id"].as_str().unwrap().to_owned();
    // One log, both halves: the micro agent's services, then the gateway agent's gateway.
    let log = env.deployment_log(&token, &deployment).await;
    assert!(
        log.contains("agent micro-0: every service is healthy"),
        "{log}"
    );
    assert!(
        log.contains("agent gateway: every service is healthy"),
        "{log}"
    );
    assert!(log.contains("written to config/routes.json"), "{log}");

    // Its own service from the sandbox, through the branch's gateway (which adds its header).
    let orders = through(&env, "gw", "/orders/1").await;
    assert_eq!(orders.status, 200, "{}", orders.body);
    assert_eq!(orders.body, "orders on feature/x in gw\n");
    assert_eq!(header(&orders, "x-company-gateway"), "add-header");
    assert_eq!(header(&orders, "x-gateway-target"), "sandbox");
    assert_eq!(header(&orders, "x-sdp-route"), "sandbox");
    // Another service from the baseline, through the gateway too.
    let billing = through(&env, "gw", "/billing/invoices").await;
    assert_eq!(billing.status, 200, "{}", billing.body);
    assert_eq!(billing.json()["from"], "baseline");
    assert_eq!(header(&billing, "x-company-gateway"), "add-header");
    assert_eq!(header(&billing, "x-gateway-target"), "baseline");
    // Outside the sandbox, the built-in router routes as always, without the gateway.
    let plain = send_plain(&env, "/orders/1").await;
    assert_eq!(header(&plain, "x-sdp-route"), "baseline");
    assert_eq!(header(&plain, "x-company-gateway"), "<none>");

    // The file holds the sandbox's service at its instance, the rest at the baselines.
    let first = upstream_of(&env, &token, "gw", "orders").await;
    let routes = routes_file(&env, &sandbox_id, "api-gateway");
    assert_eq!(routes["sandbox"], "gw");
    assert_eq!(route_to(&routes, "/orders")["target"], "sandbox");
    assert_eq!(
        route_to(&routes, "/orders")["upstream"],
        format!("http://{first}")
    );
    assert_eq!(route_to(&routes, "/billing")["target"], "baseline");
    assert_eq!(
        route_to(&routes, "/billing")["upstream"],
        env.baseline.url()
    );

    // The inspector shows the hop to the gateway.
    let requests = env
        .get("/api/sandboxes/gw/requests", Some(&token))
        .await
        .json();
    let hop = &requests.as_array().unwrap()[0];
    assert_eq!(hop["route"], "gateway", "{requests}");
    assert_eq!(hop["service"], "api-gateway", "{requests}");
    let gateway_upstream = upstream_of(&env, &token, "gw", "api-gateway").await;
    assert_eq!(hop["upstream"], gateway_upstream.as_str(), "{requests}");

    // A redeploy of the service moves it: the gateway's file follows, and it reloads.
    let redeployed = env.redeploy_and_wait(&token, "gw", &["orders@main"]).await;
    assert_eq!(redeployed["state"], "ready", "{redeployed}");
    let second = upstream_of(&env, &token, "gw", "orders").await;
    assert_ne!(first, second, "a new instance on a new port");
    wait_until("the gateway's routes file names the new instance", || {
        route_to(&routes_file(&env, &sandbox_id, "api-gateway"), "/orders")["upstream"]
            == format!("http://{second}")
    })
    .await;
    let mut answer = String::new();
    for _ in 0..100 {
        answer = through(&env, "gw", "/orders/1").await.body;
        if answer == "orders on main in gw\n" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        answer, "orders on main in gw\n",
        "the gateway reloaded its routes"
    );
    let loaded = through(&env, "gw", "/_gateway").await.json();
    assert!(loaded["loads"].as_u64().unwrap() >= 2, "{loaded}");
    // Reloaded in place by its signal: the same instance serves.
    assert_eq!(
        upstream_of(&env, &token, "gw", "api-gateway").await,
        gateway_upstream
    );

    // The end removes the gateway from the gateway agent too.
    let deleted = env.delete_sandbox(&token, "gw").await;
    assert_eq!(deleted.status, 202, "{}", deleted.body);
    let checkout = env
        .agent_work_dir("gateway")
        .join("checkouts")
        .join(&sandbox_id);
    wait_until("the gateway agent deleted the gateway's checkout", || {
        !checkout.exists()
    })
    .await;
    let gone = through(&env, "gw", "/orders/1").await;
    assert_eq!(gone.status, 404, "{}", gone.body);
}

async fn send_plain(env: &TestEnv, path: &str) -> Reply {
    let resp = reqwest::get(format!("{}{path}", env.router_url()))
        .await
        .unwrap();
    Reply::from(resp).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_whose_routes_come_from_its_template_is_restarted_to_read_them_and_a_gateway_alone_deploys_on_the_gateway_agent()
 {
    let env = TestEnv::builder(SDP)
        .repos(&["orders", "api-gateway"])
        .catalog(&["orders", "edge"])
        .gateway(true)
        .start()
        .await;
    let token = env.login().await;
    // The gateway first, alone: nothing of the sandbox runs on a micro agent yet.
    let (sandbox, deployment) = env.deploy(&token, "tpl", &["edge@main"]).await;
    assert_eq!(deployment["state"], "ready", "{deployment}");
    let sandbox_id = sandbox["id"].as_str().unwrap().to_owned();
    let routes = routes_file(&env, &sandbox_id, "edge");
    assert_eq!(route_to(&routes, "/orders")["target"], "baseline");
    let before = through(&env, "tpl", "/orders/1").await;
    assert_eq!(before.json()["from"], "baseline", "{}", before.body);
    let gateway_before = upstream_of(&env, &token, "tpl", "edge").await;

    // Then a service: the template is rendered again, and the gateway restarted to read it.
    let redeployed = env
        .redeploy_and_wait(&token, "tpl", &["orders@feature/x"])
        .await;
    assert_eq!(redeployed["state"], "ready", "{redeployed}");
    let orders = upstream_of(&env, &token, "tpl", "orders").await;
    wait_until("the rendered routes name the sandbox's instance", || {
        route_to(&routes_file(&env, &sandbox_id, "edge"), "/orders")["upstream"]
            == format!("http://{orders}")
    })
    .await;
    let mut answer = String::new();
    for _ in 0..150 {
        answer = through(&env, "tpl", "/orders/1").await.body;
        if answer == "orders on feature/x in tpl\n" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(answer, "orders on feature/x in tpl\n");
    // Restarted: a new instance, on a new port, which the router follows.
    let mut gateway_after = gateway_before.clone();
    for _ in 0..100 {
        gateway_after = upstream_of(&env, &token, "tpl", "edge").await;
        if gateway_after != gateway_before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_ne!(gateway_after, gateway_before, "restarted on a new port");
    let runtime_log = env.get("/api/sandboxes/tpl/logs", Some(&token)).await.body;
    assert!(
        runtime_log.contains("edge restarted to read its routes"),
        "{runtime_log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_catalog_says_which_services_are_gateways_and_a_sandbox_takes_at_most_one() {
    let env = sdp_testkit::InProcessEnv::builder()
        .catalog(&["orders", "api-gateway", "edge"])
        .gateway(true)
        .start()
        .await;
    let token = env.login().await;
    let services = env.get("/api/services", Some(&token)).await.json();
    let kind = |name: &str| {
        services
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .map(|s| s["kind"].clone())
    };
    assert_eq!(kind("orders"), Some("service".into()), "{services}");
    assert_eq!(kind("api-gateway"), Some("gateway".into()), "{services}");

    let refused = env
        .create_sandbox(
            &token,
            "two",
            &["orders@main", "api-gateway@main", "edge@main"],
        )
        .await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert_eq!(refused.error_code(), "two_gateways");
    let listed = env.get("/api/sandboxes", Some(&token)).await.json();
    assert_eq!(
        listed["items"],
        serde_json::json!([]),
        "nothing was created"
    );

    // Nor may a redeploy add a second one beside the one it runs.
    let created = env
        .create_sandbox(&token, "one", &["orders@main", "api-gateway@main"])
        .await;
    assert_eq!(created.status, 202, "{}", created.body);
    let second = env.redeploy(&token, "one", &["edge@main"]).await;
    assert_eq!(second.status, 400, "{}", second.body);
    assert_eq!(second.error_code(), "two_gateways");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_gateway_in_a_container_reads_its_new_routes_on_the_engines_signal_after_a_redeploy()
 {
    if !sdp_testkit::docker_available() {
        return;
    }
    let env = TestEnv::builder(SDP)
        .repos(&["orders", "api-gateway"])
        .catalog(&["orders", "api-gateway"])
        .runtime("docker")
        .gateway(true)
        .start()
        .await;
    let token = env.login().await;
    let name = format!("gwd-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let (sandbox, deployment) = env
        .deploy(
            &token,
            &name,
            &["orders@feature/x", "api-gateway@add-header"],
        )
        .await;
    assert_eq!(deployment["state"], "ready", "{deployment}");
    let sandbox_id = sandbox["id"].as_str().unwrap().to_owned();
    // The tests' instances publish on loopback, which a container cannot reach: the gateway
    // answers its own page here (in production `advertise_host` is the host's address).
    let page = through(&env, &name, "/_gateway").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(header(&page, "x-sdp-route"), "sandbox");
    assert_eq!(page.json()["sandbox"], name.as_str());
    let loads = page.json()["loads"].as_u64().unwrap();
    // The gateway runs in a container of the gateway agent, labelled like any instance.
    let containers = std::process::Command::new("docker")
        .args([
            "ps",
            "--filter",
            &format!("label=sdp.sandbox={sandbox_id}"),
            "--format",
            "{{.Label \"sdp.service\"}}",
        ])
        .output()
        .unwrap();
    let services = String::from_utf8_lossy(&containers.stdout).to_string();
    assert!(services.lines().any(|s| s == "api-gateway"), "{services}");

    let redeployed = env.redeploy_and_wait(&token, &name, &["orders@main"]).await;
    assert_eq!(redeployed["state"], "ready", "{redeployed}");
    let second = upstream_of(&env, &token, &name, "orders").await;
    // The engine delivered SIGHUP to the container's process: it read the new file.
    let mut loaded = Value::Null;
    for _ in 0..150 {
        loaded = through(&env, &name, "/_gateway").await.json();
        if loaded["loads"].as_u64() > Some(loads) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(loaded["loads"].as_u64() > Some(loads), "{loaded}");
    let orders = loaded["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["prefix"] == "/orders")
        .cloned()
        .unwrap_or_default();
    assert_eq!(orders["upstream"], format!("http://{second}"), "{loaded}");
    let deleted = env.delete_sandbox(&token, &name).await;
    assert_eq!(deleted.status, 202, "{}", deleted.body);
    wait_until("the gateway's container is removed", || {
        let out = std::process::Command::new("docker")
            .args([
                "ps",
                "-a",
                "-q",
                "--filter",
                &format!("label=sdp.sandbox={sandbox_id}"),
            ])
            .output()
            .unwrap();
        out.stdout.is_empty()
    })
    .await;
}
