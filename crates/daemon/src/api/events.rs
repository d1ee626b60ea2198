//! `/v1/events`: the event log, as a page of JSON or as server-sent events.

use super::failure::Failure;
use super::input::{query_int, query_pairs};
use super::state::AppState;
use crate::store;
use api::{ApiError, Event};
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::sse::{self, KeepAlive, Sse};
use axum::Json;
use futures_util::stream::{self, Stream};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

/// Most events in one page.
const MAX_LIMIT: i64 = 1000;
/// How often the stream looks for events it was not told about.
const POLL: Duration = Duration::from_millis(200);

/// Events after `after` (default 0), oldest first, at most `limit` (default 100, at most 1000).
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    params(
        ("after" = Option<i64>, Query, minimum = 0, description = "Only events with a greater id (default 0)"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 1000, description = "At most this many (1-1000, default 100)"),
    ),
    responses(
        (status = 200, description = "The events", body = Vec<Event>),
        (status = 400, description = "Bad query parameter", body = ApiError),
        (status = 500, description = "The daemon failed", body = ApiError),
    )
)]
pub async fn list_events(
    State(st): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<Event>>, Failure> {
    let mut after = 0;
    let mut limit = 100;
    for (k, v) in query_pairs(query.as_deref(), &["after", "limit"])? {
        match k.as_str() {
            "after" => after = query_int(&k, &v, 0, i64::MAX)?,
            _ => limit = query_int(&k, &v, 1, MAX_LIMIT)?,
        }
    }
    let limit = usize::try_from(limit).unwrap_or(100);
    let events = st.blocking(move |s| s.events_since(after, limit)).await?;
    Ok(Json(events.iter().map(api_event).collect()))
}

/// New events as server-sent events (`id:` the event id, `event:` its kind, `data:` the Event
/// as JSON), from `after` (or the `Last-Event-ID` header), by default from now on. A comment
/// line keeps the connection alive every 15 s.
#[utoipa::path(
    get,
    path = "/v1/events/stream",
    tag = "events",
    params(
        ("after" = Option<i64>, Query, minimum = 0, description = "Start after this event id (default: the newest, i.e. only new events)"),
        ("Last-Event-ID" = Option<i64>, Header, minimum = 0, description = "Resume after this event id"),
    ),
    responses(
        (status = 200, description = "A stream of events; each `data:` is an Event", content_type = "text/event-stream", body = Event),
        (status = 400, description = "Bad query parameter", body = ApiError),
        (status = 500, description = "The daemon failed", body = ApiError),
    )
)]
pub async fn event_stream(
    State(st): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<sse::Event, Infallible>>>, Failure> {
    let mut after = None;
    for (k, v) in query_pairs(query.as_deref(), &["after"])? {
        after = Some(query_int(&k, &v, 0, i64::MAX)?);
    }
    if after.is_none() {
        if let Some(v) = headers.get("last-event-id") {
            let v = v.to_str().unwrap_or("");
            after = Some(query_int("Last-Event-ID", v, 0, i64::MAX)?);
        }
    }
    let after = match after {
        Some(a) => a,
        None => st.blocking(|s| s.last_event_id()).await?,
    };
    let stream = stream::unfold(
        (st, after, VecDeque::<Event>::new()),
        |(st, mut last, mut queue)| async move {
            loop {
                if let Some(e) = queue.pop_front() {
                    let sse = to_sse(&e);
                    return Some((Ok(sse), (st, last, queue)));
                }
                let notified = st.changed().notified();
                let from = last;
                match st.blocking(move |s| s.events_since(from, 100)).await {
                    Ok(events) if !events.is_empty() => {
                        last = events.last().map(|e| e.id).unwrap_or(last);
                        queue.extend(events.iter().map(api_event));
                        continue;
                    }
                    _ => {}
                }
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep(POLL) => {}
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

fn to_sse(e: &Event) -> sse::Event {
    let data = serde_json::to_string(e).unwrap_or_else(|_| "{}".into());
    sse::Event::default()
        .id(e.id.to_string())
        .event(e.kind.as_str())
        .data(data)
}

/// The API's view of a logged event.
pub fn api_event(e: &store::Event) -> Event {
    Event {
        id: e.id,
        at: e.at,
        vm_id: e.vm_id.as_ref().map(|v| v.to_string()),
        kind: e.kind,
        detail: e.detail.clone(),
    }
}
