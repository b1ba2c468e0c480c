//! Fake agents over the real `/ws/agent` WebSocket, with the real agent token. A fake is for
//! what a real agent cannot be made to do, and for tests of the control plane alone (the
//! in-process tier), where it stands in for git, builds and the router:
//!
//! - [`FakeAgent`]: says hello, then does only what the test tells it, frame by frame, in
//!   JSON: a hung agent, a sloppy one, a gateway that holds a route table.
//! - [`ScriptedAgent`]: says hello and answers every job by a shared [`Script`]: it checks
//!   credentials against the users it knows, lists branches, runs deployments through their
//!   steps to an outcome with an upstream (or holds them), tears down, applies route tables,
//!   puts sandboxes to sleep and wakes them (or fails to, see [`Wakes`]); it sends
//!   heartbeats, and dials again when its connection ends, as a real agent does. A test can
//!   make it send frames of its own ([`ScriptedAgent::send`]): a gateway's `activity`, `wake`.
//!
//! What the fakes know of the protocol is in [`wire`], so that a change of the protocol is
//! one edit there.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use sdp_protocol::LogStream;

use crate::{AGENT_TOKEN, PASSWORD, USER};

/// An environment whose control plane agents can dial.
pub trait ControlPlane {
    /// `ws://…/ws/agent`.
    fn ws_url(&self) -> String;
}

impl ControlPlane for crate::TestEnv {
    fn ws_url(&self) -> String {
        crate::TestEnv::ws_url(self)
    }
}

impl ControlPlane for crate::InProcessEnv {
    fn ws_url(&self) -> String {
        crate::InProcessEnv::ws_url(self)
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `/ws/agent` with the agent token.
async fn dial(url: &str) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
    let mut req = url.into_client_request()?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {AGENT_TOKEN}").parse().unwrap(),
    );
    Ok(tokio_tungstenite::connect_async(req).await?.0)
}

/// A fake agent for faults a real one cannot be made to show: it connects and says hello,
/// then does only what the test tells it.
pub struct FakeAgent {
    pub sink: futures_util::stream::SplitSink<Socket, Message>,
    pub stream: futures_util::stream::SplitStream<Socket>,
}

impl FakeAgent {
    pub async fn connect(env: &impl ControlPlane, name: &str) -> FakeAgent {
        match FakeAgent::try_connect(env, name, "fake-host").await {
            Ok(fake) => fake,
            Err(answer) => panic!("no welcome: {answer}"),
        }
    }

    /// Says hello as a micro agent on `host`; the server's answer when it is not `welcome`.
    pub async fn try_connect(
        env: &impl ControlPlane,
        name: &str,
        host: &str,
    ) -> Result<FakeAgent, Value> {
        FakeAgent::try_connect_as(env, name, host, "micro").await
    }

    /// A fake agent of `role` (`micro` or `gateway`).
    pub async fn connect_as(env: &impl ControlPlane, name: &str, role: &str) -> FakeAgent {
        match FakeAgent::try_connect_as(env, name, "fake-host", role).await {
            Ok(fake) => fake,
            Err(answer) => panic!("no welcome: {answer}"),
        }
    }

    async fn try_connect_as(
        env: &impl ControlPlane,
        name: &str,
        host: &str,
        role: &str,
    ) -> Result<FakeAgent, Value> {
        FakeAgent::try_connect_with(env, &wire::hello(name, role, host)).await
    }

    /// A micro agent `name` coming back: its hello says which deployments it still runs and
    /// which sandboxes (ids) it holds something of.
    pub async fn come_back(
        env: &impl ControlPlane,
        name: &str,
        deployments: &[&str],
        sandboxes: &[&str],
    ) -> FakeAgent {
        let hello = wire::hello_holding(name, "micro", "fake-host", deployments, sandboxes);
        match FakeAgent::try_connect_with(env, &hello).await {
            Ok(fake) => fake,
            Err(answer) => panic!("no welcome: {answer}"),
        }
    }

    async fn try_connect_with(env: &impl ControlPlane, hello: &str) -> Result<FakeAgent, Value> {
        let socket = dial(&env.ws_url()).await.unwrap();
        let (mut sink, mut stream) = socket.split();
        sink.send(Message::Text(hello.to_owned().into()))
            .await
            .unwrap();
        let answer = next_json(&mut stream).await;
        if answer["type"] != "welcome" {
            return Err(answer);
        }
        Ok(FakeAgent { sink, stream })
    }

