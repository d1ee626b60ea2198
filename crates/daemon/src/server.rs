//! `ferrovisor daemon`: opens the store, re-adopts the VMMs that survived the previous daemon,
//! serves the API on its Unix socket until SIGTERM/SIGINT. Stopping the daemon never stops a
//! guest: VMMs run in sessions of their own, and the next daemon adopts them.

use crate::api::{bind_socket, serve_with_shutdown, ApiConfig, AppState};
use crate::cgroup::CgroupRoot;
use crate::manager::{Manager, ManagerConfig};
use crate::store::Store;
use std::ffi::CString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Default API socket.
pub const DEFAULT_SOCKET: &str = "/run/ferrovisor/api.sock";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ferrovisor";

/// How the daemon runs.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    /// The API socket.
    pub socket: PathBuf,
    /// The state directory (store, VM run directories).
    pub state_dir: PathBuf,
    /// The group that may use the API socket (name or numeric id).
    pub group: Option<String>,
    /// The KVM device.
    pub kvm: PathBuf,
    /// The binary started for each VM (`ferrovisor run`); default: this executable.
    pub vmm_binary: Option<PathBuf>,
    /// How long a VMM gets to answer on its control socket at start.
    pub ready_timeout: Duration,
    /// The cgroup v2 directory under which VMs get theirs (default: found from the daemon's
    /// own cgroup, see [`CgroupRoot::detect`]).
    pub cgroup_parent: Option<PathBuf>,
    /// How VMMs are confined.
    pub jail: crate::manager::JailPolicy,
    /// The remote API (`--listen-tls`), if any.
    pub tls: Option<TlsListen>,
}

/// The remote API's listener: an address and the TLS files.
#[derive(Clone, Debug)]
pub struct TlsListen {
    /// Where to listen (`--listen-tls ADDR:PORT`).
    pub addr: std::net::SocketAddr,
    /// Certificate, key, client CA.
    pub files: crate::tls::TlsFiles,
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] crate::error::StoreError),
    /// A file, socket or thread failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A bad option.
    #[error("{0}")]
    Usage(String),
    /// Recovery failed.
    #[error("re-adopting VMs: {0}")]
    Recover(#[from] crate::manager::OpError),
}

/// Resolves a group name or number.
pub fn resolve_group(group: &str) -> Result<u32, DaemonError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let name = CString::new(group)
        .map_err(|_| DaemonError::Usage(format!("--group {group:?}: not a group name")))?;
    // SAFETY: getgrnam reads a NUL-terminated string and returns a pointer to static storage
    // (or null); we read gr_gid at once, before any other call could overwrite it.
    let gr = unsafe { libc::getgrnam(name.as_ptr()) };
    if gr.is_null() {
        return Err(DaemonError::Usage(format!(
            "--group {group}: no such group (create it with `groupadd {group}`)"
        )));
    }
    // SAFETY: non-null pointer to a valid struct group, as above.
    Ok(unsafe { (*gr).gr_gid })
}

/// Longest Unix socket path (`sun_path` is 108 bytes with its NUL).
const SOCKET_PATH_MAX: usize = 107;

