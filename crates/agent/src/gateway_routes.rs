//! A sandbox's own API gateway (a catalog service of `kind = "gateway"`, run by the gateway
//! agent like any service): the routes file it reads (SPEC §5).
//!
//! The agent writes it before the gateway starts, from the last route table the control plane
//! sent, and again whenever a table changes the sandbox's routes, then reloads the gateway
//! (a signal, or a restart). The file is the sandbox's routes as JSON, or the gateway's own
//! template rendered with them. Everything that touches the checkout (reading the template,
//! writing the file) runs as user code's user: the checkout is user code's, and a link it
//! planted there must lead nowhere the agent's own rights would reach.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sdp_protocol::{
    GatewayRoutes, GatewaySpec, Reload, RouteTable, SandboxId, SandboxName, ServiceName,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::isolation::UserCode;
use crate::supervise::Supervisor;

/// The largest template read, and the largest file written.
const MAX_TEMPLATE: u64 = 1 << 20;
const MAX_RENDERED: usize = 4 << 20;
/// What a template may spend rendering (minijinja's fuel: about one unit per instruction), so
/// that a loop in a branch's template cannot hold the agent.
const TEMPLATE_FUEL: u64 = 5_000_000;
/// How long reading the template or writing the file may take.
const FILE_TIMEOUT: Duration = Duration::from_secs(10);

/// Writes the file aside and renames it over the old one, so the gateway never reads half a
/// table; as user code's user, in the checkout, with the path as an argument.
const WRITE_SCRIPT: &str = r#"umask 022 && mkdir -p -- "$(dirname -- "$1")" && cat > "$1.sdp-new" && mv -f -- "$1.sdp-new" "$1""#;

pub struct GatewayRoutesFiles {
    users: UserCode,
    /// The last table applied: what a gateway that starts now is given.
    table: Mutex<Option<RouteTable>>,
    /// What each running gateway was given last, by sandbox id and service.
    written: Mutex<HashMap<(SandboxId, ServiceName), GatewayRoutes>>,
}

impl GatewayRoutesFiles {
    pub fn new(users: UserCode) -> Self {
        Self {
            users,
            table: Mutex::default(),
            written: Mutex::default(),
        }
    }

    /// `sandbox`'s routes by the last table; none yet (the table has not come) leaves every
    /// request to the gateway's own defaults.
    pub fn routes_of(&self, sandbox: &SandboxName) -> GatewayRoutes {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|table| table.gateway_routes(sandbox))
            .unwrap_or_else(|| GatewayRoutes {
                sandbox: sandbox.clone(),
                generation: 0,
                routes: Vec::new(),
            })
    }

    /// Writes the routes file of the gateway `service` of `sandbox`, in `checkout`, and
    /// remembers what it holds.
    pub async fn write(
        &self,
        sandbox: &SandboxId,
        service: &ServiceName,
        spec: &GatewaySpec,
        checkout: &Path,
        routes: &GatewayRoutes,
    ) -> Result<(), String> {
        let content = match &spec.routes_template {
            None => {
                let mut json = serde_json::to_vec_pretty(routes).expect("routes serialize");
                json.push(b'\n');
                json
            }
            Some(template) => {
                let source = self.read_template(checkout, template.as_str()).await?;
                render(&source, template.as_str(), routes)?.into_bytes()
            }
        };
        self.write_file(checkout, spec.routes_file.as_str(), &content)
            .await?;
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((sandbox.clone(), service.clone()), routes.clone());
        Ok(())
    }

    /// A table was applied: each running gateway whose sandbox's routes changed gets its file
    /// again, and is reloaded. A restart happens in the background (it waits for health, and
    /// for a deployment of the sandbox in progress); the table is in use before it ends.
    pub async fn apply(&self, table: &RouteTable, supervisor: &Arc<Supervisor>) {
        *self.table.lock().unwrap_or_else(|e| e.into_inner()) = Some(table.clone());
        for (sandbox, spec) in supervisor.gateways() {
            let Some(gateway) = spec.gateway.clone() else {
                continue;
            };
            // A sandbox no longer in the table is being torn down.
            let Some(routes) = table.gateway_routes(&spec.sandbox) else {
                continue;
            };
            let key = (sandbox.clone(), spec.service.clone());
            let unchanged = self
                .written
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                .is_some_and(|written| written.same_routes(&routes));
            if unchanged {
                continue;
            }
            let service = spec.service.clone();
            if let Err(reason) = self
                .write(&sandbox, &service, &gateway, &spec.checkout, &routes)
                .await
            {
                tracing::warn!(%sandbox, %service, %reason, "cannot write a gateway's routes");
                supervisor
                    .log
                    .system(
                        &sandbox,
                        &service,
                        format!("the routes could not be written: {reason}"),
                    )
                    .await;
                continue;
            }
            supervisor
                .log
                .system(
                    &sandbox,
                    &service,
                    format!(
                        "routes of table generation {} written to {}; reloading ({})",
                        routes.generation, gateway.routes_file, gateway.reload
                    ),
                )
                .await;
            match gateway.reload {
                Reload::Signal(signal) => {
                    if let Err(e) = supervisor.runtime.signal(&sandbox, &service, signal).await {
                        tracing::warn!(%sandbox, %service, error = %e, "cannot signal a gateway");
                    }
                }
                Reload::Restart => {
                    let supervisor = supervisor.clone();
                    tokio::spawn(async move {
                        if let Err(reason) = supervisor.restart_now(&sandbox, spec).await {
                            tracing::warn!(%sandbox, %service, %reason, "a gateway did not come back after its restart");
                        }
                    });
                }
            }
        }
    }

    /// The sandbox is gone, or its gateway replaced: nothing is remembered of it.
    pub fn forget(&self, sandbox: &SandboxId) {
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(s, _), _| s != sandbox);
    }

    async fn read_template(&self, checkout: &Path, template: &str) -> Result<String, String> {
        let mut child = self
            .users
            .command("cat")
            .arg("--")
            .arg(template)
            .current_dir(checkout)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot read the template {template}: {e}"))?;
        let mut source = Vec::new();
        let stdout = child.stdout.take().expect("piped");
        let read = async {
            stdout
                .take(MAX_TEMPLATE + 1)
                .read_to_end(&mut source)
                .await
                .map_err(|e| e.to_string())?;
            child.wait().await.map_err(|e| e.to_string())
        };
        let status = tokio::time::timeout(FILE_TIMEOUT, read)
            .await
            .map_err(|_| format!("reading the template {template} took too long"))?
            .map_err(|e| format!("cannot read the template {template}: {e}"))?;
        if !status.success() {
            return Err(format!(
                "the template {template} is not a readable file of the gateway's repository"
            ));
        }
        if source.len() as u64 > MAX_TEMPLATE {
            return Err(format!(
                "the template {template} is larger than {MAX_TEMPLATE} bytes"
            ));
        }
        String::from_utf8(source).map_err(|_| format!("the template {template} is not UTF-8"))
    }

    async fn write_file(&self, checkout: &Path, path: &str, content: &[u8]) -> Result<(), String> {
        let mut child = self
            .users
            .command("sh")
            .arg("-c")
            .arg(WRITE_SCRIPT)
            .arg("sh")
            .arg(path)
            .current_dir(checkout)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot write {path}: {e}"))?;
        let mut stdin = child.stdin.take().expect("piped");
        let write = async {
            stdin.write_all(content).await.map_err(|e| e.to_string())?;
            drop(stdin);
            child.wait_with_output().await.map_err(|e| e.to_string())
        };
        let output = tokio::time::timeout(FILE_TIMEOUT, write)
            .await
            .map_err(|_| format!("writing {path} took too long"))?
            .map_err(|e| format!("cannot write {path}: {e}"))?;
        if !output.status.success() {
            let why = String::from_utf8_lossy(&output.stderr);
            return Err(format!(
                "cannot write {path}: {}",
                why.lines().last().unwrap_or("the write failed")
            ));
        }
        Ok(())
    }
}

