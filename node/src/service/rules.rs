//! Rules: saved through the customer's profile actor (validated against its links and the
//! entities' types), listed and deleted.

use custos_api::types::*;

use super::{check_id, unexpected, Vault};
use crate::error::ServiceError;
use crate::profile::{ProfileReply, ProfileRequest};

impl Vault {
    /// Validates and saves a rule.
    pub async fn create_rule(&self, customer: &str, spec: RuleSpec) -> Result<Rule, ServiceError> {
        check_id("customer id", customer)?;
        match self
            .profiles
            .send(customer, ProfileRequest::SaveRule(spec))
            .await?
        {
            ProfileReply::Saved(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// A customer's rules.
    pub async fn rules(&self, customer: &str) -> Result<Vec<Rule>, ServiceError> {
        check_id("customer id", customer)?;
        let owned = customer.to_owned();
        let (exists, rules) = self
            .read_customer(customer, move |r| {
                Ok((r.customer(&owned)?.is_some(), r.rules(&owned)?))
            })
            .await?;
        if !exists {
            return Err(ServiceError::not_found("customer", customer));
        }
        Ok(rules.iter().map(|r| r.to_wire()).collect())
    }

    /// One rule.
    pub async fn rule(&self, customer: &str, rule_id: &str) -> Result<Rule, ServiceError> {
        self.rules(customer)
            .await?
            .into_iter()
            .find(|r| r.id == rule_id)
            .ok_or_else(|| ServiceError::not_found("rule", rule_id))
    }

    /// Deletes a rule.
    pub async fn delete_rule(&self, customer: &str, rule_id: &str) -> Result<(), ServiceError> {
        check_id("customer id", customer)?;
        check_id("rule id", rule_id)?;
        match self
            .profiles
            .send(customer, ProfileRequest::DeleteRule(rule_id.to_owned()))
            .await?
        {
            ProfileReply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}
