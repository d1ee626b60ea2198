//! `ferrovisor vm ...`: one API call each, its answer as a table, key/value lines or JSON.

use super::client::{decode, Client};
use super::format::{cpu_time_ms, duration_ms, emit, or_dash, short_id, size, timestamp_ms, Table};
use super::http::escape_segment;
use super::{console, CreateArgs, VmArgs, VmCommand};
use anyhow::Context;
use api::{CreateVm, Resources, ShutdownRequest, VmConfig, VmInfo, VmStats};
use config::SerialConfig;
use serde::Serialize;
use serde_json::Value;
use std::path::PathBuf;

/// Runs one `vm` command.
pub fn run(args: &VmArgs, client: Client) -> anyhow::Result<u8> {
    let json = args.common.json;
    match &args.command {
        VmCommand::Create(c) => create(&client, c, json),
        VmCommand::List => list(&client, json),
        VmCommand::Info { vm } => info(&client, vm, json),
        VmCommand::Start { vm } => action(&client, vm, "start", None, json),
        VmCommand::Stop {
            vm, force: true, ..
        } => action(&client, vm, "kill", None, json),
        VmCommand::Stop { vm, timeout, .. } => {
            let body = match timeout {
                Some(t) => Some(serde_json::to_value(ShutdownRequest {
                    timeout_s: Some(*t),
                })?),
                None => None,
            };
            action(&client, vm, "shutdown", body, json)
        }
        VmCommand::Kill { vm } => action(&client, vm, "kill", None, json),
        VmCommand::Reboot { vm } => action(&client, vm, "reboot", None, json),
        VmCommand::Pause { vm } => action(&client, vm, "pause", None, json),
        VmCommand::Resume { vm } => action(&client, vm, "resume", None, json),
        VmCommand::Delete { vm, force } => delete(&client, vm, *force, json),
        VmCommand::Console { vm, no_stdin } => {
            console::attach(&client, &format!("{}/console", vm_path(vm)), vm, *no_stdin)
        }
        VmCommand::Stats { vm } => stats(&client, vm, json),
    }
}

/// `/v1/vms/{vm}`, the name or id escaped.
pub fn vm_path(vm: &str) -> String {
    format!("/v1/vms/{}", escape_segment(vm))
}

/// A serde enum's name (`running`, `on-failure`).
pub fn name_of<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

fn print_json(v: &Value) -> anyhow::Result<u8> {
    emit(&format!("{}\n", serde_json::to_string_pretty(v)?))?;
    Ok(0)
}

fn create(client: &Client, args: &CreateArgs, json: bool) -> anyhow::Result<u8> {
    let mut config = args.config.to_config()?;
    absolutize(&mut config)?;
    let req = CreateVm {
        name: args.name.clone(),
        config,
        restart_policy: args.restart.into(),
        start: args.start,
        resources: Resources {
            cpu_weight: args.cpu_weight,
            cpu_max_percent: args.cpu_max,
            memory_max: args.memory_max,
            pids_max: args.pids_max,
        },
    };
    let v = client.json("POST", "/v1/vms", Some(&serde_json::to_value(&req)?))?;
    // The definition is created either way (201); a start that failed leaves it `crashed`
    // with the reason, which is this command's failure.
    let failed_start = args.start
        && v.get("state").and_then(Value::as_str) == Some(api::VmState::Crashed.as_str());
    if json {
        print_json(&v)?;
    } else {
        let vm: VmInfo = decode(v.clone())?;
        emit(&vm_table(std::slice::from_ref(&vm)))?;
    }
    if failed_start {
        let reason = v
            .get("last_exit_reason")
            .and_then(Value::as_str)
            .unwrap_or("no reason recorded");
        eprintln!(
            "ferrovisor: VM {} was created but did not start: {reason}",
            args.name
        );
        return Ok(1);
    }
    Ok(0)
}

