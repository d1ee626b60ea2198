//! `ferrovisor events`: the daemon's event log, listed page by page or followed as a stream.

use super::client::{decode, Client};
use super::format::{short_id, timestamp_ms, write_out, Table};
use super::vm::name_of;
use super::EventsArgs;
use api::{Event, VmInfo};
use serde_json::Value;
use std::collections::{HashMap, HashSet};

/// Events asked for per page.
const PAGE: u32 = 1000;

/// Runs `ferrovisor events`.
pub fn run(args: &EventsArgs, client: Client) -> anyhow::Result<u8> {
    let json = args.common.json;
    // VM names for the VM column and for --vm: the VMs defined now; deleted ones are learnt
    // from the events that carry a name (`created`, `deleted`).
    let mut names = Names::default();
    if !json || args.vm.is_some() {
        let vms: Vec<VmInfo> = client.get("/v1/vms")?;
        for vm in vms {
            names.ids.insert(vm.id, vm.name);
        }
    }
    let mut filter = args.vm.as_deref().map(|wanted| Filter::new(wanted, &names));
    if args.follow {
        follow(&client, args.after, json, &mut names, &mut filter)
    } else {
        list(
            &client,
            args.after.unwrap_or(0),
            json,
            &mut names,
            &mut filter,
        )
    }
}

/// VM ids to names.
#[derive(Default)]
struct Names {
    ids: HashMap<String, String>,
}

impl Names {
    /// Learns a name from an event that carries one (`created`, `deleted`).
    fn learn(&mut self, e: &Event) {
        if let (Some(id), Some(name)) = (&e.vm_id, detail_name(e)) {
            self.ids
                .entry(id.clone())
                .or_insert_with(|| name.to_string());
        }
    }

    /// The VM column: its name when known, else the id's start.
    fn column(&self, e: &Event) -> String {
        match &e.vm_id {
            Some(id) => self.ids.get(id).cloned().unwrap_or_else(|| short_id(id)),
            None => "-".into(),
        }
    }
}

/// The VM name an event's detail carries.
fn detail_name(e: &Event) -> Option<&str> {
    e.detail.get("name").and_then(Value::as_str)
}

/// `--vm`: a name, an id or an id prefix.
struct Filter {
    wanted: String,
    ids: HashSet<String>,
}

impl Filter {
    fn new(wanted: &str, names: &Names) -> Filter {
        let ids = names
            .ids
            .iter()
            .filter(|(id, name)| *name == wanted || *id == wanted)
            .map(|(id, _)| id.clone())
            .collect();
        Filter {
            wanted: wanted.to_string(),
            ids,
        }
    }

    fn matches(&mut self, e: &Event) -> bool {
        let Some(id) = &e.vm_id else {
            return false;
        };
        if detail_name(e) == Some(self.wanted.as_str()) {
            self.ids.insert(id.clone());
        }
        self.ids.contains(id) || (!self.wanted.is_empty() && id.starts_with(&self.wanted))
    }
}

/// An event's detail, compact; nothing for an empty one.
fn detail(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::Object(m) if m.is_empty() => String::new(),
        other => other.to_string(),
    }
}

fn cells(e: &Event, names: &Names) -> Vec<String> {
    vec![
        e.id.to_string(),
        timestamp_ms(e.at),
        names.column(e),
        name_of(&e.kind),
        detail(&e.detail),
    ]
}

const HEADERS: [&str; 5] = ["ID", "TIME", "VM", "KIND", "DETAIL"];

fn list(
    client: &Client,
    mut after: i64,
    json: bool,
    names: &mut Names,
    filter: &mut Option<Filter>,
) -> anyhow::Result<u8> {
    let mut table = Table::new(&HEADERS);
    loop {
        let page: Vec<Value> = client.get(&format!("/v1/events?after={after}&limit={PAGE}"))?;
        let Some(last) = page.last() else {
            break;
        };
        let last_id = last.get("id").and_then(Value::as_i64).unwrap_or(after);
        if last_id <= after {
            anyhow::bail!("the daemon's event ids do not increase (after={after})");
        }
        after = last_id;
        for raw in page {
            let e: Event = decode(raw.clone())?;
            names.learn(&e);
            if filter.as_mut().is_some_and(|f| !f.matches(&e)) {
                continue;
            }
            if json {
                if !write_out(&format!("{raw}\n"))? {
                    return Ok(0);
                }
            } else {
                table.row(cells(&e, names));
            }
        }
    }
    if !json {
        write_out(&table.render())?;
    }
    Ok(0)
}

