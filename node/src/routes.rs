//! The routing index (entity, subject) -> customer, served from memory for the subjects events
//! arrive for, so an event's route costs no RocksDB read once its subject has been seen.
//!
//! The local meta replica stays the source: a miss reads it, and every apply that changes a
//! claim drops that subject (a snapshot install drops everything). A read that raced such a
//! change is not kept: a generation, bumped by every change, must be the same before the
//! read and at the insert. So the cache is never staler than the replica it stands for.

use std::collections::HashMap;
use std::sync::RwLock;

use custos_raft::{StateReader, StoreError};

/// Most subjects held; the cache is emptied when it is full (bounded memory, and a route costs
/// one read again, not a wrong answer).
const MAX_ROUTES: usize = 65_536;

/// The customer linking each subject, by entity, or `None` for a subject nobody links.
type Routes = HashMap<String, HashMap<String, Option<String>>>;

/// Routes by entity and subject, with the generation they were read at.
#[derive(Default)]
pub struct RouteCache {
    inner: RwLock<(u64, usize, Routes)>,
}

impl RouteCache {
    /// The customer linking `subject` at `entity`, from memory or else from `meta`.
    pub fn customer_for_subject(
        &self,
        meta: &StateReader,
        entity: &str,
        subject: &str,
    ) -> Result<Option<String>, StoreError> {
        let generation = {
            let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
            if let Some(found) = g.2.get(entity).and_then(|s| s.get(subject)) {
                return Ok(found.clone());
            }
            g.0
        };
        let customer = meta.customer_for_subject(entity, subject)?;
        self.insert_if_current(generation, entity, subject, customer.clone());
        Ok(customer)
    }

    fn insert_if_current(
        &self,
        generation: u64,
        entity: &str,
        subject: &str,
        customer: Option<String>,
    ) {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        // A claim changed while we read: what we read may be stale, so it is not kept.
        if g.0 != generation {
            return;
        }
        if g.1 >= MAX_ROUTES {
            g.2.clear();
            g.1 = 0;
        }
        let by_subject = g.2.entry(entity.to_owned()).or_default();
        if by_subject.insert(subject.to_owned(), customer).is_none() {
            g.1 += 1;
        }
    }

    /// Drops one subject's route (its claim changed), or every route (`None`: a snapshot
    /// replaced the state).
    pub fn invalidate(&self, subject: Option<(&str, &str)>) {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        g.0 += 1;
        match subject {
            Some((entity, subject)) => {
                let removed =
                    g.2.get_mut(entity)
                        .and_then(|s| s.remove(subject))
                        .is_some();
                if removed {
                    g.1 -= 1;
                }
            }
            None => {
                g.2.clear();
                g.1 = 0;
            }
        }
    }

    /// How many subjects are held.
    pub fn len(&self) -> usize {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).1
    }

    /// True when no subject is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(c: &RouteCache, entity: &str, subject: &str) -> Option<Option<String>> {
        let g = c.inner.read().unwrap_or_else(|p| p.into_inner());
        g.2.get(entity).and_then(|s| s.get(subject)).cloned()
    }

    #[test]
    fn a_change_drops_its_subject_and_a_read_that_raced_it_is_not_kept() {
        let c = RouteCache::default();
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
    fn a_full_cache_starts_again_instead_of_growing() {
        let c = RouteCache::default();
        for i in 0..MAX_ROUTES {
            c.insert_if_current(0, "airline", &format!("s{i}"), None);
        }
        assert_eq!(c.len(), MAX_ROUTES);
        c.insert_if_current(0, "airline", "one more", Some("c1".into()));
        assert_eq!(c.len(), 1);
        assert_eq!(held(&c, "airline", "one more"), Some(Some("c1".into())));
    }
}
