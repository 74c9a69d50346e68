//! The c10d TCPStore wire protocol of PyTorch 2.13, as both ends speak it.
//!
//! Every request starts with a one-byte [`Query`]. Integers are little-endian; a string or byte
//! string is a `u64` length and the bytes; a key list is a `u64` count and the strings. The
//! connection opens with `VALIDATE` + [`MAGIC`] (no reply) and `PING` + a `u32` nonce (echoed).
//! PyTorch's C++ client prefixes user keys with `/`, except its own `init/` connection counter.
//!
//! | query | request after the byte | reply |
//! |---|---|---|
//! | SET | key, value | — |
//! | COMPARE_SET | key, expected, desired | value now |
//! | GET | key (the client WAITs first) | value |
//! | ADD | key, i64 | i64 total |
//! | CHECK | keys | u8 0 ready, 1 not |
//! | WAIT | keys | u8 0 when all exist |
//! | GETNUMKEYS | — | i64 |
//! | DELETE_KEY | key | i64 deleted |
//! | APPEND | key, value | — |
//! | MULTI_GET | keys (WAITed first) | one value each |
//! | MULTI_SET | count, (key, value)… | — |
//! | CANCEL_WAIT | — | u8 1 |
//! | PING | u32 | the u32 |

use std::io::{Read, Write};

/// The validation magic number.
pub const MAGIC: u32 = 0x3C85_F7CE;

/// The connection counter key the C++ client adds 1 to when it connects (not `/`-prefixed).
pub const INIT_KEY: &str = "init/";

/// The prefix PyTorch's C++ client puts before user keys.
pub const KEY_PREFIX: &str = "/";

/// Request types, numbered as PyTorch's `QueryType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Query {
    /// Opens a connection: the magic number follows.
    Validate = 0,
    /// Sets a key.
    Set = 1,
    /// Sets a key if its value is as expected (or it is absent and expected is empty).
    CompareSet = 2,
    /// Reads a key.
    Get = 3,
    /// Adds to an integer key.
    Add = 4,
    /// Whether keys exist.
    Check = 5,
    /// Waits until keys exist.
    Wait = 6,
    /// Number of keys.
    GetNumKeys = 7,
    /// Deletes a key.
    DeleteKey = 8,
    /// Appends to a key.
    Append = 9,
    /// Reads several keys.
    MultiGet = 10,
    /// Sets several keys.
    MultiSet = 11,
    /// Gives up the pending WAIT.
    CancelWait = 12,
    /// Echoes a nonce.
    Ping = 13,
}

impl Query {
    /// The query of a request byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        use Query::*;
        Some(match b {
            0 => Validate,
            1 => Set,
            2 => CompareSet,
            3 => Get,
            4 => Add,
            5 => Check,
            6 => Wait,
            7 => GetNumKeys,
            8 => DeleteKey,
            9 => Append,
            10 => MultiGet,
            11 => MultiSet,
            12 => CancelWait,
            13 => Ping,
            _ => return None,
        })
    }
}

/// Reply to WAIT: the keys exist.
pub const STOP_WAITING: u8 = 0;
/// Reply to CANCEL_WAIT.
pub const WAIT_CANCELED: u8 = 1;
/// CHECK: all keys exist.
pub const READY: u8 = 0;
/// CHECK: some key is missing.
pub const NOT_READY: u8 = 1;

/// Largest string or value accepted (a guard against garbage lengths).
pub const MAX_LEN: u64 = 1 << 30;

/// Builds a message in memory, to send with one write.
#[derive(Debug, Default)]
pub struct Message(pub Vec<u8>);

impl Message {
    /// A message starting with `q`.
    pub fn new(q: Query) -> Self {
        Self(vec![q as u8])
    }

    /// Appends a u8.
    pub fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }

    /// Appends a little-endian u32.
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a little-endian u64.
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a little-endian i64.
    pub fn i64(mut self, v: i64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a length-prefixed byte string.
    pub fn bytes(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(&(v.len() as u64).to_le_bytes());
        self.0.extend_from_slice(v);
        self
    }

    /// Sends it.
    pub fn send(&self, w: &mut impl Write) -> std::io::Result<()> {
        w.write_all(&self.0)?;
        w.flush()
    }
}

/// Reads one u8.
pub fn read_u8(r: &mut impl Read) -> std::io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

/// Reads a little-endian u32.
pub fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// Reads a little-endian u64.
pub fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Reads a little-endian i64.
pub fn read_i64(r: &mut impl Read) -> std::io::Result<i64> {
    Ok(read_u64(r)? as i64)
}

/// Reads a length-prefixed byte string (at most [`MAX_LEN`] bytes).
pub fn read_bytes(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let n = read_u64(r)?;
    if n > MAX_LEN {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("length {n} exceeds {MAX_LEN}"),
        ));
    }
    let mut v = vec![0u8; n as usize];
    r.read_exact(&mut v)?;
    Ok(v)
}

/// Reads a length-prefixed UTF-8 string.
pub fn read_string(r: &mut impl Read) -> std::io::Result<String> {
    String::from_utf8(read_bytes(r)?)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Reads a key count and the keys.
pub fn read_keys(r: &mut impl Read) -> std::io::Result<Vec<String>> {
    let n = read_u64(r)?;
    if n > 1 << 20 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{n} keys in one request"),
        ));
    }
    (0..n).map(|_| read_string(r)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_as_pytorch_does() {
        // SET "/k" = "v1", as captured from PyTorch 2.13's client.
        let m = Message::new(Query::Set).bytes(b"/k").bytes(b"v1");
        assert_eq!(
            m.0,
            [0x01, 2, 0, 0, 0, 0, 0, 0, 0, b'/', b'k', 2, 0, 0, 0, 0, 0, 0, 0, b'v', b'1']
        );
        let mut r = &m.0[1..];
        assert_eq!(read_string(&mut r).unwrap(), "/k");
        assert_eq!(read_bytes(&mut r).unwrap(), b"v1");
        let huge = Message::default().u64(MAX_LEN + 1);
        assert!(read_bytes(&mut &huge.0[..]).is_err());
        for b in 0..=13 {
            assert_eq!(Query::from_byte(b).map(|q| q as u8), Some(b));
        }
        assert_eq!(Query::from_byte(14), None);
    }
}
