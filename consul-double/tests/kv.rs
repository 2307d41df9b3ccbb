//! The KV endpoints answer as Consul's do (agent/kvs_endpoint.go), over real HTTP.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pilotfish_consul_double::{ConsulDouble, DoubleConfig, DoubleHandle, ErrorFault, Faults};
use reqwest::header::HeaderMap;
use serde_json::Value;

async fn start(config: DoubleConfig) -> DoubleHandle {
    ConsulDouble::start_with(SocketAddr::from(([127, 0, 0, 1], 0)), config)
        .await
        .unwrap()
}

struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn index(&self) -> u64 {
        self.headers["x-consul-index"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn call(base: &str, method: &str, path: &str, body: Vec<u8>) -> Reply {
    let r = reqwest::Client::new()
        .request(method.parse().unwrap(), format!("{base}{path}"))
        .body(body)
        .send()
        .await
        .unwrap();
    Reply {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        body: r.bytes().await.unwrap().to_vec(),
    }
}

async fn get(d: &DoubleHandle, path: &str) -> Reply {
    call(&d.url(), "GET", path, Vec::new()).await
}

async fn put(d: &DoubleHandle, path: &str, body: impl Into<Vec<u8>>) -> Reply {
    call(&d.url(), "PUT", path, body.into()).await
}

async fn delete(d: &DoubleHandle, path: &str) -> Reply {
    call(&d.url(), "DELETE", path, Vec::new()).await
}

/// Polls `cond` until it holds, failing after 5s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Standard base64, decoded independently of the double's encoder.
fn unbase64(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = ALPHABET.iter().position(|a| *a == c).unwrap() as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    out
}

#[tokio::test]
async fn create_read_update_with_cas() {
    let d = start(DoubleConfig::default()).await;
    let created = put(&d, "/v1/kv/pf/leader?cas=0&flags=42", "replica-a").await;
    assert_eq!((created.status, created.text().as_str()), (200, "true"));
    assert_eq!(created.headers["content-type"], "application/json");
    assert_eq!(
        put(&d, "/v1/kv/pf/leader?cas=0", "replica-b").await.text(),
        "false",
        "cas=0 only creates"
    );

    let r = get(&d, "/v1/kv/pf/leader").await;
    assert_eq!(r.status, 200);
    let v = r.json();
    let e = &v.as_array().unwrap()[..];
    assert_eq!(e.len(), 1);
    let keys: Vec<&str> = e[0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        BTreeSet::from_iter(keys),
        BTreeSet::from([
            "LockIndex",
            "Key",
            "Flags",
            "Value",
            "CreateIndex",
            "ModifyIndex"
        ]),
        "no Session when unlocked"
    );
    assert_eq!(e[0]["Key"], "pf/leader");
    assert_eq!(e[0]["Flags"], 42);
    assert_eq!(e[0]["Value"], "cmVwbGljYS1h");
    let created_at = e[0]["CreateIndex"].as_u64().unwrap();
    assert_eq!(e[0]["ModifyIndex"].as_u64().unwrap(), created_at);
    assert_eq!(r.index(), created_at, "a key's index is its ModifyIndex");

    // Two replicas race to take over from the same index: exactly one wins, every round.
    let mut index = created_at;
    for round in 0..20 {
        let base = d.url();
        let racers: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|who| {
                let base = base.clone();
                tokio::spawn(async move {
                    let path = format!("/v1/kv/pf/leader?cas={index}");
                    let r = call(&base, "PUT", &path, format!("{who}-{round}").into()).await;
                    (who, r.text())
                })
            })
            .collect();
        let mut winners = Vec::new();
        for r in racers {
            let (who, body) = r.await.unwrap();
            assert!(body == "true" || body == "false", "{body}");
            if body == "true" {
                winners.push(who);
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        let r = get(&d, "/v1/kv/pf/leader").await;
        let e = &r.json()[0];
        assert_eq!(
            unbase64(e["Value"].as_str().unwrap()),
            format!("{}-{round}", winners[0]).into_bytes()
        );
        assert_eq!(e["CreateIndex"].as_u64().unwrap(), created_at, "kept");
        assert_eq!(e["Flags"], 0, "a write without ?flags resets them");
        assert!(e["ModifyIndex"].as_u64().unwrap() > index);
        index = e["ModifyIndex"].as_u64().unwrap();
    }

    // Without cas a write always lands; the same value again leaves ModifyIndex alone.
    assert_eq!(put(&d, "/v1/kv/pf/leader", "x").await.text(), "true");
    let first = get(&d, "/v1/kv/pf/leader").await.index();
    assert_eq!(put(&d, "/v1/kv/pf/leader", "x").await.text(), "true");
    assert_eq!(get(&d, "/v1/kv/pf/leader").await.index(), first);
    assert!(d.index("dc1") > first, "but it consumed a Raft index");
}

#[tokio::test]
async fn binary_values_round_trip() {
    let d = start(DoubleConfig::default()).await;
    let bytes: Vec<u8> = (0..=255u8).rev().chain(0..=255u8).collect();
    assert_eq!(put(&d, "/v1/kv/bin", bytes.clone()).await.text(), "true");
    let r = get(&d, "/v1/kv/bin").await;
    assert_eq!(unbase64(r.json()[0]["Value"].as_str().unwrap()), bytes);
    let raw = get(&d, "/v1/kv/bin?raw").await;
    assert_eq!(raw.status, 200);
    assert_eq!(raw.body, bytes);
    assert_eq!(raw.headers["content-type"], "text/plain");
    assert_eq!(raw.headers["x-content-type-options"], "nosniff");
    assert!(raw.headers.contains_key("x-consul-index"));

    assert_eq!(put(&d, "/v1/kv/empty", Vec::new()).await.text(), "true");
    assert!(get(&d, "/v1/kv/empty").await.json()[0]["Value"].is_null());
    assert!(get(&d, "/v1/kv/empty?raw").await.body.is_empty());
}

#[tokio::test]
async fn missing_keys_are_404_with_an_index() {
    let d = start(DoubleConfig::default()).await;
    let r = get(&d, "/v1/kv/nothing").await;
    assert_eq!(r.status, 404);
    assert!(r.body.is_empty());
    assert_eq!(r.index(), 1, "never 0, even on an empty store");
    put(&d, "/v1/kv/other", "1").await;
    let written = d.index("dc1");
    for path in [
        "/v1/kv/nothing",
        "/v1/kv/nothing?raw",
        "/v1/kv/nothing/?recurse",
        "/v1/kv/nothing/?keys",
    ] {
        let r = get(&d, path).await;
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.index(), written, "{path}: the KV table's index");
    }
    let root = get(&d, "/v1/kv/?keys").await;
    assert_eq!(
        (root.status, root.json()),
        (200, serde_json::json!(["other"]))
    );
}

#[tokio::test]
async fn recurse_and_keys_list_a_prefix() {
    let d = start(DoubleConfig::default()).await;
    for k in ["svc/b/2", "svc/a", "svc/b/1", "svc/c/x/y", "other"] {
        put(&d, &format!("/v1/kv/{k}"), k).await;
    }
    let newest_under_svc = get(&d, "/v1/kv/svc/c/x/y").await.index();
    put(&d, "/v1/kv/other", "later").await;

    let r = get(&d, "/v1/kv/svc/?recurse").await;
    assert_eq!(r.status, 200);
    let keys: Vec<String> = r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys, ["svc/a", "svc/b/1", "svc/b/2", "svc/c/x/y"]);
    assert_eq!(
        r.index(),
        newest_under_svc,
        "max ModifyIndex under the prefix"
    );

    let r = get(&d, "/v1/kv/svc/?keys&separator=/").await;
    assert_eq!(r.json(), serde_json::json!(["svc/a", "svc/b/", "svc/c/"]));
    let r = get(&d, "/v1/kv/svc/?keys").await;
    assert_eq!(r.json().as_array().unwrap().len(), 4);
    let r = get(&d, "/v1/kv/svc/?keys&seperator=/").await;
    assert_eq!(r.json().as_array().unwrap().len(), 3, "the old spelling");

    // Deleting the newest key under the prefix leaves a tombstone: the index moves forward.
    assert_eq!(delete(&d, "/v1/kv/svc/c/x/y").await.text(), "true");
    let after = get(&d, "/v1/kv/svc/?recurse").await;
    assert!(after.index() > newest_under_svc);
    assert_eq!(after.json().as_array().unwrap().len(), 3);
    // Recursive delete removes the subtree, not its neighbours.
    assert_eq!(delete(&d, "/v1/kv/svc/b/?recurse").await.text(), "true");
    let keys = get(&d, "/v1/kv/?keys").await.json();
    assert_eq!(keys, serde_json::json!(["other", "svc/a"]));

    // Once the tombstones are reaped the prefix's index goes backwards: clients must reset.
    let before = get(&d, "/v1/kv/svc/?recurse").await.index();
    d.reap_kv_tombstones();
    let after = get(&d, "/v1/kv/svc/?recurse").await.index();
    assert!(after < before, "{after} < {before}");
    assert_eq!(after, get(&d, "/v1/kv/svc/a").await.index());
}

#[tokio::test]
async fn delete_with_cas() {
    let d = start(DoubleConfig::default()).await;
    put(&d, "/v1/kv/lock", "me").await;
    let at = get(&d, "/v1/kv/lock").await.index();
    let r = delete(&d, &format!("/v1/kv/lock?cas={}", at - 1)).await;
    assert_eq!((r.status, r.text().as_str()), (200, "false"));
    assert_eq!(get(&d, "/v1/kv/lock").await.status, 200, "still there");
    assert_eq!(
        delete(&d, &format!("/v1/kv/lock?cas={at}")).await.text(),
        "true"
    );
    assert_eq!(get(&d, "/v1/kv/lock").await.status, 404);
    let r = delete(&d, "/v1/kv/lock?cas=1&recurse").await;
    assert_eq!(r.status, 400);
    assert!(r.text().starts_with("Conflicting flags: cas=1&recurse="));
}

#[tokio::test]
async fn blocking_get_is_woken_by_a_put() {
    let d = start(DoubleConfig::default()).await;
    put(&d, "/v1/kv/cfg/a", "v0").await;

    for (round, query) in ["", "?recurse"].into_iter().enumerate() {
        let index = get(&d, "/v1/kv/cfg/a").await.index();
        let path = if query.is_empty() {
            format!("/v1/kv/cfg/a?index={index}&wait=30s")
        } else {
            format!("/v1/kv/cfg/?recurse&index={index}&wait=30s")
        };
        let before = d.stats().blocked_now;
        let base = d.url();
        let waiter = tokio::spawn(async move {
            let r = call(&base, "GET", &path, Vec::new()).await;
            (r.index(), r.json())
        });
        eventually("the read to block", || d.stats().blocked_now > before).await;
        // A key outside the watch wakes the loop, which finds nothing newer and holds on.
        put(&d, "/v1/kv/elsewhere", format!("{round}")).await;
        assert!(d.stats().blocked_now > before, "still blocked");
        let t = Instant::now();
        // A new value: rewriting the same one would leave ModifyIndex, and the watch, alone.
        put(&d, "/v1/kv/cfg/a", format!("v{}", round + 1)).await;
        let (new_index, body) = waiter.await.unwrap();
        assert!(new_index > index, "woken with a newer index");
        assert_eq!(
            new_index,
            body[0]["ModifyIndex"].as_u64().unwrap(),
            "the index of the write that woke it"
        );
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "promptly, not at the end of the 30s wait"
        );
    }

    // Without a change the read holds until the wait runs out, then answers the same index.
    let now = get(&d, "/v1/kv/cfg/a").await.index();
    let r = get(&d, &format!("/v1/kv/cfg/a?index={now}&wait=200ms")).await;
    assert_eq!((r.status, r.index()), (200, now));
}