/// The daemon runs elsewhere (another working directory): relative paths in the config are
/// made absolute here, against this command's directory, as `run` would read them.
fn absolutize(cfg: &mut VmConfig) -> anyhow::Result<()> {
    fn abs(p: &mut PathBuf) -> anyhow::Result<()> {
        if p.is_relative() && !p.as_os_str().is_empty() {
            *p = std::path::absolute(&*p).with_context(|| format!("{}", p.display()))?;
        }
        Ok(())
    }
    fn abs_serial(s: &mut SerialConfig) -> anyhow::Result<()> {
        match s {
            SerialConfig::File(p) | SerialConfig::Socket(p) => abs(p),
            SerialConfig::Stdio | SerialConfig::Null => Ok(()),
        }
    }
    for p in [&mut cfg.kernel, &mut cfg.initrd, &mut cfg.firmware]
        .into_iter()
        .flatten()
    {
        abs(p)?;
    }
    for d in &mut cfg.disks {
        abs(&mut d.path)?;
    }
    if let Some(v) = &mut cfg.vsock {
        abs(&mut v.socket)?;
    }
    abs_serial(&mut cfg.serial)?;
    if let Some(c) = &mut cfg.console {
        abs_serial(c)?;
    }
    Ok(())
}

fn list(client: &Client, json: bool) -> anyhow::Result<u8> {
    let v = client.json("GET", "/v1/vms", None)?;
    if json {
        return print_json(&v);
    }
    let vms: Vec<VmInfo> = decode(v)?;
    emit(&vm_table(&vms))?;
    Ok(0)
}

/// The `vm list` table.
pub fn vm_table(vms: &[VmInfo]) -> String {
    let mut t = Table::new(&[
        "NAME", "ID", "STATE", "CPUS", "MEMORY", "PID", "UPTIME", "RESTARTS",
    ]);
    for vm in vms {
        t.row(vec![
            vm.name.clone(),
            short_id(&vm.id),
            name_of(&vm.state),
            vm.config.cpus.to_string(),
            size(vm.config.memory.0),
            or_dash(vm.pid),
            or_dash(vm.uptime_ms.map(duration_ms)),
            vm.restart_count.to_string(),
        ]);
    }
    t.render()
}

fn info(client: &Client, vm: &str, json: bool) -> anyhow::Result<u8> {
    let v = client.json("GET", &vm_path(vm), None)?;
    if json {
        return print_json(&v);
    }
    let vm: VmInfo = decode(v)?;
    emit(&info_text(&vm))?;
    Ok(0)
}

/// `key: value` lines, the values aligned.
fn key_values(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        let key = format!("{k}:");
        out.push_str(format!("{key:<width$}  {v}").trim_end());
        out.push('\n');
    }
    out
}

/// The `vm info` text.
pub fn info_text(vm: &VmInfo) -> String {
    let c = &vm.config;
    let last_exit = match (&vm.last_exit_reason, vm.last_exit_code) {
        (Some(r), Some(code)) => format!("{r} (code {code})"),
        (Some(r), None) => r.clone(),
        (None, Some(code)) => format!("code {code}"),
        (None, None) => "-".into(),
    };
    let path = |p: &Option<PathBuf>| or_dash(p.as_ref().map(|p| p.display().to_string()));
    let mut pairs = vec![
        ("name", vm.name.clone()),
        ("id", vm.id.clone()),
        ("state", name_of(&vm.state)),
        ("desired state", name_of(&vm.desired_state)),
        ("restart policy", name_of(&vm.restart_policy)),
        ("pid", or_dash(vm.pid)),
        ("uptime", or_dash(vm.uptime_ms.map(duration_ms))),
        ("started", or_dash(vm.started_at.map(timestamp_ms))),
        ("restarts", vm.restart_count.to_string()),
        ("last exit", last_exit),
        ("created", timestamp_ms(vm.created_at)),
        ("cpus", c.cpus.to_string()),
        ("memory", size(c.memory.0)),
    ];
    if c.firmware.is_some() {
        pairs.push(("firmware", path(&c.firmware)));
    }
    if c.kernel.is_some() || c.firmware.is_none() {
        pairs.push(("kernel", path(&c.kernel)));
    }
    if c.initrd.is_some() {
        pairs.push(("initrd", path(&c.initrd)));
    }
    if !c.cmdline.is_empty() {
        pairs.push(("cmdline", c.cmdline.clone()));
    }
    pairs.push(("serial", String::from(c.serial.clone())));
    pairs.push((
        "disks",
        or_none(c.disks.iter().map(describe_disk).collect()),
    ));
    pairs.push(("nets", or_none(c.nets.iter().map(describe_net).collect())));
    if let Some(v) = &c.vsock {
        pairs.push((
            "vsock",
            format!("cid={} socket={}", v.cid, v.socket.display()),
        ));
    }
    if let Some(b) = &c.balloon {
        pairs.push(("balloon", format!("size={}", size(b.size.0))));
    }
    if let Some(con) = &c.console {
        pairs.push(("console", String::from(con.clone())));
    }
    let mut devices = Vec::new();
    if c.rng {
        devices.push("rng");
    }
    if c.pmu {
        devices.push("pmu");
    }
    if !devices.is_empty() {
        pairs.push(("features", devices.join(", ")));
    }
    pairs.push(("resources", describe_resources(&vm.resources)));
    key_values(&pairs)
}

