//! The agent hub: the agents' WebSocket transport and the registry of who is connected. It
//! implements [`Dispatch`] (jobs sent, replies awaited under a timeout) and reports what
//! agents say on their own to the [`AgentReports`] it is built with. It knows nothing of
//! sandboxes or deployments.
//!
//! Each agent connection is one task that owns its socket: it alone writes to it, fed by a
//! bounded channel, so a job never waits on another job's frame and a stuck agent cannot grow
//! the server's memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use sdp_protocol::{
    AgentMessage, AgentName, Capability, FrameError, Heartbeat, Hello, Job, JobKind, JobOutput,
    MAX_FRAME_BYTES, PROTOCOL_VERSION, ProtocolError, ReplyAssembly, ReplyError, RequestId, Role,
    ServerMessage, Welcome, decode_agent_frame, encode_frame,
};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::dispatch::{AgentReports, AgentSnapshot, CallError, Dispatch, Target};

/// How long a new connection has to say `hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames waiting to be written to one agent; a full queue makes senders wait.
const OUTBOX: usize = 64;

/// A job awaiting its reply, and the parts of the reply received so far.
struct Waiter {
    reply: oneshot::Sender<Result<JobOutput, ReplyError>>,
    parts: ReplyAssembly,
}

/// One connected agent.
pub struct AgentConn {
    conn_id: u64,
    pub name: AgentName,
    pub role: Role,
    pub version: String,
    pub host: String,
    pub capabilities: Vec<Capability>,
    /// Encoded frames, each checked against the size limit before it is queued.
    outbox: mpsc::Sender<String>,
    pending: Mutex<HashMap<RequestId, Waiter>>,
    next_request: AtomicU64,
    in_flight: AtomicU32,
    status: Mutex<Status>,
    closed: CancellationToken,
}

#[derive(Clone, Copy)]
struct Status {
    heartbeat: Heartbeat,
    last_seen: OffsetDateTime,
}

impl AgentConn {
    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<RequestId, Waiter>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Jobs in flight and deployments running: a deploy job is answered at once, so the
    /// deployments it started count too.
    fn busyness(&self) -> u32 {
        let heartbeat = self.lock_status().heartbeat;
        self.in_flight.load(Ordering::Relaxed) + heartbeat.load + heartbeat.running
    }
}

pub struct Hub {
    agents: Mutex<HashMap<String, Arc<AgentConn>>>,
    next_conn: AtomicU64,
    /// Weak: what it reports to holds the hub (as its [`Dispatch`]).
    reports: Weak<dyn AgentReports>,
    /// Silence longer than this ends a connection.
    agent_timeout: Duration,
    shutdown: CancellationToken,
}

