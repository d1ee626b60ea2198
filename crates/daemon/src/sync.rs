//! The daemon's one way of taking a `std::sync::Mutex`.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, poisoned or not: a thread that panicked while holding it does not take every
/// later user down with it. The daemon's critical sections leave their data consistent when
/// they unwind (single map or counter updates; store transactions roll back).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
