//! The objects an instance is made of, as the cluster receives them: a Deployment of one
//! replica (or, for `restart = "never"`, a bare Pod that nobody starts again), and with
//! `expose = "nodeport"` or `"route"` a Service, plus an OpenShift Route for `"route"`.
//! Written as the manifests people read, then checked against the API's types.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::{Value, json};

/// The container that runs the service; its init container is [`FETCH_CONTAINER`].
pub const SERVICE_CONTAINER: &str = "service";
pub const FETCH_CONTAINER: &str = "fetch";
/// The Service port's name, which a Route targets.
const PORT_NAME: &str = "http";

/// Fetches the checkout into `/src` (an `emptyDir`) with the one-time grant, from the agent
/// (`fetch.rs`). Every value comes from the environment: nothing of it is shell syntax.
const FETCH_SCRIPT: &str = r#"set -e
wget -q -O /src/.sdp-checkout.tar --header "Authorization: Bearer $SDP_FETCH_SECRET" "$SDP_FETCH_URL/v1/checkouts/$SDP_FETCH_GRANT?pod=$SDP_POD&uid=$SDP_POD_UID"
tar -x -f /src/.sdp-checkout.tar -C /src
rm -f /src/.sdp-checkout.tar"#;

/// Everything an instance's pod is made of.
pub struct PodInput<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub annotations: &'a BTreeMap<String, String>,
    pub image: &'a str,
    pub pull_policy: &'a str,
    pub run: &'a str,
    pub port: u16,
    /// The catalog's env and the `SDP_*` variables, without `PORT`.
    pub env: &'a BTreeMap<String, String>,
    pub health: &'a str,
    pub host_network: bool,
    pub memory: &'a str,
    pub cpu: &'a str,
    pub run_as_user: i64,
    pub fetch_url: &'a str,
    pub grant: &'a str,
    pub secret: &'a str,
    /// `restart = "never"`: a bare Pod that is not started again.
    pub never_restart: bool,
}

/// Kubernetes expands `$(NAME)` in commands and env values and reads `$$` as `$`: doubling
/// every `$` hands the catalog's text to the shell exactly as written.
fn literal(s: &str) -> String {
    s.replace('$', "$$")
}

fn env_list(env: &BTreeMap<String, String>) -> Vec<Value> {
    env.iter()
        .map(|(k, v)| json!({"name": k, "value": literal(v)}))
        .collect()
}

fn pod_spec(p: &PodInput<'_>) -> Value {
    let mut env = env_list(p.env);
    env.push(json!({"name": "PORT", "value": p.port.to_string()}));
    let resources = json!({
        "requests": {"memory": p.memory, "cpu": p.cpu},
        "limits": {"memory": p.memory, "cpu": p.cpu},
    });
    let locked_down = json!({
        "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]},
    });
    let src =
        |read_only: bool| json!([{"name": "src", "mountPath": "/src", "readOnly": read_only}]);
    json!({
        "restartPolicy": if p.never_restart { "Never" } else { "Always" },
        "hostNetwork": p.host_network,
        "dnsPolicy": if p.host_network { "ClusterFirstWithHostNet" } else { "ClusterFirst" },
        // User code gets no credential of the cluster, and no list of its Services.
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        "terminationGracePeriodSeconds": 2,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": p.run_as_user,
            "runAsGroup": p.run_as_user,
        },
        "volumes": [{"name": "src", "emptyDir": {}}],
        "initContainers": [{
            "name": FETCH_CONTAINER,
            "image": p.image,
            "imagePullPolicy": p.pull_policy,
            "command": ["sh", "-c", FETCH_SCRIPT],
            "env": [
                {"name": "SDP_FETCH_URL", "value": literal(p.fetch_url)},
                {"name": "SDP_FETCH_GRANT", "value": p.grant},
                {"name": "SDP_FETCH_SECRET", "value": p.secret},
                {"name": "SDP_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "SDP_POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
            ],
            "resources": resources,
            "securityContext": locked_down,
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "volumeMounts": src(false),
        }],
        "containers": [{
            "name": SERVICE_CONTAINER,
            "image": p.image,
            "imagePullPolicy": p.pull_policy,
            "command": ["sh", "-c", literal(p.run)],
            "workingDir": "/src",
            "env": env,
            "ports": [{"name": PORT_NAME, "containerPort": p.port, "protocol": "TCP"}],
            "readinessProbe": {
                "httpGet": {"path": p.health, "port": p.port},
                "periodSeconds": 1,
                "timeoutSeconds": 2,
                "failureThreshold": 3,
            },
            "resources": resources,
            "securityContext": locked_down,
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "volumeMounts": src(true),
        }],
    })
}

fn metadata(p: &PodInput<'_>) -> Value {
    json!({
        "name": p.name,
        "namespace": p.namespace,
        "labels": p.labels,
        "annotations": p.annotations,
    })
}

