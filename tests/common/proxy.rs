//! A loopback TCP fault-injection proxy that understands Kafka framing.
//!
//! [`Proxy::start`] listens on `127.0.0.1:<free port>` and forwards every
//! accepted connection to an upstream broker, two threads per connection
//! (one each way), so sync tests can use it without a runtime. Put the
//! broker behind it with `Broker::start_behind_proxy`, which makes tansu
//! advertise the proxy's address: after bootstrap every client, on every
//! connection, goes through the proxy.
//!
//! Faults are set at any time through a cloneable [`ProxyHandle`] (a
//! [`Proxy`] derefs to one). A handle applies its faults to every
//! connection; [`ProxyHandle::only`] narrows them to connections whose Kafka
//! `client_id` (librdkafka's `client.id`) starts with a prefix.
//!
//! - [`delay`](ProxyHandle::delay): every forwarded frame waits that long,
//!   in both directions;
//! - [`cut`](ProxyHandle::cut): closes matching connections now (both
//!   sides) and closes new ones until [`heal`](ProxyHandle::heal): at accept
//!   without a prefix, at their first request with one;
//!   [`disconnect`](ProxyHandle::disconnect) closes them without refusing;
//! - [`black_hole`](ProxyHandle::black_hole): connections stay open, new
//!   ones are accepted, but every frame either way is read and dropped;
//! - [`cut_after_request`](ProxyHandle::cut_after_request): the next
//!   `count` requests with an api key are forwarded, and their connection is
//!   closed when the broker's reply to them (matched by correlation id)
//!   arrives, before a byte of it reaches the client;
//! - [`heal`](ProxyHandle::heal): removes every fault, of every prefix.
//!
//! Why framing-aware: a byte-level proxy can drop a connection, but not
//! lose exactly the reply of a transaction commit. Cutting the connection
//! when the EndTxn reply passes means the broker did commit (or abort) and
//! the client cannot know: the "ambiguous commit" exactly-once code must
//! survive. Client ids come from the request headers; dropping whole frames
//! keeps a black-holed stream well-framed after a heal.
//!
//! Bounded: at most [`MAX_CONNECTIONS`] connections, two threads and two
//! 64 KiB buffers each, frames up to [`MAX_FRAME`] bytes (streamed, never
//! held whole). Nothing read from the network is unwrapped: a malformed
//! frame or an I/O error closes that connection.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Read, Write};
use std::mem::discriminant;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// The most connections open at once; further ones are closed at accept.
pub const MAX_CONNECTIONS: usize = 256;
/// The largest frame forwarded; a bigger length prefix closes the connection.
pub const MAX_FRAME: usize = 256 << 20;
const CHUNK: usize = 64 << 10;
const STACK: usize = 256 << 10;

/// Kafka api keys tests ask about.
pub mod api {
    pub const PRODUCE: i16 = 0;
    pub const FETCH: i16 = 1;
    pub const METADATA: i16 = 3;
    pub const API_VERSIONS: i16 = 18;
    pub const END_TXN: i16 = 26;
}

#[derive(Debug, Clone)]
enum Fault {
    Delay(Duration),
    Refuse,
    BlackHole,
    CutAfter { api_key: i16, remaining: u32 },
}

struct Rule {
    prefix: Option<String>,
    fault: Fault,
}

#[derive(Default)]
struct State {
    rules: Vec<Rule>,
    conns: HashMap<u64, Arc<Conn>>,
    next_id: u64,
    requests: BTreeMap<i16, u64>,
}

struct Shared {
    upstream: SocketAddr,
    addr: SocketAddr,
    state: Mutex<State>,
    accepted: AtomicU64,
    to_broker: AtomicU64,
    to_client: AtomicU64,
    fired: AtomicU64,
    stopping: AtomicBool,
}

struct Conn {
    client: TcpStream,
    upstream: TcpStream,
    /// The latest non-null client id this connection's requests carried.
    client_id: Mutex<Option<String>>,
    /// Correlation ids whose reply closes the connection instead.
    cut_on_reply: Mutex<HashSet<i32>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn matches(prefix: &Option<String>, client_id: Option<&str>) -> bool {
    match prefix {
        None => true,
        Some(prefix) => client_id.is_some_and(|id| id.starts_with(prefix.as_str())),
    }
}

impl Conn {
    fn close(&self) {
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.upstream.shutdown(Shutdown::Both);
    }

