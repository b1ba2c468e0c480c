//! A TCP forwarder in front of a server, whose open connections a test can cut, as a network
//! that drops them does: each side sees its peer close. For a browser's WebSocket dropped in
//! the middle of a stream while the server, and what feeds it, go on.
//!
//! The browser talks to the proxy, so the server's `public_url` must be the proxy's (the
//! WebSocket `Origin` check): bind it first ([`CutProxy::bind`]), give the server its URL,
//! then [`CutProxy::forward_to`] the server.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

pub struct CutProxy {
    listener: Option<TcpListener>,
    pub addr: SocketAddr,
    cut: tokio::sync::watch::Sender<u64>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl CutProxy {
    pub async fn bind() -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        CutProxy {
            listener: Some(listener),
            addr,
            cut: tokio::sync::watch::Sender::new(0),
            task: None,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Forwards every connection to `target` (`http://host:port` or `host:port`).
    pub fn forward_to(&mut self, target: &str) {
        let target = target.trim_start_matches("http://").to_owned();
        let listener = self.listener.take().expect("forwarding once");
        let cut = self.cut.clone();
        self.task = Some(tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let target = target.clone();
                let mut cuts = cut.subscribe();
                cuts.mark_unchanged();
                connections.spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cuts.changed() => {}
                    }
                });
                while connections.try_join_next().is_some() {}
            }
        }));
    }

    /// Closes every connection open now; later ones go through.
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}
