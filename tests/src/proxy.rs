//! TCP proxies in front of local servers (PostgreSQL, brokers), for outages that touch only the
//! test that makes them (the server itself may be shared by every test).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A TCP proxy on 127.0.0.1 to a local port that can be cut (its port closed: new connections are
/// refused, open ones dropped) and restored on the same port.
pub struct TcpProxy {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    /// The port it forwards to (127.0.0.1).
    pub target: u16,
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl TcpProxy {
    /// Starts it on a free port, forwarding to `127.0.0.1:target_port`.
    pub async fn start(target_port: u16) -> TcpProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = TcpProxy {
            port: listener.local_addr().unwrap().port(),
            target: target_port,
            tasks: Arc::default(),
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let tasks = self.tasks.clone();
        let target = self.target;
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let conn = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                tasks.lock().unwrap().push(conn.abort_handle());
            }
        });
        self.tasks.lock().unwrap().push(accept.abort_handle());
    }

    /// Closes the port and drops every open connection.
    pub fn cut(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    /// Listens on the same port again.
    pub async fn restore(&self) {
        let start = Instant::now();
        let listener = loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(
                        start.elapsed() < Duration::from_secs(10),
                        "cannot listen on {} again: {e}",
                        self.port
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        self.serve(listener);
    }
}

/// A [`TcpProxy`] to the local PostgreSQL (127.0.0.1:5432).
pub struct DbProxy {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    inner: TcpProxy,
}

impl DbProxy {
    /// Starts it on a free port.
    pub async fn start() -> DbProxy {
        let inner = TcpProxy::start(PG_PORT).await;
        DbProxy {
            port: inner.port,
            inner,
        }
    }

    /// Closes the port and drops every open connection.
    pub fn cut(&self) {
        self.inner.cut()
    }

    /// Listens on the same port again.
    pub async fn restore(&self) {
        self.inner.restore().await
    }
}

/// A proxy to the local PostgreSQL that refuses, as PgBouncer does, a connection whose startup
/// message carries the `options` parameter (`-c name=value` settings), and passes the others on.
/// It answers `N` to an SSL request, so connections through it are plain.
pub struct OptionsRefused {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    refused: Arc<std::sync::atomic::AtomicUsize>,
    accept: tokio::task::AbortHandle,
}

/// The local PostgreSQL's port.
const PG_PORT: u16 = 5432;

/// The code of PostgreSQL's SSLRequest, in place of a protocol version.
const SSL_REQUEST: u32 = 80877103;

impl OptionsRefused {
    /// Starts it on a free port.
    pub async fn start() -> OptionsRefused {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = refused.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    // Startup packets: length (with itself), then a code or protocol version.
                    let startup = loop {
                        let len = client.read_u32().await? as usize;
                        let mut body = vec![0; len.saturating_sub(4)];
                        client.read_exact(&mut body).await?;
                        if body.len() == 4 && body[..4] == SSL_REQUEST.to_be_bytes() {
                            client.write_all(b"N").await?;
                            continue;
                        }
                        break [(len as u32).to_be_bytes().as_slice(), &body].concat();
                    };
                    if startup.windows(8).any(|w| w == b"options\0") {
                        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let fields: &[u8] = b"SFATAL\0C08P01\0Munsupported startup parameter: options\0\0";
                        let mut error = vec![b'E'];
                        error.extend_from_slice(&(fields.len() as u32 + 4).to_be_bytes());
                        error.extend_from_slice(fields);
                        return client.write_all(&error).await;
                    }
                    let mut server = tokio::net::TcpStream::connect(("127.0.0.1", PG_PORT)).await?;
                    server.write_all(&startup).await?;
                    tokio::io::copy_bidirectional(&mut client, &mut server)
                        .await
                        .map(|_| ())
                });
            }
        });
        OptionsRefused {
            port,
            refused,
            accept: accept.abort_handle(),
        }
    }

    /// How many connections it refused.
    pub fn refused(&self) -> usize {
        self.refused.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for OptionsRefused {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
