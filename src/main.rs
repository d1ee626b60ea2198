//! `ferrovisor`: the command-line entry point. Subcommands only; the work is in the crates.

mod cli;
mod jailed;

use anyhow::Context;
use api::control::VmCommand;
use clap::{Parser, Subcommand, ValueEnum};
use config::exit_report::ExitReport;
use config::{
    BalloonConfig, ByteSize, DiskConfig, Irqchip, MemoryOption, NetConfig, SerialConfig, VmConfig,
    VsockConfig,
};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;
use vmm::kvm::{KvmFlavour, KVM_PATH, PVM_HINT};
use vmm::vm::{ExitReason, Vm, EXIT_SETUP_ERROR};

#[derive(Parser)]
#[command(
    name = "ferrovisor",
    version,
    about = "A KVM hypervisor: run and manage virtual machines"
)]
struct Cli {
    /// Log level: error, warn, info, debug, trace (or a tracing filter).
    #[arg(long, global = true, default_value = "warn", env = "FERROVISOR_LOG")]
    log_level: String,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(flatten)]
    remote: cli::RemoteArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run one VM in the foreground, its serial console on this terminal.
    Run(Box<RunArgs>),
    /// Talk to a running VMM's control socket (`run --control PATH`); prints its JSON answer.
    Ctl {
        /// The control socket.
        socket: PathBuf,
        #[command(subcommand)]
        request: CtlRequest,
    },
    /// Describe this host's KVM: flavour, limits, whether stock kernels can run.
    Host {
        /// KVM device.
        #[arg(long, env = "FERROVISOR_KVM", default_value = KVM_PATH)]
        kvm: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the host daemon: the VM registry, one VMM process per VM, the HTTP API on a Unix
    /// socket. One per host (per state directory).
    Daemon(Box<DaemonArgs>),
    /// Manage the host daemon's VMs (through its API socket).
    Vm(cli::VmArgs),
    /// The host daemon's event log: list it, or follow it as it grows.
    Events(cli::EventsArgs),
}

#[derive(clap::Args)]
struct DaemonArgs {
    /// The API socket (mode 0660).
    #[arg(long, env = "FERROVISOR_SOCKET", default_value = daemon::server::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Where the daemon keeps its database and the VMs' run directories.
    #[arg(long, env = "FERROVISOR_STATE_DIR", default_value = daemon::server::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// The group allowed to use the API socket (name or gid); default: root's only.
    #[arg(long)]
    group: Option<String>,
    /// The KVM device VMs use.
    #[arg(long, env = "FERROVISOR_KVM", default_value = KVM_PATH)]
    kvm: PathBuf,
    /// Seconds a new VMM gets to come up (its control socket answering).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    ready_timeout: u64,
    /// The cgroup v2 directory VMs get their cgroups under (default: `ferrovisor/` at the root,
    /// or `vms/` beside the daemon's own delegated cgroup).
    #[arg(long, value_name = "PATH")]
    cgroup_parent: Option<PathBuf>,
    /// The uids (and gids) VMs' confined VMMs run as, one per VM, recorded in the state
    /// directory: FIRST-LAST, at least 16 ids, none used by an account or group of the host.
    #[arg(long, value_name = "FIRST-LAST", default_value = "900000-965535", value_parser = parse_uid_range)]
    uid_range: std::ops::RangeInclusive<u32>,
    /// Run every VM WITHOUT these walls (comma-separated: namespaces, filesystem, identity,
    /// seccomp, landlock, cgroups, apparmor, selinux); shown in `/v1/host`.
    #[arg(long, value_name = "WALLS", value_parser = jailed::parse_walls)]
    allow_unconfined: Option<jailed::Walls>,
    /// Refuse to start a VM without these host-dependent walls (landlock, cgroups, apparmor,
    /// selinux); the others are always required unless --allow-unconfined.
    #[arg(long, value_name = "WALLS", value_parser = jailed::parse_walls)]
    require: Option<jailed::Walls>,
    /// Also serve the API over TCP with mutual TLS 1.3 on ADDR:PORT (e.g. 0.0.0.0:8443);
    /// needs --tls-cert, --tls-key and --tls-client-ca. Roles come from the client
    /// certificate's O (reader, operator, admin), the user from its CN.
    #[arg(long, value_name = "ADDR:PORT", requires_all = ["tls_cert", "tls_key", "tls_client_ca"])]
    listen_tls: Option<std::net::SocketAddr>,
    /// The server's certificate chain (PEM), for --listen-tls; re-read on SIGHUP.
    #[arg(long, value_name = "FILE", requires = "listen_tls")]
    tls_cert: Option<PathBuf>,
    /// The server's private key (PEM, mode 0600 or stricter), for --listen-tls; re-read on
    /// SIGHUP.
    #[arg(long, value_name = "FILE", requires = "listen_tls")]
    tls_key: Option<PathBuf>,
    /// The CA certificate(s) (PEM) a client's certificate must be signed by; re-read on SIGHUP.
    #[arg(long, value_name = "FILE", requires = "listen_tls")]
    tls_client_ca: Option<PathBuf>,
}