/// One row of the followed stream: fixed widths, as later rows cannot realign earlier ones.
fn stream_line(cells: &[String]) -> String {
    const WIDTHS: [usize; 4] = [6, 24, 16, 10];
    let mut line = String::new();
    for (i, c) in cells.iter().enumerate() {
        match WIDTHS.get(i) {
            Some(w) => line.push_str(&format!("{c:<w$}  ")),
            None => line.push_str(c),
        }
    }
    format!("{}\n", line.trim_end())
}

fn follow(
    client: &Client,
    after: Option<i64>,
    json: bool,
    names: &mut Names,
    filter: &mut Option<Filter>,
) -> anyhow::Result<u8> {
    let target = match after {
        Some(a) => format!("/v1/events/stream?after={a}"),
        None => "/v1/events/stream".to_string(),
    };
    let mut stream = client.events(&target)?;
    if !json {
        let header: Vec<String> = HEADERS.iter().map(|h| h.to_string()).collect();
        if !write_out(&stream_line(&header))? {
            return Ok(0);
        }
    }
    let mut last = after;
    loop {
        let next = stream.next_event();
        let ev = match next {
            Ok(Some(ev)) => ev,
            Ok(None) | Err(_) => {
                let resume = last
                    .map(|l| format!("; resume with --after {l}"))
                    .unwrap_or_default();
                match next {
                    Err(e) => anyhow::bail!("the event stream failed: {e}{resume}"),
                    _ => anyhow::bail!("the daemon closed the event stream{resume}"),
                }
            }
        };
        let raw: Value = serde_json::from_str(&ev.data).map_err(|e| {
            anyhow::anyhow!(
                "the daemon sent an event that is not JSON ({e}): {}",
                ev.data
            )
        })?;
        let e: Event = decode(raw.clone())?;
        last = Some(e.id);
        names.learn(&e);
        if filter.as_mut().is_some_and(|f| !f.matches(&e)) {
            continue;
        }
        let text = if json {
            format!("{raw}\n")
        } else {
            stream_line(&cells(&e, names))
        };
        if !write_out(&text)? {
            return Ok(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::EventKind;
    use serde_json::json;

    fn ev(id: i64, vm: &str, kind: EventKind, detail: Value) -> Event {
        Event {
            id,
            at: 1_714_566_896_789,
            vm_id: Some(vm.into()),
            kind,
            detail,
        }
    }

    #[test]
    fn names_and_filters() {
        let a = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let b = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
        let mut names = Names::default();
        names.ids.insert(a.into(), "web-1".into());
        let created_b = ev(2, b, EventKind::Created, json!({"name": "old"}));
        let stopped_b = ev(3, b, EventKind::Stopped, json!({}));
        assert_eq!(names.column(&stopped_b), "bbbbbbbbbbbb");
        names.learn(&created_b);
        assert_eq!(names.column(&stopped_b), "old");

        let mut by_name = Filter::new("old", &Names::default());
        assert!(by_name.matches(&created_b));
        assert!(by_name.matches(&stopped_b), "learnt from the created event");
        assert!(!by_name.matches(&ev(4, a, EventKind::Started, json!({}))));

        let mut by_known_name = Filter::new("web-1", &names);
        assert!(by_known_name.matches(&ev(4, a, EventKind::Started, json!({}))));
        assert!(!by_known_name.matches(&stopped_b));

        let mut by_prefix = Filter::new("bbbb", &names);
        assert!(by_prefix.matches(&stopped_b));
        assert!(!by_prefix.matches(&ev(4, a, EventKind::Started, json!({}))));
    }

    #[test]
    fn rows() {
        let names = Names::default();
        let e = ev(
            12,
            "3f2a9c0d5e6b7a8190a1b2c3d4e5f607",
            EventKind::Exited,
            json!({"reason": "poweroff", "code": 0}),
        );
        assert_eq!(
            stream_line(&cells(&e, &names)),
            "12      2024-05-01T12:34:56.789Z  3f2a9c0d5e6b      exited      {\"code\":0,\"reason\":\"poweroff\"}\n"
        );
        let quiet = ev(13, "x", EventKind::Paused, json!({}));
        assert_eq!(cells(&quiet, &names)[4], "");
    }
}
