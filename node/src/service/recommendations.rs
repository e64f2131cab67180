//! Recommendations: trained on the meta group's leader from every data group's aggregates
//! (each asked through its leader), stored in the meta group, served from the model and the
//! customer's own rules, links and engagement.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use custos_api::types::*;
use custos_api::ErrorCode;
use custos_raft::records::ModelRecord;
use custos_raft::{StateChange, META_GROUP};

use super::{check_id, Vault};
use crate::cluster::wire::{GroupAnswer, GroupQuery, TrainingInput};
use crate::core::Core;
use crate::error::ServiceError;
use crate::recommend::vault::Served;

/// The (customer, `source/type`) pairs received within the engagement window.
fn recent(engagements: Vec<(String, String, u64, i64)>) -> Vec<(String, String)> {
    let since = unix_now_ms() - crate::recommend::vault::ENGAGEMENT_RECENCY_MS;
    engagements
        .into_iter()
        .filter(|(_, _, count, last)| *count > 0 && *last >= since)
        .map(|(c, t, _, _)| (c, t))
        .collect()
}

/// Trains the recommender on every customer's rules and stores the model through Raft.
pub async fn train_recommender(core: &Core) -> Result<ModelSummary, ServiceError> {
    // One training at a time: an operator's `train` and the leader's own schedule would
    // otherwise both number their model after the one stored, and the later got 409 ("a newer
    // model is already stored"). The second waits, then trains on what is there then.
    static TRAINING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one = TRAINING.lock().await;
    let mut all = TrainingInput::default();
    let groups = core.data_groups()?;
    // Each group keeps its share of the cap (customers are spread evenly over the groups).
    let max_customers = core
        .config
        .recommend_max_customers
        .div_ceil(groups.len().max(1) as u32);
    for group in groups {
        let answer =
            crate::peer::ask_group(core, group, GroupQuery::TrainingInput { max_customers })
                .await
                .map_err(|e| {
                    ServiceError::refused(ErrorCode::Unavailable, format!("group {group}: {e}"))
                })?;
        let GroupAnswer::TrainingInput(part) = answer else {
            return Err(ServiceError::refused(
                ErrorCode::Unavailable,
                format!("group {group} could not answer"),
            ));
        };
        all.rules.extend(part.rules);
        all.links.extend(part.links);
        all.engagements.extend(part.engagements);
        for (t, n) in part.dismissals {
            *all.dismissals.entry(t).or_insert(0) += n;
        }
    }
    let current = core.read_meta(|r| r.model()).await?;
    let received = recent(all.engagements);
    let version = current.as_ref().map(|m| m.version).unwrap_or(0) + 1;
    let (beta, k) = (
        core.config.recommend_beta,
        core.config.recommend_min_customers,
    );
    let now = unix_now_ms();
    let (rules, links, dismissals) = (all.rules, all.links, all.dismissals);
    // Training is CPU work on counts: keep it off the event loops.
    let model = tokio::task::spawn_blocking(move || {
        let population = crate::recommend::vault::Population {
            rules,
            links,
            received,
            dismissals,
        };
        crate::recommend::vault::train(population, version, now, beta, k)
    })
    .await
    .map_err(|e| ServiceError::Internal(e.to_string()))?;
    // A young vault is retrained every few minutes: when nothing changed, nothing is written
    // (no Raft entry, no new version), unless the model is due by age.
    if let Some(cur) = current.filter(|cur| {
        same_content(cur, &model)
            && ((now - cur.trained_ms) as f64) < core.config.recommend_interval_secs * 1000.0
    }) {
        return Ok(summary_of(&cur));
    }
    let summary = summary_of(&model);
    core.propose(META_GROUP, StateChange::PutModel(Box::new(model)))
        .await?;
    Ok(summary)
}

fn summary_of(model: &ModelRecord) -> ModelSummary {
    ModelSummary {
        version: model.version,
        trained_at: rfc3339_ms(model.trained_ms),
        customers: model.customers,
        templates: model.templates.len() as u32,
        pairs: model.pairs.len() as u32,
        min_support: model.min_support,
    }
}

/// Two models that would serve the same recommendations (version and time aside).
fn same_content(a: &ModelRecord, b: &ModelRecord) -> bool {
    a.customers == b.customers
        && a.beta == b.beta
        && a.min_support == b.min_support
        && a.templates == b.templates
        && a.pairs == b.pairs
        && a.ranker == b.ranker
}

impl Vault {
    /// Trains the recommender now.
    pub async fn train_recommender(&self) -> Result<ModelSummary, ServiceError> {
        train_recommender(&self.core).await
    }