    pub async fn send_text(&mut self, text: &str) {
        self.sink
            .send(Message::Text(text.to_owned().into()))
            .await
            .unwrap();
    }

    pub async fn next_json(&mut self) -> Value {
        next_json(&mut self.stream).await
    }

    /// The next job frame whose job is `name`; other frames are skipped.
    pub async fn next_job(&mut self, name: &str) -> Value {
        loop {
            let frame = self.next_json().await;
            if wire::job_name(&frame) == Some(name) {
                return frame;
            }
        }
    }

    /// Sends a `runtime` frame with `events` (see [`wire::runtime_log`] and
    /// [`wire::runtime_instance`]).
    pub async fn send_runtime(&mut self, events: Vec<sdp_protocol::RuntimeEvent>) {
        self.send_text(&wire::runtime(events)).await;
    }

    /// The next `runtime_ack` or `runtime_resend` frame; others are skipped.
    pub async fn next_runtime_answer(&mut self) -> Value {
        loop {
            let frame = self.next_json().await;
            if frame["type"] == "runtime_ack" || frame["type"] == "runtime_resend" {
                return frame;
            }
        }
    }

    /// Answers `job` (a frame from [`FakeAgent::next_job`]) with `output`.
    pub async fn reply(&mut self, job: &Value, output: Value) {
        self.send_text(&wire::reply_json(job, output)).await;
    }
}

pub async fn next_json<S>(stream: &mut S) -> Value
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        // Generous: a frame may wait for a build, which a cold Go cache makes slow.
        let frame = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("a frame within 60s")
            .expect("the connection is open")
            .expect("a frame");
        if let Message::Text(t) = frame {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

/// How scripted micro agents answer deploy jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deploys {
    /// Every service goes through fetching, building, starting and healthy at once, and the
    /// outcome gives it an upstream (where nothing listens: no request is meant to reach it).
    Ready,
    /// Accepted and `fetching`, then nothing until [`Script::release`]: a deployment in
    /// progress for as long as the test needs one.
    Held,
}

/// How scripted micro agents answer wake jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wakes {
    /// Every service deployed to the sandbox runs again, at [`WOKEN_UPSTREAM`].
    Ready,
    /// The wake fails with this message, as a real agent's whose kept build is gone.
    Fail(String),
}

/// What scripted agents know and do, shared by those of one environment (and kept across
/// their reconnections), and what they were sent.
pub struct Script {
    /// Users and passwords the "git server" accepts, as the real one's.
    users: Mutex<HashMap<String, String>>,
    /// Every repository's branches and tips.
    branches: Mutex<Vec<(String, String)>>,
    deploys: Mutex<Deploys>,
    wakes: Mutex<Wakes>,
    /// The services deployed to each sandbox (by id), which a wake starts again.
    deployed: Mutex<HashMap<String, Vec<sdp_protocol::ServiceName>>>,
    /// Scripted deployments by id, so that one a later job supersedes is stopped first.
    running: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    released: tokio::sync::watch::Sender<bool>,
    build_output: Mutex<BuildOutput>,
    /// Every job a scripted agent was sent, as JSON, with `agent` added: its name.
    jobs: Mutex<Vec<Value>>,
    /// The frames each way, for the failure report.
    transcript: Mutex<Vec<String>>,
}

/// What each service's scripted build prints, and after how many of its lines it waits for
/// [`Script::release`].
type BuildOutput = (Vec<(LogStream, String)>, Option<usize>);

/// The tip every branch of a scripted agent's repositories points at.
pub const FAKE_COMMIT: &str = "5dc0ffee5dc0ffee5dc0ffee5dc0ffee5dc0ffee";

/// Where a scripted deployment's instances "listen": the discard port, where nothing does.
pub const FAKE_UPSTREAM: &str = "127.0.0.1:9";

/// Where a scripted wake's instances "listen": not [`FAKE_UPSTREAM`], so that a test sees
/// the wake's answer recorded.
pub const WOKEN_UPSTREAM: &str = "127.0.0.1:7";

