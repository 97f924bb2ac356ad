//! The dashboard: a page, a script and a style sheet compiled into the binary (no front-end
//! build), served at `/ui/`. It logs in with an API token and reads the same API as the CLI.

use axum::http::header;
use axum::response::{IntoResponse, Redirect};

const INDEX: &str = include_str!("ui/index.html");
const APP: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/style.css");

pub async fn index() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX)
}

pub async fn app() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        APP,
    )
}

pub async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE)
}

pub async fn root() -> Redirect {
    Redirect::to("/ui/")
}