/// Decrements the in-flight count however the call ends.
struct InFlight<'a>(&'a AgentConn);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Hub {
    pub fn new(
        reports: Weak<dyn AgentReports>,
        agent_timeout: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            agents: Mutex::default(),
            next_conn: AtomicU64::new(1),
            reports,
            agent_timeout,
            shutdown,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<AgentConn>>> {
        self.agents.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The least busy connected agent of `role`.
    fn pick(&self, role: Role) -> Option<Arc<AgentConn>> {
        self.lock()
            .values()
            .filter(|a| a.role == role)
            .min_by_key(|a| (a.busyness(), a.name.clone()))
            .cloned()
    }

    async fn exchange(
        agent: Arc<AgentConn>,
        job: JobKind,
        timeout: Duration,
    ) -> Result<(AgentName, JobOutput), CallError> {
        agent.in_flight.fetch_add(1, Ordering::Relaxed);
        let _guard = InFlight(&agent);
        let id = RequestId(agent.next_request.fetch_add(1, Ordering::Relaxed));
        let job_name = job.name();
        // A route table with very many sandboxes could outgrow a frame: say so rather than
        // send what the agent would drop the connection for.
        let frame = encode_frame(&ServerMessage::Job(Job { id, job })).map_err(|e| {
            let bytes = match e {
                FrameError::TooLarge(bytes) => bytes,
                _ => 0,
            };
            tracing::error!(agent = %agent.name, job = job_name, bytes, "job not sent: over the frame limit");
            CallError::JobTooLarge {
                agent: agent.name.clone(),
                job: job_name,
                bytes,
            }
        })?;
        let (tx, rx) = oneshot::channel();
        agent.lock_pending().insert(
            id,
            Waiter {
                reply: tx,
                parts: ReplyAssembly::default(),
            },
        );
        tracing::debug!(agent = %agent.name, job = job_name, %id, "sending job");
        let exchange = async {
            agent.outbox.send(frame).await.map_err(|_| ())?;
            tokio::select! {
                // The connection ended after this call picked it: fail now, not at the timeout.
                _ = agent.closed.cancelled() => Err(()),
                reply = rx => reply.map_err(|_| ()),
            }
        };
        let result = tokio::time::timeout(timeout, exchange).await;
        agent.lock_pending().remove(&id);
        match result {
            Ok(Ok(Ok(output))) => Ok((agent.name.clone(), output)),
            Ok(Ok(Err(reason))) => {
                tracing::warn!(agent = %agent.name, job = job_name, %id, %reason, "agent's answer refused");
                Err(CallError::BadReply {
                    agent: agent.name.clone(),
                    reason,
                })
            }
            Ok(Err(())) => Err(CallError::Disconnected {
                agent: agent.name.clone(),
            }),
            Err(_) => {
                tracing::warn!(agent = %agent.name, job = job_name, %id, "agent did not answer in time");
                Err(CallError::Timeout {
                    agent: agent.name.clone(),
                    after: timeout,
                })
            }
        }
    }

    /// Registers `conn`. An older connection of the same name, role and host is the same
    /// agent reconnecting before its old socket timed out, and is replaced; a different agent
    /// under a taken name is refused, so that two agents never knock each other off in turn.
    fn register(&self, conn: Arc<AgentConn>) -> Result<(), ProtocolError> {
        let mut agents = self.lock();
        if let Some(old) = agents.get(conn.name.as_str()) {
            if old.role != conn.role || old.host != conn.host {
                return Err(ProtocolError {
                    code: "name_taken".into(),
                    message: format!(
                        "an agent named {} is already connected ({} on host {}); give this one another `name`",
                        conn.name, old.role, old.host
                    ),
                });
            }
            old.closed.cancel();
        }
        agents.insert(conn.name.to_string(), conn);
        Ok(())
    }

    /// Removes `conn` if it is still the registered connection of its name; says whether it
    /// was.
    fn unregister(&self, conn: &AgentConn) -> bool {
        let mut agents = self.lock();
        let current = agents
            .get(conn.name.as_str())
            .is_some_and(|current| current.conn_id == conn.conn_id);
        if current {
            agents.remove(conn.name.as_str());
        }
        current
    }
}

#[async_trait::async_trait]
impl Dispatch for Hub {
    async fn send(
        &self,
        target: Target,
        job: JobKind,
        timeout: Duration,
    ) -> Result<(AgentName, JobOutput), CallError> {
        let agent = match target {
            Target::Any(role) => self.pick(role).ok_or(CallError::NoAgent(role))?,
            Target::Agent(name) => self
                .lock()
                .get(name.as_str())
                .cloned()
                .ok_or(CallError::NotConnected(name))?,
        };
        Self::exchange(agent, job, timeout).await
    }

    async fn agents(&self, role: Role) -> Vec<AgentName> {
        let mut names: Vec<AgentName> = self
            .lock()
            .values()
            .filter(|a| a.role == role)
            .map(|a| a.name.clone())
            .collect();
        names.sort();
        names
    }

    async fn is_connected(&self, agent: &AgentName) -> bool {
        self.lock().contains_key(agent.as_str())
    }

    async fn connected(&self) -> Vec<AgentSnapshot> {
        let mut list: Vec<_> = self
            .lock()
            .values()
            .map(|a| {
                let status = *a.lock_status();
                AgentSnapshot {
                    name: a.name.to_string(),
                    role: a.role,
                    version: a.version.clone(),
                    host: a.host.clone(),
                    capabilities: a.capabilities.clone(),
                    last_seen: status.last_seen,
                    load: a.in_flight.load(Ordering::Relaxed) + status.heartbeat.load,
                    running: status.heartbeat.running,
                }
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }
}

type Sink = futures_util::stream::SplitSink<WebSocket, Message>;

/// Writes one encoded frame, giving up after `limit`: an agent that stops reading must not
/// block its connection task (and with it the silence check) for ever.
async fn send_frame(sink: &mut Sink, frame: String, limit: Duration) -> Result<(), ()> {
    match tokio::time::timeout(limit, sink.send(Message::Text(frame.into()))).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// Encodes a frame of the connection's own (an acknowledgement, an error); one that would be
/// over the limit (an acknowledgement echoing an absurdly long deployment id) is left out.
fn checked(msg: &ServerMessage) -> Option<String> {
    encode_frame(msg)
        .inspect_err(|e| tracing::warn!(error = %e, "frame to an agent left out"))
        .ok()
}

/// Tells the agent why it is refused, and closes.
async fn refuse(sink: &mut Sink, refusal: ProtocolError, limit: Duration) {
    tracing::warn!(code = %refusal.code, reason = %refusal.message, "agent refused at hello");
    if let Some(frame) = checked(&ServerMessage::Error(refusal)) {
        let _ = send_frame(sink, frame, limit).await;
    }
    let _ = tokio::time::timeout(limit, sink.close()).await;
}

/// Serves one agent's WebSocket until it closes, falls silent, is replaced or the server
/// stops.
pub async fn serve_agent(hub: Arc<Hub>, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let limit = hub.agent_timeout;

    let hello = match tokio::time::timeout(HELLO_TIMEOUT, first_hello(&mut stream)).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(refusal)) => return refuse(&mut sink, refusal, limit).await,
        Err(_) => {
            tracing::warn!("agent connection closed: no hello within {HELLO_TIMEOUT:?}");
            return;
        }
    };

    let now = OffsetDateTime::now_utc();
    let (outbox, jobs) = mpsc::channel(OUTBOX);
    let conn = Arc::new(AgentConn {
        conn_id: hub.next_conn.fetch_add(1, Ordering::Relaxed),
        name: hello.name.clone(),
        role: hello.role,
        version: hello.version.clone(),
        host: hello.host.clone(),
        capabilities: hello.capabilities.clone(),
        outbox,
        pending: Mutex::default(),
        next_request: AtomicU64::new(1),
        in_flight: AtomicU32::new(0),
        status: Mutex::new(Status {
            heartbeat: Heartbeat {
                load: 0,
                running: 0,
            },
            last_seen: now,
        }),
        closed: CancellationToken::new(),
    });
    if let Err(refusal) = hub.register(conn.clone()) {
        return refuse(&mut sink, refusal, limit).await;
    }
    tracing::info!(agent = %conn.name, role = %conn.role, version = %conn.version, host = %conn.host, "agent connected");
    if let Some(reports) = hub.reports.upgrade() {
        reports.hello(&hello).await;
    }

    let welcome = ServerMessage::Welcome(Welcome {
        protocol: PROTOCOL_VERSION,
        heartbeat_interval_ms: (hub.agent_timeout / 3).as_millis() as u64,
    });
    let mut reason = "closed by the agent".to_owned();
    let welcomed = match checked(&welcome) {
        Some(frame) => send_frame(&mut sink, frame, limit).await.is_ok(),
        None => false,
    };
    // Reading and writing run apart: a reader that waited for its writes to go out while the
    // agent waited for its own would deadlock under a flood of events.
    let stop_writing = CancellationToken::new();
    let writer = tokio::spawn(write_frames(sink, jobs, limit, stop_writing.clone()));
    if welcomed {
        let mut last_heard = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            let replies = tokio::select! {
                _ = hub.shutdown.cancelled() => { reason = "server shutting down".into(); break }
                _ = conn.closed.cancelled() => { reason = "replaced by a new connection".into(); break }
                _ = stop_writing.cancelled() => {
                    reason = "the socket failed or the agent stopped reading".into();
                    break;
                }
                _ = tick.tick() => {
                    if last_heard.elapsed() > hub.agent_timeout {
                        reason = "silent past the heartbeat timeout".into();
                        break;
                    }
                    continue;
                }
                frame = stream.next() => {
                    let frame = match frame {
                        Some(Ok(frame)) => frame,
                        Some(Err(e)) => {
                            // e.g. a frame over the size limit: say so before closing.
                            reason = format!("unreadable frame: {e}");
                            let error = ServerMessage::Error(ProtocolError {
                                code: "unreadable_frame".into(),
                                message: format!("{e}; frames are limited to {MAX_FRAME_BYTES} bytes"),
                            });
                            if let Some(frame) = checked(&error) {
                                let _ = tokio::time::timeout(limit, conn.outbox.send(frame)).await;
                            }
                            break;
                        }
                        None => break,
                    };
                    last_heard = tokio::time::Instant::now();
                    match frame {
                        Message::Text(text) => handle_frame(&conn, &hub.reports, &text).await,
                        Message::Binary(_) => vec![ServerMessage::Error(FrameError::Binary.to_protocol_error())],
                        Message::Close(_) => break,
                        Message::Ping(_) | Message::Pong(_) => continue,
                    }
                }
            };
            for frame in replies.iter().filter_map(checked) {
                if !matches!(
                    tokio::time::timeout(limit, conn.outbox.send(frame)).await,
                    Ok(Ok(()))
                ) {
                    reason = "the agent stopped reading".into();
                    break;
                }
            }
        }
    }
    stop_writing.cancel();
    let _ = writer.await;

    // Closing first makes new calls fail at once; dropping the pending senders wakes every
    // caller still waiting on this agent.
    conn.closed.cancel();
    let current = hub.unregister(&conn);
    conn.lock_pending().clear();
    let status = *conn.lock_status();
    tracing::info!(agent = %conn.name, reason, "agent disconnected");
    // A newer connection of the same agent owns what is reported of it now.
    if current && let Some(reports) = hub.reports.upgrade() {
        reports
            .gone(&conn.name, status.last_seen, status.heartbeat)
            .await;
    }
}

/// Writes the frames queued for an agent until told to stop (then flushes what is queued and
/// closes) or a write fails (then tells the reader, through `stop`).
async fn write_frames(
    mut sink: Sink,
    mut queue: mpsc::Receiver<String>,
    limit: Duration,
    stop: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            biased;
            msg = queue.recv() => msg,
            _ = stop.cancelled() => None,
        };
        let Some(msg) = msg else { break };
        if send_frame(&mut sink, msg, limit).await.is_err() {
            stop.cancel();
            return;
        }
    }
    while let Ok(msg) = queue.try_recv() {
        if send_frame(&mut sink, msg, limit).await.is_err() {
            return;
        }
    }
    let _ = tokio::time::timeout(limit, sink.close()).await;
}

