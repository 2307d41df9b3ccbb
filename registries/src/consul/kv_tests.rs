//! The KV client against the Consul double, which answers as consul-api.md says Consul does.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use pilotfish_consul_double::{ConsulDouble, DoubleHandle};

use super::*;
use crate::consul::ConsulConfig;

async fn kv() -> (DoubleHandle, Kv) {
    let double = ConsulDouble::start(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let config = ConsulConfig::new(double.url(), vec!["dc1".into()]);
    let client = Client::new(Arc::new(config)).unwrap();
    (double, Kv::new(client, None))
}

#[tokio::test]
async fn cas_lets_one_of_two_writers_at_the_same_index_win() {
    let (_double, kv) = kv().await;
    assert_eq!(kv.get("p/a").await.unwrap(), None);
    assert!(kv.put("p/a", b"one", Some(0)).await.unwrap(), "create");
    assert!(
        !kv.put("p/a", b"two", Some(0)).await.unwrap(),
        "create again"
    );
    let first = kv.get("p/a").await.unwrap().unwrap();
    assert_eq!(first.value, b"one");
    assert!(kv
        .put("p/a", b"two", Some(first.modify_index))
        .await
        .unwrap());
    assert!(
        !kv.put("p/a", b"three", Some(first.modify_index))
            .await
            .unwrap(),
        "a second writer that read the same index loses"
    );
    assert_eq!(kv.get("p/a").await.unwrap().unwrap().value, b"two");
    let now = kv.get("p/a").await.unwrap().unwrap();
    assert!(!kv.delete("p/a", Some(first.modify_index)).await.unwrap());
    assert!(kv.delete("p/a", Some(now.modify_index)).await.unwrap());
    assert_eq!(kv.get("p/a").await.unwrap(), None);
}

#[tokio::test]
async fn a_blocking_list_returns_when_the_prefix_changes() {
    let (double, kv) = kv().await;
    kv.put("p/x/one", b"1", None).await.unwrap();
    kv.put("q/other", b"", None).await.unwrap();
    let (entries, meta) = kv.list("p/", 0, Duration::from_secs(5)).await.unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].key, "p/x/one");
    assert!(meta.index > 0);
    let writer = kv.clone();
    let started = std::time::Instant::now();
    let blocked =
        tokio::spawn(async move { kv.list("p/", meta.index, Duration::from_secs(5)).await });
    // The write comes once the double holds the query (so it must wake it, not pre-empt it).
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    while double.stats().blocked_now == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the list never blocked"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    writer.put("p/x/two", b"", None).await.unwrap();
    let (entries, next) = blocked.await.unwrap().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "woken by the write"
    );
    assert!(next.index > meta.index);
    let keys: Vec<(&str, &[u8])> = entries
        .iter()
        .map(|e| (e.key.as_str(), e.value.as_slice()))
        .collect();
    assert_eq!(keys, [("p/x/one", &b"1"[..]), ("p/x/two", &b""[..])]);
}

#[tokio::test]
async fn the_index_of_a_prefix_moves_with_writes_and_deletes_under_it() {
    let (_double, kv) = kv().await;
    kv.put("p/a", b"1", None).await.unwrap();
    let written = kv.index("p/").await.unwrap();
    assert_eq!(
        written,
        kv.list("p/", 0, Duration::from_secs(1))
            .await
            .unwrap()
            .1
            .index
    );
    kv.put("q/other", b"", None).await.unwrap();
    assert_eq!(kv.index("p/").await.unwrap(), written, "a write elsewhere");
    kv.delete("p/a", None).await.unwrap();
    assert!(kv.index("p/").await.unwrap() > written, "a delete counts");
}

#[tokio::test]
async fn an_empty_prefix_is_an_empty_list_with_an_index() {
    let (_double, kv) = kv().await;
    let (entries, meta) = kv
        .list("nothing/", 0, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(entries.is_empty());
    assert!(meta.index > 0, "X-Consul-Index is never 0");
}

#[tokio::test]
async fn an_unreachable_consul_is_a_transport_error_naming_the_url() {
    let config = ConsulConfig::new("http://127.0.0.1:1", vec!["dc1".into()]);
    let kv = Kv::new(Client::new(Arc::new(config)).unwrap(), None);
    let err = kv.get("p/a").await.unwrap_err();
    assert!(
        matches!(&err, ConsulError::Transport { url, .. } if url.contains("127.0.0.1:1/v1/kv/p/a")),
        "{err}"
    );
}
