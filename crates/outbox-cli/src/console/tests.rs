//! The console's handlers and token check, on an in-memory SQLite outbox.

use std::time::Instant;

use axum::http::HeaderValue;
use outbox::{Message, Store};

use super::*;
use crate::settings::Secret;

fn state(token: Option<&str>, dbs: Vec<Arc<DatabaseView>>) -> Arc<AdminState> {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    Arc::new(AdminState {
        prometheus: recorder.handle(),
        databases: dbs,
        lease_ttl: Duration::from_secs(30),
        broker_unavailable: Duration::from_secs(60),
        started: Instant::now(),
        token: token.map(|t| Secret(t.into())),
    })
}

/// A database with one parked dead letter; returns its view, store and the message id.
async fn planted(name: &str) -> (Arc<DatabaseView>, Arc<dyn Store>, uuid::Uuid) {
    let pool = outbox_tests::db::fresh_sqlite_memory().await;
    let store: Arc<dyn Store> = Arc::new(outbox::sqlite::SqliteStore::new(pool.clone()));
    let m = Message::new("orders.v1", "x").key("<k>&1");
    let mut tx = pool.begin().await.unwrap();
    let e = outbox::enqueue(&mut tx, &m).await.unwrap();
    tx.commit().await.unwrap();
    let leases = store.acquire("test", 64, Duration::from_secs(60)).await.unwrap();
    let lease = leases.iter().find(|l| l.lane == e.lane).unwrap();
    let row = store.claim(lease, 1, &[]).await.unwrap().remove(0);
    store.dead_letter(lease, row.pos, "<b>gone</b>", true).await.unwrap();
    for l in &leases {
        store.release(l).await.unwrap();
    }
    let view = DatabaseView::new(name);
    view.connected(Arc::clone(&store), outbox_relay::RelayHealth::default());
    (view, store, m.id())
}

