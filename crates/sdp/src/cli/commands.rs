//! The client's subcommands and what each does.

use clap::Subcommand;
use sdp_api::{CreateSandbox, ListParams, Redeploy, Sandbox, Selection};
use sdp_client::{Client, ClientError, Store, StoredSession};
use sdp_protocol::{BranchName, DeploymentId, SandboxId, SandboxName, ServiceName};

use super::follow::{self, Render};
use super::output::{
    self, BAD, BOLD, BUSY, Cell, DIM, GOOD, NAME, Table, note, print_json, say, spin, state_style,
};
use super::{AUTH, FAILED, Failure, Session, env};

/// What `sdp extend NAME` adds when no duration is given: the dashboard's button does the same.
const DEFAULT_EXTEND: &str = "24h";

#[derive(Subcommand)]
pub enum ClientCommand {
    /// Log in with your Bitbucket username and password (or SDP_USERNAME and SDP_PASSWORD).
    Login {
        /// The SDP server, like https://sdp.example.com (else SDP_SERVER, else the last one).
        #[arg(long, value_name = "URL")]
        server: Option<String>,
    },
    /// End the session on the server and forget its token.
    Logout,
    /// Create a sandbox, or redeploy yours, with a branch for each service.
    Deploy {
        /// The sandbox's name: lower-case letters, digits and `-`.
        name: String,
        /// A service and its branch, like orders@feature/x.
        #[arg(required = true, value_name = "SERVICE@BRANCH")]
        services: Vec<String>,
        /// How long the sandbox lives, like 8h (the server's default when absent).
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
        /// Show the steps and the log until the deployment ends; exit 1 when it failed.
        #[arg(long, short)]
        follow: bool,
        /// Follow the services' branches: each is redeployed whenever its branch moves (a
        /// push webhook, or polling), with your credentials while you are logged in.
        #[arg(long)]
        follow_branch: bool,
        /// Print JSON: the sandbox and its deployment, or with --follow the log's frames.
        #[arg(long)]
        json: bool,
    },
    /// Follow a service's branch in your sandbox (redeploy it on every push), or stop with --off.
    Follow {
        name: String,
        service: String,
        /// Stop following.
        #[arg(long)]
        off: bool,
        #[arg(long)]
        json: bool,
    },
    /// List live sandboxes: yours, or everyone's with --all.
    Ls {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show a sandbox: its services, branches, commits and states, its URL and expiry.
    Status {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a sandbox's runtime log (its services' output), or a deployment's log.
    Logs {
        /// A sandbox's name, or a deployment's id (dep_…).
        #[arg(value_name = "NAME|DEPLOYMENT")]
        target: String,
        /// The log of this deployment of the sandbox.
        #[arg(long, value_name = "ID")]
        deployment: Option<String>,
        /// Keep following the log as it grows.
        #[arg(long, short)]
        follow: bool,
        /// Only this service's lines.
        #[arg(long, value_name = "SERVICE")]
        service: Option<String>,
    },
    /// Push a sandbox's expiry to DURATION from now (24h when absent).
    Extend {
        name: String,
        #[arg(value_name = "DURATION", conflicts_with = "ttl")]
        duration: Option<String>,
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete a sandbox: its services stop and its URL ends.
    Rm { name: String },
    /// List the agents: deploy hosts and gateways, and what they run.
    Agents {
        #[arg(long)]
        json: bool,
    },
    /// Print a sandbox's URL, and open it in a browser when one is available.
    Open { name: String },
}

pub async fn run(command: ClientCommand) -> Result<(), Failure> {
    match command {
        ClientCommand::Login { server } => login(server).await,
        ClientCommand::Logout => logout().await,
        ClientCommand::Deploy {
            name,
            services,
            ttl,
            follow,
            follow_branch,
            json,
        } => deploy(name, &services, ttl, follow, follow_branch, json).await,
        ClientCommand::Follow {
            name,
            service,
            off,
            json,
        } => set_follow(&name, &service, !off, json).await,
        ClientCommand::Ls { all, json } => ls(all, json).await,
        ClientCommand::Status { name, json } => status(&name, json).await,
        ClientCommand::Logs {
            target,
            deployment,
            follow,
            service,
        } => logs(&target, deployment, follow, service).await,
        ClientCommand::Extend {
            name,
            duration,
            ttl,
            json,
        } => {
            let ttl = duration
                .or(ttl)
                .unwrap_or_else(|| DEFAULT_EXTEND.to_owned());
            extend(&name, &ttl, json).await
        }
        ClientCommand::Rm { name } => rm(&name).await,
        ClientCommand::Agents { json } => agents(json).await,
        ClientCommand::Open { name } => open(&name).await,
    }
}

async fn login(server: Option<String>) -> Result<(), Failure> {
    let store = Store::locate()?;
    let stored = store.load()?;
    let server = server
        .or_else(|| env("SDP_SERVER"))
        .or_else(|| stored.as_ref().map(|s| s.server.clone()))
        .ok_or_else(|| Failure::usage("which SDP server? give --server URL (or set SDP_SERVER)"))?;
    let client = Client::new(&server, None)?;
    let user = match env("SDP_USERNAME") {
        Some(user) => user,
        None => output::ask("Bitbucket username: ")?,
    };
    if user.is_empty() {
        return Err(Failure::new(AUTH, "no username given"));
    }
    let password = match env("SDP_PASSWORD") {
        Some(password) => password,
        None => output::ask_password(&user)?,
    };
    let answer = spin(
        "checking your credentials with git",
        client.login(&user, &password),
    )
    .await?;
    store.save(&StoredSession {
        server: client.server().to_owned(),
        user: answer.user.clone(),
        token: answer.token,
        expires_at: answer.expires_at.clone(),
    })?;
    say(
        GOOD,
        format!(
            "Logged in to {} as {} until {} ({}).",
            client.server(),
            answer.user,
            answer.expires_at,
            output::relative(&answer.expires_at)
        ),
    );
    Ok(())
}

async fn logout() -> Result<(), Failure> {
    let store = Store::locate()?;
    let session = Session::open();
    let removed = store.remove()?;
    let session = match session {
        Ok(session) => session,
        Err(_) if removed => {
            say(GOOD, "Logged out.");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    match session.client.logout().await {
        Ok(()) => {}
        // Ended already: what logging out asks for.
        Err(e) if e.needs_login() => {}
        Err(e) => {
            let failure = Failure::from(e);
            return Err(Failure {
                message: format!(
                    "the token is forgotten here, but the server was not told: {}",
                    failure.message
                ),
                ..failure
            });
        }
    }
    say(GOOD, format!("Logged out of {}.", session.client.server()));
    Ok(())
}

/// `orders@feature/x` as a selection; the branch is everything after the first `@`. Names
/// are checked here as the server checks them, so that a typo is bad usage (exit 2) that
/// sends nothing.
fn selection(raw: &str, follow: bool) -> Result<Selection, Failure> {
    match raw.split_once('@') {
        Some((service, branch)) if !service.is_empty() && !branch.is_empty() => {
            let service = ServiceName::parse(service.to_owned()).map_err(Failure::usage_of)?;
            let branch = BranchName::parse(branch.to_owned()).map_err(Failure::usage_of)?;
            Ok(Selection {
                service: service.as_str().to_owned(),
                branch: branch.as_str().to_owned(),
                // Without the flag a redeploy leaves following as it was.
                follow: follow.then_some(true),
            })
        }
        _ => Err(Failure::usage(format!(
            "`{raw}` is not SERVICE@BRANCH, like orders@feature/x"
        ))),
    }
}

fn is_live(sandbox: &Sandbox) -> bool {
    !matches!(sandbox.state.as_str(), "deleted" | "expired")
}

async fn deploy(
    name: String,
    services: &[String],
    ttl: Option<String>,
    follow: bool,
    follow_branch: bool,
    json: bool,
) -> Result<(), Failure> {
    // A sandbox is named by its name, or by its id when it exists.
    if SandboxId::parse(name.clone()).is_err() {
        SandboxName::parse(name.clone()).map_err(Failure::usage_of)?;
    }
    let selections = services
        .iter()
        .map(|s| selection(s, follow_branch))
        .collect::<Result<Vec<_>, _>>()?;
    let mut session = Session::open()?;
    let existing = session.client.sandbox(&name).await?;
    let redeploy = existing.as_ref().is_some_and(is_live);
    let doing = if redeploy {
        "redeploying"
    } else {
        "creating the sandbox"
    };
    // The spinner turns inside the call, so that it is gone while a password is asked.
    let accepted = session
        .with_reauth(|client| {
            let (name, selections, ttl) = (name.clone(), selections.clone(), ttl.clone());
            async move { spin(doing, submit(&client, &name, selections, ttl, redeploy)).await }
        })
        .await?;
    let Some(deployment) = accepted.deployment.clone() else {
        if json {
            print_json(&accepted);
        } else {
            say(GOOD, format!("{} is up to date: nothing to deploy.", name));
        }
        return Ok(());
    };
    if !follow {
        if json {
            print_json(&accepted);
        } else {
            say(
                BOLD,
                format!(
                    "Deploying {} ({}): {}",
                    accepted.sandbox.name,
                    deployment.id,
                    services.join(", ")
                ),
            );
            say(NAME, &accepted.sandbox.url);
            note(
                DIM,
                format!(
                    "`sdp logs {} -f` follows it; `sdp status {}` shows it.",
                    deployment.id, name
                ),
            );
        }
        return Ok(());
    }
    if !json {
        note(
            BOLD,
            format!("Deploying {} ({})", accepted.sandbox.name, deployment.id),
        );
    }
    let names: Vec<String> = selections.iter().map(|s| s.service.clone()).collect();
    let mut render = Render::new(json, None, &names);
    let mut follower = session.client.follow_deployment(&deployment.id);
    let ended = follow::to_end(&mut follower, &mut render).await?;
    finish(
        &session.client,
        &deployment.id,
        ended,
        &accepted.sandbox,
        json,
    )
    .await
}

/// Creates the sandbox, or redeploys it when `redeploy` (it exists, and lives); a `ttl`
/// extends a redeployed one.
async fn submit(
    client: &Client,
    name: &str,
    selections: Vec<Selection>,
    ttl: Option<String>,
    redeploy: bool,
) -> Result<sdp_api::Accepted, ClientError> {
    if !redeploy {
        let create = CreateSandbox {
            name: name.to_owned(),
            services: selections.clone(),
            ttl: ttl.clone(),
        };
        match client.create(&create).await {
            // Created meanwhile (by another shell of the same person): redeploy it.
            Err(e) if e.code() == Some("sandbox_exists") => {}
            other => return other,
        }
    }
    let accepted = client
        .redeploy(
            name,
            &Redeploy {
                services: selections,
            },
        )
        .await?;
    match ttl {
        Some(ttl) => {
            let sandbox = client.extend(name, &ttl).await?;
            Ok(sdp_api::Accepted {
                sandbox,
                ..accepted
            })
        }
        None => Ok(accepted),
    }
}

/// Exit 0 when the deployment ended ready, else 1 with its error and the step that failed.
async fn finish(
    client: &Client,
    id: &str,
    ended: Option<follow::Ended>,
    sandbox: &Sandbox,
    json: bool,
) -> Result<(), Failure> {
    let ended = match ended {
        Some(ended) => ended,
        // Closed without an end frame: ask what became of it.
        None => {
            let d = client.deployment(id).await?;
            follow::Ended {
                state: d.state,
                error: d.error,
                failed_step: None,
            }
        }
    };
    if ended.state == "ready" {
        if !json {
            say(GOOD, format!("{} is ready: {}", sandbox.name, sandbox.url));
        }
        return Ok(());
    }
    let step = ended
        .failed_step
        .map(|s| format!(" at {s}"))
        .unwrap_or_default();
    let error = ended.error.map(|e| format!(": {e}")).unwrap_or_default();
    Err(Failure::new(
        FAILED,
        format!("deployment {id} {}{step}{error}", ended.state),
    )
    .hint(format!("`sdp logs {id}` prints its whole log")))
}

async fn ls(all: bool, json: bool) -> Result<(), Failure> {
    let mut session = Session::open()?;
    let owner = if all {
        None
    } else {
        Some(session.user().await?)
    };
    let params = ListParams {
        owner,
        ..ListParams::default()
    };
    let sandboxes: Vec<Sandbox> = spin("listing", session.client.sandboxes(params))
        .await?
        .into_iter()
        .filter(is_live)
        .collect();
    if json {
        print_json(&sandboxes);
        return Ok(());
    }
    if sandboxes.is_empty() {
        note(
            DIM,
            if all {
                "No live sandboxes."
            } else {
                "You have no live sandboxes; `sdp deploy NAME SERVICE@BRANCH` makes one, `sdp ls --all` lists everyone's."
            },
        );
        return Ok(());
    }
    let mut headers = vec!["NAME"];
    if all {
        headers.push("OWNER");
    }
    headers.extend(["STATE", "SERVICES", "EXPIRES", "URL"]);
    let mut table = Table::new(&headers);
    for s in &sandboxes {
        let mut row = vec![Cell::styled(&s.name, NAME)];
        if all {
            row.push(Cell::new(&s.owner));
        }
        let services: Vec<String> = s
            .services
            .iter()
            .map(|x| format!("{}@{}", x.service, x.branch))
            .collect();
        row.extend([
            Cell::styled(&s.state, state_style(&s.state)),
            Cell::new(services.join(", ")),
            Cell::styled(
                output::relative(&s.expires_at),
                if s.expires_soon {
                    BUSY
                } else {
                    anstyle::Style::new()
                },
            ),
            Cell::new(&s.url),
        ]);
        table.row(row);
    }
    table.print();
    Ok(())
}

/// The sandbox named `name`, or a failure that says there is none.
async fn find(client: &Client, name: &str) -> Result<Sandbox, Failure> {
    client.sandbox(name).await?.ok_or_else(|| {
        Failure::new(FAILED, format!("there is no sandbox named {name}"))
            .hint("`sdp ls --all` lists the sandboxes")
    })
}

async fn status(name: &str, json: bool) -> Result<(), Failure> {
    let session = Session::open()?;
    let s = find(&session.client, name).await?;
    if json {
        print_json(&s);
        return Ok(());
    }
    output::out(format_args!(
        "{}{}{}  {}{}{}\n",
        NAME.render(),
        s.name,
        NAME.render_reset(),
        state_style(&s.state).render(),
        s.state,
        state_style(&s.state).render_reset()
    ));
    output::out(format_args!("owner:    {}\nurl:      {}\n", s.owner, s.url));
    let expiry = format!("{} ({})", s.expires_at, output::relative(&s.expires_at));
    if s.expires_soon {
        say(
            BUSY,
            format!("expires:  {expiry}: `sdp extend {}` keeps it", s.name),
        );
    } else {
        output::out(format_args!("expires:  {expiry}\n"));
    }
    output::out("\n");
    let mut table = Table::new(&[
        "SERVICE", "BRANCH", "COMMIT", "STATE", "UPSTREAM", "RESTARTS", "FOLLOW",
    ]);
    for x in &s.services {
        table.row(vec![
            Cell::styled(&x.service, NAME),
            Cell::new(&x.branch),
            Cell::new(output::short_commit(x.commit.as_deref())),
            Cell::styled(&x.state, state_style(&x.state)),
            Cell::new(x.upstream.as_deref().unwrap_or("-")),
            Cell::new(x.restarts.to_string()),
            Cell::new(if x.follow { "yes" } else { "-" }),
        ]);
    }
    table.print();
    for x in &s.services {
        if let Some(pending) = &x.pending {
            say(
                BUSY,
                format!(
                    "{}: new commit {} waiting: {}",
                    x.service,
                    output::short_commit(Some(&pending.commit)),
                    pending.reason
                ),
            );
        }
    }
    for x in s.services.iter().filter(|x| x.reason.is_some()) {
        say(
            BAD,
            format!("{}: {}", x.service, x.reason.as_deref().unwrap_or_default()),
        );
        for line in &x.last_lines {
            say(DIM, format!("  {line}"));
        }
    }
    Ok(())
}

async fn set_follow(name: &str, service: &str, follow: bool, json: bool) -> Result<(), Failure> {
    let session = Session::open()?;
    let s = session.client.set_follow(name, service, follow).await?;
    if json {
        print_json(&s);
    } else if follow {
        say(
            GOOD,
            format!("{service} in {name} follows its branch: each push redeploys it."),
        );
    } else {
        say(
            GOOD,
            format!("{service} in {name} no longer follows its branch."),
        );
    }
    Ok(())
}

async fn logs(
    target: &str,
    deployment: Option<String>,
    follow: bool,
    service: Option<String>,
) -> Result<(), Failure> {
    let session = Session::open()?;
    let client = &session.client;
    let deployment = match deployment {
        Some(id) => Some(id),
        None if DeploymentId::parse(target.to_owned()).is_ok() => Some(target.to_owned()),
        None => None,
    };
    match deployment {
        Some(id) => {
            if !follow {
                let text = client.deployment_log(&id).await?;
                print_filtered(&text, service.as_deref());
                return Ok(());
            }
            let d = client.deployment(&id).await?;
            let names: Vec<String> = d.services.iter().map(|s| s.service.clone()).collect();
            let mut render = Render::new(false, service, &names);
            let mut follower = client.follow_deployment(&id);
            match follow::to_end(&mut follower, &mut render).await? {
                Some(ended) if ended.state != "ready" => Err(Failure::new(
                    FAILED,
                    format!(
                        "deployment {id} {}{}",
                        ended.state,
                        ended.error.map(|e| format!(": {e}")).unwrap_or_default()
                    ),
                )),
                _ => Ok(()),
            }
        }
        None => {
            if !follow {
                let text = client.runtime_log(target, service.as_deref()).await?;
                output::out(text);
                return Ok(());
            }
            let s = find(client, target).await?;
            let names: Vec<String> = s.services.iter().map(|x| x.service.clone()).collect();
            let mut render = Render::new(false, None, &names);
            let mut follower = client.follow_runtime(&s.id, service.as_deref(), 1);
            follow::to_end(&mut follower, &mut render).await?;
            Ok(())
        }
    }
}

/// The lines of a deployment's text log of one service (`[service/stream]`), or all.
fn print_filtered(text: &str, service: Option<&str>) {
    match service {
        None => output::out(text),
        Some(service) => {
            let tag = format!(" [{service}/");
            let step = format!(" [{service}] ");
            for line in text
                .lines()
                .filter(|l| l.contains(&tag) || l.contains(&step))
            {
                output::out(format_args!("{line}\n"));
            }
        }
    }
}

async fn extend(name: &str, ttl: &str, json: bool) -> Result<(), Failure> {
    let session = Session::open()?;
    let s = session.client.extend(name, ttl).await?;
    if json {
        print_json(&s);
    } else {
        say(
            GOOD,
            format!(
                "{} now expires at {} ({}).",
                s.name,
                s.expires_at,
                output::relative(&s.expires_at)
            ),
        );
    }
    Ok(())
}

async fn rm(name: &str) -> Result<(), Failure> {
    let session = Session::open()?;
    match spin("deleting", session.client.delete(name)).await {
        Ok(()) => {}
        Err(ClientError::Api { status: 404, .. }) => {
            return Err(
                Failure::new(FAILED, format!("there is no sandbox named {name}"))
                    .hint("`sdp ls` lists yours"),
            );
        }
        Err(e) => return Err(e.into()),
    }
    say(
        GOOD,
        format!("{name} is deleted: its services are stopping."),
    );
    Ok(())
}

async fn agents(json: bool) -> Result<(), Failure> {
    let session = Session::open()?;
    let agents = session.client.agents().await?;
    if json {
        print_json(&agents);
        return Ok(());
    }
    if agents.is_empty() {
        note(DIM, "No agent has connected to this server yet.");
        return Ok(());
    }
    let mut table = Table::new(&[
        "NAME",
        "ROLE",
        "STATE",
        "VERSION",
        "HOST",
        "RUNNING",
        "LAST SEEN",
    ]);
    for a in &agents {
        let state = if a.connected { "connected" } else { "offline" };
        table.row(vec![
            Cell::styled(&a.name, NAME),
            Cell::new(&a.role),
            Cell::styled(state, state_style(state)),
            Cell::new(&a.version),
            Cell::new(&a.host),
            Cell::new(a.running.to_string()),
            Cell::new(output::relative(&a.last_seen)),
        ]);
    }
    table.print();
    Ok(())
}

async fn open(name: &str) -> Result<(), Failure> {
    let session = Session::open()?;
    let s = find(&session.client, name).await?;
    output::out(format_args!("{}\n", s.url));
    // Only for a person at a desktop: a text browser would take over the terminal, and a
    // script wants the URL alone.
    let desktop =
        env("DISPLAY").is_some() || env("WAYLAND_DISPLAY").is_some() || env("BROWSER").is_some();
    if desktop
        && std::io::IsTerminal::is_terminal(&std::io::stdout())
        && let Err(e) = webbrowser::open(&s.url)
    {
        note(DIM, format!("(cannot open a browser: {e})"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_selection_splits_at_the_first_at_sign_and_needs_both_parts() {
        let s = selection("orders@feature/a@b", false).unwrap();
        assert_eq!(
            (s.service.as_str(), s.branch.as_str()),
            ("orders", "feature/a@b")
        );
        assert_eq!(
            s.follow, None,
            "a redeploy without the flag keeps following as it was"
        );
        assert_eq!(selection("orders@main", true).unwrap().follow, Some(true));
        for bad in [
            "orders",
            "@main",
            "orders@",
            "",
            "orders@-x",
            "orders@a..b",
            "Orders@main",
        ] {
            let e = selection(bad, false).unwrap_err();
            assert_eq!(e.status, crate::cli::USAGE, "{bad}");
        }
    }
}