fn or_none(items: Vec<String>) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join("; ")
    }
}

fn describe_disk(d: &config::DiskConfig) -> String {
    let mut s = d.path.display().to_string();
    if d.readonly {
        s.push_str(" ro");
    }
    if let Some(id) = &d.id {
        s.push_str(&format!(" id={id}"));
    }
    if let Some(n) = d.iops {
        s.push_str(&format!(" iops={n}"));
    }
    if let Some(b) = d.bw {
        s.push_str(&format!(" bw={}/s", size(b.0)));
    }
    s
}

fn describe_net(n: &config::NetConfig) -> String {
    let mut s = format!("tap={}", n.tap);
    if let Some(m) = &n.mac {
        s.push_str(&format!(" mac={m}"));
    }
    if let Some(id) = &n.id {
        s.push_str(&format!(" id={id}"));
    }
    if let Some(i) = n.iops {
        s.push_str(&format!(" iops={i}"));
    }
    if let Some(b) = n.bw {
        s.push_str(&format!(" bw={}/s", size(b.0)));
    }
    s
}

fn describe_resources(r: &Resources) -> String {
    let mut parts = Vec::new();
    if let Some(w) = r.cpu_weight {
        parts.push(format!("cpu-weight={w}"));
    }
    if let Some(p) = r.cpu_max_percent {
        parts.push(format!("cpu-max={p}%"));
    }
    if let Some(m) = r.memory_max {
        parts.push(format!("memory-max={}", size(m.0)));
    }
    if let Some(p) = r.pids_max {
        parts.push(format!("pids-max={p}"));
    }
    if parts.is_empty() {
        "no limits".into()
    } else {
        parts.join(" ")
    }
}

fn action(
    client: &Client,
    vm: &str,
    what: &str,
    body: Option<Value>,
    json: bool,
) -> anyhow::Result<u8> {
    let v = client.json("POST", &format!("{}/{what}", vm_path(vm)), body.as_ref())?;
    if json {
        return print_json(&v);
    }
    let vm: VmInfo = decode(v)?;
    emit(&format!("{}: {}\n", vm.name, name_of(&vm.state)))?;
    Ok(0)
}

fn delete(client: &Client, vm: &str, force: bool, json: bool) -> anyhow::Result<u8> {
    let target = if force {
        format!("{}?force=true", vm_path(vm))
    } else {
        vm_path(vm)
    };
    let v = client.json("DELETE", &target, None)?;
    if json {
        return print_json(&v);
    }
    let vm: VmInfo = decode(v)?;
    emit(&format!("{}: deleted\n", vm.name))?;
    Ok(0)
}

