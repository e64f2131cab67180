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
    inner: RwLock<Held>,
}

#[derive(Default)]
struct Held {
    /// Bumped by every change of a claim.
    generation: u64,
    by_entity: Routes,
}

impl Held {
    /// Subjects held (a sum over entities, which are few).
    fn len(&self) -> usize {
        self.by_entity.values().map(HashMap::len).sum()
    }

    fn get(&self, entity: &str, subject: &str) -> Option<&Option<String>> {
        self.by_entity.get(entity).and_then(|s| s.get(subject))
    }
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
            let held = self.inner.read().unwrap_or_else(|p| p.into_inner());
            if let Some(found) = held.get(entity, subject) {
                return Ok(found.clone());
            }
            held.generation
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
        let mut held = self.inner.write().unwrap_or_else(|p| p.into_inner());
        // A claim changed while we read: what we read may be stale, so it is not kept.
        if held.generation != generation {
            return;
        }
        if held.len() >= MAX_ROUTES {
            held.by_entity.clear();
        }
        held.by_entity
            .entry(entity.to_owned())
            .or_default()
            .insert(subject.to_owned(), customer);
    }

    /// Drops one subject's route (its claim changed), or every route (`None`: a snapshot
    /// replaced the state).
    pub fn invalidate(&self, subject: Option<(&str, &str)>) {
        let mut held = self.inner.write().unwrap_or_else(|p| p.into_inner());
        held.generation += 1;
        match subject {
            Some((entity, subject)) => {
                if let Some(s) = held.by_entity.get_mut(entity) {
                    s.remove(subject);
                }
            }
            None => held.by_entity.clear(),
        }
    }

    /// How many subjects are held.
    pub fn len(&self) -> usize {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).len()
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
        let held = c.inner.read().unwrap_or_else(|p| p.into_inner());
        held.get(entity, subject).cloned()
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