/// Reads frames until the first one, which must be a `hello` in our protocol version.
async fn first_hello(
    stream: &mut futures_util::stream::SplitStream<WebSocket>,
) -> Result<Hello, ProtocolError> {
    loop {
        let frame = match stream.next().await {
            Some(Ok(frame)) => frame,
            _ => {
                return Err(ProtocolError {
                    code: "closed".into(),
                    message: "the connection closed before hello".into(),
                });
            }
        };
        let text = match frame {
            Message::Text(text) => text,
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Binary(_) => return Err(FrameError::Binary.to_protocol_error()),
            Message::Close(_) => {
                return Err(ProtocolError {
                    code: "closed".into(),
                    message: "the connection closed before hello".into(),
                });
            }
        };
        return match decode_agent_frame(&text) {
            Ok(AgentMessage::Hello(hello)) if hello.protocol == PROTOCOL_VERSION => Ok(hello),
            Ok(AgentMessage::Hello(hello)) => Err(ProtocolError {
                code: "protocol_version".into(),
                message: format!(
                    "this control plane speaks protocol {PROTOCOL_VERSION}, the agent {}; upgrade the older side",
                    hello.protocol
                ),
            }),
            Ok(_) => Err(ProtocolError {
                code: "hello_expected".into(),
                message: "the first frame must be hello".into(),
            }),
            Err(e) => Err(e.to_protocol_error()),
        };
    }
}