    /// A customer's recommendations, at or above the configured confidence.
    pub async fn recommendations(
        &self,
        customer: &str,
    ) -> Result<RecommendationList, ServiceError> {
        check_id("customer id", customer)?;
        let owned = customer.to_owned();
        let (exists, rules, links, engagements, dismissed) = self
            .read_customer(customer, move |r| {
                Ok((
                    r.customer(&owned)?.is_some(),
                    r.rules(&owned)?,
                    r.links(&owned)?,
                    r.engagements(Some(&owned))?,
                    r.dismissed(&owned)?,
                ))
            })
            .await?;
        if !exists {
            return Err(ServiceError::not_found("customer", customer));
        }
        let received: Vec<String> = recent(engagements).into_iter().map(|(_, t)| t).collect();
        let linked: Vec<String> = links.into_iter().map(|l| l.entity_id).collect();
        let threshold = self.core.config.recommend_threshold;
        let Some(served) = self.served_model().await? else {
            return Ok(RecommendationList {
                model_version: None,
                threshold,
                items: Vec::new(),
            });
        };
        let dismissed: std::collections::HashSet<String> = dismissed.into_iter().collect();
        // Entities the customer could link to use a recommended rule: those the model names
        // that are registered and delivering (from the entity cache, not a scan per request).
        let mut linkable = std::collections::HashSet::new();
        for id in served.entities() {
            if linked.iter().any(|l| l == id) {
                continue;
            }
            if self
                .core
                .entity(id)
                .await?
                .is_some_and(|e| e.record.endpoint_enabled)
            {
                linkable.insert(id.to_owned());
            }
        }
        Ok(RecommendationList {
            model_version: Some(served.record.version),
            threshold,
            items: served.recommend(&rules, &linked, &linkable, &received, &dismissed, threshold),
        })
    }

    /// The model as served from memory. It is read from the meta group's replica (and its maps
    /// built, off the event loop) only when the replica may hold another model since the last
    /// read (`model_epoch`), not on every request: at a million customers it is megabytes.
    /// None when there is none, or when it was trained with a smaller k than this node's
    /// (raised since): what fewer customers share is in it, so nothing is served from it until
    /// it is retrained.
    async fn served_model(&self) -> Result<Option<Arc<Served>>, ServiceError> {
        let epoch = self.core.wake.model_epoch.load(Ordering::SeqCst);
        let cached = self
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some((at, served)) = &cached {
            if *at == epoch {
                return Ok(served.clone());
            }
        }
        let min_support = self.core.config.recommend_min_customers;
        let model = self
            .core
            .read_meta(|r| r.model())
            .await?
            .filter(|m| m.min_support >= min_support);
        let served = match (model, cached.and_then(|(_, s)| s)) {
            (None, _) => None,
            (Some(m), Some(s)) if s.record.version == m.version => Some(s),
            (Some(m), _) => Some(Arc::new(
                tokio::task::spawn_blocking(move || Served::new(m))
                    .await
                    .map_err(|e| ServiceError::Internal(format!("building the model: {e}")))?,
            )),
        };
        // Read after the epoch was taken: a model stored meanwhile is read again next time.
        *self.served.lock().unwrap_or_else(|p| p.into_inner()) = Some((epoch, served.clone()));
        Ok(served)
    }

    /// The recommendation `rec_id` as this customer is offered it now (404 otherwise: an id
    /// names the rule shown, so one from before a retraining that changed it is not found).
    async fn offered(&self, customer: &str, rec_id: &str) -> Result<Recommendation, ServiceError> {
        self.recommendations(customer)
            .await?
            .items
            .into_iter()
            .find(|r| r.id == rec_id)
            .ok_or_else(|| ServiceError::not_found("recommendation", rec_id))
    }

    /// Accepts a recommendation: its rule is created and validated like any rule.
    pub async fn accept_recommendation(
        &self,
        customer: &str,
        rec_id: &str,
    ) -> Result<Rule, ServiceError> {
        let rec = self.offered(customer, rec_id).await?;
        if let Some(missing) = rec.needs_link {
            return Err(ServiceError::refused(
                ErrorCode::EntityNotLinked,
                format!(
                    "this rule needs {missing}: link it first (the portal does both in one step)"
                ),
            ));
        }
        self.create_rule(customer, rec.rule).await
    }

    /// Starts linking the entity a recommendation needs, carrying its rule: once the customer
    /// is back from the entity's sign-in and the link is made, the rule is created.
    pub async fn link_then_accept(
        &self,
        customer: &str,
        rec_id: &str,
    ) -> Result<AuthorizeLink, ServiceError> {
        let rec = self.offered(customer, rec_id).await?;
        let Some(missing) = rec.needs_link else {
            return Err(ServiceError::refused(
                ErrorCode::Conflict,
                "both companies are linked already: add the rule",
            ));
        };
        let rule =
            serde_json::to_string(&rec.rule).map_err(|e| ServiceError::Internal(e.to_string()))?;
        self.begin_oauth_link(customer, &missing, true, Some(rule))
            .await
    }

    /// Dismisses a recommendation; it is not shown again.
    pub async fn dismiss_recommendation(
        &self,
        customer: &str,
        rec_id: &str,
    ) -> Result<(), ServiceError> {
        check_id("customer id", customer)?;
        // Only what this customer is offered: a dismissal lowers a template's confidence for
        // everyone once k customers made one, so dismissals of rules never shown (made by
        // accounts that are free to open) must not count.
        self.offered(customer, rec_id).await?;
        let template = crate::recommend::vault::decode_id(rec_id)
            .filter(|t| t.len() <= 4 * custos_api::limits::MAX_ID_LEN + 3)
            .ok_or_else(|| ServiceError::not_found("recommendation", rec_id))?;
        self.core
            .propose(
                self.group_of(customer)?,
                StateChange::Dismiss {
                    customer_id: customer.to_owned(),
                    template,
                },
            )
            .await?;
        Ok(())
    }
}
