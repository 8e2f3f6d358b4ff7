//! The cluster dashboard: one self-contained page (`dashboard.html`: inline CSS and script, no
//! external resource) embedded in the binary and served at `GET /`, and `GET /dashboard/leader`,
//! which tells the page whether this controller leads (always 200, unlike `/v1`).
//!
//! The page reads only the public REST API (`/v1/hosts`, `/v1/vms`, `/v1/tasks`, `/v1/events`,
//! `/v1/plans`, `/v1/stats/series`), learns from `/openapi.json` which of them this controller has
//! (a missing one makes its panel say "not available"), polls every 1.5 s, and builds every
//! element through the DOM (text nodes, never markup from the API).
//!
//! On a controller served over TLS the page itself needs no credentials (it holds no cluster
//! data) but every call does: the page takes a bearer token from the URL's fragment
//! (`https://CONTROLLER/#token=…`, never sent to the server, removed from the address bar at
//! once) or from a form shown when a call answers 401, keeps it in the tab's `sessionStorage` and
//! sends it only as `Authorization: Bearer`, never in a query string.
//!
//! Headers: a Content-Security-Policy that allows nothing but the page's own inline `<script>`
//! and `<style>` (by their SHA-256, computed once from the embedded page) and requests to this
//! origin; no caching (`no-cache`, so an upgraded controller serves its new page at once),
//! `nosniff`, no referrer, no framing.

use std::sync::{Arc, LazyLock};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::Shared;

/// The page, as served.
pub const PAGE: &str = include_str!("dashboard.html");

/// The routes: `GET /` (the page) and `GET /dashboard/leader`.
pub fn router() -> Router<Arc<Shared>> {
    Router::new()
        .route("/", get(page))
        .route("/dashboard/leader", get(leader))
}

/// The page's Content-Security-Policy (see the module docs).
pub static CSP: LazyLock<String> = LazyLock::new(|| {
    let hash = |tag: &str| {
        let body = inline(PAGE, tag).unwrap_or_else(|| panic!("dashboard.html has a <{tag}>"));
        csp_hash(body)
    };
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src data:; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash("script"),
        hash("style")
    )
});

async fn page() -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP.as_str()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        PAGE,
    )
        .into_response()
}

/// `GET /dashboard/leader`: whether this controller leads, and where the leader is.
#[derive(Debug, Serialize)]
struct Leadership {
    /// This controller leads.
    leading: bool,
    /// Its generation while it leads.
    generation: Option<u64>,
    /// This controller's URL.
    url: String,
    /// The leader's URL as last seen in etcd (this one's while it leads), if any leads.
    leader_url: Option<String>,
}

async fn leader(State(s): State<Arc<Shared>>) -> Response {
    let generation = s.core().generation(); // the lock ends here: leader_url takes it again
    let body = Leadership {
        leading: generation.is_some(),
        generation,
        url: s.url().to_string(),
        leader_url: s.leader_url(),
    };
    (
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(body),
    )
        .into_response()
}

/// The text between the page's first `<tag>` and `</tag>`, exactly as the browser hashes it.
fn inline<'a>(page: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = page.find(&open)? + open.len();
    let len = page[start..].find(&format!("</{tag}>"))?;
    Some(&page[start..start + len])
}

/// A CSP hash source for an inline element's text: `'sha256-<base64 of its SHA-256>'`.
fn csp_hash(body: &str) -> String {
    format!(
        "'sha256-{}'",
        STANDARD.encode(Sha256::digest(body.as_bytes()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_sources_are_base64_sha256_as_csp_writes_them() {
        // SHA-256("abc"), FIPS 180-2's example, in standard base64 with padding
        assert_eq!(
            csp_hash("abc"),
            "'sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0='"
        );
    }

    #[test]
    fn the_policy_allows_exactly_the_pages_inline_script_and_style() {
        let script = inline(PAGE, "script").expect("a script");
        let style = inline(PAGE, "style").expect("a style");
        let csp = CSP.as_str();
        for body in [script, style] {
            let source = csp_hash(body);
            assert!(csp.contains(&source), "{csp} lacks {source}");
        }
        assert!(csp.starts_with("default-src 'none';"), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        // One script and one style, so the hashes cover everything the page runs.
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert_eq!(PAGE.matches("<style").count(), 1);
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere_and_writes_no_markup() {
        for banned in [
            "src=\"http",
            "href=\"http",
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!PAGE.contains(banned), "dashboard.html uses {banned:?}");
        }
        // No inline event handler (onclick=...): the policy would block it.
        let handler = PAGE.split_whitespace().find(|w| {
            w.strip_prefix("on").is_some_and(|rest| {
                let name = rest.chars().take_while(char::is_ascii_lowercase).count();
                name > 0 && rest[name..].starts_with('=')
            })
        });
        assert_eq!(handler, None, "dashboard.html has an inline handler");
    }

    #[tokio::test]
    async fn the_page_is_html_with_the_policy_and_no_caching() {
        let r = page().await;
        assert_eq!(r.status(), StatusCode::OK);
        let h = r.headers();
        assert_eq!(h[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(h[header::CACHE_CONTROL], "no-cache");
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], CSP.as_str());
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    }
}
