//! The double answers as Consul does (consul-api.md section a), over real HTTP.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pilotfish_consul_double::{ConsulDouble, DoubleConfig, DoubleHandle, ErrorFault, Faults};
use serde_json::Value;

async fn start(config: DoubleConfig) -> DoubleHandle {
    ConsulDouble::start_with(SocketAddr::from(([127, 0, 0, 1], 0)), config)
        .await
        .unwrap()
}

async fn get(d: &DoubleHandle, path: &str) -> (u16, reqwest::header::HeaderMap, String) {
    let r = reqwest::get(format!("{}{}", d.url(), path)).await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.unwrap())
}

#[tokio::test]
async fn json_shapes_and_headers_follow_consul() {
    let d = start(DoubleConfig::default()).await;
    // Seed over HTTP, with a raw register leaving Meta null.
    let client = reqwest::Client::new();
    let body = r#"{"Node":"n1","Address":"10.0.0.1","Service":{"ID":"web-1","Service":"web","Tags":null,
        "TaggedAddresses":{"lan_ipv4":{"address":"10.0.0.1","port":8080}},"Weights":{"Passing":10,"Warning":1}},
        "Check":{"CheckID":"service:web-1","Name":"web","Status":"warning","ServiceID":"web-1"}}"#;
    let r = client
        .put(format!("{}/v1/catalog/register", d.url()))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "true");

    let (code, h, body) = get(&d, "/v1/health/service/web").await;
    assert_eq!(code, 200);
    for name in [
        "x-consul-index",
        "x-consul-knownleader",
        "x-consul-lastcontact",
        "x-consul-effective-consistency",
        "x-consul-default-acl-policy",
    ] {
        assert!(h.contains_key(name), "{name}");
    }
    assert_ne!(h["x-consul-index"], "0");
    let v: Value = serde_json::from_str(&body).unwrap();
    let e = &v[0];
    assert!(e["Node"]["Meta"].is_null(), "raw register leaves Meta null");
    assert_eq!(e["Service"]["Tags"], serde_json::json!([]));
    assert!(e["Service"].get("Port").is_none(), "Port absent when 0");
    assert_eq!(
        e["Service"]["TaggedAddresses"]["lan_ipv4"]["Port"], 8080,
        "capitalized keys"
    );
    assert_eq!(
        e["Service"]["Proxy"],
        serde_json::json!({"Mode": "", "MeshGateway": {}, "Expose": {}})
    );
    let checks: Vec<&str> = e["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["CheckID"].as_str().unwrap())
        .collect();
    assert_eq!(checks, ["serfHealth", "service:web-1"]);

    let (_, _, body) = get(&d, "/v1/catalog/service/web").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v[0]["ServicePort"], 0, "ServicePort always present");
    assert!(v[0].get("Checks").is_none());
    assert!(v[0]["ServiceLocality"].is_null());

    let (_, _, body) = get(&d, "/v1/health/service/web?passing").await;
    assert_eq!(body, "[]", "warning is not passing");
    let (_, _, body) = get(&d, "/v1/health/service/nothing").await;
    assert_eq!(body, "[]");
    let (_, _, body) = get(&d, "/v1/catalog/services").await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        serde_json::json!({"consul": [], "web": []})
    );
    let (_, _, body) = get(&d, "/v1/health/state/critical").await;
    assert_eq!(body, "[]");
    let (code, _, body) = get(&d, "/v1/health/service/web?passing=maybe").await;
    assert_eq!((code, body.as_str()), (400, "Invalid value for ?passing"));
    let (code, _, body) = get(
        &d,
        r#"/v1/health/service/web?filter=Service.ID%20%3D%3D%20%22web-1%22"#,
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let (code, _, _) = get(&d, "/v1/health/service/web?filter=Service.Port%20%3E%201").await;
    assert_eq!(code, 400, "unsupported filters are refused, not ignored");
}

