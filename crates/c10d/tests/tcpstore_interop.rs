//! Wire compatibility with PyTorch 2.13's c10d TCPStore, both ways: PyTorch's server with waypoint's
//! client, and waypoint's server with PyTorch's client, each reading the other's keys.

use waypoint_testkit as common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use waypoint_c10d::{StoreClient, StoreServer};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/tcpstore_peer.py");
const T: Duration = Duration::from_secs(30);

#[test]
fn waypoint_client_on_pytorch_server() {
    let port = common::free_port();
    let mut py = Command::new(common::python())
        .args([SCRIPT, "server", &port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(py.stdout.take().unwrap()).lines();

    // PyTorch's server waits for 2 workers (itself and us), counted in `init/` as we connect.
    let mut c = StoreClient::connect("127.0.0.1", port, T).unwrap();
    assert_eq!(c.get("py_key").unwrap(), b"hello from python");
    c.set("rust_key", b"hello from rust").unwrap();
    assert_eq!(c.add("counter", 7).unwrap(), 7);
    c.multi_set(&[("m1", b"one"), ("m2", b"two")]).unwrap();
    c.append("log", b"a").unwrap();
    c.append("log", b"b").unwrap();
    c.set("to_delete", b"x").unwrap();
    assert!(c.delete_key("to_delete").unwrap());
    assert!(c.check(&["py_key"]).unwrap());
    assert!(c.wait(&["never"], Duration::from_millis(200)).is_err());
    c.ping().unwrap();
    c.set("rust_done", b"1").unwrap();

    let out: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert!(py.wait().unwrap().success());
    assert_eq!(out["rust_key"], "hello from rust");
    assert_eq!(out["counter"], 7);
    assert_eq!(out["multi"], serde_json::json!(["one", "two"]));
    assert_eq!(out["appended"], "ab");
    assert_eq!(out["deleted_gone"], true);
    // init/, /py_key, /rust_key, /counter, /m1, /m2, /log, /rust_done.
    assert_eq!(out["num_keys"], 8);
}

#[test]
fn pytorch_client_on_waypoint_server() {
    let server = StoreServer::bind("127.0.0.1", 0).unwrap();
    let mut c = StoreClient::connect("127.0.0.1", server.port(), T).unwrap();
    c.set("from_rust", b"hello from rust").unwrap();
    c.set("cas", b"r").unwrap();
    assert_eq!(c.add("counter", 1).unwrap(), 1);
    let out = Command::new(common::python())
        .args([SCRIPT, "client", &server.port().to_string()])
        .output()
        .unwrap();
    common::ok(&out);
    let seen: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(seen["from_rust"], "hello from rust");
    assert_eq!(seen["counter"], 11);
    assert_eq!(seen["cas"], "p");
    assert_eq!(seen["check"], false);
    assert_eq!(seen["wait_timed_out"], true);
    assert_eq!(seen["after_append"], "hello from rust+py");
    c.wait(&["python_done"], T).unwrap();
    assert_eq!(c.get("from_python").unwrap(), b"hello from python");
    assert_eq!(c.get("cas").unwrap(), b"p");
    assert_eq!(
        c.multi_get(&["pm1", "pm2"]).unwrap(),
        vec![b"a".to_vec(), b"b".to_vec()]
    );
}
