//! The page's rendering and escaping.

use super::*;
use outbox::LaneInfo;

fn dead(topic: &str, key: Option<&str>, error: &str) -> DeadLetter {
    let d = DeadLetter::new(uuid::Uuid::nil(), topic, error, Utc::now())
        .attempts(3)
        .parked(true);
    match key {
        Some(k) => d.key(k, 7),
        None => d,
    }
}

fn page_with(db: DbPage, writes: bool) -> String {
    page(&Page {
        databases: vec![db],
        notice: None,
        writes,
        uptime: Duration::from_secs(75),
        broker_threshold: Duration::from_secs(60),
        now: Utc::now(),
    })
}

fn ready(dead: Vec<DeadLetter>) -> DbPage {
    let now = Utc::now();
    DbPage::Ready(Box::new(Ready {
        name: "orders".into(),
        status: Status::new(
            12,
            Some(Duration::from_millis(2500)),
            dead.len() as i64,
            vec![
                LaneInfo::new(0, Some("relay-a".into()), 4, Some(now + chrono::Duration::seconds(5))),
                LaneInfo::new(1, None, 2, None),
            ],
        ),
        dead,
        rate: Some(41.25),
        published: 1000,
        lanes_held: 1,
        broker_down: None,
        store_failing: vec![],
    }))
}

#[test]
fn escapes_the_html_specials() {
    assert_eq!(
        esc(r#"<a href="x">'&'</a>"#),
        "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
    );
    assert_eq!(esc("plain text ünïcode"), "plain text ünïcode");
}

#[test]
fn values_from_the_database_are_escaped_on_the_page() {
    let html = page_with(
        ready(vec![dead(
            "<script>alert('topic')</script>",
            Some("\"><img src=x onerror=alert(1)>"),
            "broker said <b>no</b> & gave up",
        )]),
        true,
    );
    assert!(!html.contains("<script>alert"), "{html}");
    assert!(!html.contains("<img"), "{html}");
    assert!(!html.contains("<b>no</b>"), "{html}");
    assert!(
        html.contains("&lt;script&gt;alert(&#39;topic&#39;)&lt;/script&gt;"),
        "{html}"
    );
    assert!(html.contains("&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"), "{html}");
    assert!(
        html.contains("broker said &lt;b&gt;no&lt;/b&gt; &amp; gave up"),
        "{html}"
    );
}

#[test]
fn names_owners_and_notices_are_escaped_too() {
    let html = page(&Page {
        databases: vec![
            DbPage::NotReached { name: "<x>".into() },
            DbPage::Failed {
                name: "y".into(),
                error: "<err>".into(),
            },
        ],
        notice: Some("<done>".into()),
        writes: false,
        uptime: Duration::ZERO,
        broker_threshold: Duration::from_secs(60),
        now: Utc::now(),
    });
    assert!(
        !html.contains("<x>") && !html.contains("<err>") && !html.contains("<done>"),
        "{html}"
    );
    assert!(
        html.contains("Database &lt;x&gt;</h2><p class=\"warn\">not reached yet"),
        "{html}"
    );
}

#[test]
fn shows_backlog_lanes_rate_broker_and_dead_letters_with_actions() {
    let html = page_with(ready(vec![dead("orders", Some("k1"), "UnknownTopicOrPartition")]), true);
    for want in [
        "<td class=\"n\" id=\"pending\">12</td>",
        "2.5 s",
        "41.2 msg/s",
        "reachable",
        "<code>relay-a</code>",
        "expires in",
        "1 without a live owner",
        "<details class=\"lanes\" open>",
        "UnknownTopicOrPartition",
        "parked",
        "name=\"token\"",
        "formaction=\"/dead-letters/orders/00000000-0000-0000-0000-000000000000/retry\"",
        "formaction=\"/dead-letters/orders/00000000-0000-0000-0000-000000000000/discard\"",
    ] {
        assert!(html.contains(want), "missing {want:?} in\n{html}");
    }
}

#[test]
fn without_a_token_there_are_no_buttons_and_no_form() {
    let html = page_with(ready(vec![dead("t", None, "e")]), false);
    assert!(!html.contains("<button"), "{html}");
    assert!(!html.contains("<form"), "{html}");
    assert!(!html.contains("name=\"token\""), "{html}");
    assert!(html.contains("Retry and Discard are off"), "{html}");
}

#[test]
fn a_database_not_reached_says_so() {
    let html = page_with(DbPage::NotReached { name: "billing".into() }, true);
    assert!(
        html.contains("Database billing</h2><p class=\"warn\">not reached yet</p>"),
        "{html}"
    );
}

#[test]
fn broker_outage_a_failing_store_write_and_measuring_rate() {
    let DbPage::Ready(mut r) = ready(vec![]) else {
        unreachable!()
    };
    r.broker_down = Some(Duration::from_secs(90));
    r.store_failing = vec![outbox_relay::StoreFailing {
        lane: 7,
        for_: Duration::from_secs(45),
        error: "marks <refused>".into(),
    }];
    r.rate = None;
    let html = page_with(DbPage::Ready(r), true);
    assert!(
        html.contains("unavailable for 1 min 30 s (not ready past 1 min 0 s)"),
        "{html}"
    );
    assert!(
        html.contains(
            "Lane 7</th><td><span class=\"bad\">store writes failing for 45.0 s</span>: marks &lt;refused&gt;"
        ),
        "{html}"
    );
    assert!(html.contains("measuring&hellip;"), "{html}");
    assert!(html.contains("No dead letters."), "{html}");
}

#[test]
fn path_segments_and_durations() {
    assert_eq!(seg("orders_eu-1"), "orders_eu-1");
    assert_eq!(seg("a b/c?"), "a%20b%2Fc%3F");
    assert_eq!(human(Duration::from_millis(850)), "850 ms");
    assert_eq!(human(Duration::from_secs(3 * 3600 + 120)), "3 h 2 min");
}