#[tokio::test]
async fn errors_are_plain_text_with_consul_codes() {
    let d = start(DoubleConfig {
        datacenters: vec!["dc1".into(), "dc2".into()],
        ..DoubleConfig::default()
    })
    .await;
    let cases = [
        ("/v1/nope", 404, "404 page not found"),
        (
            "/v1/health/service/web?dc=dc9",
            500,
            "No path to datacenter",
        ),
        (
            "/v1/health/service/web?stale&consistent",
            400,
            "Cannot specify ?stale with ?consistent, conflicting semantics.",
        ),
        ("/v1/health/service/web?index=x", 400, "Invalid index"),
        (
            "/v1/health/service/web?index=1&wait=10",
            400,
            "Invalid wait time",
        ),
        (
            "/v1/health/service/web?ns=a",
            400,
            "Invalid query parameter: \"ns\" - Namespaces are a Consul Enterprise feature",
        ),
        ("/v1/health/state/", 400, "Missing check state"),
    ];
    for (path, code, body) in cases {
        let (c, _, b) = get(&d, path).await;
        assert_eq!((c, b.as_str()), (code, body), "{path}");
    }
    let r = reqwest::Client::new()
        .post(format!("{}/v1/catalog/services", d.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "OPTIONS,GET");
    assert_eq!(r.text().await.unwrap(), "method POST not allowed");
    let (c, _, _) = get(&d, "/v1/catalog/services?dc=dc2").await;
    assert_eq!(c, 200);
}

#[tokio::test]
async fn blocking_queries_wait_wake_and_time_out() {
    let d = start(DoubleConfig::default()).await;
    d.register_instance("", "n1", "10.0.0.1", "web", "web-1", 80)
        .unwrap();
    d.register_instance("", "n2", "10.0.0.2", "db", "db-1", 5432)
        .unwrap();
    let (_, h, _) = get(&d, "/v1/health/service/web").await;
    let web_index: u64 = h["x-consul-index"].to_str().unwrap().parse().unwrap();
    // Timeout: 200 with the same index after wait (+ at most wait/16).
    let t = Instant::now();
    let (c, h, _) = get(
        &d,
        &format!("/v1/health/service/web?index={web_index}&wait=300ms"),
    )
    .await;
    assert_eq!(c, 200);
    assert_eq!(h["x-consul-index"].to_str().unwrap(), web_index.to_string());
    assert!(t.elapsed() >= Duration::from_millis(300) && t.elapsed() < Duration::from_millis(900));
    // Per-service granularity: a db change does not wake a web watch; a web change does.
    let url = format!("/v1/health/service/web?index={web_index}&wait=5s");
    let waiter = tokio::spawn({
        let base = d.url();
        async move {
            reqwest::get(format!("{base}{url}"))
                .await
                .unwrap()
                .headers()["x-consul-index"]
                .to_str()
                .unwrap()
                .to_string()
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    d.set_check_status("", "n2", "service:db-1", "critical");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished());
    let t = Instant::now();
    d.set_check_status("", "n1", "service:web-1", "critical");
    let idx: u64 = waiter.await.unwrap().parse().unwrap();
    assert!(idx > web_index);
    assert!(t.elapsed() < Duration::from_millis(500));
    // Spurious wake-up: the index moves, the body does not.
    let (_, _, before) = get(&d, "/v1/health/service/web").await;
    d.spurious_wakeup();
    let (_, h, after) = get(&d, &format!("/v1/health/service/web?index={idx}")).await;
    assert_eq!(before, after);
    assert!(
        h["x-consul-index"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > idx
    );
    assert!(d.stats().requests_to("/v1/health/service/web") >= 5);
}

#[tokio::test]
async fn acl_tokens_faults_and_connection_cap() {
    let d = start(DoubleConfig {
        tokens: Some(BTreeSet::from(["t1".to_string()])),
        ..DoubleConfig::default()
    })
    .await;
    d.register_instance("", "n1", "10.0.0.1", "web", "web-1", 80)
        .unwrap();
    let c = reqwest::Client::new();
    let ok = c
        .get(format!("{}/v1/health/service/web", d.url()))
        .header("X-Consul-Token", "t1")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.headers()["x-consul-default-acl-policy"], "deny");
    assert_eq!(
        serde_json::from_str::<Value>(&ok.text().await.unwrap())
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let bearer = c
        .get(format!("{}/v1/health/service/web", d.url()))
        .header("Authorization", "bearer t1")
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), 200);
    let bad = c
        .get(format!("{}/v1/health/service/web", d.url()))
        .header("X-Consul-Token", "nope")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 403);
    assert_eq!(bad.text().await.unwrap(), "ACL not found");
    let anon = c
        .get(format!("{}/v1/health/service/web", d.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        anon.text().await.unwrap(),
        "[]",
        "anonymous sees nothing under default deny"
    );

    let d = start(DoubleConfig::default()).await;
    d.set_faults(Faults {
        error: Some(ErrorFault::NoLeader),
        ..Faults::default()
    });
    let (code, _, body) = get(&d, "/v1/catalog/services").await;
    assert_eq!((code, body.as_str()), (500, "No cluster leader"));
    let (code, h, _) = get(&d, "/v1/catalog/services?stale").await;
    assert_eq!(code, 200);
    assert_eq!(h["x-consul-knownleader"], "false");
    let (_, _, body) = get(&d, "/v1/status/leader").await;
    assert_eq!(body, "\"\"");

    // Admin endpoint sets the same switches.
    let r = c
        .put(format!("{}/_double/faults", d.url()))
        .body(r#"{"error":"rate_limited"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(get(&d, "/v1/catalog/services").await.0, 429);
    c.put(format!("{}/_double/faults", d.url()))
        .body(r#"{"cut":"mid_body"}"#)
        .send()
        .await
        .unwrap();
    d.register_instance("", "n1", "10.0.0.1", "web", "web-1", 80)
        .unwrap();
    let cut = match reqwest::get(format!("{}/v1/health/service/web", d.url())).await {
        Ok(r) => r.text().await.is_err(),
        Err(_) => true,
    };
    assert!(cut, "the response is cut");

    // Per-client connection cap: the third concurrent connection is refused. A fresh double, so
    // that no pooled connection of the clients above holds a slot.
    let d = start(DoubleConfig::default()).await;
    d.set_faults(Faults {
        max_conns_per_client: 2,
        ..Faults::default()
    });
    let holders: Vec<_> = (0..2)
        .map(|_| {
            let url = format!("{}/v1/catalog/services?index=999999&wait=2s", d.url());
            tokio::spawn(async move {
                reqwest::Client::new()
                    .get(url)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let third = reqwest::Client::new()
        .get(format!("{}/v1/catalog/services", d.url()))
        .send()
        .await;
    assert!(third.is_err(), "over the cap: refused");
    assert!(d.stats().connections_refused >= 1);
    for h in holders {
        assert_eq!(h.await.unwrap().unwrap(), 200);
    }
}