impl Default for Script {
    fn default() -> Self {
        Script {
            users: Mutex::new(HashMap::from([(USER.to_owned(), PASSWORD.to_owned())])),
            branches: Mutex::new(vec![("main".to_owned(), FAKE_COMMIT.to_owned())]),
            deploys: Mutex::new(Deploys::Ready),
            wakes: Mutex::new(Wakes::Ready),
            deployed: Mutex::default(),
            running: Mutex::default(),
            released: tokio::sync::watch::Sender::new(false),
            build_output: Mutex::default(),
            jobs: Mutex::default(),
            transcript: Mutex::default(),
        }
    }
}

impl Script {
    /// From now on `user` logs in with `password` (the git server's user list).
    pub fn add_user(&self, user: &str, password: &str) {
        self.users
            .lock()
            .unwrap()
            .insert(user.to_owned(), password.to_owned());
    }

    /// How deploy jobs are answered from now on.
    pub fn set_deploys(&self, deploys: Deploys) {
        *self.deploys.lock().unwrap() = deploys;
    }

    /// How wake jobs are answered from now on.
    pub fn set_wakes(&self, wakes: Wakes) {
        *self.wakes.lock().unwrap() = wakes;
    }

    /// From now on each service's build prints `lines` (`(stream, text)`: `stdout`, `stderr`
    /// or `system`), after its usual line; with `hold_after`, it prints that many and waits
    /// for [`Script::release`] before the rest.
    pub fn set_build_output(&self, lines: Vec<(&str, String)>, hold_after: Option<usize>) {
        let lines = lines
            .into_iter()
            .map(|(stream, text)| (wire::stream(stream), text))
            .collect();
        *self.build_output.lock().unwrap() = (lines, hold_after);
    }

    /// Replaces the branches every repository has: `(name, commit)`.
    pub fn set_branches(&self, branches: &[(&str, &str)]) {
        *self.branches.lock().unwrap() = branches
            .iter()
            .map(|(name, commit)| ((*name).to_owned(), (*commit).to_owned()))
            .collect();
    }

    /// Lets every held deployment (and every later one) go on to its outcome.
    pub fn release(&self) {
        self.released.send_replace(true);
    }

    /// The jobs named `name` (`probe_credentials`, `deploy`, …) scripted agents were sent,
    /// oldest first: each `{"id", "job": {"name", …}, "agent"}`.
    pub fn jobs(&self, name: &str) -> Vec<Value> {
        self.jobs
            .lock()
            .unwrap()
            .iter()
            .filter(|j| j["job"]["name"] == name)
            .cloned()
            .collect()
    }

    /// Every job scripted agents were sent, in the order they came, oldest first.
    pub fn all_jobs(&self) -> Vec<Value> {
        self.jobs.lock().unwrap().clone()
    }

    pub fn transcript(&self) -> String {
        self.transcript.lock().unwrap().join("\n")
    }

    fn accepts(&self, user: &str, password: &str) -> bool {
        self.users.lock().unwrap().get(user).map(String::as_str) == Some(password)
    }

    fn note(&self, line: String) {
        self.transcript.lock().unwrap().push(line);
    }
}

/// A fake agent that answers every job by its [`Script`], in a task of its own; dropping it
/// ends its connection.
pub struct ScriptedAgent {
    pub name: String,
    task: tokio::task::JoinHandle<()>,
    /// Frames for the agent to send on its connection (the one it has, or its next).
    frames: tokio::sync::mpsc::UnboundedSender<String>,
}

impl Drop for ScriptedAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ScriptedAgent {
    /// Dials `url` as agent `name` of `role` (`micro` or `gateway`), and again whenever the
    /// connection ends. Not waited for: see the environment's `wait_for_agents`.
    pub fn spawn(url: String, name: &str, role: &str, script: Arc<Script>) -> ScriptedAgent {
        let (agent, role) = (name.to_owned(), role.to_owned());
        let (frames, mut own) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                if let Err(why) = converse(&url, &agent, &role, &script, &mut own).await {
                    script.note(format!("{agent}: {why}"));
                }
                // As a real agent does after its control plane restarts, a little later.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        ScriptedAgent {
            name: name.to_owned(),
            task,
            frames,
        }
    }

    /// Sends `text` (a frame, see [`wire::activity`] and [`wire::wake`]) on the agent's
    /// connection, after what it is sending now.
    pub fn send(&self, text: String) {
        let _ = self.frames.send(text);
    }

    /// What [`ScriptedAgent::send`] sends through, for a task of the test's own.
    pub fn sender(&self) -> tokio::sync::mpsc::UnboundedSender<String> {
        self.frames.clone()
    }
}