/// Each VM's sockets are `<state-dir>/vms/<32 hex digits>/console.sock`: refuse a state
/// directory whose path leaves them no room (the VMs would all fail to start).
fn check_state_dir_length(state_dir: &std::path::Path) -> Result<(), DaemonError> {
    let dir = std::path::absolute(state_dir)?;
    let longest = dir
        .join("vms")
        .join("0".repeat(32))
        .join("console.sock")
        .as_os_str()
        .len();
    if longest > SOCKET_PATH_MAX {
        return Err(DaemonError::Usage(format!(
            "--state-dir {}: too long: the VMs' sockets (<state-dir>/vms/<id>/console.sock, \
             {longest} bytes) would exceed the {SOCKET_PATH_MAX} bytes a Unix socket path may \
             have; use a path of at most {} bytes",
            dir.display(),
            dir.as_os_str().len() - (longest - SOCKET_PATH_MAX)
        )));
    }
    Ok(())
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(opts: &DaemonOptions) -> Result<(), DaemonError> {
    let gid = opts.group.as_deref().map(resolve_group).transpose()?;
    opts.jail.validate().map_err(DaemonError::Usage)?;
    if !opts.jail.skip.is_empty() {
        let walls: Vec<&str> = opts.jail.skip.iter().map(|w| w.name()).collect();
        eprintln!(
            "ferrovisor daemon: VMs run WITHOUT these walls (--allow-unconfined): {}",
            walls.join(", ")
        );
    }
    check_state_dir_length(&opts.state_dir)?;
    // Bad TLS files stop the daemon before it touches anything.
    let tls = opts
        .tls
        .as_ref()
        .map(|t| crate::tls::Reloadable::new(t.files.clone()).map(|r| (t.addr, r)))
        .transpose()
        .map_err(|e| DaemonError::Usage(e.to_string()))?;
    let binary = match &opts.vmm_binary {
        Some(b) => b.clone(),
        None => std::env::current_exe()?,
    };
    let store = Arc::new(Store::open(&opts.state_dir)?);
    if !opts.jail.skip.is_empty() {
        // The operator's choice goes on the record, each time a daemon starts with it.
        let walls: Vec<&str> = opts.jail.skip.iter().map(|w| w.name()).collect();
        store.append_event(
            None,
            api::EventKind::Unconfined,
            &serde_json::json!({ "walls": walls, "option": "--allow-unconfined" }),
        )?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fv-api")
        .enable_all()
        .build()?;
    let cgroups = CgroupRoot::detect(opts.cgroup_parent.as_deref());
    match &cgroups {
        Ok(root) => {
            tracing::info!("VM cgroups under {}", root.parent().display());
            if let Some(missing) = root.missing_controllers() {
                eprintln!("ferrovisor daemon: some VM limits cannot be applied: {missing}");
            }
        }
        Err(why) => eprintln!(
            "ferrovisor daemon: VM resource limits cannot be applied (VMs with limits will be \
             refused): {why}"
        ),
    }
    let changed = Arc::new(tokio::sync::Notify::new());
    let manager = Manager::new(
        store,
        ManagerConfig {
            binary,
            run_dir: opts.state_dir.join("vms"),
            ready_timeout: opts.ready_timeout,
            cgroups,
            jail: opts.jail.clone(),
        },
        rt.handle().clone(),
        changed.clone(),
    )?;
    // Outside the runtime: recovery takes VM locks the blocking way.
    let adopted = manager.recover()?;
    tracing::info!("re-adopted {adopted} running VMM(s)");
    if let Some(dir) = opts.socket.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        }
    }
    let state = AppState::new(
        manager,
        changed,
        ApiConfig {
            state_dir: opts.state_dir.clone(),
            kvm_path: opts.kvm.clone(),
            jail: opts.jail.clone(),
        },
    );
    let socket = opts.socket.clone();
    let result = rt.block_on(async move {
        let listener = bind_socket(&socket, gid)?;
        eprintln!(
            "ferrovisor daemon: serving on {} (state in {})",
            socket.display(),
            opts.state_dir.display()
        );
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (tls_stop_tx, tls_stop_rx) = tokio::sync::oneshot::channel::<()>();
        // SIGHUP: read the TLS certificate, key and client CA again (new handshakes use them;
        // running VMs and open connections are not touched). Without --listen-tls there is
        // nothing to re-read, and a SIGHUP does not stop the daemon either.
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let reload = tls.as_ref().map(|(_, t)| t.clone());
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match reload.as_ref().map(|t| t.reload()) {
                    Some(Ok(())) => eprintln!("ferrovisor daemon: TLS files re-read (SIGHUP)"),
                    Some(Err(e)) => eprintln!(
                        "ferrovisor daemon: SIGHUP: keeping the old TLS configuration: {e}"
                    ),
                    None => {
                        eprintln!("ferrovisor daemon: SIGHUP: nothing to re-read (no --listen-tls)")
                    }
                }
            }
        });
        if let Some((addr, tls)) = tls {
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("--listen-tls {addr}: {e}")))?;
            eprintln!(
                "ferrovisor daemon: serving the remote API on {} (mutual TLS 1.3)",
                tcp.local_addr().unwrap_or(addr)
            );
            tokio::spawn(crate::api::serve_tls(tcp, tls, state.clone(), async {
                let _ = tls_stop_rx.await;
            }));
        }
        let server = tokio::spawn(serve_with_shutdown(listener, state, async {
            let _ = stop_rx.await;
        }));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        eprintln!("ferrovisor daemon: stopping (VMs keep running)");
        let _ = stop_tx.send(());
        let _ = tls_stop_tx.send(());
        // Event streams and consoles never end by themselves: give requests in flight a
        // moment, then go.
        let _ = tokio::time::timeout(Duration::from_secs(3), server).await;
        let _ = std::fs::remove_file(&socket);
        Ok::<(), DaemonError>(())
    });
    // Long requests (a 30 s shutdown) may still hold the runtime: do not wait for them.
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}