#[tokio::test]
async fn errors_limits_acls_and_faults() {
    let d = start(DoubleConfig::default()).await;
    let cases = [
        ("GET", "/v1/kv/", 400, "Missing key name"),
        ("PUT", "/v1/kv/", 400, "Missing key name"),
        ("DELETE", "/v1/kv/", 400, "Missing key name"),
        ("PUT", "/v1/kv//a", 400, "key must not begin with a '/'"),
        (
            "PUT",
            "/v1/kv/a?flags=x",
            500,
            "strconv.ParseUint: parsing \"x\": invalid syntax",
        ),
        ("PUT", "/v1/kv/a?acquire=s1", 500, "invalid session \"s1\""),
        ("GET", "/v1/kv/a?index=x", 400, "Invalid index"),
    ];
    for (method, path, code, body) in cases {
        let r = call(&d.url(), method, path, b"v".to_vec()).await;
        assert_eq!(
            (r.status, r.text().as_str()),
            (code, body),
            "{method} {path}"
        );
    }
    let r = call(&d.url(), "POST", "/v1/kv/a", Vec::new()).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.headers["allow"], "OPTIONS,GET,PUT,DELETE");

    // 512 KiB is the most a value may hold.
    let limit = 512 * 1024;
    assert_eq!(put(&d, "/v1/kv/big", vec![b'x'; limit]).await.status, 200);
    let r = put(&d, "/v1/kv/big", vec![b'x'; limit + 1]).await;
    assert_eq!(r.status, 413);
    assert!(r.text().starts_with("Request body(524289 bytes) too large"));

    // Faults: no leader fails default reads and every write; stale reads still answer.
    d.set_faults(Faults {
        error: Some(ErrorFault::NoLeader),
        ..Faults::default()
    });
    assert_eq!(get(&d, "/v1/kv/big").await.status, 500);
    let stale = get(&d, "/v1/kv/big?stale").await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.headers["x-consul-knownleader"], "false");
    let r = put(&d, "/v1/kv/big?stale", "y").await;
    assert_eq!((r.status, r.text().as_str()), (500, "No cluster leader"));
    d.set_faults(Faults {
        error: Some(ErrorFault::RateLimited),
        ..Faults::default()
    });
    assert_eq!(delete(&d, "/v1/kv/big").await.status, 429);
    d.set_faults(Faults::default());

    // ACLs: a known token may read and write, an unknown one is not found, none is denied.
    let d = start(DoubleConfig {
        tokens: Some(BTreeSet::from(["t1".to_string()])),
        ..DoubleConfig::default()
    })
    .await;
    assert_eq!(put(&d, "/v1/kv/a?token=t1", "1").await.text(), "true");
    let r = reqwest::Client::new()
        .get(format!("{}/v1/kv/a", d.url()))
        .header("X-Consul-Token", "t1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = get(&d, "/v1/kv/a?token=nope").await;
    assert_eq!((r.status, r.text().as_str()), (403, "ACL not found"));
    let r = get(&d, "/v1/kv/a").await;
    assert_eq!(r.status, 403);
    assert!(r
        .text()
        .starts_with("Permission denied: anonymous token lacks permission 'key:read' on \"a\""));
    assert_eq!(put(&d, "/v1/kv/a", "2").await.status, 403);
    assert_eq!(
        get(&d, "/v1/kv/?recurse").await.status,
        404,
        "listings are filtered, not refused"
    );
}