/// One connection of a scripted agent, until it ends.
async fn converse(
    url: &str,
    agent: &str,
    role: &str,
    script: &Arc<Script>,
    own: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
) -> Result<(), String> {
    let socket = dial(url)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let (mut sink, mut stream) = socket.split();
    let hello = wire::hello(agent, role, "fake-host");
    script.note(format!("{agent} -> {hello}"));
    sink.send(Message::Text(hello.into()))
        .await
        .map_err(|e| e.to_string())?;
    let welcome = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .map_err(|_| "no answer to hello".to_owned())?;
    let Some(Ok(Message::Text(welcome))) = welcome else {
        return Err(format!("no welcome: {welcome:?}"));
    };
    let welcome = welcome.as_str();
    script.note(format!("{agent} <- {welcome}"));
    let heartbeat = wire::heartbeat_interval(welcome).ok_or(format!("no welcome: {welcome}"))?;
    let (out, mut outbox) = tokio::sync::mpsc::unbounded_channel::<String>();
    // Deployments in progress end with the connection.
    let mut deployments = tokio::task::JoinSet::new();
    let mut beat = tokio::time::interval(heartbeat);
    loop {
        let text = tokio::select! {
            _ = beat.tick() => wire::heartbeat(),
            Some(text) = outbox.recv() => text,
            Some(text) = own.recv() => {
                script.note(format!("{agent} -> {text}"));
                text
            }
            frame = stream.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let text = text.as_str();
                    script.note(format!("{agent} <- {text}"));
                    let job = wire::job_json(text);
                    if let Some(mut job) = job {
                        job["agent"] = Value::from(agent);
                        script.jobs.lock().unwrap().push(job);
                    }
                    for answer in wire::answer(text, script, &out, &mut deployments) {
                        script.note(format!("{agent} -> {answer}"));
                        sink.send(Message::Text(answer.into())).await.map_err(|e| e.to_string())?;
                    }
                    continue;
                }
                Some(Ok(Message::Close(_))) | None => return Err("connection closed".into()),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(_)) => continue,
            },
        };
        sink.send(Message::Text(text.into()))
            .await
            .map_err(|e| e.to_string())?;
    }
}

/// The protocol as the fakes speak it: [`sdp_protocol`]'s types, and the JSON shapes the
/// frame-by-frame [`FakeAgent`] deals in.
pub mod wire {
    use std::time::Duration;

    use sdp_protocol::{
        AgentMessage, Branch, BranchName, Capability, DeployJob, Event, EventBody, Heartbeat,
        Hello, JobError, JobErrorCode, JobKind, JobOutput, LogStream, PROTOCOL_VERSION, Reply,
        Role, ServerMessage, ServiceOutcome, Step, StepState, decode_server_frame, encode,
    };
    use serde_json::{Value, json};
    use time::OffsetDateTime;
    use tokio::sync::mpsc::UnboundedSender;

    use super::{Deploys, FAKE_COMMIT, FAKE_UPSTREAM, Script, WOKEN_UPSTREAM, Wakes};

    /// The first frame: `hello` as agent `name` of `role` on `host`.
    pub fn hello(name: &str, role: &str, host: &str) -> String {
        hello_holding(name, role, host, &[], &[])
    }

