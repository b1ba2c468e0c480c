//! An instance's health path, as the agent checks it: while it starts (until it answers 200
//! or the health timeout passes) and, once healthy, every `health_interval`.

use std::time::Duration;

/// How long one check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Between the first checks while an instance starts: most services answer within tens of
/// milliseconds, and a deploy should not wait for a round poll past that.
const FIRST_POLL: Duration = Duration::from_millis(10);
/// How many checks are [`FIRST_POLL`] apart; then [`STARTING_POLL`].
const FIRST_CHECKS: u32 = 20;
/// Between later checks while an instance starts.
const STARTING_POLL: Duration = Duration::from_millis(100);

/// The client of every health check: plain HTTP, or HTTPS for an instance behind an
/// OpenShift Route, its certificate verified against the system's trusted certificates
/// (which honour `SSL_CERT_FILE`), read on the first such check only. A user's health path is
/// hostile: a redirect would make the agent request any URL it names (another sandbox's
/// port, the control plane) every health interval, and a proxy from the agent's environment
/// would carry checks off the host. So no redirect is followed (a 3xx is an answer like any
/// other: not healthy), and no proxy is used.
#[derive(Clone)]
pub struct Client {
    plain: Http<hyper_util::client::legacy::connect::HttpConnector>,
    tls: std::sync::Arc<std::sync::OnceLock<Http<Https>>>,
}

type Https = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;
type Http<C> = hyper_util::client::legacy::Client<C, http_body_util::Empty<hyper::body::Bytes>>;

fn tcp() -> hyper_util::client::legacy::connect::HttpConnector {
    let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_connect_timeout(Some(CHECK_TIMEOUT));
    tcp
}

fn http<C>(connector: C) -> Http<C>
where
    C: hyper_util::client::legacy::connect::Connect + Clone,
{
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(connector)
}

fn https() -> Http<Https> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    http(
        hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(tcp()),
    )
}

pub fn client() -> Client {
    Client {
        plain: http(tcp()),
        tls: std::sync::Arc::default(),
    }
}

/// `http://host:port`, the origin of an instance published on a port.
pub fn origin(host: &str, port: u16) -> String {
    format!("http://{}", crate::deploy::upstream_address(host, port))
}

/// One check of `origin` (`http://host:port`, or `https://host`): `Ok` on a 200, else what
/// came back.
pub async fn check(http: &Client, origin: &str, path: &str) -> Result<(), String> {
    let uri: hyper::Uri = format!("{origin}{path}")
        .parse()
        .map_err(|e| format!("not a URL: {e}"))?;
    let asked = if uri.scheme() == Some(&hyper::http::uri::Scheme::HTTPS) {
        http.tls.get_or_init(https).get(uri)
    } else {
        http.plain.get(uri)
    };
    match tokio::time::timeout(CHECK_TIMEOUT, asked).await {
        Ok(Ok(resp)) if resp.status() == hyper::StatusCode::OK => Ok(()),
        Ok(Ok(resp)) => Err(format!("status {}", resp.status().as_u16())),
        Ok(Err(e)) if e.is_connect() => Err("connection refused".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {}s", CHECK_TIMEOUT.as_secs())),
    }
}

/// Checks until a 200, or `timeout` passes: then says why, for people.
pub async fn wait_healthy(
    http: &Client,
    origin: &str,
    path: &str,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::from("no answer");
    let mut checks = 0u32;
    while tokio::time::Instant::now() < deadline {
        match check(http, origin, path).await {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
        checks += 1;
        let poll = if checks < FIRST_CHECKS {
            FIRST_POLL
        } else {
            STARTING_POLL
        };
        tokio::time::sleep(poll).await;
    }
    Err(format!(
        "did not become healthy within {}s: {path} gave {last}",
        timeout.as_secs()
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A server answering every request with `answer`; counts the requests it got.
    async fn serve(answer: String) -> (u16, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = requests.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        (port, requests)
    }

    #[tokio::test]
    async fn a_redirect_is_not_followed_and_counts_as_unhealthy() {
        let ok = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
        let (target, reached) = serve(ok.to_owned()).await;
        let redirect = format!(
            "HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:{target}/\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
        let (health, _) = serve(redirect).await;
        let answer = check(&client(), &origin("127.0.0.1", health), "/healthz").await;
        assert_eq!(answer, Err("status 302".to_owned()));
        // Whatever the client did, it did before answering.
        assert_eq!(
            reached.load(Ordering::SeqCst),
            0,
            "the redirect was followed"
        );
        assert_eq!(
            check(&client(), &origin("127.0.0.1", target), "/").await,
            Ok(())
        );
    }

    #[tokio::test]
    async fn an_https_origin_is_checked_over_tls_and_a_plain_server_there_is_not_healthy() {
        let ok = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
        let (port, _) = serve(ok.to_owned()).await;
        let http = client();
        assert_eq!(check(&http, &origin("127.0.0.1", port), "/").await, Ok(()));
        let answer = check(&http, &format!("https://127.0.0.1:{port}"), "/").await;
        assert!(answer.is_err(), "{answer:?}");
    }
}
