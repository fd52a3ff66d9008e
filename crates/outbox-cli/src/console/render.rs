//! The console page as HTML: pure functions of what the handlers gathered, so they are tested
//! without a database. Every value that comes from a database (topics, keys, errors, owners) goes
//! through [`esc`]; attributes are always double-quoted.

use std::fmt::Write;
use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox::{DeadLetter, Status};

/// Writes to a `String` (which cannot fail).
macro_rules! w {
    ($out:expr, $($arg:tt)*) => {{
        let _ = write!($out, $($arg)*);
    }};
}

/// Escapes text for HTML element content and double- or single-quoted attribute values.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes one URL path segment (everything but RFC 3986's unreserved characters).
pub(crate) fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            w!(out, "%{b:02X}");
        }
    }
    out
}

/// A duration for people: `850 ms`, `12.3 s`, `5 min 3 s`, `2 h 5 min`.
pub(crate) fn human(d: Duration) -> String {
    let s = d.as_secs();
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else if s < 60 {
        format!("{:.1} s", d.as_secs_f64())
    } else if s < 3600 {
        format!("{} min {} s", s / 60, s % 60)
    } else {
        format!("{} h {} min", s / 3600, (s % 3600) / 60)
    }
}

/// What the page shows for one database.
pub(crate) enum DbPage {
    /// The daemon has not reached it yet (still connecting, or it is down since start-up).
    NotReached { name: String },
    /// Reached, but it did not answer the status query.
    Failed { name: String, error: String },
    /// Reached and answered.
    Ready(Box<Ready>),
}

/// A database that answered, and its relay's state.
pub(crate) struct Ready {
    pub(crate) name: String,
    pub(crate) status: Status,
    /// Oldest first, at most [`super::DEAD_LETTERS_SHOWN`].
    pub(crate) dead: Vec<DeadLetter>,
    /// Messages per second over the sampler's window; `None` while it has too little history.
    pub(crate) rate: Option<f64>,
    /// Published since the relay started.
    pub(crate) published: u64,
    /// Lanes this daemon's relay holds.
    pub(crate) lanes_held: usize,
    /// Since when the broker has been unavailable, if it is.
    pub(crate) broker_down: Option<Duration>,
    /// Lanes whose store write is being retried.
    pub(crate) store_failing: Vec<outbox_relay::StoreFailing>,
}

/// The whole page.
pub(crate) struct Page {
    pub(crate) databases: Vec<DbPage>,
    /// A short confirmation of the last action (already plain text; escaped here).
    pub(crate) notice: Option<String>,
    /// True when a token is configured: the Retry and Discard buttons and the token field show.
    pub(crate) writes: bool,
    /// Since the daemon started.
    pub(crate) uptime: Duration,
    /// `/readyz` fails once the broker has been unavailable this long.
    pub(crate) broker_threshold: Duration,
    pub(crate) now: DateTime<Utc>,
}

const STYLE: &str = "\
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}\
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.15em;margin:1.4em 0 .4em}\
.meta{color:#666;margin:0 0 1em}\
table{border-collapse:collapse;background:#fff;margin:.3em 0}\
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}\
th{background:#f0f0f0;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}\
code{font:12px ui-monospace,monospace}\
.ok{color:#17692b}.bad{color:#b00020;font-weight:600}.warn{color:#8a5a00}\
.notice{background:#e7f4ea;border:1px solid #9cc9a7;padding:.5em .8em;display:inline-block}\
.off{color:#666;font-style:italic}\
section{border-top:2px solid #ccc;margin-top:1em}\
button{font:inherit;padding:.1em .6em;cursor:pointer}button.discard{color:#b00020}\
.token{margin:.5em 0 1em}.token input{font:inherit;width:18em}\
.err{max-width:36em;word-break:break-word}details{margin:.4em 0}.nw{white-space:nowrap}";