    /// `hello` of an agent that still runs `deployments` and holds something of `sandboxes`
    /// (ids).
    pub fn hello_holding(
        name: &str,
        role: &str,
        host: &str,
        deployments: &[&str],
        sandboxes: &[&str],
    ) -> String {
        let role = match role {
            "micro" => Role::Micro,
            "gateway" => Role::Gateway,
            other => panic!("no role {other}"),
        };
        encode(&AgentMessage::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            name: sdp_protocol::AgentName::parse(name)
                .unwrap_or_else(|e| panic!("agent name {name}: {e}")),
            role,
            version: "fake".to_owned(),
            host: host.to_owned(),
            capabilities: vec![Capability::Git],
            deployments: deployments
                .iter()
                .map(|d| sdp_protocol::DeploymentId::parse(*d).unwrap())
                .collect(),
            sandboxes: sandboxes
                .iter()
                .map(|s| sdp_protocol::SandboxId::parse(*s).unwrap())
                .collect(),
        }))
    }

    /// A gateway's `activity` frame: the sandboxes (names) that had requests.
    pub fn activity(sandboxes: &[&str]) -> String {
        encode(&AgentMessage::Activity {
            sandboxes: sandboxes
                .iter()
                .map(|s| sdp_protocol::SandboxName::parse(*s).unwrap())
                .collect(),
        })
    }

    /// A gateway's `wake` frame: it holds a request for `sandbox` (a name), which sleeps.
    pub fn wake(sandbox: &str) -> String {
        encode(&AgentMessage::Wake {
            sandbox: sdp_protocol::SandboxName::parse(sandbox).unwrap(),
        })
    }

    /// A `runtime` frame of `events`.
    pub fn runtime(events: Vec<sdp_protocol::RuntimeEvent>) -> String {
        encode(&AgentMessage::Runtime { events })
    }

    /// `stdout`, `stderr`, or anything else: `system`.
    pub fn stream(name: &str) -> LogStream {
        match name {
            "stdout" => LogStream::Stdout,
            "stderr" => LogStream::Stderr,
            _ => LogStream::System,
        }
    }

    /// A runtime event: a line `service` printed on `stream` (`stdout`, `stderr`, `system`).
    pub fn runtime_log(
        sandbox: &str,
        seq: u64,
        service: &str,
        stream: &str,
        line: &str,
    ) -> sdp_protocol::RuntimeEvent {
        let stream = self::stream(stream);
        sdp_protocol::RuntimeEvent {
            sandbox: sdp_protocol::SandboxId::parse(sandbox).unwrap(),
            seq,
            ts: OffsetDateTime::now_utc(),
            body: sdp_protocol::RuntimeBody::Log {
                service: sdp_protocol::ServiceName::parse(service).unwrap(),
                stream,
                line: line.to_owned(),
            },
        }
    }

    /// A runtime event: `service`'s instance is now `state` (`running`, `unhealthy`,
    /// `crashed`, `restarting`, `sleeping`), for `reason`, at `upstream`.
    pub fn runtime_instance(
        sandbox: &str,
        seq: u64,
        service: &str,
        state: &str,
        reason: Option<&str>,
        upstream: Option<&str>,
        restarts: u32,
    ) -> sdp_protocol::RuntimeEvent {
        let state: sdp_protocol::InstanceState =
            serde_json::from_value(Value::from(state)).unwrap();
        sdp_protocol::RuntimeEvent {
            sandbox: sdp_protocol::SandboxId::parse(sandbox).unwrap(),
            seq,
            ts: OffsetDateTime::now_utc(),
            body: sdp_protocol::RuntimeBody::Instance(sdp_protocol::InstanceReport {
                service: sdp_protocol::ServiceName::parse(service).unwrap(),
                state,
                reason: reason.map(str::to_owned),
                last_lines: reason
                    .map(|r| vec![format!("last words before {r}")])
                    .unwrap_or_default(),
                upstream: upstream.map(str::to_owned),
                restarts,
                // Worded as the real agent words its last report.
                gave_up: reason.is_some_and(|r| r.starts_with("gave up")),
            }),
        }
    }

    /// The heartbeat period a `welcome` asks for.
    pub(super) fn heartbeat_interval(welcome: &str) -> Option<Duration> {
        match decode_server_frame(welcome).ok()? {
            ServerMessage::Welcome(w) => Some(Duration::from_millis(w.heartbeat_interval_ms)),
            _ => None,
        }
    }

    pub(super) fn heartbeat() -> String {
        encode(&AgentMessage::Heartbeat(Heartbeat {
            load: 0,
            running: 0,
        }))
    }

    /// The job's name of a frame, if it is a job.
    pub fn job_name(frame: &Value) -> Option<&str> {
        (frame["type"] == "job")
            .then(|| frame["job"]["name"].as_str())
            .flatten()
    }

    /// A job frame as JSON (`{"type": "job", "id", "job": {"name", …}}`), if it is one.
    pub(super) fn job_json(text: &str) -> Option<Value> {
        let frame: Value = serde_json::from_str(text).ok()?;
        job_name(&frame)?;
        Some(frame)
    }

    /// The reply to `job` (a job frame) with `output` (`{"outcome": …}`).
    pub fn reply_json(job: &Value, output: Value) -> String {
        json!({"type": "reply", "id": job["id"], "output": output}).to_string()
    }

    /// What a scripted agent answers to `text`, a frame of the control plane. A deployment's
    /// events go out later through `out`, from a task in `deployments`.
    pub(super) fn answer(
        text: &str,
        script: &std::sync::Arc<Script>,
        out: &UnboundedSender<String>,
        deployments: &mut tokio::task::JoinSet<()>,
    ) -> Vec<String> {
        let job = match decode_server_frame(text) {
            Ok(ServerMessage::Job(job)) => job,
            Ok(
                ServerMessage::Welcome(_)
                | ServerMessage::Heartbeat
                | ServerMessage::Ack { .. }
                | ServerMessage::Resend { .. }
                | ServerMessage::RuntimeAck { .. }
                | ServerMessage::RuntimeResend { .. }
                | ServerMessage::Error(_),
            )
            | Err(_) => return Vec::new(),
        };
        let output = match job.job {
            JobKind::ProbeCredentials(sdp_protocol::ProbeCredentials { credentials, repo }) => {
                match checked(script, &credentials, repo.as_str()) {
                    Ok(()) => JobOutput::CredentialsAccepted,
                    Err(refused) => refused,
                }
            }
            JobKind::ListBranches(sdp_protocol::ListBranches { credentials, repo }) => {
                match checked(script, &credentials, repo.as_str()) {
                    Ok(()) => JobOutput::Branches {
                        branches: script
                            .branches
                            .lock()
                            .unwrap()
                            .iter()
                            .map(|(name, commit)| Branch {
                                name: BranchName::parse(name.clone()).unwrap(),
                                commit: commit.clone(),
                            })
                            .collect(),
                    },
                    Err(refused) => refused,
                }
            }
            JobKind::Deploy(deploy) => {
                let mut deployed = script.deployed.lock().unwrap();
                let services = deployed
                    .entry(deploy.sandbox_id.as_str().to_owned())
                    .or_default();
                for spec in &deploy.services {
                    if !services.contains(&spec.service) {
                        services.push(spec.service.clone());
                    }
                }
                drop(deployed);
                let held = *script.deploys.lock().unwrap() == Deploys::Held;
                let released = script.released.subscribe();
                let output = script.build_output.lock().unwrap().clone();
                // Each service comes up at its branch's tip, as the real agent fetches it.
                let tips = script.branches.lock().unwrap().clone();
                let mut running = script.running.lock().unwrap();
                // As the real agent, the deployment this one supersedes stops first (here
                // before it sends anything more: the control plane has ended it).
                if let Some(old) = deploy
                    .supersedes
                    .as_ref()
                    .and_then(|old| running.remove(old.as_str()))
                {
                    old.abort();
                }
                let id = deploy.deployment.as_str().to_owned();
                let task = deployments.spawn(run_deployment(
                    deploy,
                    held,
                    output,
                    tips,
                    released,
                    out.clone(),
                ));
                running.insert(id, task);
                JobOutput::Accepted
            }
            JobKind::Teardown { .. } => JobOutput::TornDown,
            JobKind::Routes(_) => JobOutput::RoutesApplied,
            JobKind::Requests { .. } => JobOutput::Requests {
                requests: Vec::new(),
            },
            JobKind::Sleep(_) => JobOutput::Slept,
            JobKind::Wake(wake) => match script.wakes.lock().unwrap().clone() {
                Wakes::Ready => JobOutput::Woken {
                    services: script
                        .deployed
                        .lock()
                        .unwrap()
                        .get(wake.sandbox_id.as_str())
                        .into_iter()
                        .flatten()
                        .map(|service| ServiceOutcome {
                            service: service.clone(),
                            commit: Some(FAKE_COMMIT.to_owned()),
                            upstream: Some(WOKEN_UPSTREAM.to_owned()),
                        })
                        .collect(),
                },
                Wakes::Fail(message) => JobOutput::Failed(JobError {
                    code: JobErrorCode::Failed,
                    message,
                }),
            },
        };
        Reply::new(job.id, output).into_frames()
    }

    /// What git says of `credentials` for `repo`: accepted, or a `failed` reply as the real
    /// agent's for a refused password.
    fn checked(
        script: &Script,
        credentials: &sdp_protocol::Credentials,
        repo: &str,
    ) -> Result<(), JobOutput> {
        if script.accepts(credentials.username.as_str(), credentials.password.expose()) {
            return Ok(());
        }
        Err(JobOutput::Failed(JobError {
            code: JobErrorCode::AuthFailed,
            message: format!("fatal: Authentication failed for '{repo}'"),
        }))
    }

    /// Between a scripted deployment's steps. A real agent's quickest deployment takes a git
    /// round trip or more before its outcome, and the control plane records a deployment as
    /// running only once the `accepted` reply is in: it ignores an outcome that comes before
    /// that record (seen here with events sent at once), so the fakes never outrun it.
    const STEP_PAUSE: Duration = Duration::from_millis(50);

    /// Build output goes out this many lines to a frame, as a real agent batches it.
    const OUTPUT_BATCH: usize = 256;

    /// A deployment's events, as a real agent sends them: per service its steps and a line
    /// of output (and the script's build output), then the outcome.
    async fn run_deployment(
        deploy: DeployJob,
        held: bool,
        (output, hold_after): super::BuildOutput,
        tips: Vec<(String, String)>,
        mut released: tokio::sync::watch::Receiver<bool>,
        out: UnboundedSender<String>,
    ) {
        let mut seq = 0;
        let mut send = |bodies: Vec<EventBody>| {
            let events = bodies
                .into_iter()
                .map(|body| {
                    seq += 1;
                    Event {
                        deployment: deploy.deployment.clone(),
                        seq,
                        ts: OffsetDateTime::now_utc(),
                        body,
                    }
                })
                .collect();
            let _ = out.send(encode(&AgentMessage::Events { events }));
        };
        let step = |service: &sdp_protocol::ServiceName, step, state| EventBody::Step {
            service: Some(service.clone()),
            step,
            state,
        };
        let mut outcomes = Vec::new();
        for (i, spec) in deploy.services.iter().enumerate() {
            let service = &spec.service;
            send(vec![step(service, Step::Fetching, StepState::Running)]);
            if held && i == 0 {
                let _ = released.wait_for(|go| *go).await;
            }
            tokio::time::sleep(STEP_PAUSE).await;
            send(vec![step(service, Step::Building, StepState::Running)]);
            send(vec![EventBody::Log {
                service: Some(service.clone()),
                stream: LogStream::Stdout,
                line: format!("building {service} from {}", spec.branch),
            }]);
            let printed = |lines: &[(LogStream, String)]| -> Vec<EventBody> {
                lines
                    .iter()
                    .map(|(stream, line)| EventBody::Log {
                        service: Some(service.clone()),
                        stream: *stream,
                        line: line.clone(),
                    })
                    .collect()
            };
            let hold = hold_after.unwrap_or(output.len()).min(output.len());
            for part in output[..hold].chunks(OUTPUT_BATCH) {
                send(printed(part));
            }
            if hold < output.len() {
                let _ = released.wait_for(|go| *go).await;
                for part in output[hold..].chunks(OUTPUT_BATCH) {
                    send(printed(part));
                }
            }
            tokio::time::sleep(STEP_PAUSE).await;
            send(vec![step(service, Step::Starting, StepState::Running)]);
            tokio::time::sleep(STEP_PAUSE).await;
            send(vec![step(service, Step::Healthy, StepState::Done)]);
            let tip = tips
                .iter()
                .find(|(branch, _)| branch == spec.branch.as_str())
                .map_or(FAKE_COMMIT, |(_, commit)| commit.as_str());
            outcomes.push(ServiceOutcome {
                service: service.clone(),
                commit: Some(tip.to_owned()),
                upstream: Some(FAKE_UPSTREAM.to_owned()),
            });
        }
        tokio::time::sleep(STEP_PAUSE).await;
        send(vec![EventBody::Outcome {
            ok: true,
            error: None,
            services: outcomes,
        }]);
    }
}