async fn body(r: Response) -> String {
    let bytes = axum::body::to_bytes(r.into_body(), usize::MAX).await.unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn form(token: &str) -> Result<Form<TokenField>, FormRejection> {
    Ok(Form(TokenField { token: token.into() }))
}

async fn post(s: &Arc<AdminState>, action: Action, db: &str, id: &str, headers: HeaderMap, token: &str) -> Response {
    act(
        action,
        State(Arc::clone(s)),
        Path((db.to_owned(), id.to_owned())),
        headers,
        form(token),
    )
    .await
}

async fn get_page(s: &Arc<AdminState>, q: Done) -> String {
    let r = page(
        State(Arc::clone(s)),
        Extension(Arc::new(Sampler::default())),
        Ok(Query(q)),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    body(r).await
}

#[test]
fn token_check() {
    let none = HeaderMap::new();
    let mut bearer = HeaderMap::new();
    bearer.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer s3cret"));
    assert_eq!(check_token(None, &none, Some("s3cret")), Err(Refusal::Off));
    assert_eq!(check_token(None, &bearer, None), Err(Refusal::Off));
    assert_eq!(check_token(Some("s3cret"), &none, None), Err(Refusal::WrongToken));
    assert_eq!(check_token(Some("s3cret"), &none, Some("")), Err(Refusal::WrongToken));
    assert_eq!(
        check_token(Some("s3cret"), &none, Some("s3creT")),
        Err(Refusal::WrongToken)
    );
    assert_eq!(
        check_token(Some("s3cret"), &none, Some("s3cre")),
        Err(Refusal::WrongToken)
    );
    assert_eq!(
        check_token(Some("s3cret"), &none, Some("s3cret!")),
        Err(Refusal::WrongToken)
    );
    assert_eq!(check_token(Some("s3cret"), &none, Some("s3cret")), Ok(()));
    assert_eq!(check_token(Some("s3cret"), &bearer, None), Ok(()));
    // The header wins: a right form field does not rescue a wrong header.
    let mut wrong = HeaderMap::new();
    wrong.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer nope"));
    assert_eq!(
        check_token(Some("s3cret"), &wrong, Some("s3cret")),
        Err(Refusal::WrongToken)
    );
    // Another scheme is no token.
    let mut basic = HeaderMap::new();
    basic.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic s3cret"));
    assert_eq!(check_token(Some("s3cret"), &basic, None), Err(Refusal::WrongToken));
}

#[test]
fn notices_only_for_known_outcomes_databases_and_ids() {
    let s = state(None, vec![DatabaseView::new("orders")]);
    let id = uuid::Uuid::new_v4().to_string();
    let q = |done: &str, db: &str, id: &str| Done {
        done: Some(done.into()),
        db: Some(db.into()),
        id: Some(id.into()),
    };
    let n = notice(&q("retried", "orders", &id), &s).unwrap();
    assert!(n.contains(&id) && n.contains("orders") && n.contains("put back"), "{n}");
    assert!(notice(&q("discarded", "orders", &id), &s)
        .unwrap()
        .contains("discarded"));
    assert_eq!(notice(&q("<script>", "orders", &id), &s), None);
    assert_eq!(notice(&q("retried", "other", &id), &s), None);
    assert_eq!(notice(&q("retried", "orders", "<b>not-an-id</b>"), &s), None);
    assert_eq!(notice(&Done::default(), &s), None);
}

#[tokio::test]
async fn without_a_token_the_page_has_no_buttons_and_posts_are_403() {
    let (view, store, id) = planted("orders").await;
    let s = state(None, vec![view, DatabaseView::new("billing")]);
    let html = get_page(&s, Done::default()).await;
    assert!(html.contains(&id.to_string()), "{html}");
    assert!(!html.contains("<button"), "{html}");
    assert!(
        html.contains("Database billing</h2><p class=\"warn\">not reached yet"),
        "{html}"
    );
    let r = post(
        &s,
        Action::Retry,
        "orders",
        &id.to_string(),
        HeaderMap::new(),
        "anything",
    )
    .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(body(r).await.contains("No admin token is configured"));
    assert_eq!(store.status().await.unwrap().dead_letters, 1, "nothing changed");
}

#[tokio::test]
async fn a_wrong_token_changes_nothing_and_the_right_one_retries_and_discards() {
    let (view, store, id) = planted("orders").await;
    let s = state(Some("s3cret"), vec![view, DatabaseView::new("billing")]);
    let html = get_page(&s, Done::default()).await;
    assert!(html.contains("orders.v1") && html.contains("&lt;k&gt;&amp;1"), "{html}");
    assert!(html.contains("&lt;b&gt;gone&lt;/b&gt;"), "{html}");
    assert!(html.contains(&format!("/dead-letters/orders/{id}/retry")), "{html}");
    assert!(!html.contains("s3cret"), "the page never shows the token");

    let id_s = id.to_string();
    for action in [Action::Retry, Action::Discard] {
        let r = post(&s, action, "orders", &id_s, HeaderMap::new(), "wrong").await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(body(r).await.contains("Nothing was changed"));
    }
    let st = store.status().await.unwrap();
    assert_eq!((st.pending, st.dead_letters), (0, 1), "a wrong token changed nothing");

    let r = post(&s, Action::Retry, "nowhere", &id_s, HeaderMap::new(), "s3cret").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = post(&s, Action::Retry, "billing", &id_s, HeaderMap::new(), "s3cret").await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let r = post(&s, Action::Retry, "orders", "nope", HeaderMap::new(), "s3cret").await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    let r = post(&s, Action::Retry, "orders", &id_s, HeaderMap::new(), "s3cret").await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let to = r.headers()[header::LOCATION].to_str().unwrap().to_owned();
    assert_eq!(to, format!("/?done=retried&db=orders&id={id}"));
    let st = store.status().await.unwrap();
    assert_eq!((st.pending, st.dead_letters), (1, 0), "retried");
    let html = get_page(
        &s,
        Done {
            done: Some("retried".into()),
            db: Some("orders".into()),
            id: Some(id_s.clone()),
        },
    )
    .await;
    assert!(html.contains("put back into the outbox"), "{html}");
    assert!(html.contains("No dead letters."), "{html}");

    // Gone now: the action says so instead of failing.
    let mut bearer = HeaderMap::new();
    bearer.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer s3cret"));
    let r = post(&s, Action::Discard, "orders", &id_s, bearer, "").await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        r.headers()[header::LOCATION].to_str().unwrap(),
        format!("/?done=gone&db=orders&id={id}")
    );
}

#[tokio::test]
async fn discard_with_a_bearer_token() {
    let (view, store, id) = planted("orders").await;
    let s = state(Some("s3cret"), vec![view]);
    let mut bearer = HeaderMap::new();
    bearer.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer s3cret"));
    let r = act(
        Action::Discard,
        State(Arc::clone(&s)),
        Path(("orders".to_owned(), id.to_string())),
        bearer,
        Err(FormRejection::from(
            axum::extract::rejection::InvalidFormContentType::default(),
        )),
    )
    .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let st = store.status().await.unwrap();
    assert_eq!((st.pending, st.dead_letters), (0, 0), "discarded for good");
}