/// Handles one text frame of a registered agent; returns the frames to answer with.
async fn handle_frame(
    conn: &AgentConn,
    reports: &Weak<dyn AgentReports>,
    text: &str,
) -> Vec<ServerMessage> {
    let msg = match decode_agent_frame(text) {
        Ok(msg) => msg,
        Err(e) => {
            tracing::warn!(agent = %conn.name, error = %e, "unreadable frame from agent");
            return vec![ServerMessage::Error(e.to_protocol_error())];
        }
    };
    match msg {
        AgentMessage::Heartbeat(heartbeat) => {
            *conn.lock_status() = Status {
                heartbeat,
                last_seen: OffsetDateTime::now_utc(),
            };
            vec![ServerMessage::Heartbeat]
        }
        AgentMessage::Reply(reply) => {
            conn.lock_status().last_seen = OffsetDateTime::now_utc();
            let id = reply.id;
            let mut pending = conn.lock_pending();
            let Some(waiter) = pending.get_mut(&id) else {
                tracing::debug!(agent = %conn.name, %id, "reply to a job nobody waits for any more");
                return Vec::new();
            };
            // A long list comes in parts: the waiter hears once the last is in.
            if let Some(result) = waiter.parts.add(reply, text.len()).transpose()
                && let Some(waiter) = pending.remove(&id)
            {
                let _ = waiter.reply.send(result);
            }
            Vec::new()
        }
        AgentMessage::Hello(_) => vec![ServerMessage::Error(ProtocolError {
            code: "unexpected_hello".into(),
            message: "hello was already received on this connection".into(),
        })],
        AgentMessage::Events { events } => {
            // The server is stopping: nothing is acknowledged, the agent sends it again.
            let Some(reports) = reports.upgrade() else {
                return Vec::new();
            };
            let answer = reports.events(&conn.name, events).await;
            let acks = answer
                .acks
                .into_iter()
                .map(|(deployment, seq)| ServerMessage::Ack { deployment, seq });
            let resend =
                answer
                    .resend
                    .into_iter()
                    .map(|(deployment, from_seq)| ServerMessage::Resend {
                        deployment,
                        from_seq,
                    });
            acks.chain(resend).collect()
        }
        AgentMessage::Runtime { events } => {
            // As for events: stopping, nothing is acknowledged.
            let Some(reports) = reports.upgrade() else {
                return Vec::new();
            };
            let answer = reports.runtime(&conn.name, events).await;
            let acks = answer
                .acks
                .into_iter()
                .map(|(sandbox, seq)| ServerMessage::RuntimeAck { sandbox, seq });
            let resend = answer
                .resend
                .into_iter()
                .map(|(sandbox, from_seq)| ServerMessage::RuntimeResend { sandbox, from_seq });
            acks.chain(resend).collect()
        }
        // Only the router knows of requests: a micro agent's word is not taken.
        AgentMessage::Activity { .. } | AgentMessage::Wake { .. } if conn.role != Role::Gateway => {
            tracing::warn!(agent = %conn.name, "activity or wake from an agent that is not a gateway; ignored");
            Vec::new()
        }
        AgentMessage::Activity { sandboxes } => {
            if let Some(reports) = reports.upgrade() {
                reports.activity(&conn.name, sandboxes).await;
            }
            Vec::new()
        }
        AgentMessage::Wake { sandbox } => {
            if let Some(reports) = reports.upgrade() {
                reports.wake(&conn.name, sandbox).await;
            }
            Vec::new()
        }
        AgentMessage::Error(e) => {
            tracing::warn!(agent = %conn.name, code = %e.code, message = %e.message, "agent reported a protocol error");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use sdp_protocol::{RouteTable, SandboxName, SandboxRoutes, ServiceName};

    use super::*;

    fn connection(outbox: mpsc::Sender<String>) -> Arc<AgentConn> {
        Arc::new(AgentConn {
            conn_id: 1,
            name: AgentName::parse("gw").unwrap(),
            role: Role::Gateway,
            version: "test".into(),
            host: "host".into(),
            capabilities: Vec::new(),
            outbox,
            pending: Mutex::default(),
            next_request: AtomicU64::new(1),
            in_flight: AtomicU32::new(0),
            status: Mutex::new(Status {
                heartbeat: Heartbeat {
                    load: 0,
                    running: 0,
                },
                last_seen: OffsetDateTime::now_utc(),
            }),
            closed: CancellationToken::new(),
        })
    }

    #[tokio::test]
    async fn a_route_table_too_large_for_a_frame_is_refused_and_never_sent() {
        let (outbox, mut queued) = mpsc::channel(1);
        let agent = connection(outbox);
        let service = ServiceName::parse("orders").unwrap();
        // 20,000 sandboxes, each with an upstream: about 1.2 MB.
        let sandboxes = (0..20_000)
            .map(|i| SandboxRoutes {
                sandbox: SandboxName::parse(format!("sandbox-{i}")).unwrap(),
                upstreams: BTreeMap::from([(service.clone(), format!("10.0.0.1:{}", 20_000 + i))]),
                down: BTreeMap::new(),
                sleeping: false,
                gateway: None,
            })
            .collect();
        let table = RouteTable {
            sandboxes,
            ..RouteTable::default()
        };
        let refused = Hub::exchange(
            agent.clone(),
            JobKind::Routes(table),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        let CallError::JobTooLarge { job, bytes, .. } = &refused else {
            panic!("{refused}")
        };
        assert_eq!((*job, *bytes > MAX_FRAME_BYTES), ("routes", true));
        assert!(refused.to_string().contains("not sent"), "{refused}");
        assert!(queued.try_recv().is_err(), "nothing was queued");
        assert!(agent.lock_pending().is_empty());
    }
}
