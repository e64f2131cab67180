//! Answers read from a local replica, kept in memory until an apply changes them: the routing
//! index's (entity, subject) -> customer for the subjects events arrive for, and whether a
//! customer links an entity, which every delivery attempt asks.
//!
//! The replica stays the source: a miss reads it, and every apply that changes an answer drops
//! it (a snapshot install drops everything), before the apply's outcome is returned. A read
//! that raced such a change is not kept: a generation, bumped by every change, must be the
//! same before the read and at the insert. So the cache is never staler than the replica it
//! stands for.

use std::collections::HashMap;
use std::sync::RwLock;

/// Answers by two keys (an outer one with few values, e.g. an entity, and an inner one), with
/// the generation they were read at. Bounded: emptied when full (an answer then costs one read
/// again, never a wrong answer).
pub struct ReadCache<V> {
    inner: RwLock<Held<V>>,
    capacity: usize,
}

struct Held<V> {
    /// Bumped by every change.
    generation: u64,
    by_outer: HashMap<String, HashMap<String, V>>,
    /// Answers held (kept, since the outer map is not always small).
    len: usize,
}

impl<V: Clone> ReadCache<V> {
    /// An empty cache holding at most `capacity` answers.
    pub fn new(capacity: usize) -> Self {
        ReadCache {
            inner: RwLock::new(Held {
                generation: 0,
                by_outer: HashMap::new(),
                len: 0,
            }),
            capacity,
        }
    }

    fn held(&self) -> std::sync::RwLockReadGuard<'_, Held<V>> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn held_mut(&self) -> std::sync::RwLockWriteGuard<'_, Held<V>> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The answer for (`outer`, `inner`), from memory or else from `read` (the replica).
    pub fn get_or_read<E>(
        &self,
        outer: &str,
        inner: &str,
        read: impl FnOnce() -> Result<V, E>,
    ) -> Result<V, E> {
        self.get_or_read_keeping(outer, inner, read, |_| true)
    }

    /// As [`Self::get_or_read`], keeping an answer read only when `keep` says so (e.g. only
    /// answers whose number is bounded by real data, where keys come from unchecked input).
    pub fn get_or_read_keeping<E>(
        &self,
        outer: &str,
        inner: &str,
        read: impl FnOnce() -> Result<V, E>,
        keep: impl FnOnce(&V) -> bool,
    ) -> Result<V, E> {
        let generation = {
            let held = self.held();
            if let Some(found) = held.by_outer.get(outer).and_then(|m| m.get(inner)) {
                return Ok(found.clone());
            }
            held.generation
        };
        let value = read()?;
        if keep(&value) {
            self.insert_if_current(generation, outer, inner, value.clone());
        }
        Ok(value)
    }

    fn insert_if_current(&self, generation: u64, outer: &str, inner: &str, value: V) {
        let mut held = self.held_mut();
        // An answer changed while we read: what we read may be stale, so it is not kept.
        if held.generation != generation {
            return;
        }
        let held_already = held
            .by_outer
            .get(outer)
            .is_some_and(|m| m.contains_key(inner));
        if !held_already && held.len >= self.capacity {
            held.by_outer.clear();
            held.len = 0;
        }
        let added = held
            .by_outer
            .entry(outer.to_owned())
            .or_default()
            .insert(inner.to_owned(), value)
            .is_none();
        held.len += usize::from(added);
    }

    /// Drops one answer (it changed), or every answer (`None`: e.g. a snapshot replaced the
    /// state).
    pub fn invalidate(&self, key: Option<(&str, &str)>) {
        let mut held = self.held_mut();
        held.generation += 1;
        match key {
            Some((outer, inner)) => {
                let removed = held
                    .by_outer
                    .get_mut(outer)
                    .and_then(|m| m.remove(inner))
                    .is_some();
                held.len -= usize::from(removed);
                if held.by_outer.get(outer).is_some_and(HashMap::is_empty) {
                    held.by_outer.remove(outer);
                }
            }
            None => {
                held.by_outer.clear();
                held.len = 0;
            }
        }
    }

    /// How many answers are held.
    pub fn len(&self) -> usize {
        self.held().len
    }

    /// True when no answer is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(c: &ReadCache<Option<String>>, outer: &str, inner: &str) -> Option<Option<String>> {
        c.held()
            .by_outer
            .get(outer)
            .and_then(|m| m.get(inner))
            .cloned()
    }

    #[test]
    fn a_change_drops_its_answer_and_a_read_that_raced_it_is_not_kept() {
        let c = ReadCache::new(16);
        c.insert_if_current(0, "airline", "ff", Some("c1".into()));
        c.insert_if_current(0, "airline", "nobody", None);
        assert_eq!(held(&c, "airline", "ff"), Some(Some("c1".into())));
        assert_eq!(
            held(&c, "airline", "nobody"),
            Some(None),
            "misses are held too"
        );
        assert_eq!(c.len(), 2);
        c.invalidate(Some(("airline", "ff")));
        assert_eq!(held(&c, "airline", "ff"), None);
        assert_eq!(c.len(), 1);
        // Read at generation 0, before the change above: stale, not kept.
        c.insert_if_current(0, "airline", "ff", Some("c1".into()));
        assert_eq!(held(&c, "airline", "ff"), None);
        c.insert_if_current(1, "airline", "ff", Some("c2".into()));
        assert_eq!(held(&c, "airline", "ff"), Some(Some("c2".into())));
        c.invalidate(None);
        assert!(c.is_empty());
        assert_eq!(held(&c, "airline", "nobody"), None);
    }

    #[test]
    fn an_answer_is_read_once_until_it_changes() {
        let c: ReadCache<bool> = ReadCache::new(16);
        let reads = std::cell::Cell::new(0);
        let read = |v: bool| {
            reads.set(reads.get() + 1);
            Ok::<_, ()>(v)
        };
        assert_eq!(c.get_or_read("c1", "hotel", || read(true)), Ok(true));
        assert_eq!(c.get_or_read("c1", "hotel", || read(false)), Ok(true));
        assert_eq!(reads.get(), 1);
        // A failed read is not kept.
        assert_eq!(c.get_or_read("c1", "car", || Err(())), Err(()));
        assert_eq!(c.len(), 1);
        c.invalidate(Some(("c1", "hotel")));
        assert_eq!(c.get_or_read("c1", "hotel", || read(false)), Ok(false));
        assert_eq!(reads.get(), 2);
        // Dropping an answer that is not held changes nothing but the generation.
        c.invalidate(Some(("c2", "hotel")));
        assert_eq!(c.len(), 1);
        // An answer `keep` refuses is read every time.
        for _ in 0..2 {
            assert_eq!(
                c.get_or_read_keeping("c3", "hotel", || read(false), |v| *v),
                Ok(false)
            );
        }
        assert_eq!(reads.get(), 4);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn a_full_cache_starts_again_instead_of_growing() {
        let c = ReadCache::new(100);
        for i in 0..100 {
            c.insert_if_current(0, "airline", &format!("s{i}"), None);
        }
        assert_eq!(c.len(), 100);
        c.insert_if_current(0, "airline", "s7", Some("c7".into()));
        assert_eq!(c.len(), 100, "a key held already is replaced, not added");
        c.insert_if_current(0, "airline", "one more", Some("c1".into()));
        assert_eq!(c.len(), 1);
        assert_eq!(held(&c, "airline", "one more"), Some(Some("c1".into())));
    }
}
