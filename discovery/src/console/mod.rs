//! The web console at `/ui/`: one HTML page, a script and a style sheet, compiled into the
//! binary (no CDN, no build step). The page holds no state on the server: it polls the same
//! JSON the tools read (`/v1/services`, `/v1/routes`, `/v1/proxies`, `/status`) and writes
//! routes through the rules API, so the console can do nothing a token holder could not do
//! with `pilotfish-ctl`. The token lives in the browser's `sessionStorage`, never here.

use axum::extract::RawQuery;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

const INDEX: &str = include_str!("index.html");
const APP: &str = include_str!("app.js");
const STYLE: &str = include_str!("style.css");

/// `/ui` (a redirect that keeps the query), `/ui/`, `/ui/app.js`, `/ui/style.css`.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/ui", get(redirect))
        .route(
            "/ui/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/ui/index.html",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP) }),
        )
        .route(
            "/ui/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}

/// `/ui?token=...` must reach the page with its query, or the token is lost.
async fn redirect(RawQuery(query): RawQuery) -> Redirect {
    match query {
        Some(q) => Redirect::permanent(&format!("/ui/?{q}")),
        None => Redirect::permanent("/ui/"),
    }
}

/// The assets change with the binary; `no-store` so an upgraded discovery is never served a
/// stale script next to a new API.
fn asset(content_type: &'static str, text: &'static str) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        text,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    async fn get_path(path: &str) -> Response {
        router::<()>()
            .oneshot(Request::get(path).body(Body::empty()).expect("request"))
            .await
            .expect("infallible")
    }

    #[tokio::test]
    async fn serves_the_embedded_page_with_content_types_and_no_store() {
        for (path, content_type, needle) in [
            ("/ui/", "text/html", "<script src=\"app.js\">"),
            ("/ui/app.js", "text/javascript", "/v1/services"),
            ("/ui/style.css", "text/css", ".bar"),
        ] {
            let response = get_path(path).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            let headers = response.headers().clone();
            assert!(
                headers[header::CONTENT_TYPE]
                    .to_str()
                    .is_ok_and(|v| v.starts_with(content_type)),
                "{path}: {headers:?}"
            );
            assert_eq!(headers[header::CACHE_CONTROL], "no-store", "{path}");
            let body = response.into_body().collect().await.expect("body");
            let text = String::from_utf8(body.to_bytes().to_vec()).expect("utf-8");
            assert!(text.contains(needle), "{path}");
        }
    }

    #[tokio::test]
    async fn ui_without_slash_redirects_keeping_the_query() {
        let response = get_path("/ui?token=t&set=reviews:0,100").await;
        assert!(response.status().is_redirection());
        assert_eq!(
            response.headers()[header::LOCATION],
            "/ui/?token=t&set=reviews:0,100"
        );
        let response = get_path("/ui").await;
        assert_eq!(response.headers()[header::LOCATION], "/ui/");
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for text in [INDEX, APP, STYLE] {
            assert!(!text.contains("http://") && !text.contains("https://"));
            assert!(!text.contains("//cdn"));
        }
    }
}
