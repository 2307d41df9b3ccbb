//! The shared store against the Consul double: two "replicas" (each a state_dir, a mirror and
//! a rules API) over one KV store.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use pilotfish_consul_double::{ConsulDouble, DoubleHandle};
use pilotfish_pki::{RevocationStore, TokenRejected, TokenStore};
use pilotfish_registries::consul::ConsulConfig;
use serde_json::{json, Value};
use tower::ServiceExt as _;

use super::*;
use crate::config::{StoreConfig, DEFAULT_STORE_PREFIX};
use crate::rules_api::tests::{OPERATOR_RULES, SERVICES};
use crate::rules_api::{Access, RulesApi};

fn store_config(double: &DoubleHandle) -> StoreConfig {
    let mut consul = ConsulConfig::new(double.url(), Vec::new());
    consul.wait = Duration::from_secs(5);
    consul.stale = false;
    StoreConfig {
        consul,
        datacenter: None,
        prefix: DEFAULT_STORE_PREFIX.to_string(),
    }
}

struct Replica {
    dir: tempfile::TempDir,
    store: Arc<SharedStore>,
    router: axum::Router,
    stop: CancellationToken,
}

impl Replica {
    /// A replica whose state_dir already holds `rules` (file name, content) in rules.d.
    async fn start(double: &DoubleHandle, rules: &[(&str, &str)]) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let registry = dir.path().join("registry.d");
        std::fs::create_dir(&registry).unwrap();
        std::fs::write(registry.join("services.toml"), SERVICES).unwrap();
        // Declares the subsets (policies.reviews) the canaries route to.
        std::fs::write(registry.join("rules.toml"), OPERATOR_RULES).unwrap();
        let rules_dir = dir.path().join("state").join(RULES_DIR);
        std::fs::create_dir_all(&rules_dir).unwrap();
        for (name, content) in rules {
            std::fs::write(rules_dir.join(name), content).unwrap();
        }
        let store = SharedStore::new(&store_config(double), &dir.path().join("state")).unwrap();
        let stop = CancellationToken::new();
        let (tx, synced) = tokio::sync::oneshot::channel();
        tokio::spawn(store.clone().run(stop.clone(), Some(tx)));
        synced.await.unwrap();
        let api = RulesApi::new(rules_dir.clone(), vec![registry, rules_dir], Access::Open)
            .unwrap()
            .with_store(store.clone());
        Replica {
            router: Arc::new(api).router(),
            dir,
            store,
            stop,
        }
    }

    fn rules_file(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.path().join("state").join(RULES_DIR).join(name)).ok()
    }

    async fn call(
        &self,
        method: Method,
        uri: &str,
        if_match: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Option<String>, Value) {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(v) = if_match {
            request = request.header(header::IF_MATCH, v);
        }
        let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
        let response = self
            .router
            .clone()
            .oneshot(request.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let etag = response
            .headers()
            .get(header::ETAG)
            .map(|v| v.to_str().unwrap().to_string());
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, etag, body)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn double() -> DoubleHandle {
    ConsulDouble::start(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap()
}

fn canary(weight: i64) -> Value {
    json!({"rules": [{"to": [{"subset": "v1", "weight": 100 - weight}, {"subset": "v2", "weight": weight}]}]})
}

/// Polls `check` until it holds (or fails the test after 5 s).
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_one_replica_reaches_the_others_rules_d_and_a_delete_removes_it() {
    let double = double().await;
    let a = Replica::start(&double, &[]).await;
    let b = Replica::start(&double, &[]).await;
    let (status, etag, _) = a
        .call(Method::PUT, "/v1/routes/reviews", None, Some(canary(10)))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    // Read-your-writes on A: its mirror has the file when the write is answered.
    let on_a = a.rules_file("routes-reviews.toml").expect("on A at once");
    assert!(on_a.contains("weight = 10"), "{on_a}");
    eventually("B's mirror", || {
        b.rules_file("routes-reviews.toml").as_ref() == Some(&on_a)
    })
    .await;
    let (status, etag_b, body) = b.call(Method::GET, "/v1/routes/reviews", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(etag_b, etag, "the same version on both replicas");
    assert_eq!(body["managed"], true);

    let (status, _, _) = b
        .call(Method::DELETE, "/v1/routes/reviews", etag.as_deref(), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(b.rules_file("routes-reviews.toml").is_none());
    eventually("A's mirror to drop it", || {
        a.rules_file("routes-reviews.toml").is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_with_the_same_if_match_on_two_replicas_one_wins() {
    let double = double().await;
    let a = Replica::start(&double, &[]).await;
    let b = Replica::start(&double, &[]).await;
    let (_, etag, _) = a
        .call(Method::PUT, "/v1/routes/reviews", None, Some(canary(10)))
        .await;
    eventually("B's mirror", || {
        b.rules_file("routes-reviews.toml").is_some()
    })
    .await;
    for round in 0..5 {
        let (_, current, _) = a.call(Method::GET, "/v1/routes/reviews", None, None).await;
        let version = current.clone().unwrap();
        // The same body on both sides: Consul would let both identical writes "win" if the
        // API wrote identical bytes.
        let body = canary(20 + round);
        let (ra, rb) = tokio::join!(
            a.call(
                Method::PUT,
                "/v1/routes/reviews",
                Some(&version),
                Some(body.clone())
            ),
            b.call(
                Method::PUT,
                "/v1/routes/reviews",
                Some(&version),
                Some(body)
            ),
        );
        let statuses = [ra.0, rb.0];
        assert_eq!(
            statuses.iter().filter(|s| **s == StatusCode::OK).count(),
            1,
            "round {round}: exactly one wins: {statuses:?} {} {}",
            ra.2,
            rb.2
        );
        assert!(statuses.contains(&StatusCode::CONFLICT), "{statuses:?}");
        let winner = if ra.0 == StatusCode::OK { ra.1 } else { rb.1 };
        // The winner's replica answers with it at once, the other once its mirror has it.
        let want = winner.unwrap();
        for replica in [&a, &b] {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let (_, now, _) = replica
                    .call(Method::GET, "/v1/routes/reviews", None, None)
                    .await;
                if now.as_deref() == Some(want.as_str()) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "round {round}: {now:?} != {want}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert_ne!(etag, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_replica_seeds_the_store_and_later_ones_take_its_state() {
    let double = double().await;
    let own = "[routes.reviews]\ntimeout = \"3s\"\n";
    let a = Replica::start(&double, &[("routes-reviews.toml", own)]).await;
    // B had its own stale object; the store (seeded by A) wins, and B's extra file goes.
    let stale = "[routes.reviews]\ntimeout = \"9s\"\n";
    let b = Replica::start(
        &double,
        &[
            ("routes-reviews.toml", stale),
            ("routes-ratings.toml", stale),
        ],
    )
    .await;
    assert_eq!(b.rules_file("routes-reviews.toml").as_deref(), Some(own));
    assert_eq!(b.rules_file("routes-ratings.toml"), None);
    assert_eq!(a.rules_file("routes-reviews.toml").as_deref(), Some(own));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_and_revocations_are_shared() {
    let double = double().await;
    let a = Replica::start(&double, &[]).await;
    let b = Replica::start(&double, &[]).await;
    let (sa, sb) = (a.store.clone(), b.store.clone());
    let outcome = tokio::task::spawn_blocking(move || {
        let on_a = TokenStore::shared(sa.document(TOKENS_KEY));
        let on_b = TokenStore::shared(sb.document(TOKENS_KEY));
        let token = on_a.create("vm-1", Duration::from_secs(600)).unwrap();
        let first = on_b.redeem(&token, "vm-1");
        let second = on_a.redeem(&token, "vm-1");
        RevocationStore::shared(sa.document(REVOCATIONS_KEY))
            .revoke("vm-2", std::time::SystemTime::now())
            .unwrap();
        (first, second)
    })
    .await
    .unwrap();
    assert!(outcome.0.is_ok(), "{:?}", outcome.0);
    assert!(
        matches!(outcome.1, Err(TokenRejected::AlreadyUsed { .. })),
        "{:?}",
        outcome.1
    );
    // Each replica's revoker reads its own state_dir copy.
    let copy = b.dir.path().join("state").join(REVOCATIONS_FILE);
    eventually("B's revocations.json", || {
        RevocationStore::new(copy.parent().unwrap())
            .load()
            .is_ok_and(|r| r.is_revoked("vm-2"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_consul_writes_are_refused_and_reads_served_from_the_copy() {
    let double = double().await;
    let a = Replica::start(&double, &[]).await;
    let (status, _, _) = a
        .call(Method::PUT, "/v1/routes/reviews", None, Some(canary(10)))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    double.shutdown().await;
    let (status, _, body) = a
        .call(Method::PUT, "/v1/routes/reviews", None, Some(canary(30)))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let message = body["errors"][0].as_str().unwrap();
    assert!(
        message.contains("the shared store (Consul KV pilotfish/rules/routes-reviews at http://")
            && message.contains("writes need it, reads are served from this replica's copy"),
        "{message}"
    );
    assert!(!a.store.is_up());
    let (status, _, body) = a.call(Method::GET, "/v1/routes/reviews", None, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(a
        .rules_file("routes-reviews.toml")
        .unwrap()
        .contains("weight = 10"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roots_shared_by_one_replica_join_the_others_ca_and_leave_when_retired() {
    let double = double().await;
    let a = Replica::start(&double, &[]).await;
    let ca_dir = a.dir.path().join("state").join("ca");
    std::fs::create_dir_all(&ca_dir).unwrap();
    let mut changed = a.store.roots_changed();
    let fp = "ab".repeat(32);
    let pem = "-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n";
    assert!(a
        .store
        .put_if(&format!("{ROOTS_KEY}{fp}"), pem.as_bytes(), 0)
        .await
        .unwrap());
    // Not hex: never a file name.
    a.store.put_if("roots/../evil", b"x", 0).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), changed.changed())
        .await
        .expect("the mirror tells the CA to reload")
        .unwrap();
    let file = ca_dir.join("roots.d").join(format!("shared-{fp}.pem"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), pem);
    assert_eq!(
        std::fs::read_dir(ca_dir.join("roots.d")).unwrap().count(),
        1
    );

    let removed = a.store.remove_roots(&fp[..16]).await.unwrap();
    assert_eq!(removed, vec![fp.clone()]);
    tokio::time::timeout(Duration::from_secs(5), changed.changed())
        .await
        .expect("reload after the retirement")
        .unwrap();
    assert!(!file.exists());
}