/// The Deployment of one replica that runs the instance (`restart = "on-failure"`).
pub fn deployment(p: &PodInput<'_>) -> Result<Deployment, serde_json::Error> {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(p),
        "spec": {
            "replicas": 1,
            "revisionHistoryLimit": 0,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": p.labels},
            "template": {
                "metadata": {"labels": p.labels, "annotations": p.annotations},
                "spec": pod_spec(p),
            },
        },
    }))
}

/// The bare Pod that runs the instance once (`restart = "never"`).
pub fn pod(p: &PodInput<'_>) -> Result<Pod, serde_json::Error> {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata(p),
        "spec": pod_spec(p),
    }))
}

/// A Service in front of the instance's pod: `NodePort`, or `ClusterIP` for a Route.
pub fn service(
    name: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    port: u16,
    node_port: bool,
) -> Result<Service, serde_json::Error> {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "type": if node_port { "NodePort" } else { "ClusterIP" },
            "selector": labels,
            "ports": [{"name": PORT_NAME, "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }))
}

/// OpenShift's Route, which this crate has no type of.
pub fn route_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("route.openshift.io", "v1", "Route"))
}

/// An edge-terminated Route to the instance's Service: the router reaches it over HTTPS.
pub fn route(
    name: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    host: Option<&str>,
) -> DynamicObject {
    let mut spec = json!({
        "to": {"kind": "Service", "name": name},
        "port": {"targetPort": PORT_NAME},
        "tls": {"termination": "edge", "insecureEdgeTerminationPolicy": "Redirect"},
    });
    if let Some(host) = host {
        spec["host"] = json!(host);
    }
    let mut route = DynamicObject::new(name, &route_resource()).within(namespace);
    route.metadata.labels = Some(labels.clone());
    route.data = json!({ "spec": spec });
    route
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(
        labels: &'a BTreeMap<String, String>,
        env: &'a BTreeMap<String, String>,
    ) -> PodInput<'a> {
        PodInput {
            name: "sdp-orders-0123456789",
            namespace: "sdp",
            labels,
            annotations: labels,
            image: "busybox",
            pull_policy: "IfNotPresent",
            run: "./orders --port $PORT $(cat flags)",
            port: 8080,
            env,
            health: "/healthz",
            host_network: false,
            memory: "256Mi",
            cpu: "250m",
            run_as_user: 65534,
            fetch_url: "http://10.0.0.1:9180",
            grant: "00ff",
            secret: "s3cret",
            never_restart: false,
        }
    }

    #[test]
    fn commands_and_values_reach_the_shell_as_written_and_user_code_gets_no_cluster_credential() {
        let labels = BTreeMap::from([("sdp.service".to_owned(), "orders".to_owned())]);
        let env = BTreeMap::from([("GREETING".to_owned(), "$(HOME) costs $$5".to_owned())]);
        let d = deployment(&input(&labels, &env)).unwrap();
        let spec = d.spec.unwrap().template.spec.unwrap();
        let service = &spec.containers[0];
        assert_eq!(
            service.command.as_ref().unwrap()[2],
            "./orders --port $$PORT $$(cat flags)"
        );
        let env = service.env.as_ref().unwrap();
        assert_eq!(env[0].value.as_deref(), Some("$$(HOME) costs $$$$5"));
        assert_eq!(env[1].name, "PORT");
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.enable_service_links, Some(false));
        assert_eq!(spec.security_context.unwrap().run_as_non_root, Some(true));
        assert!(service.volume_mounts.as_ref().unwrap()[0].read_only == Some(true));
    }

    #[test]
    fn a_nodeport_service_and_an_edge_route_select_the_instance_by_its_labels() {
        let labels = BTreeMap::from([
            ("sdp.sandbox".to_owned(), "sbx_0000000000000001".to_owned()),
            ("sdp.service".to_owned(), "orders".to_owned()),
        ]);
        let service = service("sdp-orders-0123456789", "sdp", &labels, 8080, true).unwrap();
        let spec = service.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("NodePort"));
        assert_eq!(spec.selector.as_ref(), Some(&labels));
        assert_eq!(service.metadata.labels.as_ref(), Some(&labels));
        let route = route("sdp-orders-0123456789", "sdp", &labels, Some("x.apps.test"));
        assert_eq!(route.metadata.labels.as_ref(), Some(&labels));
        assert_eq!(route.data["spec"]["host"], "x.apps.test");
        assert_eq!(route.data["spec"]["to"]["name"], "sdp-orders-0123456789");
        assert_eq!(route.data["spec"]["tls"]["termination"], "edge");
        let pod = pod(&PodInput {
            never_restart: true,
            ..input(&labels, &BTreeMap::new())
        })
        .unwrap();
        assert_eq!(pod.spec.unwrap().restart_policy.as_deref(), Some("Never"));
    }
}