/// The page.
pub(crate) fn page(p: &Page) -> String {
    let mut out = String::with_capacity(8192);
    out.push_str("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width\">");
    w!(
        out,
        "<title>outbox-relay console</title><style>{STYLE}</style></head><body>\n"
    );
    out.push_str("<h1>outbox-relay console</h1>\n");
    w!(
        out,
        "<p class=\"meta\">up {} &middot; as of {} &middot; <a href=\"/\">refresh</a> &middot; \
         <a href=\"/metrics\">metrics</a> &middot; <a href=\"/readyz\">readiness</a></p>\n",
        human(p.uptime),
        p.now.format("%Y-%m-%d %H:%M:%S UTC")
    );
    if let Some(n) = &p.notice {
        w!(out, "<p class=\"notice\" id=\"notice\">{}</p>\n", esc(n));
    }
    // One form for the whole page: the token is typed once, each button posts to its own action
    // (`formaction`). Its first button is disabled, so Enter in the token field submits nothing.
    if p.writes {
        out.push_str(
            "<form method=\"post\" action=\"/\" autocomplete=\"off\">\
             <button type=\"submit\" disabled hidden aria-hidden=\"true\"></button>\n\
             <p class=\"token\"><label>Admin token <input type=\"password\" name=\"token\" \
             id=\"token\" autocomplete=\"off\"></label> (needed by Retry and Discard)</p>\n",
        );
    } else {
        out.push_str(
            "<p class=\"off\" id=\"writes-off\">Retry and Discard are off: no admin token is \
             configured (<code>[admin] token</code> or <code>OUTBOX_ADMIN_TOKEN</code>).</p>\n",
        );
    }
    for db in &p.databases {
        database(&mut out, db, p);
    }
    if p.writes {
        out.push_str("</form>\n");
    }
    out.push_str("</body></html>\n");
    out
}

fn database(out: &mut String, db: &DbPage, p: &Page) {
    let r = match db {
        DbPage::NotReached { name } => {
            w!(
                out,
                "<section data-db=\"{0}\"><h2>Database {0}</h2><p class=\"warn\">not reached yet</p></section>\n",
                esc(name)
            );
            return;
        }
        DbPage::Failed { name, error } => {
            w!(
                out,
                "<section data-db=\"{0}\"><h2>Database {0}</h2><p class=\"bad\">status query failed: {1}</p></section>\n",
                esc(name),
                esc(error)
            );
            return;
        }
        DbPage::Ready(r) => r,
    };
    let s = &r.status;
    w!(out, "<section data-db=\"{0}\"><h2>Database {0}</h2>\n", esc(&r.name));
    out.push_str("<table class=\"summary\">");
    w!(
        out,
        "<tr><th>Backlog</th><td class=\"n\" id=\"pending\">{}</td></tr>",
        s.pending
    );
    let oldest = s.oldest_pending_age.map_or_else(|| "&mdash;".to_owned(), human);
    w!(out, "<tr><th>Oldest pending</th><td class=\"n\">{oldest}</td></tr>");
    let rate = r
        .rate
        .map_or_else(|| "measuring&hellip;".to_owned(), |x| format!("{x:.1} msg/s"));
    w!(
        out,
        "<tr><th>Publish rate</th><td class=\"n\" title=\"over the last {} s\">{rate}</td></tr>",
        super::rate::WINDOW.as_secs()
    );
    w!(
        out,
        "<tr><th>Published</th><td class=\"n\">{} since start</td></tr>",
        r.published
    );
    let broker = match r.broker_down {
        None => "<span class=\"ok\">reachable</span>".to_owned(),
        Some(d) if d >= p.broker_threshold => format!(
            "<span class=\"bad\">unavailable for {} (not ready past {})</span>",
            human(d),
            human(p.broker_threshold)
        ),
        Some(d) => format!("<span class=\"warn\">unavailable for {}</span>", human(d)),
    };
    w!(out, "<tr><th>Broker</th><td id=\"broker\">{broker}</td></tr>");
    for f in &r.store_failing {
        w!(
            out,
            "<tr><th>Lane {}</th><td><span class=\"bad\">store writes failing for {}</span>: {}</td></tr>",
            f.lane,
            human(f.for_),
            esc(&f.error)
        );
    }
    let dead_class = if s.dead_letters > 0 { "n bad" } else { "n" };
    w!(
        out,
        "<tr><th>Dead letters</th><td class=\"{dead_class}\">{}</td></tr></table>\n",
        s.dead_letters
    );
    lanes(out, r, p.now);
    dead_letters(out, r, p);
    out.push_str("</section>\n");
}