fn parse_uid_range(s: &str) -> Result<std::ops::RangeInclusive<u32>, String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected FIRST-LAST, e.g. 900000-965535"))?;
    let num = |x: &str| {
        x.trim()
            .parse::<u32>()
            .map_err(|e| format!("{s:?}: {x:?} is not a uid ({e})"))
    };
    Ok(num(a)?..=num(b)?)
}

#[derive(Subcommand)]
enum CtlRequest {
    /// Run state, pid, uptime.
    Status,
    /// vCPU exits, device counters, RSS, balloon.
    Stats,
    /// Park every vCPU.
    Pause,
    /// Run again.
    Resume,
    /// Stop the VM (the VMM exits 0).
    Stop,
    /// Press the ACPI power button and return at once; the guest powers off (the VMM exits 0)
    /// if it handles the button.
    Shutdown,
    /// Set the balloon size (memory taken from the guest), e.g. 256M; 0 gives it all back.
    Balloon {
        /// New size.
        #[arg(value_parser = parse_size)]
        size: ByteSize,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    vm: VmConfigArgs,
    /// A control socket (JSON lines) for this VMM: status, device counters, balloon size.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Write why the VMM exited here, atomically, as it exits (JSON: reason, exit_code, at_ms,
    /// pid): how a supervisor that is not this process's parent learns how it ended.
    #[arg(long, value_name = "PATH")]
    exit_report: Option<PathBuf>,
    /// Record KVM's trace events for this VM's vCPUs (a tracefs instance of its own, needs
    /// root) and print the last ones in the report when the guest faults: how to see what a
    /// triple-faulting guest did last.
    #[arg(long)]
    fault_trace: bool,
    /// KVM device.
    #[arg(long, env = "FERROVISOR_KVM", default_value = KVM_PATH)]
    kvm: PathBuf,
    #[command(flatten)]
    jail: jailed::JailArgs,
}

/// The VM configuration flags, shared by `run` and `vm create`.
#[derive(clap::Args)]
struct VmConfigArgs {
    /// Linux kernel: bzImage or ELF vmlinux.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line, appended after what the VMM adds (console=ttyS0).
    #[arg(long)]
    cmdline: Option<String>,
    /// Raw firmware image mapped below 4 GiB, started at the reset vector (instead of --kernel).
    #[arg(long)]
    firmware: Option<PathBuf>,
    /// Number of vCPUs [default: 1].
    #[arg(long)]
    cpus: Option<u32>,
    /// Guest memory, e.g. 512M, 2G [default: 512M], and how it is backed:
    /// SIZE[,hugepages=auto|on|off] — auto (default): transparent huge pages where the host has
    /// them; on: 2 MiB hugetlbfs pages, reserved at start; off: 4 KiB pages.
    #[arg(long, value_parser = parse_memory)]
    memory: Option<MemoryOption>,
    /// Where the IOAPIC lives: split (in the VMM, KVM's local APICs; the default) or kernel
    /// (KVM's in-kernel IOAPIC).
    #[arg(long, value_parser = parse_irqchip)]
    irqchip: Option<Irqchip>,
    /// Serial console: stdio, null, file=PATH, socket=PATH [default: stdio].
    #[arg(long, value_parser = parse_serial)]
    serial: Option<SerialConfig>,
    /// Expose the host's performance counters (PMU) to the guest.
    #[arg(long)]
    pmu: bool,
    /// Add a virtio-rng entropy device (the guest's /dev/hwrng), fed from the host's getrandom.
    #[arg(long)]
    rng: bool,
    /// A virtio-blk disk (repeatable): path=IMAGE[,readonly=on][,id=ID][,iops=N][,bw=BYTES/s].
    #[arg(long = "disk", value_name = "OPTIONS", value_parser = parse_disk)]
    disks: Vec<DiskConfig>,
    /// A virtio-net NIC over a TAP device, created if missing (repeatable):
    /// tap=NAME[,mac=MAC][,id=ID][,iops=PACKETS/s][,bw=BYTES/s].
    #[arg(long = "net", value_name = "OPTIONS", value_parser = parse_net)]
    nets: Vec<NetConfig>,
    /// A virtio-vsock device: cid=N,socket=PATH (Firecracker-style hybrid Unix socket).
    #[arg(long, value_name = "OPTIONS", value_parser = parse_vsock)]
    vsock: Option<VsockConfig>,
    /// A virtio-balloon device: [size=BYTES][,deflate-on-oom=on][,stats=SECS][,free-page-reporting=on].
    #[arg(long, value_name = "OPTIONS", value_parser = parse_balloon, num_args = 0..=1, default_missing_value = "")]
    balloon: Option<BalloonConfig>,
    /// A virtio-console (the guest's /dev/hvc0): null, file=PATH or socket=PATH.
    #[arg(long, value_parser = parse_serial)]
    console: Option<SerialConfig>,
    /// A VmConfig JSON file; flags given on the command line override its fields.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn parse_size(s: &str) -> Result<ByteSize, String> {
    s.parse().map_err(|e: config::ConfigError| e.to_string())
}

fn parse_memory(s: &str) -> Result<MemoryOption, String> {
    s.parse().map_err(|e: config::ConfigError| e.to_string())
}

fn parse_irqchip(s: &str) -> Result<Irqchip, String> {
    s.parse().map_err(|e: config::ConfigError| e.to_string())
}

fn parse_serial(s: &str) -> Result<SerialConfig, String> {
    s.parse().map_err(|e: config::ConfigError| e.to_string())
}

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    s.parse().map_err(|e: config::ConfigError| e.to_string())
}

