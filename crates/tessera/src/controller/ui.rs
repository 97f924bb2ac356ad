//! The dashboard: a page, a script, a style sheet and an icon compiled into the binary (no
//! front-end build), served at `/ui/`. It logs in with an API token and reads the same API as the
//! CLI.
//!
//! Every answer carries a content security policy that allows only these files: a job's name or
//! output that slipped into markup could run no script of its own, and no other site may frame
//! the page (clickjacking).

use axum::http::header;
use axum::response::{IntoResponse, Redirect};

const INDEX: &str = include_str!("ui/index.html");
const APP: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/style.css");
const ICON: &str = include_str!("ui/favicon.svg");

/// Scripts, styles and images from the controller only. The script sets bar widths and colours
/// through the style object (CSSOM), which the policy does not govern, so no inline style
/// attribute needs allowing.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                      img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; \
                      frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            // A controller upgraded in place serves its new dashboard at the next load.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

pub async fn index() -> impl IntoResponse {
    asset("text/html; charset=utf-8", INDEX)
}

pub async fn app() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", APP)
}

pub async fn style() -> impl IntoResponse {
    asset("text/css; charset=utf-8", STYLE)
}

/// The tab's icon, also at `/favicon.ico` where browsers look without being told.
pub async fn icon() -> impl IntoResponse {
    asset("image/svg+xml", ICON)
}

pub async fn root() -> Redirect {
    Redirect::to("/ui/")
}
