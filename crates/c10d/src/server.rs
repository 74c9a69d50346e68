//! A TCPStore server that PyTorch's clients (and [`crate::StoreClient`]) talk to: a thread per
//! connection over one key-value map. A WAIT whose keys are missing is parked; whichever request
//! creates the last of its keys answers it on the waiter's socket.

use std::collections::HashMap;
use std::io::BufReader;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::error::{DistError, Result};
use crate::wire::{self, Message, Query};

struct Waiter {
    conn: u64,
    keys: Vec<String>,
    socket: TcpStream,
}

#[derive(Default)]
struct State {
    map: HashMap<String, Vec<u8>>,
    waiters: Vec<Waiter>,
    sockets: HashMap<u64, TcpStream>,
}

impl State {
    /// Answers every waiter whose keys all exist now.
    fn wake(&mut self) {
        let map = &self.map;
        self.waiters.retain_mut(|w| {
            if w.keys.iter().all(|k| map.contains_key(k)) {
                let _ = Message::default()
                    .u8(wire::STOP_WAITING)
                    .send(&mut w.socket);
                false
            } else {
                true
            }
        });
    }
}

/// A running TCPStore server; stops when dropped.
pub struct StoreServer {
    port: u16,
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<State>>,
    accept: Option<JoinHandle<()>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl StoreServer {
    /// Listens on `host:port` (port 0: any free port).
    pub fn bind(host: &str, port: u16) -> Result<Self> {
        let listener = TcpListener::bind((host, port)).map_err(DistError::io(format!(
            "binding the TCPStore to {host}:{port}"
        )))?;
        let port = listener
            .local_addr()
            .map_err(DistError::io("reading the bound address"))?
            .port();
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(State::default()));
        let accept = {
            let (stop, state) = (stop.clone(), state.clone());
            std::thread::Builder::new()
                .name("tcpstore-accept".into())
                .spawn(move || accept_loop(listener, stop, state))
                .map_err(DistError::io("starting the TCPStore thread"))?
        };
        tracing::debug!(port, "TCPStore listening");
        Ok(Self {
            port,
            stop,
            state,
            accept: Some(accept),
        })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Number of keys held.
    pub fn num_keys(&self) -> usize {
        lock(&self.state).map.len()
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop, then close every connection.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        for (_, s) in lock(&self.state).sockets.drain() {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: TcpListener, stop: Arc<AtomicBool>, state: Arc<Mutex<State>>) {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else { continue };
        stream.set_nodelay(true).ok();
        let conn = NEXT.fetch_add(1, Ordering::Relaxed);
        if let Ok(s) = stream.try_clone() {
            lock(&state).sockets.insert(conn, s);
        }
        let state = state.clone();
        let _ = std::thread::Builder::new()
            .name(format!("tcpstore-conn-{conn}"))
            .spawn(move || {
                if let Err(e) = serve(conn, stream, &state) {
                    tracing::debug!(conn, "TCPStore connection ended: {e}");
                }
                let mut st = lock(&state);
                st.waiters.retain(|w| w.conn != conn);
                st.sockets.remove(&conn);
            });
    }
}

fn serve(conn: u64, stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    loop {
        let byte = match wire::read_u8(&mut r) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        let q = Query::from_byte(byte).ok_or_else(|| bad(format!("unknown query {byte}")))?;
        match q {
            Query::Validate => {
                let magic = wire::read_u32(&mut r)?;
                if magic != wire::MAGIC {
                    return Err(bad(format!("bad magic {magic:#x}")));
                }
            }
            Query::Ping => {
                let nonce = wire::read_u32(&mut r)?;
                Message::default().u32(nonce).send(&mut out)?;
            }
            Query::Set => {
                let (k, v) = (wire::read_string(&mut r)?, wire::read_bytes(&mut r)?);
                let mut st = lock(state);
                st.map.insert(k, v);
                st.wake();
            }
            Query::CompareSet => {
                let k = wire::read_string(&mut r)?;
                let (expected, desired) = (wire::read_bytes(&mut r)?, wire::read_bytes(&mut r)?);
                let mut st = lock(state);
                let now = match st.map.get(&k) {
                    None if expected.is_empty() => {
                        st.map.insert(k, desired.clone());
                        st.wake();
                        desired
                    }
                    None => expected,
                    Some(v) if *v == expected => {
                        st.map.insert(k, desired.clone());
                        desired
                    }
                    Some(v) => v.clone(),
                };
                drop(st);
                Message::default().bytes(&now).send(&mut out)?;
            }
            Query::Get => {
                let k = wire::read_string(&mut r)?;
                let v = lock(state).map.get(&k).cloned();
                let v = v.ok_or_else(|| bad(format!("GET of missing key {k:?}")))?;
                Message::default().bytes(&v).send(&mut out)?;
            }
            Query::Add => {
                let k = wire::read_string(&mut r)?;
                let delta = wire::read_i64(&mut r)?;
                let mut st = lock(state);
                let old = match st.map.get(&k) {
                    None => 0,
                    Some(v) => std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse::<i64>().ok())
                        .ok_or_else(|| bad(format!("ADD to non-integer key {k:?}")))?,
                };
                let new = old + delta;
                st.map.insert(k, new.to_string().into_bytes());
                st.wake();
                drop(st);
                Message::default().i64(new).send(&mut out)?;
            }
            Query::Check => {
                let keys = wire::read_keys(&mut r)?;
                let st = lock(state);
                let ready = keys.iter().all(|k| st.map.contains_key(k));
                drop(st);
                let reply = if ready { wire::READY } else { wire::NOT_READY };
                Message::default().u8(reply).send(&mut out)?;
            }
            Query::Wait => {
                let keys = wire::read_keys(&mut r)?;
                let mut st = lock(state);
                if keys.iter().all(|k| st.map.contains_key(k)) {
                    drop(st);
                    Message::default().u8(wire::STOP_WAITING).send(&mut out)?;
                } else {
                    st.waiters.push(Waiter {
                        conn,
                        keys,
                        socket: out.try_clone()?,
                    });
                }
            }
            Query::CancelWait => {
                lock(state).waiters.retain(|w| w.conn != conn);
                Message::default().u8(wire::WAIT_CANCELED).send(&mut out)?;
            }
            Query::GetNumKeys => {
                let n = lock(state).map.len() as i64;
                Message::default().i64(n).send(&mut out)?;
            }
            Query::DeleteKey => {
                let k = wire::read_string(&mut r)?;
                let removed = lock(state).map.remove(&k).is_some();
                Message::default().i64(i64::from(removed)).send(&mut out)?;
            }
            Query::Append => {
                let (k, v) = (wire::read_string(&mut r)?, wire::read_bytes(&mut r)?);
                let mut st = lock(state);
                st.map.entry(k).or_default().extend_from_slice(&v);
                st.wake();
            }
            Query::MultiGet => {
                let keys = wire::read_keys(&mut r)?;
                let st = lock(state);
                let mut m = Message::default();
                for k in &keys {
                    let v = st
                        .map
                        .get(k)
                        .ok_or_else(|| bad(format!("MULTI_GET of missing key {k:?}")))?;
                    m = m.bytes(v);
                }
                drop(st);
                m.send(&mut out)?;
            }
            Query::MultiSet => {
                let n = wire::read_u64(&mut r)?;
                if n > 1 << 20 {
                    return Err(bad(format!("MULTI_SET of {n} keys")));
                }
                let mut pairs = Vec::new();
                for _ in 0..n {
                    pairs.push((wire::read_string(&mut r)?, wire::read_bytes(&mut r)?));
                }
                let mut st = lock(state);
                st.map.extend(pairs);
                st.wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::StoreClient;

    #[test]
    fn every_request_round_trips_and_waits_wake() {
        let server = StoreServer::bind("127.0.0.1", 0).unwrap();
        let t = Duration::from_secs(5);
        let mut a = StoreClient::connect("127.0.0.1", server.port(), t).unwrap();
        let mut b = StoreClient::connect("127.0.0.1", server.port(), t).unwrap();
        assert_eq!(a.add("init-count", 0).unwrap(), 0);
        a.set("k", b"v1").unwrap();
        assert_eq!(b.get("k").unwrap(), b"v1");
        assert_eq!(b.add("n", 5).unwrap(), 5);
        assert_eq!(a.add("n", -2).unwrap(), 3);
        assert!(a.check(&["k", "n"]).unwrap());
        assert!(!a.check(&["k", "missing"]).unwrap());
        assert_eq!(a.compare_set("k", b"v1", b"v2").unwrap(), b"v2");
        assert_eq!(a.compare_set("k", b"nope", b"v3").unwrap(), b"v2");
        assert_eq!(a.compare_set("fresh", b"", b"x").unwrap(), b"x");
        a.multi_set(&[("p", b"1"), ("q", b"2")]).unwrap();
        assert_eq!(
            b.multi_get(&["p", "q"]).unwrap(),
            vec![b"1".to_vec(), b"2".to_vec()]
        );
        a.append("p", b"3").unwrap();
        // APPEND has no reply (as in PyTorch), and "p" exists already, so `b` could read before the
        // server has applied it: a round trip on `a` first orders the two connections.
        a.ping().unwrap();
        assert_eq!(b.get("p").unwrap(), b"13");
        assert!(a.delete_key("p").unwrap());
        assert!(!a.delete_key("p").unwrap());
        // init/ (from both clients) plus /k /n /fresh /q /init-count.
        assert_eq!(a.num_keys().unwrap(), 6);

        // A WAIT parked on one connection is answered by a SET on another.
        let port = server.port();
        let waiter = std::thread::spawn(move || {
            let mut c = StoreClient::connect("127.0.0.1", port, t).unwrap();
            c.wait(&["later"], Duration::from_secs(5))
        });
        std::thread::sleep(Duration::from_millis(100));
        a.set("later", b"!").unwrap();
        waiter.join().unwrap().unwrap();

        // A WAIT that times out is cancelled, and the connection stays usable.
        let err = b.wait(&["never"], Duration::from_millis(100)).unwrap_err();
        assert!(err.to_string().contains("never"), "{err}");
        assert_eq!(b.get("k").unwrap(), b"v2");
    }

    #[test]
    fn unreachable_store_names_the_address() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let err = StoreClient::connect("127.0.0.1", port, Duration::from_millis(200))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(&format!("127.0.0.1:{port}")) && err.contains("MASTER_ADDR"),
            "{err}"
        );
    }
}
