//! Following a log WebSocket across dropped connections and server restarts.
//!
//! Every frame carries its `seq`; a follower asks for `?from=<last seq + 1>` when it
//! connects again, and drops any frame it has already had, so what it hands on has no gap
//! and no repeat, however often the connection drops.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use sdp_api::Frame;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use url::Url;

use crate::{Client, ClientError, api_error};

/// How long a follower tries to connect again before it gives the server up for gone.
const RECONNECT_FOR: Duration = Duration::from_secs(300);
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What a follower saw.
#[derive(Debug)]
pub enum Followed {
    /// The next frame: never one seen before, never one after a gap.
    Frame(Frame),
    /// The connection dropped (why); the follower connects again from where it was.
    Lost(String),
    /// Connected again after [`Followed::Lost`].
    Resumed,
}

/// A follower of one log WebSocket; [`Follow::next`] until it returns `None` after the end.
pub struct Follow {
    client: Client,
    url: Url,
    query: Vec<(String, String)>,
    next: u64,
    socket: Option<Socket>,
    connected_once: bool,
    lost_since: Option<Instant>,
    ended: bool,
}

impl Follow {
    pub(crate) fn new(client: Client, url: Url, query: Vec<(String, String)>, from: u64) -> Self {
        Follow {
            client,
            url,
            query,
            next: from.max(1),
            socket: None,
            connected_once: false,
            lost_since: None,
            ended: false,
        }
    }

    /// The `seq` the next frame will have at least.
    pub fn next_seq(&self) -> u64 {
        self.next
    }

    /// The next event, or `None` once the end frame has been handed on (or the server
    /// closed a stream that has no end frame).
    pub async fn next(&mut self) -> Result<Option<Followed>, ClientError> {
        loop {
            if self.ended {
                return Ok(None);
            }
            let Some(socket) = self.socket.as_mut() else {
                let socket = self.connect().await?;
                self.socket = Some(socket);
                if self.lost_since.take().is_some() {
                    return Ok(Some(Followed::Resumed));
                }
                continue;
            };
            match socket.next().await {
                Some(Ok(Message::Text(text))) => {
                    let frame: Frame =
                        serde_json::from_str(&text).map_err(|e| ClientError::Protocol {
                            url: self.url.path().to_owned(),
                            reason: format!("a frame that is not SDP's: {e}"),
                        })?;
                    if let Frame::End { .. } = frame {
                        self.ended = true;
                        return Ok(Some(Followed::Frame(frame)));
                    }
                    if frame.seq() < self.next {
                        continue;
                    }
                    self.next = frame.seq() + 1;
                    return Ok(Some(Followed::Frame(frame)));
                }
                Some(Ok(Message::Close(_))) | None => {
                    self.socket = None;
                    return Ok(Some(self.lost("the server closed the connection".into())));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    self.socket = None;
                    return Ok(Some(self.lost(e.to_string())));
                }
            }
        }
    }

    fn lost(&mut self, why: String) -> Followed {
        self.lost_since.get_or_insert_with(Instant::now);
        Followed::Lost(why)
    }

    /// Connects from `next`: at once the first time (an unreachable server is an error),
    /// with backoff after a loss, for up to [`RECONNECT_FOR`].
    async fn connect(&mut self) -> Result<Socket, ClientError> {
        let mut backoff = FIRST_BACKOFF;
        loop {
            match self.connect_once().await {
                Ok(socket) => {
                    self.connected_once = true;
                    return Ok(socket);
                }
                Err(e @ ClientError::Unreachable { .. }) => {
                    let gone_for = self.lost_since.map(|since| since.elapsed());
                    match gone_for {
                        Some(gone) if self.connected_once && gone < RECONNECT_FOR => {
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                        }
                        _ => return Err(e),
                    }
                }
                // A server that is up again while still starting may answer 502/503
                // through a proxy; anything else it says is final.
                Err(ClientError::Api {
                    status: 502..=504, ..
                }) if self.lost_since.is_some_and(|s| s.elapsed() < RECONNECT_FOR) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn connect_once(&self) -> Result<Socket, ClientError> {
        let mut url = self.url.clone();
        {
            let mut pairs = url.query_pairs_mut();
            pairs.append_pair("from", &self.next.to_string());
            for (k, v) in &self.query {
                pairs.append_pair(k, v);
            }
        }
        let mut req = url
            .as_str()
            .into_client_request()
            .map_err(|e| ClientError::BadUrl {
                url: self.client.server().to_owned(),
                reason: e.to_string(),
            })?;
        if let Some(token) = self.client.token() {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| ClientError::BadUrl {
                    url: self.client.server().to_owned(),
                    reason: "the session token is not a valid header value".into(),
                })?;
            req.headers_mut().insert("authorization", value);
        }
        let connector = Connector::Rustls(self.client.tls.clone());
        let connecting =
            tokio_tungstenite::connect_async_tls_with_config(req, None, false, Some(connector));
        let connected = tokio::time::timeout(crate::CONNECT_TIMEOUT, connecting).await;
        match connected {
            Ok(Ok((socket, _))) => Ok(socket),
            Ok(Err(tungstenite::Error::Http(resp))) => {
                let body = resp.body().clone().unwrap_or_default();
                Err(api_error(resp.status(), &body, self.url.path()))
            }
            Ok(Err(e)) => Err(ClientError::Unreachable {
                url: self.client.server().to_owned(),
                reason: e.to_string(),
            }),
            Err(_) => Err(ClientError::Unreachable {
                url: self.client.server().to_owned(),
                reason: "no answer in time".into(),
            }),
        }
    }
}
