//! The status page (`/status`, also reached from `/`): the queue, the instances, spend, what
//! is held off, and recent events, with hold / drain / run / kill buttons that call the
//! management API. Server-rendered HTML; `status/app.js` refreshes the live part every 2 s.
//! Everything is served from the binary (no CDN, no build step).
//!
//! Auth: the `ManagementToken`, as everywhere on this port. The login form sets the
//! `arvados_api_token` cookie the management API already accepts (HttpOnly, SameSite=Strict,
//! so another site cannot make a logged-in browser press the buttons). Without the token the
//! page shows only the login form. Responses forbid framing and inline scripts.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use chrono::Utc;

use super::api::{Denied, check_token, is_management_token};
use super::{Role, Service};
use crate::events;
use crate::scheduler::pool::WorkerPool;

type Shared = Arc<Service>;

const APP_JS: &str = include_str!("status/app.js");
const APP_CSS: &str = include_str!("status/app.css");

/// Rows shown per table (the rest are counted).
const MAX_ROWS: usize = 300;
/// Events shown.
const MAX_EVENTS: usize = 60;

/// The status page's routes (they do their own token check, so a browser without the token
/// gets the login form instead of a bare 401).
pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/status") }))
        .route("/status", get(page))
        .route("/status/", get(|| async { Redirect::to("/status") }))
        .route("/status/live", get(live))
        .route("/status/login", post(login))
        .route("/status/logout", post(logout))
        .route(
            "/status/app.js",
            get(|| async { asset(APP_JS, "text/javascript") }),
        )
        .route(
            "/status/app.css",
            get(|| async { asset(APP_CSS, "text/css") }),
        )
        // Browsers ask for it; an empty answer keeps their consoles quiet.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
}

fn asset(body: &'static str, kind: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, format!("{kind}; charset=utf-8")),
            (header::CACHE_CONTROL, "no-cache".to_string()),
        ],
        body,
    )
        .into_response()
}