fn parse_net(s: &str) -> Result<NetConfig, String> {
    s.parse().map_err(|e: config::ConfigError| e.to_string())
}

fn parse_vsock(s: &str) -> Result<VsockConfig, String> {
    s.parse().map_err(|e: config::ConfigError| e.to_string())
}

fn parse_balloon(s: &str) -> Result<BalloonConfig, String> {
    s.parse().map_err(|e: config::ConfigError| e.to_string())
}

impl VmConfigArgs {
    fn to_config(&self) -> anyhow::Result<VmConfig> {
        let mut cfg = match &self.config {
            Some(path) => VmConfig::from_file(path)?,
            None => VmConfig::default(),
        };
        if let Some(k) = &self.kernel {
            cfg.kernel = Some(k.clone());
        }
        if let Some(i) = &self.initrd {
            cfg.initrd = Some(i.clone());
        }
        if let Some(c) = &self.cmdline {
            cfg.cmdline = c.clone();
        }
        if let Some(f) = &self.firmware {
            cfg.firmware = Some(f.clone());
        }
        if let Some(n) = self.cpus {
            cfg.cpus = n;
        }
        if let Some(m) = self.memory {
            cfg.memory = m.size;
            if let Some(hp) = m.hugepages {
                cfg.hugepages = hp;
            }
        }
        if let Some(i) = self.irqchip {
            cfg.irqchip = i;
        }
        if let Some(s) = &self.serial {
            cfg.serial = s.clone();
        }
        cfg.pmu |= self.pmu;
        cfg.rng |= self.rng;
        cfg.disks.extend(self.disks.iter().cloned());
        cfg.nets.extend(self.nets.iter().cloned());
        if let Some(v) = &self.vsock {
            cfg.vsock = Some(v.clone());
        }
        if let Some(b) = &self.balloon {
            cfg.balloon = Some(b.clone());
        }
        if let Some(c) = &self.console {
            cfg.console = Some(c.clone());
        }
        Ok(cfg)
    }
}

fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Builds the VM confined ([`jail::enter`] between opening its host files and making its
/// threads).
fn build_jailed(args: &RunArgs, config: &VmConfig, started: Instant) -> anyhow::Result<Vm> {
    if args.fault_trace {
        anyhow::bail!("--fault-trace reads the host's tracefs, which a confined VMM cannot see; run it without --jail");
    }
    if jail::spawn::current_uid() != 0 {
        anyhow::bail!(
            "--jail needs root: the VMM opens what it needs as root, then gives it all up"
        );
    }
    config::exit_report::remember_host_pid();
    let mut paths: Vec<(&str, &std::path::Path)> = Vec::new();
    if let Some(p) = &args.control {
        paths.push(("--control", p));
    }
    if let Some(p) = &args.exit_report {
        paths.push(("--exit-report", p));
    }
    if let config::SerialConfig::Socket(p) = &config.serial {
        paths.push(("--serial socket=", p));
    }
    if let Some(config::SerialConfig::Socket(p)) = &config.console {
        paths.push(("--console socket=", p));
    }
    if let Some(v) = &config.vsock {
        paths.push(("--vsock socket=", &v.socket));
    }
    let dir = jailed::run_dir(&args.jail, &paths)?;
    let plan = jailed::plan(&args.jail, dir)?;
    // The control socket answers only whoever started this VMM (the daemon).
    vmm::control::accept_only_uid(jail::spawn::current_uid());
    let seccomp = !plan.skip.contains(&jail::Wall::Seccomp);
    if seccomp {
        jail::single_malloc_arena();
        jail::seccomp::prepare().context("seccomp wall")?;
        jail::seccomp::install_sigsys_handler().context("seccomp wall: SIGSYS handler")?;
    }
    let owned: Vec<std::path::PathBuf> = paths.iter().map(|(_, p)| p.to_path_buf()).collect();
    let (uid, gid) = (plan.uid, plan.gid);
    let mut confine = || -> Result<(), vmm::vm::VmError> {
        // Sockets bound before the walls are root's: they become the VM's, so that it can
        // remove them at exit even from a sticky directory such as /tmp.
        for p in owned.iter().filter(|p| p.exists()) {
            std::os::unix::fs::chown(p, Some(uid), Some(gid)).map_err(|source| {
                vmm::vm::VmError::Io {
                    what: "giving the VMM's sockets to the VM's uid",
                    source,
                }
            })?;
        }
        let t = Instant::now();
        let report = jail::enter(&plan)?;
        let took = t.elapsed().as_secs_f64() * 1000.0;
        let seccomp = if seccomp {
            "seccomp: up (a filter per thread kind)"
        } else {
            "seccomp: off (--allow-unconfined)"
        };
        let steps: Vec<String> = report
            .steps
            .iter()
            .map(|(n, ms)| format!("{n} {ms:.2}"))
            .collect();
        eprintln!(
            "ferrovisor: jail: {report}; {seccomp} (walls up in {took:.2} ms: {})",
            steps.join(", ")
        );
        Ok(())
    };
    Ok(vmm::builder::build_for_boot(
        config,
        &args.kvm,
        started,
        &mut confine,
    )?)
}

fn run(args: &RunArgs, started: Instant) -> anyhow::Result<ExitReason> {
    let config = args.vm.to_config()?;
    let mut vm = if args.jail.jail {
        build_jailed(args, &config, started)?
    } else {
        Vm::build(&config, &args.kvm, started)?
    };
    if let Some(path) = &args.control {
        vm.set_control_socket(path);
    }
    if args.fault_trace {
        vm.enable_fault_trace();
    }
    let outcome = vm.run().context("running the VM")?;
    let e = &outcome.exits;
    tracing::info!(
        "exits: total={} io_in={} io_out={} mmio_read={} mmio_write={} unhandled_pio={} unhandled_mmio={} hlt={} interrupted={} other={}",
        e.total(), e.io_in, e.io_out, e.mmio_read, e.mmio_write, e.unhandled_pio,
        e.unhandled_mmio, e.hlt, e.interrupted, e.other
    );
    match &outcome.reason {
        ExitReason::Fault(report) => {
            eprintln!("ferrovisor: the guest could not run: {report}");
        }
        ExitReason::Panic => eprintln!("ferrovisor: the guest kernel panicked"),
        other => tracing::info!(
            "{} after {:.2} s",
            other.describe(),
            outcome.run_time.as_secs_f64()
        ),
    }
    Ok(outcome.reason)
}

/// Runs the VM and writes its exit report (`--exit-report`), whatever the outcome.
fn run_and_report(args: &RunArgs, started: Instant) -> anyhow::Result<u8> {
    let result = run(args, started);
    if let Some(path) = &args.exit_report {
        let report = match &result {
            Ok(reason) => reason.exit_report(),
            Err(e) => ExitReport::error(format!("{e:#}")),
        };
        if let Err(e) = report.write(path) {
            eprintln!("ferrovisor: exit report {}: {e}", path.display());
        }
    }
    result.map(|reason| reason.exit_code() as u8)
}

fn ctl(socket: &std::path::Path, request: &CtlRequest) -> anyhow::Result<u8> {
    let command = match request {
        CtlRequest::Status => VmCommand::Status,
        CtlRequest::Stats => VmCommand::Stats,
        CtlRequest::Pause => VmCommand::Pause,
        CtlRequest::Resume => VmCommand::Resume,
        CtlRequest::Stop => VmCommand::Stop,
        CtlRequest::Shutdown => VmCommand::Shutdown,
        CtlRequest::Balloon { size } => VmCommand::Balloon { size: *size },
    };
    let req = serde_json::to_value(&command)?;
    let answer = vmm::control::request(socket, &req)
        .with_context(|| format!("control socket {}", socket.display()))?;
    println!("{}", serde_json::to_string_pretty(&answer)?);
    let ok = answer.get("ok").and_then(|v| v.as_bool()).unwrap_or(false);
    if !ok {
        if let Some(e) = answer.get("error").and_then(|v| v.as_str()) {
            eprintln!("ferrovisor: {e}");
        }
    }
    Ok(if ok { 0 } else { 1 })
}

fn host(kvm: &std::path::Path, json: bool) -> anyhow::Result<u8> {
    let flavour = KvmFlavour::detect();
    let opened = vmm::kvm::open_kvm(kvm);
    let limits = vmm::vm::probe_host_limits(kvm);
    let (usable, error) = match &opened {
        Ok(_) => (true, None),
        Err(e) => (false, Some(e.to_string())),
    };
    // The walls a confined VMM gets here; cgroups as a daemon would find them (read only: the
    // daemon's own `/v1/host` says what it set up).
    let mut walls = jail::probe();
    let cgroups = jail::cgroup::probe().map_err(|e| e.to_string());
    let at = walls
        .iter()
        .position(|w| w.wall == jail::Wall::Landlock)
        .map_or(walls.len(), |i| i + 1);
    walls.insert(
        at,
        jail::WallStatus {
            wall: jail::Wall::Cgroups,
            available: cgroups.is_ok(),
            detail: cgroups.unwrap_or_else(|e| e),
        },
    );
    if json {
        let v = serde_json::json!({
            "kvm_path": kvm,
            "kvm_usable": usable,
            "kvm_error": error,
            "flavour": match flavour {
                KvmFlavour::Intel | KvmFlavour::Amd => "hardware",
                KvmFlavour::Pvm => "pvm",
                KvmFlavour::Unknown => "unknown",
            },
            "module": flavour.name(),
            "runs_stock_kernels": usable && flavour.runs_stock_kernels(),
            "max_vcpus": limits.max_vcpus,
            "host_memory": limits.host_memory,
            "host_cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "walls": walls.iter().map(|w| serde_json::json!({
                "name": w.wall.name(),
                "available": w.available,
                "detail": w.detail,
            })).collect::<Vec<_>>(),
        });
        println!("{v:#}");
    } else {
        println!("KVM device:   {}", kvm.display());
        match &error {
            None => println!("KVM usable:   yes"),
            Some(e) => println!("KVM usable:   no: {e}"),
        }
        println!("KVM flavour:  {flavour}");
        println!("max vCPUs:    {}", limits.max_vcpus);
        println!("host memory:  {}", ByteSize(limits.host_memory));
        if !flavour.runs_stock_kernels() {
            println!("note:         {PVM_HINT}");
        }
        println!("confinement walls (ferrovisor run --jail, the daemon's VMMs):");
        for w in &walls {
            let state = if w.available {
                "available"
            } else {
                "NOT available"
            };
            println!("  {:<11} {state}: {}", w.wall.name(), w.detail);
        }
    }
    Ok(if usable { 0 } else { 1 })
}

