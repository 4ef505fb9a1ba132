//! Poison-tolerant lock guards for the in-memory state (caches, the session pool, counters).
//!
//! A poisoned lock only means another thread panicked while holding it. Every structure guarded
//! this way is updated by single assignments or inserts, so it is never left half-written;
//! carrying on is safer than cascading the panic into every later request.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}
