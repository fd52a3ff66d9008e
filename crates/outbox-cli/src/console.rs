//! The console: a server-rendered page on the admin port (`GET /`) showing, per database, the
//! backlog and its oldest age, the lanes with their owners and lease expiry, the publish rate (see
//! [`rate`]), the broker's state and the dead letters, each with Retry and Discard buttons.
//!
//! Plain HTML and CSS, no script: the page is one form, the buttons post to
//! `POST /dead-letters/{database}/{id}/retry` and `.../discard`. Those need the configured token
//! (`[admin] token` or `OUTBOX_ADMIN_TOKEN`), sent as the form field `token` or as
//! `Authorization: Bearer TOKEN`; without a configured token the buttons are not shown and the
//! routes answer 403. A done action redirects to `/` (303) with a notice. The page shows database
//! names only, never their URLs.

mod rate;
mod render;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::FormRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use outbox::StoreAdmin;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::admin::{AdminState, Connected, DatabaseView};
use rate::Sampler;
use render::{DbPage, Page, Ready};

/// How many dead letters a database's table lists (oldest first; the count shows them all).
pub(crate) const DEAD_LETTERS_SHOWN: usize = 100;
/// How long a database may take to answer the page's queries.
const DB_ANSWER: Duration = Duration::from_secs(2);

/// The console's routes.
pub(crate) fn routes() -> Router<Arc<AdminState>> {
    Router::new()
        .route("/", get(page))
        .route(
            "/dead-letters/{db}/{id}/retry",
            post(|s, p, h, f| act(Action::Retry, s, p, h, f)),
        )
        .route(
            "/dead-letters/{db}/{id}/discard",
            post(|s, p, h, f| act(Action::Discard, s, p, h, f)),
        )
        .layer(Extension(Arc::new(Sampler::default())))
}

/// `?done=retried&db=NAME&id=UUID`: what the redirect after an action tells the page.
#[derive(Debug, Default, Deserialize)]
struct Done {
    done: Option<String>,
    db: Option<String>,
    id: Option<String>,
}

/// The notice for a redirect's query: only known outcomes, configured names and valid ids are
/// shown, so a crafted link cannot put text of its choosing on the page.
fn notice(q: &Done, s: &AdminState) -> Option<String> {
    let db = s.databases.iter().find(|d| Some(&d.name) == q.db.as_ref())?;
    let id: uuid::Uuid = q.id.as_deref()?.parse().ok()?;
    let what = match q.done.as_deref()? {
        "retried" => "put back into the outbox",
        "discarded" => "discarded",
        "gone" => "was not there any more (already retried or discarded?)",
        _ => return None,
    };
    Some(format!("Dead letter {id} in database {}: {what}.", db.name))
}

async fn page(
    State(s): State<Arc<AdminState>>,
    Extension(sampler): Extension<Arc<Sampler>>,
    q: Result<Query<Done>, axum::extract::rejection::QueryRejection>,
) -> Response {
    sampler.start(&s);
    let q = q.map(|Query(q)| q).unwrap_or_default();
    let dbs = s.databases.iter().enumerate().map(|(i, db)| database(i, db, &sampler));
    let html = render::page(&Page {
        databases: futures::future::join_all(dbs).await,
        notice: notice(&q, &s),
        writes: s.token.is_some(),
        uptime: s.started.elapsed(),
        broker_threshold: s.broker_unavailable,
        now: chrono::Utc::now(),
    });
    html_response(StatusCode::OK, html)
}

/// What the page shows for one database.
async fn database(index: usize, db: &DatabaseView, sampler: &Sampler) -> DbPage {
    let Some(Connected { store, health }) = db.connected.get() else {
        return DbPage::NotReached { name: db.name.clone() };
    };
    let failed = |error: String| DbPage::Failed {
        name: db.name.clone(),
        error,
    };
    let queries = async { tokio::try_join!(store.status(), store.dead_letters(DEAD_LETTERS_SHOWN)) };
    let (status, dead) = match tokio::time::timeout(DB_ANSWER, queries).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => return failed(e.to_string()),
        Err(_) => return failed(format!("no answer within {DB_ANSWER:?}")),
    };
    let published = health.published();
    DbPage::Ready(Box::new(Ready {
        name: db.name.clone(),
        status,
        dead,
        rate: sampler.rate(index, published),
        published,
        lanes_held: health.lanes_held(),
        broker_down: health.broker_unavailable_for(),
        store_failing: health.store_failing(),
    }))
}