fn run_daemon(args: &DaemonArgs) -> anyhow::Result<u8> {
    let opts = daemon::server::DaemonOptions {
        socket: args.socket.clone(),
        state_dir: args.state_dir.clone(),
        group: args.group.clone(),
        kvm: args.kvm.clone(),
        vmm_binary: None,
        ready_timeout: std::time::Duration::from_secs(args.ready_timeout),
        cgroup_parent: args.cgroup_parent.clone(),
        jail: daemon::manager::JailPolicy {
            uid_range: args.uid_range.clone(),
            skip: args.allow_unconfined.clone().unwrap_or_default().0,
            require: args.require.clone().unwrap_or_default().0,
        },
        tls: match (
            &args.listen_tls,
            &args.tls_cert,
            &args.tls_key,
            &args.tls_client_ca,
        ) {
            (Some(addr), Some(cert), Some(key), Some(ca)) => Some(daemon::server::TlsListen {
                addr: *addr,
                files: daemon::tls::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: ca.clone(),
                },
            }),
            _ => None,
        },
    };
    daemon::server::run(&opts).context("ferrovisor daemon")?;
    Ok(0)
}

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    init_logging(&cli.log_level, cli.log_format);
    let result = match &cli.command {
        Command::Run(args) if jailed::needs_front(&args.jail) => match jailed::front() {
            Ok(Some(code)) => Ok(code),
            // The child: pid 1 of its own PID namespace, it runs the VMM.
            Ok(None) => run_and_report(args, started),
            Err(e) => Err(e),
        },
        Command::Run(args) => run_and_report(args, started),
        Command::Host { kvm, json } => host(kvm, *json),
        Command::Ctl { socket, request } => ctl(socket, request),
        Command::Daemon(args) => run_daemon(args),
        Command::Vm(args) => cli::vm(args, &cli.remote),
        Command::Events(args) => cli::events(args, &cli.remote),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("ferrovisor: error: {e:#}");
            ExitCode::from(EXIT_SETUP_ERROR as u8)
        }
    }
}