    fn client_id(&self) -> Option<String> {
        lock(&self.client_id).clone()
    }
}

/// What the rules say about one frame.
#[derive(Default)]
struct Verdict {
    delay: Duration,
    drop: bool,
    close: bool,
}

impl Shared {
    fn verdict(&self, client_id: Option<&str>) -> Verdict {
        let state = lock(&self.state);
        let mut verdict = Verdict::default();
        for rule in state.rules.iter() {
            if !matches(&rule.prefix, client_id) {
                continue;
            }
            match rule.fault {
                Fault::Delay(delay) => verdict.delay = verdict.delay.max(delay),
                Fault::Refuse => verdict.close = true,
                Fault::BlackHole => verdict.drop = true,
                Fault::CutAfter { .. } => {}
            }
        }
        verdict
    }

    /// Whether a one-shot rule claims this request; counts it down if so.
    fn claim(&self, api_key: i16, client_id: Option<&str>) -> bool {
        let mut state = lock(&self.state);
        for rule in state.rules.iter_mut() {
            if let Fault::CutAfter {
                api_key: key,
                remaining,
            } = &mut rule.fault
                && *key == api_key
                && *remaining > 0
                && matches(&rule.prefix, client_id)
            {
                *remaining -= 1;
                return true;
            }
        }
        false
    }

    fn open(self: &Arc<Self>, client: TcpStream) -> io::Result<()> {
        if self.verdict(None).close || lock(&self.state).conns.len() >= MAX_CONNECTIONS {
            return client.shutdown(Shutdown::Both);
        }
        let upstream = TcpStream::connect_timeout(&self.upstream, Duration::from_secs(5))?;
        client.set_nodelay(true)?;
        upstream.set_nodelay(true)?;
        let conn = Arc::new(Conn {
            client: client.try_clone()?,
            upstream: upstream.try_clone()?,
            client_id: Mutex::new(None),
            cut_on_reply: Mutex::new(HashSet::new()),
        });
        let id = {
            let mut state = lock(&self.state);
            state.next_id += 1;
            let id = state.next_id;
            state.conns.insert(id, conn.clone());
            id
        };
        let down = (conn.upstream.try_clone()?, conn.client.try_clone()?);
        let pumps = [(client, upstream, true), (down.0, down.1, false)]
            .into_iter()
            .map(|(from, to, up)| {
                let (shared, conn) = (self.clone(), conn.clone());
                thread::Builder::new()
                    .name(if up { "proxy-up" } else { "proxy-down" }.into())
                    .stack_size(STACK)
                    .spawn(move || {
                        let _ = if up {
                            shared.pump_requests(&conn, from, to)
                        } else {
                            shared.pump_replies(&conn, from, to)
                        };
                        conn.close();
                        lock(&shared.state).conns.remove(&id);
                    })
            })
            .collect::<Vec<_>>();
        if pumps.iter().any(Result::is_err) {
            conn.close();
            lock(&self.state).conns.remove(&id);
        }
        Ok(())
    }