/// The lanes, folded unless one has no live owner.
fn lanes(out: &mut String, r: &Ready, now: DateTime<Utc>) {
    let lanes = &r.status.lanes;
    let unowned = r.status.unowned_lanes();
    let owners: std::collections::BTreeSet<&str> = lanes.iter().filter_map(|l| l.owner.as_deref()).collect();
    let open = if unowned > 0 { " open" } else { "" };
    w!(
        out,
        "<details class=\"lanes\"{open}><summary>Lanes: {} ({} held here, {} owner{}, ",
        lanes.len(),
        r.lanes_held,
        owners.len(),
        if owners.len() == 1 { "" } else { "s" }
    );
    if unowned > 0 {
        w!(
            out,
            "<span class=\"bad\">{unowned} without a live owner</span>)</summary>\n"
        );
    } else {
        out.push_str("<span class=\"ok\">all owned</span>)</summary>\n");
    }
    out.push_str("<table><tr><th>Lane</th><th>Owner</th><th>Epoch</th><th>Lease</th></tr>\n");
    for l in lanes {
        let owner = l.owner.as_deref().map_or_else(
            || "<span class=\"bad\">none</span>".to_owned(),
            |o| format!("<code>{}</code>", esc(o)),
        );
        let lease = match l.expires_at {
            None => "&mdash;".to_owned(),
            Some(e) if e > now => format!("expires in {}", human((e - now).to_std().unwrap_or_default())),
            Some(e) => format!(
                "<span class=\"bad\">expired {} ago</span>",
                human((now - e).to_std().unwrap_or_default())
            ),
        };
        w!(
            out,
            "<tr><td class=\"n\">{}</td><td>{owner}</td><td class=\"n\">{}</td><td>{lease}</td></tr>\n",
            l.lane,
            l.epoch
        );
    }
    out.push_str("</table></details>\n");
}

fn dead_letters(out: &mut String, r: &Ready, p: &Page) {
    let total = r.status.dead_letters;
    if r.dead.is_empty() {
        out.push_str("<p id=\"no-dead-letters\">No dead letters.</p>\n");
        return;
    }
    w!(out, "<h3>Dead letters</h3>");
    if (r.dead.len() as i64) < total {
        w!(out, "<p>The oldest {} of {total}.</p>", r.dead.len());
    }
    out.push_str(
        "<table class=\"dead-letters\"><tr><th>Id</th><th>Topic</th><th>Key</th><th>Seq</th>\
         <th>Attempts</th><th>Error</th><th>Policy</th><th>Dead since</th>",
    );
    if p.writes {
        out.push_str("<th>Action</th>");
    }
    out.push_str("</tr>\n");
    let db = seg(&r.name);
    for d in &r.dead {
        let key = d.key.as_deref().map_or_else(
            || "<span class=\"off\">none</span>".to_owned(),
            |k| format!("<code>{}</code>", esc(k)),
        );
        let seq = d.seq.map_or_else(|| "&mdash;".to_owned(), |s| s.to_string());
        let policy = if d.parked {
            "<span class=\"bad\" title=\"blocks later messages of its key\">parked</span>"
        } else {
            "skipped"
        };
        let ago = human((p.now - d.dead_at).to_std().unwrap_or_default());
        w!(
            out,
            "<tr data-id=\"{id}\"><td class=\"nw\"><code>{id}</code></td><td class=\"topic\">{}</td><td class=\"key\">{key}</td>\
             <td class=\"n\">{seq}</td><td class=\"n\">{}</td><td class=\"err\">{}</td><td>{policy}</td>\
             <td>{} ({ago} ago)</td>",
            esc(&d.topic),
            d.attempts,
            esc(&d.error),
            d.dead_at.format("%Y-%m-%d %H:%M:%S UTC"),
            id = d.id,
        );
        if p.writes {
            let base = format!("/dead-letters/{}/{}", esc(&db), d.id);
            w!(
                out,
                "<td class=\"nw\"><button type=\"submit\" class=\"retry\" formaction=\"{base}/retry\">Retry</button> \
                 <button type=\"submit\" class=\"discard\" formaction=\"{base}/discard\">Discard</button></td>"
            );
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");
}

/// A small page for a refused or failed action, linking back to the console.
pub(crate) fn message(title: &str, text: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{0}</title>\
         <style>{STYLE}</style></head><body><h1>{0}</h1><p id=\"message\">{1}</p>\
         <p><a href=\"/\">Back to the console</a></p></body></html>\n",
        esc(title),
        esc(text)
    )
}

#[cfg(test)]
mod tests;