/// HTML with the headers every page here carries.
fn html(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    for (k, v) in [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    r
}

/// Text safe inside HTML elements and quoted attributes.
pub fn esc(s: &str) -> String {
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

/// `1h02m`, `3m05s`, `42s`.
pub fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn money(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else {
        "∞".into()
    }
}

fn shell(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><link rel=\"stylesheet\" href=\"/status/app.css\"></head>\
         <body>{body}</body></html>\n",
        esc(title)
    )
}

fn login_form(svc: &Service, message: &str) -> String {
    shell(
        &format!("{} dispatcher: log in", svc.cluster.cluster_id),
        &format!(
            "<form class=\"login\" method=\"post\" action=\"/status/login\">\
             <h1>{} cloud dispatcher</h1>\
             <p class=\"bad\" id=\"login-message\">{}</p>\
             <label for=\"token\">Management token</label>\
             <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" required>\
             <button type=\"submit\">Log in</button></form>",
            esc(&svc.cluster.cluster_id),
            esc(message)
        ),
    )
}

async fn page(State(svc): State<Shared>, headers: HeaderMap, uri: Uri) -> Response {
    match check_token(&svc, &headers, &uri) {
        Ok(()) => {}
        Err(Denied::NotConfigured) => {
            return html(
                StatusCode::FORBIDDEN,
                shell(
                    "status",
                    "<p class=\"login\">Management API authentication is not configured \
                     (set ManagementToken in the cluster config).</p>",
                ),
            );
        }
        Err(Denied::NoToken) => return html(StatusCode::OK, login_form(&svc, "")),
        Err(Denied::WrongToken) => {
            return html(
                StatusCode::FORBIDDEN,
                login_form(&svc, "That is not the management token."),
            );
        }
    }
    let body = format!(
        "<header><h1>{id} cloud dispatcher</h1><span class=\"who\">{driver} driver · \
         InstanceSetID {set}</span><form method=\"post\" action=\"/status/logout\">\
         <button type=\"submit\">Log out</button></form></header>\
         <main><p id=\"flash\" role=\"status\"></p><div id=\"live\">{live}</div></main>\
         <script src=\"/status/app.js\"></script>",
        id = esc(&svc.cluster.cluster_id),
        driver = esc(&svc.cluster.containers.cloud_vms.driver),
        set = esc(&svc.instance_set_id),
        live = live_html(&svc),
    );
    html(
        StatusCode::OK,
        shell(&format!("{} dispatcher", svc.cluster.cluster_id), &body),
    )
}

async fn live(State(svc): State<Shared>, headers: HeaderMap, uri: Uri) -> Response {
    match check_token(&svc, &headers, &uri) {
        Ok(()) => html(StatusCode::OK, live_html(&svc)),
        Err(Denied::NoToken) => html(StatusCode::UNAUTHORIZED, String::new()),
        Err(_) => html(StatusCode::FORBIDDEN, String::new()),
    }
}

/// Characters a cookie value may hold unquoted (RFC 6265 cookie-octet).
fn cookie_safe(s: &str) -> bool {
    s.bytes()
        .all(|b| matches!(b, 0x21 | 0x23..=0x2b | 0x2d..=0x3a | 0x3c..=0x5b | 0x5d..=0x7e))
}

async fn login(State(svc): State<Shared>, body: Bytes) -> Response {
    let token = url::form_urlencoded::parse(&body)
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    if svc.cluster.management_token.is_empty() {
        return html(
            StatusCode::FORBIDDEN,
            login_form(&svc, "Management API authentication is not configured."),
        );
    }
    if !is_management_token(&svc, &token) {
        tracing::warn!("status page: login with a wrong token");
        return html(
            StatusCode::FORBIDDEN,
            login_form(&svc, "That is not the management token."),
        );
    }
    if !cookie_safe(&token) {
        return html(
            StatusCode::BAD_REQUEST,
            login_form(
                &svc,
                "This token cannot be kept in a cookie; use the management API with it.",
            ),
        );
    }
    let mut r = Redirect::to("/status").into_response();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "arvados_api_token={token}; Path=/; HttpOnly; SameSite=Strict"
    )) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn logout() -> Response {
    let mut r = Redirect::to("/status").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "arvados_api_token=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    r
}

