//! The client commands: `ferrovisor vm ...` and `ferrovisor events`, which drive the host
//! daemon through its HTTP API on a Unix socket. Tables for people by default, `--json` for
//! scripts (the daemon's JSON as it sent it).

mod client;
mod console;
mod events;
mod format;
mod http;
mod sse;
mod tls;
mod vm;

use clap::{Args, Subcommand, ValueEnum};
use config::ByteSize;
use std::path::PathBuf;

pub use client::DEFAULT_SOCKET;

/// Options every client command takes.
#[derive(Args)]
pub struct Common {
    /// The daemon's API socket.
    #[arg(
        long,
        global = true,
        env = "FERROVISOR_SOCKET",
        default_value = DEFAULT_SOCKET,
        value_name = "PATH"
    )]
    pub socket: PathBuf,
    /// Print JSON (the daemon's answer) instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// A remote daemon (`ferrovisor daemon --listen-tls`), for `vm` and `events`, given before the
/// command: `ferrovisor --remote HOST:PORT --tls-cert FILE --tls-key FILE --tls-ca FILE vm list`.
#[derive(Args)]
pub struct RemoteArgs {
    /// Talk to the daemon at HOST:PORT over mutual TLS instead of its local socket (`vm` and
    /// `events` commands).
    #[arg(
        long,
        env = "FERROVISOR_REMOTE",
        value_name = "HOST:PORT",
        requires_all = ["tls_cert", "tls_key", "tls_ca"]
    )]
    pub remote: Option<String>,
    /// This client's certificate (PEM), signed by the daemon's client CA; its O names the role.
    #[arg(long, env = "FERROVISOR_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, env = "FERROVISOR_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// The CA certificate(s) (PEM) the daemon's certificate must be signed by.
    #[arg(long, env = "FERROVISOR_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
}

impl RemoteArgs {
    /// The client these options (and `socket`) ask for.
    pub(crate) fn client(&self, socket: &std::path::Path) -> anyhow::Result<client::Client> {
        match (&self.remote, &self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, ..) => Ok(client::Client::new(socket)),
            (Some(addr), Some(cert), Some(key), Some(ca)) => Ok(client::Client::remote(
                tls::Remote::new(addr, cert, key, ca).map_err(anyhow::Error::msg)?,
            )),
            (Some(_), ..) => anyhow::bail!("--remote needs --tls-cert, --tls-key and --tls-ca"),
        }
    }
}

/// `ferrovisor vm ...`.
#[derive(Args)]
pub struct VmArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: VmCommand,
}

/// The VM commands. `VM` is a VM's name or id.
#[derive(Subcommand)]
pub enum VmCommand {
    /// Define a VM (from the same flags as `run`, or --config FILE); --start starts it too.
    Create(Box<CreateArgs>),
    /// List the VMs.
    List,
    /// Show one VM: state, restart policy, process, configuration, resource limits.
    Info {
        /// The VM (name or id).
        vm: String,
    },
    /// Start a VM (its desired state becomes running).
    Start {
        /// The VM (name or id).
        vm: String,
    },
    /// Stop a VM gracefully: the ACPI power button, then after --timeout seconds a kill.
    /// Returns once it is down.
    Stop {
        /// The VM (name or id).
        vm: String,
        /// Seconds the guest gets to power off [daemon's default: 30].
        #[arg(long, value_name = "SECS", conflicts_with = "force")]
        timeout: Option<u32>,
        /// Kill it at once (like `vm kill`).
        #[arg(long)]
        force: bool,
    },
    /// Kill a VM's VMM at once.
    Kill {
        /// The VM (name or id).
        vm: String,
    },
    /// Reset a VM.
    Reboot {
        /// The VM (name or id).
        vm: String,
    },
    /// Pause a VM's vCPUs.
    Pause {
        /// The VM (name or id).
        vm: String,
    },
    /// Resume a paused VM.
    Resume {
        /// The VM (name or id).
        vm: String,
    },
    /// Delete a VM (a running one only with --force, which stops it first).
    Delete {
        /// The VM (name or id).
        vm: String,
        /// Delete it even if it runs.
        #[arg(long)]
        force: bool,
    },
    /// Attach to a VM's serial console (Ctrl-] detaches when stdin is a terminal).
    Console {
        /// The VM (name or id).
        vm: String,
        /// Only show the console's output; send nothing.
        #[arg(long)]
        no_stdin: bool,
    },
    /// A VM's counters: vCPU exits and CPU time, device counters, memory.
    Stats {
        /// The VM (name or id).
        vm: String,
    },
}

/// `ferrovisor vm create`.
#[derive(Args)]
pub struct CreateArgs {
    /// The VM's name: 1-63 of `A-Z a-z 0-9 . _ -`.
    pub name: String,
    #[command(flatten)]
    pub config: crate::VmConfigArgs,
    /// What the daemon does when the VM ends by itself.
    #[arg(long, value_enum, default_value_t = Restart::Never)]
    pub restart: Restart,
    /// Start it once defined.
    #[arg(long)]
    pub start: bool,
    /// Relative CPU share against other VMs (cgroup cpu.weight, 1-10000).
    #[arg(long, value_name = "N")]
    pub cpu_weight: Option<u32>,
    /// CPU time cap in percent of one host CPU (cgroup cpu.max; 150 = 1.5 CPUs).
    #[arg(long, value_name = "PERCENT")]
    pub cpu_max: Option<u32>,
    /// Memory cap of the whole VMM, guest RAM included (cgroup memory.max), e.g. 1G.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub memory_max: Option<ByteSize>,
    /// Most tasks (threads) the VMM may have (cgroup pids.max).
    #[arg(long, value_name = "N")]
    pub pids_max: Option<u32>,
}

/// `--restart`.
#[derive(Clone, Copy, ValueEnum)]
pub enum Restart {
    /// Leave it down.
    Never,
    /// Restart it when it crashed.
    OnFailure,
    /// Restart it whenever it ends.
    Always,
}

impl From<Restart> for api::RestartPolicy {
    fn from(r: Restart) -> api::RestartPolicy {
        match r {
            Restart::Never => api::RestartPolicy::Never,
            Restart::OnFailure => api::RestartPolicy::OnFailure,
            Restart::Always => api::RestartPolicy::Always,
        }
    }
}

fn parse_size(s: &str) -> Result<ByteSize, String> {
    s.parse().map_err(|e: config::ConfigError| e.to_string())
}

/// `ferrovisor events`.
#[derive(Args)]
pub struct EventsArgs {
    #[command(flatten)]
    pub common: Common,
    /// Keep the stream open and print events as they happen (until interrupted).
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only events with a greater id (with --follow: replay from there, then follow).
    #[arg(long, value_name = "ID")]
    pub after: Option<i64>,
    /// Only the events of this VM (name, id or id prefix).
    #[arg(long, value_name = "VM")]
    pub vm: Option<String>,
}

/// Runs `ferrovisor vm ...`; the exit status.
pub fn vm(args: &VmArgs, remote: &RemoteArgs) -> anyhow::Result<u8> {
    vm::run(args, remote.client(&args.common.socket)?)
}

/// Runs `ferrovisor events`; the exit status.
pub fn events(args: &EventsArgs, remote: &RemoteArgs) -> anyhow::Result<u8> {
    events::run(args, remote.client(&args.common.socket)?)
}