    /// Client to broker: length, api_key, api_version, correlation_id,
    /// client_id (i16 length, -1 null), then the body.
    fn pump_requests(&self, conn: &Conn, mut from: TcpStream, mut to: TcpStream) -> io::Result<()> {
        let mut buf = vec![0u8; CHUNK];
        while let Some(size) = read_length(&mut from)? {
            if size < 10 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "short request"));
            }
            from.read_exact(&mut buf[..10])?;
            let api_key = i16::from_be_bytes([buf[0], buf[1]]);
            let correlation = i32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
            let id_len = i16::from_be_bytes([buf[8], buf[9]]);
            let mut head = 10;
            if id_len > 0 {
                let n = usize::from(id_len.unsigned_abs()).min(size - 10);
                from.read_exact(&mut buf[10..10 + n])?;
                head += n;
                *lock(&conn.client_id) = Some(String::from_utf8_lossy(&buf[10..head]).into_owned());
            }
            *lock(&self.state).requests.entry(api_key).or_default() += 1;
            let client_id = conn.client_id();
            let verdict = self.verdict(client_id.as_deref());
            if verdict.close {
                return Ok(());
            }
            if !verdict.drop && self.claim(api_key, client_id.as_deref()) {
                lock(&conn.cut_on_reply).insert(correlation);
            }
            self.forward(
                &mut from,
                &mut to,
                &mut buf,
                size,
                head,
                &verdict,
                &self.to_broker,
            )?;
        }
        Ok(())
    }

    /// Broker to client: length, correlation_id, then the body.
    fn pump_replies(&self, conn: &Conn, mut from: TcpStream, mut to: TcpStream) -> io::Result<()> {
        let mut buf = vec![0u8; CHUNK];
        while let Some(size) = read_length(&mut from)? {
            let head = size.min(4);
            from.read_exact(&mut buf[..head])?;
            let verdict = self.verdict(conn.client_id().as_deref());
            if verdict.close {
                return Ok(());
            }
            if head == 4 {
                let correlation = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                if lock(&conn.cut_on_reply).remove(&correlation) {
                    // Counted first: whoever sees the cut sees the count.
                    self.fired.fetch_add(1, Ordering::SeqCst);
                    conn.close();
                    return Ok(());
                }
            }
            self.forward(
                &mut from,
                &mut to,
                &mut buf,
                size,
                head,
                &verdict,
                &self.to_client,
            )?;
        }
        Ok(())
    }

    /// Forwards (or drops) one frame whose first `head` bytes are in `buf`.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        from: &mut TcpStream,
        to: &mut TcpStream,
        buf: &mut [u8],
        size: usize,
        head: usize,
        verdict: &Verdict,
        counter: &AtomicU64,
    ) -> io::Result<()> {
        if !verdict.delay.is_zero() {
            thread::sleep(verdict.delay);
        }
        let send = !verdict.drop;
        if send {
            let length = u32::try_from(size).map_err(io::Error::other)?;
            to.write_all(&length.to_be_bytes())?;
            to.write_all(&buf[..head])?;
        }
        let mut left = size - head;
        while left > 0 {
            let n = left.min(buf.len());
            from.read_exact(&mut buf[..n])?;
            if send {
                to.write_all(&buf[..n])?;
            }
            left -= n;
        }
        if send {
            counter.fetch_add(4 + size as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// The 4-byte big-endian length of the next frame; `None` at a clean EOF.
fn read_length(from: &mut TcpStream) -> io::Result<Option<usize>> {
    let mut length = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match from.read(&mut length[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    usize::try_from(i32::from_be_bytes(length))
        .ok()
        .filter(|&size| size <= MAX_FRAME)
        .map(Some)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad frame length"))
}

/// What the proxy has seen so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted, including refused ones.
    pub accepted: u64,
    /// Connections open now.
    pub open: usize,
    /// Requests seen (forwarded or not) per api key.
    pub requests: BTreeMap<i16, u64>,
    /// Bytes forwarded to the broker and to clients.
    pub bytes_to_broker: u64,
    pub bytes_to_client: u64,
    /// How many times a `cut_after_request` rule fired.
    pub fired: u64,
}

impl ProxyStats {
    pub fn requests(&self, api_key: i16) -> u64 {
        self.requests.get(&api_key).copied().unwrap_or(0)
    }
}

/// Sets faults on a running proxy; cheap to clone and `Send`.
#[derive(Clone)]
pub struct ProxyHandle {
    shared: Arc<Shared>,
    prefix: Option<String>,
}

impl ProxyHandle {
    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    pub fn port(&self) -> u16 {
        self.shared.addr.port()
    }

    /// A handle whose faults apply only to connections whose client id
    /// starts with `prefix`.
    pub fn only(&self, prefix: &str) -> ProxyHandle {
        ProxyHandle {
            shared: self.shared.clone(),
            prefix: Some(prefix.to_owned()),
        }
    }

    fn add(&self, fault: Fault) {
        let mut state = lock(&self.shared.state);
        if !matches!(fault, Fault::CutAfter { .. }) {
            state.rules.retain(|r| {
                r.prefix != self.prefix || discriminant(&r.fault) != discriminant(&fault)
            });
        }
        state.rules.push(Rule {
            prefix: self.prefix.clone(),
            fault,
        });
    }

    /// Delays every forwarded frame, both ways, by `delay` (replacing this
    /// prefix's earlier delay).
    pub fn delay(&self, delay: Duration) {
        self.add(Fault::Delay(delay));
    }

    /// Closes matching connections now and refuses new ones until `heal`.
    pub fn cut(&self) {
        self.add(Fault::Refuse);
        self.disconnect();
    }

    /// Closes matching connections now; clients may reconnect at once.
    pub fn disconnect(&self) {
        let conns: Vec<Arc<Conn>> = lock(&self.shared.state)
            .conns
            .values()
            .filter(|c| matches(&self.prefix, c.client_id().as_deref()))
            .cloned()
            .collect();
        for conn in conns {
            conn.close();
        }
    }

    /// Forwards nothing either way (frames are read and dropped) until
    /// `heal`; new connections are accepted and get nothing.
    pub fn black_hole(&self) {
        self.add(Fault::BlackHole);
    }

    /// For the next `count` requests with `api_key`: forward the request,
    /// then close its connection when the broker's reply to it arrives.
    pub fn cut_after_request(&self, api_key: i16, count: u32) {
        self.add(Fault::CutAfter {
            api_key,
            remaining: count,
        });
    }

    /// Removes every fault (of every prefix, armed rules included).
    pub fn heal(&self) {
        lock(&self.shared.state).rules.clear();
    }

    /// How many times a `cut_after_request` rule fired.
    pub fn fired(&self) -> u64 {
        self.shared.fired.load(Ordering::SeqCst)
    }

    pub fn stats(&self) -> ProxyStats {
        let state = lock(&self.shared.state);
        ProxyStats {
            accepted: self.shared.accepted.load(Ordering::SeqCst),
            open: state.conns.len(),
            requests: state.requests.clone(),
            bytes_to_broker: self.shared.to_broker.load(Ordering::Relaxed),
            bytes_to_client: self.shared.to_client.load(Ordering::Relaxed),
            fired: self.fired(),
        }
    }
}

/// A running proxy: stops accepting and closes every connection on drop.
pub struct Proxy {
    handle: ProxyHandle,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub fn start(upstream: impl ToSocketAddrs) -> io::Result<Proxy> {
        let upstream = upstream
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no upstream address"))?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let shared = Arc::new(Shared {
            upstream,
            addr: listener.local_addr()?,
            state: Mutex::new(State::default()),
            accepted: AtomicU64::new(0),
            to_broker: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
            fired: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        });
        let accepting = shared.clone();
        let acceptor = thread::Builder::new()
            .name("proxy-accept".into())
            .stack_size(STACK)
            .spawn(move || {
                for client in listener.incoming() {
                    if accepting.stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    match client {
                        Ok(client) => {
                            accepting.accepted.fetch_add(1, Ordering::SeqCst);
                            let _ = accepting.open(client);
                        }
                        // Out of descriptors, say: do not spin.
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
            })?;
        Ok(Proxy {
            handle: ProxyHandle {
                shared,
                prefix: None,
            },
            acceptor: Some(acceptor),
        })
    }

    pub fn handle(&self) -> ProxyHandle {
        self.handle.clone()
    }
}

impl Deref for Proxy {
    type Target = ProxyHandle;

    fn deref(&self) -> &ProxyHandle {
        &self.handle
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let shared = &self.handle.shared;
        shared.stopping.store(true, Ordering::SeqCst);
        // Wakes the acceptor, which then sees `stopping`.
        let woke = TcpStream::connect(shared.addr).is_ok();
        let conns: Vec<Arc<Conn>> = lock(&shared.state).conns.drain().map(|(_, c)| c).collect();
        for conn in conns {
            conn.close();
        }
        if woke && let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}