/// The part of the page the script refreshes.
pub fn live_html(svc: &Service) -> String {
    let mut h = String::new();
    let now = Utc::now();
    let role = svc.role();
    if let Role::Standby { holder } = &role {
        let _ = write!(
            h,
            "<p class=\"banner\" data-role=\"standby\">Standby: waiting for the dispatcher lock \
             (held by {}). Read-only view; nothing is locked, created or started here.</p>",
            esc(holder)
        );
    }
    let instances = svc.pool.instances();
    let ages = svc.pool.instance_ages();
    let queue = svc.scheduler.queue_view().sorted();
    let queue: Vec<_> = if queue.is_empty() {
        // No pass yet (starting, or a standby): the polled queue, without statuses.
        let (entries, _) = svc.queue.entries();
        entries
            .into_iter()
            .map(|e| (e, crate::scheduler::Status::None))
            .collect()
    } else {
        queue
    };
    let count = |s: &str| {
        queue
            .iter()
            .filter(|(e, _)| e.container().state.as_str() == s)
            .count()
    };
    let fleet: f64 = instances.iter().map(|v| v.price).sum();
    let spent = svc.pool.spent_today();
    let caps = svc.scheduler.spend_caps();
    let waiting_cap = queue
        .iter()
        .filter(|(_, s)| matches!(s, crate::scheduler::Status::SpendCap(..)))
        .count();
    let cap_text = |v: f64| {
        if v > 0.0 { money(v) } else { "none".into() }
    };
    let _ = write!(
        h,
        "<section class=\"cards\" id=\"summary\">\
         <div class=\"card\"><div class=\"label\">Role</div><div class=\"value\" id=\"role\">{role}</div></div>\
         <div class=\"card\"><div class=\"label\">Queued / locked / running</div><div class=\"value\" id=\"counts\">{q} / {l} / {r}</div></div>\
         <div class=\"card\"><div class=\"label\">Instances</div><div class=\"value\" id=\"instance-count\">{n}</div></div>\
         <div class=\"card\"><div class=\"label\">Spend now (per hour)</div><div class=\"value\" id=\"spend-now\">{fleet}</div></div>\
         <div class=\"card\"><div class=\"label\">Spent today (UTC)</div><div class=\"value\" id=\"spend-today\">{spent}</div></div>\
         <div class=\"card\"><div class=\"label\">Cap per hour / day</div><div class=\"value\" id=\"spend-cap\">{ch} / {cd}</div></div>\
         <div class=\"card\"><div class=\"label\">Waiting for the cap</div><div class=\"value\" id=\"waiting-cap\">{waiting_cap}</div></div>\
         </section>",
        role = esc(role.as_str()),
        q = count("Queued"),
        l = count("Locked"),
        r = count("Running"),
        n = instances.iter().filter(|v| !v.instance.is_empty()).count(),
        fleet = money(fleet),
        spent = money(spent),
        ch = cap_text(caps.max_cost_per_hour),
        cd = cap_text(caps.max_cost_per_day),
    );

    // Instances.
    let _ = write!(
        h,
        "<section><h2>Instances</h2><div class=\"scroll\"><table id=\"instances\"><thead><tr>\
         <th>Instance</th><th>Type</th><th>State</th><th>Idle behavior</th><th>Containers</th>\
         <th>Age</th><th>Price/h</th><th>Actions</th></tr></thead><tbody>"
    );
    let mut shown = 0;
    for v in instances.iter().filter(|v| !v.instance.is_empty()) {
        shown += 1;
        if shown > MAX_ROWS {
            continue;
        }
        let id = esc(&v.instance);
        let containers = v
            .running_container_uuids
            .iter()
            .map(|u| esc(u))
            .collect::<Vec<_>>()
            .join("<br>");
        let mut buttons = String::new();
        for (action, label) in [("hold", "Hold"), ("drain", "Drain"), ("run", "Run")] {
            if v.idle_behavior.as_str() != action {
                let _ = write!(
                    buttons,
                    "<button data-action=\"{action}\" data-id=\"{id}\">{label}</button>"
                );
            }
        }
        let _ = write!(
            buttons,
            "<button class=\"danger\" data-action=\"kill-instance\" data-id=\"{id}\">Kill</button>"
        );
        let _ = write!(
            h,
            "<tr data-instance=\"{id}\" data-state=\"{state}\" data-idle-behavior=\"{b}\">\
             <td class=\"id\">{id}</td><td>{ty}</td><td class=\"state\">{state}</td><td>{b}</td>\
             <td class=\"id\">{containers}</td><td class=\"num\">{age}</td><td class=\"num\">{price}</td>\
             <td class=\"buttons\">{buttons}</td></tr>",
            state = v.worker_state.as_str(),
            b = v.idle_behavior.as_str(),
            ty = esc(&v.arvados_instance_type),
            age = ages.get(&v.instance).map(|d| age(*d)).unwrap_or_default(),
            price = money(v.price),
        );
    }
    let pending = instances.iter().filter(|v| v.instance.is_empty()).count();
    let _ = write!(h, "</tbody></table></div>");
    if shown > MAX_ROWS {
        let _ = write!(h, "<p class=\"muted\">… and {} more</p>", shown - MAX_ROWS);
    }
    if pending > 0 {
        let _ = write!(
            h,
            "<p class=\"muted\" id=\"pending-creates\">{pending} create call(s) in flight</p>"
        );
    }
    let _ = write!(h, "</section>");

    // Queue.
    let _ = write!(
        h,
        "<section><h2>Queue</h2><div class=\"scroll\"><table id=\"queue\"><thead><tr>\
         <th>Container</th><th>State</th><th>Priority</th><th>Waiting</th><th>Type</th>\
         <th>Scheduling status</th><th></th></tr></thead><tbody>"
    );
    for (e, status) in queue.iter().take(MAX_ROWS) {
        let c = e.container();
        let uuid = esc(&c.uuid);
        let waiting = (now - e.first_seen_at()).to_std().unwrap_or_default();
        let ty = e
            .instance_types
            .first()
            .map(|t| esc(&t.name))
            .unwrap_or_default();
        let kill = if matches!(c.state.as_str(), "Locked" | "Running") {
            format!(
                "<button class=\"danger\" data-action=\"kill-container\" data-id=\"{uuid}\">Kill</button>"
            )
        } else {
            String::new()
        };
        let _ = write!(
            h,
            "<tr data-container=\"{uuid}\" data-state=\"{state}\"><td class=\"id\">{uuid}</td>\
             <td class=\"state\">{state}</td><td class=\"num\">{prio}</td><td class=\"num\">{wait}</td>\
             <td>{ty}</td><td class=\"status\">{status}</td><td class=\"buttons\">{kill}</td></tr>",
            state = c.state.as_str(),
            prio = c.priority,
            wait = age(waiting),
            status = esc(&status.to_string()),
        );
    }
    let _ = write!(h, "</tbody></table></div>");
    if queue.len() > MAX_ROWS {
        let _ = write!(
            h,
            "<p class=\"muted\">… and {} more</p>",
            queue.len() - MAX_ROWS
        );
    }
    let _ = write!(h, "</section>");

    // Held off.
    let holdoffs = svc.pool.holdoffs();
    let _ = write!(h, "<section><h2>Held off</h2>");
    if holdoffs.is_empty() {
        let _ = write!(
            h,
            "<p class=\"muted\" id=\"holdoffs\">Nothing is held off.</p>"
        );
    } else {
        let _ = write!(
            h,
            "<div class=\"scroll\"><table id=\"holdoffs\"><thead><tr><th>What</th><th>Why</th>\
             <th>Until</th></tr></thead><tbody>"
        );
        for o in holdoffs {
            let until = match o.until {
                Some(t) => format!("in {}", age((t - now).to_std().unwrap_or_default())),
                None => "until that changes".into(),
            };
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&o.what),
                esc(&o.reason),
                esc(&until)
            );
        }
        let _ = write!(h, "</tbody></table></div>");
    }
    let _ = write!(h, "</section>");

    // Events.
    let _ = write!(
        h,
        "<section><h2>Recent events</h2><ul class=\"events\" id=\"events\">"
    );
    let evs = events::newest(&[&svc.pool.events, &svc.queue.events], MAX_EVENTS);
    if evs.is_empty() {
        let _ = write!(h, "<li class=\"muted\">Nothing yet.</li>");
    }
    for e in evs {
        let _ = write!(
            h,
            "<li data-kind=\"{kind}\" data-subject=\"{subject}\" class=\"{class}\">\
             <time datetime=\"{at}\">{short}</time><b>{kind}</b> {subject} <span class=\"muted\">{detail}</span></li>",
            kind = esc(e.kind),
            subject = esc(&e.subject),
            class = if e.is_error() { "bad" } else { "" },
            at = e.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            short = e.at.format("%H:%M:%S"),
            detail = esc(&e.detail),
        );
    }
    let _ = write!(h, "</ul></section>");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_every_html_special_character() {
        assert_eq!(
            esc(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn ages_read_like_a_clock() {
        assert_eq!(age(Duration::from_secs(42)), "42s");
        assert_eq!(age(Duration::from_secs(185)), "3m05s");
        assert_eq!(age(Duration::from_secs(3720)), "1h02m");
    }

    #[test]
    fn only_cookie_octets_go_into_the_cookie() {
        assert!(cookie_safe("v2/zzzzz-gj3su-abc/0123xyz"));
        assert!(!cookie_safe("a;b"));
        assert!(!cookie_safe("a b"));
        assert!(!cookie_safe("a\"b"));
    }
}