fn stats(client: &Client, vm: &str, json: bool) -> anyhow::Result<u8> {
    let v = client.json("GET", &format!("{}/stats", vm_path(vm)), None)?;
    if json {
        return print_json(&v);
    }
    let s: VmStats = decode(v)?;
    emit(&stats_text(&s))?;
    Ok(0)
}

/// The `vm stats` text: a summary, the vCPU table, the device table.
pub fn stats_text(s: &VmStats) -> String {
    let mut out = key_values(&[
        ("name", s.name.clone()),
        ("state", name_of(&s.state)),
        ("pid", s.pid.to_string()),
        ("uptime", duration_ms(s.uptime_ms)),
        ("memory", size(s.memory_bytes)),
        ("rss", or_dash(s.rss_bytes.map(size))),
    ]);
    let mut t = Table::new(&["VCPU", "EXITS", "IO", "MMIO", "HLT", "CPU TIME"]);
    for v in &s.vcpus {
        let get = |k: &str| v.exits.get(k).copied().unwrap_or(0);
        let total = v
            .exits
            .get("total")
            .copied()
            .unwrap_or_else(|| v.exits.values().fold(0u64, |a, b| a.saturating_add(*b)));
        t.row(vec![
            v.vcpu.to_string(),
            total.to_string(),
            get("io_in").saturating_add(get("io_out")).to_string(),
            get("mmio_read")
                .saturating_add(get("mmio_write"))
                .to_string(),
            get("hlt").to_string(),
            or_dash(v.cpu_time_ms.map(cpu_time_ms)),
        ]);
    }
    out.push('\n');
    out.push_str(&t.render());
    if !s.devices.is_empty() {
        let mut t = Table::new(&["TYPE", "ID", "COUNTERS"]);
        for d in &s.devices {
            let counters: Vec<String> =
                d.counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
            t.row(vec![d.kind.clone(), d.id.clone(), counters.join(" ")]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    if let Some(cg) = &s.cgroup {
        let mut parts = Vec::new();
        if let Some(m) = cg.memory_bytes {
            parts.push(format!("memory={}", size(m)));
        }
        if let Some(us) = cg.cpu_usage_usec {
            parts.push(format!("cpu={}", cpu_time_ms(us / 1000)));
        }
        if let Some(p) = cg.pids {
            parts.push(format!("pids={p}"));
        }
        if let Some(k) = cg.oom_kills {
            parts.push(format!("oom_kills={k}"));
        }
        out.push_str(&format!("\ncgroup: {}\n", parts.join(" ")));
    }
    if let Some(b) = s
        .balloon
        .as_ref()
        .and_then(|b| serde_json::to_value(b).ok())
    {
        out.push_str(&format!("\nballoon: {b}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::{DesiredState, DeviceStats, RestartPolicy, VcpuStats, VmState};
    use std::collections::BTreeMap;

    fn sample() -> VmInfo {
        VmInfo {
            id: "3f2a9c0d5e6b7a8190a1b2c3d4e5f607".into(),
            name: "web-1".into(),
            state: VmState::Running,
            desired_state: DesiredState::Running,
            restart_policy: RestartPolicy::OnFailure,
            config: VmConfig {
                kernel: Some("/img/vmlinuz".into()),
                cpus: 2,
                memory: config::ByteSize(512 << 20),
                disks: vec!["path=/img/root.raw,readonly=on,id=root".parse().unwrap()],
                ..VmConfig::default()
            },
            pid: Some(4242),
            uptime_ms: Some(192_000),
            started_at: Some(1_714_566_896_789),
            restart_count: 1,
            last_exit_reason: Some("crashed".into()),
            last_exit_code: Some(3),
            created_at: 1_714_566_800_000,
            resources: Resources {
                cpu_weight: Some(200),
                memory_max: Some(config::ByteSize(1 << 30)),
                ..Resources::default()
            },
        }
    }

    #[test]
    fn list_table() {
        let mut stopped = sample();
        stopped.name = "db".into();
        stopped.id = "00112233445566778899aabbccddeeff".into();
        stopped.state = VmState::Stopped;
        stopped.pid = None;
        stopped.uptime_ms = None;
        stopped.restart_count = 0;
        stopped.config.memory = config::ByteSize(2 << 30);
        assert_eq!(
            vm_table(&[sample(), stopped]),
            "NAME   ID            STATE    CPUS  MEMORY  PID   UPTIME  RESTARTS\n\
             web-1  3f2a9c0d5e6b  running  2     512M    4242  3m12s   1\n\
             db     001122334455  stopped  2     2G      -     -       0\n"
        );
    }

    #[test]
    fn info_lines() {
        let text = info_text(&sample());
        for line in [
            "name:            web-1",
            "id:              3f2a9c0d5e6b7a8190a1b2c3d4e5f607",
            "state:           running",
            "desired state:   running",
            "restart policy:  on-failure",
            "pid:             4242",
            "uptime:          3m12s",
            "started:         2024-05-01T12:34:56.789Z",
            "restarts:        1",
            "last exit:       crashed (code 3)",
            "cpus:            2",
            "memory:          512M",
            "kernel:          /img/vmlinuz",
            "disks:           /img/root.raw ro id=root",
            "nets:            none",
            "resources:       cpu-weight=200 memory-max=1G",
        ] {
            assert!(
                text.contains(&format!("{line}\n")),
                "{line:?} missing in:\n{text}"
            );
        }
        assert!(!text.lines().any(|l| l.ends_with(' ')), "{text}");
    }

    #[test]
    fn stats_tables() {
        let s = VmStats {
            id: "3f2a".into(),
            name: "web-1".into(),
            state: VmState::Running,
            pid: 4242,
            uptime_ms: 5_000,
            rss_bytes: Some(300 << 20),
            memory_bytes: 512 << 20,
            vcpus: vec![VcpuStats {
                vcpu: 0,
                exits: BTreeMap::from([
                    ("total".to_string(), 100),
                    ("io_in".to_string(), 10),
                    ("io_out".to_string(), 20),
                    ("mmio_read".to_string(), 3),
                    ("mmio_write".to_string(), 4),
                    ("hlt".to_string(), 50),
                ]),
                cpu_time_ms: Some(1_250),
            }],
            devices: vec![DeviceStats {
                kind: "block".into(),
                id: "root".into(),
                counters: BTreeMap::from([
                    ("read_bytes".to_string(), 4096),
                    ("errors".to_string(), 0),
                ]),
            }],
            cgroup: None,
            balloon: None,
        };
        let text = stats_text(&s);
        assert!(text.contains("rss:     300M\n"), "{text}");
        assert!(
            text.contains(
                "VCPU  EXITS  IO  MMIO  HLT  CPU TIME\n0     100    30  7     50   1.250s\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("TYPE   ID    COUNTERS\nblock  root  errors=0 read_bytes=4096\n"),
            "{text}"
        );
    }

    #[test]
    fn paths_are_escaped_and_relative_config_paths_made_absolute() {
        assert_eq!(vm_path("web-1"), "/v1/vms/web-1");
        assert_eq!(vm_path("a/b c"), "/v1/vms/a%2Fb%20c");
        assert_eq!(vm_path(".."), "/v1/vms/%2E%2E");
        let mut cfg = VmConfig {
            kernel: Some("vmlinuz".into()),
            initrd: Some("/abs/initrd".into()),
            disks: vec!["path=root.img".parse().unwrap()],
            console: Some("file=hvc.log".parse().unwrap()),
            ..VmConfig::default()
        };
        absolutize(&mut cfg).unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(cfg.kernel, Some(cwd.join("vmlinuz")));
        assert_eq!(cfg.initrd, Some(PathBuf::from("/abs/initrd")));
        assert_eq!(cfg.disks[0].path, cwd.join("root.img"));
        assert_eq!(cfg.console, Some(SerialConfig::File(cwd.join("hvc.log"))));
        assert_eq!(cfg.serial, SerialConfig::Stdio);
    }
}