/// The gateway's template rendered with the routes: `sandbox`, `generation` and `routes` (each
/// with `prefix`, `service`, `target`, `upstream` and, when down, `state`), as in the JSON.
fn render(source: &str, name: &str, routes: &GatewayRoutes) -> Result<String, String> {
    let mut env = minijinja::Environment::new();
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.add_template(name, source)
        .map_err(|e| format!("the template {name} is not valid: {e}"))?;
    let rendered = env
        .get_template(name)
        .and_then(|t| t.render(minijinja::Value::from_serialize(routes)))
        .map_err(|e| format!("the template {name} did not render: {e}"))?;
    if rendered.len() > MAX_RENDERED {
        return Err(format!(
            "the template {name} renders more than {MAX_RENDERED} bytes"
        ));
    }
    Ok(rendered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdp_protocol::{GatewayRoute, RouteKind};

    fn routes() -> GatewayRoutes {
        GatewayRoutes {
            sandbox: SandboxName::parse("demo").unwrap(),
            generation: 3,
            routes: vec![GatewayRoute {
                prefix: "/orders".into(),
                service: ServiceName::parse("orders").unwrap(),
                target: RouteKind::Sandbox,
                upstream: Some("http://127.0.0.1:20001".into()),
                state: None,
            }],
        }
    }

    #[test]
    fn a_template_is_rendered_with_the_same_data_as_the_json() {
        let out = render(
            "# {{ sandbox }} g{{ generation }}\n{% for r in routes %}{{ r.prefix }} {{ r.target }} {{ r.upstream }}\n{% endfor %}",
            "routes.tmpl",
            &routes(),
        )
        .unwrap();
        assert_eq!(out, "# demo g3\n/orders sandbox http://127.0.0.1:20001\n");
    }

    #[test]
    fn a_template_that_never_ends_runs_out_of_fuel_instead_of_holding_the_agent() {
        let err = render(
            "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
            "loop.tmpl",
            &routes(),
        )
        .unwrap_err();
        assert!(err.contains("did not render"), "{err}");
    }

    #[test]
    fn a_broken_template_says_what_is_wrong() {
        let err = render("{% for %}", "bad.tmpl", &routes()).unwrap_err();
        assert!(err.contains("bad.tmpl is not valid"), "{err}");
    }

    #[tokio::test]
    async fn the_routes_file_is_written_whole_inside_the_checkout() {
        let dir = tempfile::tempdir().unwrap();
        let files = GatewayRoutesFiles::new(UserCode::from_config(None, true).unwrap());
        let spec = GatewaySpec {
            routes_file: sdp_protocol::CheckoutPath::parse("config/routes.json").unwrap(),
            routes_template: None,
            reload: Reload::Restart,
        };
        let sandbox = SandboxId::parse("sbx_0123456789abcdef").unwrap();
        let service = ServiceName::parse("api-gateway").unwrap();
        files
            .write(&sandbox, &service, &spec, dir.path(), &routes())
            .await
            .unwrap();
        let written: GatewayRoutes =
            serde_json::from_slice(&std::fs::read(dir.path().join("config/routes.json")).unwrap())
                .unwrap();
        assert_eq!(written, routes());
        assert!(!dir.path().join("config/routes.json.sdp-new").exists());
    }
}