/// A write action on a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Retry,
    Discard,
}

/// The form the page posts: the token field.
#[derive(Debug, Deserialize)]
struct TokenField {
    #[serde(default)]
    token: String,
}

/// Why a write action is refused before it touches a database.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// No token configured: write actions are off.
    Off,
    /// No token sent, or a different one.
    WrongToken,
}

/// Checks the token a request presents (the `Authorization: Bearer` header wins over the form
/// field) against the configured one. The comparison takes the same time wherever the two differ
/// (`subtle`); only the length can show through timing, which tells an attacker nothing of the
/// characters.
fn check_token(configured: Option<&str>, headers: &HeaderMap, field: Option<&str>) -> Result<(), Refusal> {
    let configured = configured.ok_or(Refusal::Off)?;
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let presented = bearer.or(field).filter(|t| !t.is_empty()).ok_or(Refusal::WrongToken)?;
    if bool::from(presented.as_bytes().ct_eq(configured.as_bytes())) {
        Ok(())
    } else {
        Err(Refusal::WrongToken)
    }
}

async fn act(
    action: Action,
    State(s): State<Arc<AdminState>>,
    Path((db, id)): Path<(String, String)>,
    headers: HeaderMap,
    form: Result<Form<TokenField>, FormRejection>,
) -> Response {
    let field = form.as_ref().ok().map(|Form(f)| f.token.as_str());
    let verb = match action {
        Action::Retry => "retry",
        Action::Discard => "discard",
    };
    match check_token(s.token.as_ref().map(|t| t.0.as_str()), &headers, field) {
        Ok(()) => {}
        Err(Refusal::Off) => {
            return refused(
                StatusCode::FORBIDDEN,
                "Write actions are off",
                "No admin token is configured ([admin] token or OUTBOX_ADMIN_TOKEN), so the console \
                 cannot retry or discard dead letters. Nothing was changed.",
            )
        }
        Err(Refusal::WrongToken) => {
            tracing::warn!(database = ?db, id = ?id, action = verb, "console: write action refused (wrong or missing token)");
            return refused(
                StatusCode::FORBIDDEN,
                "Wrong token",
                "The admin token is missing or wrong. Nothing was changed.",
            );
        }
    }
    let Some(view) = s.databases.iter().find(|d| d.name == db) else {
        return refused(StatusCode::NOT_FOUND, "No such database", &format!("No database {db}."));
    };
    let Some(Connected { store, .. }) = view.connected.get() else {
        return refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "Database not reached yet",
            &format!("Database {db} has not been reached yet. Nothing was changed."),
        );
    };
    let Ok(id) = id.parse::<uuid::Uuid>() else {
        return refused(StatusCode::BAD_REQUEST, "Bad id", &format!("{id} is not a message id."));
    };
    let res = match action {
        Action::Retry => store.retry_dead_letter(id).await,
        Action::Discard => store.discard_dead_letter(id).await,
    };
    let done = match res {
        Ok(true) => {
            tracing::info!(database = %db, %id, action = verb, "console: dead letter handled");
            match action {
                Action::Retry => "retried",
                Action::Discard => "discarded",
            }
        }
        Ok(false) => "gone",
        Err(e) => {
            return refused(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Database error",
                &format!("Could not {verb} dead letter {id} in database {db}: {e}"),
            )
        }
    };
    Redirect::to(&format!("/?done={done}&db={}&id={id}", render::seg(&db))).into_response()
}

fn refused(status: StatusCode, title: &str, text: &str) -> Response {
    html_response(status, render::message(title, text))
}

/// An HTML response that is never cached, framed, or allowed to run scripts.
fn html_response(status: StatusCode, html: String) -> Response {
    let mut r = (status, html).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    r
}

#[cfg(test)]
mod tests;
