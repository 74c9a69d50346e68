//! A TCPStore client, as PyTorch's C++ `TCPStore(is_master=False)` behaves on the wire: user keys get
//! the `/` prefix, GET and MULTI_GET wait for their keys first, and a timed-out WAIT is cancelled.

use std::io::BufReader;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::{DistError, Result};
use crate::wire::{self, Message, Query};

/// One connection to a TCPStore. Requests are sequential; share it behind a mutex.
pub struct StoreClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    addr: String,
    timeout: Duration,
    /// The most any answer may take (`None`: no limit but a wait's own).
    io_timeout: Option<Duration>,
}

impl StoreClient {
    /// Connects to `host:port`, retrying until `timeout` (the server may not be up yet), validates,
    /// pings, and counts itself in `init/` as PyTorch's clients do. `timeout` is also the default
    /// for [`StoreClient::wait`] and [`StoreClient::get`].
    pub fn connect(host: &str, port: u16, timeout: Duration) -> Result<Self> {
        let addr = format!("{host}:{port}");
        let deadline = Instant::now() + timeout;
        let mut backoff = Duration::from_millis(10);
        loop {
            match Self::try_connect(&addr, timeout) {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() + backoff < deadline => {
                    tracing::debug!(%addr, "store not reachable yet: {e}");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(e) => {
                    return Err(DistError::Unreachable {
                        addr,
                        timeout,
                        last: e.to_string(),
                    })
                }
            }
        }
    }

    fn try_connect(addr: &str, timeout: Duration) -> Result<Self> {
        let sock = addr
            .to_socket_addrs()
            .map_err(DistError::io(format!("resolving {addr}")))?
            .next()
            .ok_or_else(|| DistError::Protocol(format!("{addr} resolves to no address")))?;
        let stream = TcpStream::connect_timeout(&sock, timeout.min(Duration::from_secs(5)))
            .map_err(DistError::io(format!("connecting to {addr}")))?;
        stream.set_nodelay(true).ok();
        let writer = stream
            .try_clone()
            .map_err(DistError::io("cloning the socket"))?;
        let mut c = Self {
            reader: BufReader::new(stream),
            writer,
            addr: addr.to_string(),
            timeout,
            io_timeout: None,
        };
        c.send(Message::new(Query::Validate).u32(wire::MAGIC))?;
        c.ping()?;
        c.raw_add(wire::INIT_KEY, 1)?;
        Ok(c)
    }

    /// Limits how long any answer may take: a store that goes silent (its host powered off, cut
    /// off without a reset) fails the call instead of holding it for ever. After such a failure
    /// the connection's state is unknown: connect again.
    pub fn set_io_timeout(&mut self, timeout: Option<Duration>) {
        self.io_timeout = timeout;
        self.reader.get_ref().set_read_timeout(timeout).ok();
        self.writer.set_write_timeout(timeout).ok();
    }

    /// The store's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn send(&mut self, m: Message) -> Result<()> {
        let ctx = format!("sending to the TCPStore at {}", self.addr);
        m.send(&mut self.writer).map_err(DistError::io(ctx))
    }

    fn recv<T>(
        &mut self,
        f: impl FnOnce(&mut BufReader<TcpStream>) -> std::io::Result<T>,
    ) -> Result<T> {
        let ctx = format!("reading from the TCPStore at {}", self.addr);
        f(&mut self.reader).map_err(DistError::io(ctx))
    }

    fn key(k: &str) -> Vec<u8> {
        format!("{}{k}", wire::KEY_PREFIX).into_bytes()
    }

    fn keys(m: Message, keys: &[&str]) -> Message {
        keys.iter()
            .fold(m.u64(keys.len() as u64), |m, k| m.bytes(&Self::key(k)))
    }

    /// Round trip: sends a nonce, expects it back.
    pub fn ping(&mut self) -> Result<()> {
        let nonce = std::process::id() ^ 0x5EED;
        self.send(Message::new(Query::Ping).u32(nonce))?;
        let back = self.recv(wire::read_u32)?;
        if back != nonce {
            return Err(DistError::Protocol(format!(
                "PING {nonce} answered with {back}: not a TCPStore?"
            )));
        }
        Ok(())
    }

