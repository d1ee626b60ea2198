//! The API's shared state: what every handler gets (the VM manager, the config, the change
//! notifier), and how handlers run store and manager operations off the async workers.

use super::failure::Failure;
use crate::error::StoreError;
use crate::manager::{Manager, OpError};
use crate::store::Store;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use tokio::sync::{Notify, OwnedMutexGuard};

tokio::task_local! {
    /// The user a request runs as (its certificate's CN, or `local`), set by the API's
    /// authorization layer; store writes made for the request record it as `"by"`.
    pub(crate) static ACTOR: String;
}

/// The request's user, to carry into a blocking task.
fn actor() -> Option<String> {
    ACTOR.try_with(|a| a.clone()).ok()
}

/// What the API needs to know about the host daemon.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// The daemon's state directory.
    pub state_dir: PathBuf,
    /// The KVM device (`/dev/kvm`): configs are validated against its limits.
    pub kvm_path: PathBuf,
    /// How VMMs are confined.
    pub jail: crate::manager::JailPolicy,
}

/// The API's shared state: the VM manager (and through it the store), the config, the change
/// notifier.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    manager: Manager,
    config: ApiConfig,
    changed: Arc<Notify>,
    openapi: OnceLock<String>,
}

impl AppState {
    /// State over `manager`; `changed` is the notifier the manager wakes (see
    /// [`Manager::new`]).
    pub fn new(manager: Manager, changed: Arc<Notify>, config: ApiConfig) -> AppState {
        AppState {
            inner: Arc::new(Inner {
                manager,
                config,
                changed,
                openapi: OnceLock::new(),
            }),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        self.inner.manager.store()
    }

    /// The VM manager.
    pub fn manager(&self) -> &Manager {
        &self.inner.manager
    }

    /// The config.
    pub fn config(&self) -> &ApiConfig {
        &self.inner.config
    }

    /// Wakes the event streams: call after writing to the store.
    pub fn notify_changed(&self) {
        self.inner.changed.notify_waiters();
    }

    pub(crate) fn changed(&self) -> &Notify {
        &self.inner.changed
    }

    /// Keeps the OpenAPI document `GET /openapi.json` serves (the first one set stays).
    pub(super) fn set_openapi(&self, json: String) {
        let _ = self.inner.openapi.set(json);
    }

    /// The OpenAPI document, once the router set it.
    pub(super) fn openapi(&self) -> Option<&str> {
        self.inner.openapi.get().map(String::as_str)
    }

    /// Takes the lock of one VM (by its id; `name:NAME` for a VM being created). Held for the
    /// whole of an operation on that VM, so operations on one VM never interleave.
    pub async fn lock_vm(&self, key: &str) -> OwnedMutexGuard<()> {
        self.inner.manager.lock_vm(key).await
    }

    /// Runs a store operation on the blocking pool.
    pub(crate) async fn blocking<T, F>(&self, f: F) -> Result<T, Failure>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = Arc::clone(self.store());
        let by = actor();
        tokio::task::spawn_blocking(move || crate::store::acting_as(by.as_deref(), || f(&store)))
            .await
            .map_err(|e| Failure::internal(format!("store operation failed: {e}")))?
            .map_err(Failure::from)
    }

    /// Runs a manager operation on VM `vm` (id or name) with its lock held, on the blocking
    /// pool.
    pub(crate) async fn vm_op<T, F>(&self, vm: String, f: F) -> Result<T, Failure>
    where
        T: Send + 'static,
        F: FnOnce(&Manager, &str) -> Result<T, OpError> + Send + 'static,
    {
        let id = self.blocking(move |s| s.get(&vm)).await?.id.to_string();
        let guard = self.lock_vm(&id).await;
        let m = self.inner.manager.clone();
        let by = actor();
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            crate::store::acting_as(by.as_deref(), || f(&m, &id))
        })
        .await
        .map_err(|e| Failure::internal(format!("VM operation failed: {e}")))?
        .map_err(Failure::from)
    }
}