    /// Sets `key`.
    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        self.send(Message::new(Query::Set).bytes(&Self::key(key)).bytes(value))
    }

    /// Waits for `key` (default timeout), then reads it.
    pub fn get(&mut self, key: &str) -> Result<Vec<u8>> {
        self.wait(&[key], self.timeout)?;
        self.send(Message::new(Query::Get).bytes(&Self::key(key)))?;
        self.recv(wire::read_bytes)
    }

    /// Adds `delta` to the integer at `key` (absent: 0); returns the new value.
    pub fn add(&mut self, key: &str, delta: i64) -> Result<i64> {
        self.raw_add(&format!("{}{key}", wire::KEY_PREFIX), delta)
    }

    fn raw_add(&mut self, key: &str, delta: i64) -> Result<i64> {
        self.send(Message::new(Query::Add).bytes(key.as_bytes()).i64(delta))?;
        self.recv(wire::read_i64)
    }

    /// Sets `key` to `desired` if it holds `expected` (or is absent and `expected` is empty); returns
    /// the value it holds afterwards.
    pub fn compare_set(&mut self, key: &str, expected: &[u8], desired: &[u8]) -> Result<Vec<u8>> {
        self.send(
            Message::new(Query::CompareSet)
                .bytes(&Self::key(key))
                .bytes(expected)
                .bytes(desired),
        )?;
        self.recv(wire::read_bytes)
    }

    /// Whether all `keys` exist.
    pub fn check(&mut self, keys: &[&str]) -> Result<bool> {
        self.send(Self::keys(Message::new(Query::Check), keys))?;
        Ok(self.recv(wire::read_u8)? == wire::READY)
    }

    /// Waits until all `keys` exist, at most `timeout` (then cancels the wait and fails).
    pub fn wait(&mut self, keys: &[&str], timeout: Duration) -> Result<()> {
        self.send(Self::keys(Message::new(Query::Wait), keys))?;
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .ok();
        let first = wire::read_u8(&mut self.reader);
        self.reader.get_ref().set_read_timeout(self.io_timeout).ok();
        match first {
            Ok(wire::STOP_WAITING) => Ok(()),
            Ok(other) => Err(DistError::Protocol(format!("WAIT answered {other}"))),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                self.send(Message::new(Query::CancelWait))?;
                // The keys may have arrived just before the cancel: then STOP_WAITING comes first.
                let mut reply = self.recv(wire::read_u8)?;
                let arrived = reply == wire::STOP_WAITING;
                if arrived {
                    reply = self.recv(wire::read_u8)?;
                }
                if reply != wire::WAIT_CANCELED {
                    return Err(DistError::Protocol(format!("CANCEL_WAIT answered {reply}")));
                }
                if arrived {
                    Ok(())
                } else {
                    Err(DistError::Timeout {
                        keys: keys.iter().map(|k| k.to_string()).collect(),
                        timeout,
                    })
                }
            }
            Err(e) => Err(DistError::Io {
                context: format!("waiting on the TCPStore at {}", self.addr),
                source: e,
            }),
        }
    }

    /// Number of keys in the store (PyTorch's count includes its `init/` counter).
    pub fn num_keys(&mut self) -> Result<i64> {
        self.send(Message::new(Query::GetNumKeys))?;
        self.recv(wire::read_i64)
    }

    /// Deletes `key`; whether it existed.
    pub fn delete_key(&mut self, key: &str) -> Result<bool> {
        self.send(Message::new(Query::DeleteKey).bytes(&Self::key(key)))?;
        Ok(self.recv(wire::read_i64)? > 0)
    }

    /// Appends to `key` (absent: creates it).
    pub fn append(&mut self, key: &str, value: &[u8]) -> Result<()> {
        self.send(
            Message::new(Query::Append)
                .bytes(&Self::key(key))
                .bytes(value),
        )
    }

    /// Waits for all `keys` (default timeout), then reads them.
    pub fn multi_get(&mut self, keys: &[&str]) -> Result<Vec<Vec<u8>>> {
        self.wait(keys, self.timeout)?;
        self.send(Self::keys(Message::new(Query::MultiGet), keys))?;
        (0..keys.len())
            .map(|_| self.recv(wire::read_bytes))
            .collect()
    }

    /// Sets several keys.
    pub fn multi_set(&mut self, pairs: &[(&str, &[u8])]) -> Result<()> {
        let m = pairs.iter().fold(
            Message::new(Query::MultiSet).u64(pairs.len() as u64),
            |m, (k, v)| m.bytes(&Self::key(k)).bytes(v),
        );
        self.send(m)
    }
}
