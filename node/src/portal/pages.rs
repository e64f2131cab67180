//! The portal's pages: server-rendered HTML (maud), no script, every page its own URL.

use custos_api::types::{
    ActivityItem, ActivityKind, Customer, DeliveryStatus, Entity, EventStatus, RecommendationList,
    Rule, TryOutcome,
};
use maud::{html, Markup, DOCTYPE};

/// A message shown once at the top of the next page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flash {
    /// Something worked.
    Ok(String),
    /// Something was refused.
    Error(String),
}

/// Which section the page belongs to (marked in the navigation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// Signed out pages.
    Account,
    /// Overview and recommendations.
    Home,
    /// Entity catalog and links.
    Catalog,
    /// Rules.
    Rules,
    /// Activity.
    Activity,
    /// Export and deletion.
    Data,
}

/// What every signed-in page needs.
#[derive(Debug, Clone)]
pub struct Chrome<'a> {
    /// The account's email, when signed in.
    pub email: Option<&'a str>,
    /// The CSRF token for this page's forms.
    pub csrf: &'a str,
    /// The section.
    pub section: Section,
    /// A one-time message.
    pub flash: Option<Flash>,
}

/// "flight.delayed" -> "Flight delayed".
pub fn plain(type_name: &str) -> String {
    let words = type_name.replace(['.', '_', '-'], " ");
    let mut c = words.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

fn csrf_field(csrf: &str) -> Markup {
    html! { input type="hidden" name="csrf" value=(csrf); }
}

/// The page frame: header, navigation, flash, content.
pub fn layout(title: &str, chrome: &Chrome<'_>, content: Markup) -> Markup {
    let nav = [
        (Section::Home, "/portal", "Overview"),
        (Section::Catalog, "/portal/catalog", "Companies"),
        (Section::Rules, "/portal/rules", "Rules"),
        (Section::Activity, "/portal/activity", "Activity"),
        (Section::Data, "/portal/data", "Your data"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Custos" }
                link rel="stylesheet" href="/portal/static/portal.css";
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header {
                    a.brand href="/portal" { "Custos" }
                    @if let Some(email) = chrome.email {
                        nav aria-label="Main" {
                            ul {
                                @for (section, href, label) in nav {
                                    li {
                                        @if section == chrome.section {
                                            a href=(href) aria-current="page" { (label) }
                                        } @else {
                                            a href=(href) { (label) }
                                        }
                                    }
                                }
                            }
                        }
                        form.inline method="post" action="/portal/signout" {
                            (csrf_field(chrome.csrf))
                            button.secondary type="submit" { "Sign out " span.hint { "(" (email) ")" } }
                        }
                    }
                }
                main id="main" {
                    @match &chrome.flash {
                        Some(Flash::Ok(m)) => { p.flash.ok role="status" { (m) } }
                        Some(Flash::Error(m)) => { p.flash.error role="alert" { (m) } }
                        None => {}
                    }
                    (content)
                }
            }
        }
    }
}

/// Sign in or sign up.
pub fn account_form(signup: bool, csrf: &str, email: &str) -> Markup {
    let (action, heading, button, other) = if signup {
        (
            "/portal/signup",
            "Create your vault",
            "Create account",
            html! { "Already have an account? " a href="/portal/signin" { "Sign in" } },
        )
    } else {
        (
            "/portal/signin",
            "Sign in to your vault",
            "Sign in",
            html! { "New here? " a href="/portal/signup" { "Create an account" } },
        )
    };
    html! {
        h1 { (heading) }
        p { "Custos keeps the companies you trust connected on your terms: they act for you only on the rules you keep." }
        form method="post" action=(action) {
            (csrf_field(csrf))
            label for="email" { "Email" }
            input id="email" name="email" type="email" autocomplete="email" required value=(email);
            label for="password" { "Password" }
            input id="password" name="password" type="password" required minlength="10"
                autocomplete=(if signup { "new-password" } else { "current-password" });
            @if signup { p.hint { "At least 10 characters." } }
            button type="submit" { (button) }
        }
        p { (other) }
    }
}

fn entity_name<'a>(entities: &'a [Entity], id: &'a str) -> &'a str {
    entities
        .iter()
        .find(|e| e.id == id)
        .map(|e| e.name.as_str())
        .unwrap_or(id)
}

/// Overview: linked companies, rules count, recommendations.
pub fn home(
    customer: &Customer,
    entities: &[Entity],
    rules: &[Rule],
    recs: &RecommendationList,
    csrf: &str,
) -> Markup {
    html! {
        h1 { "Your vault" }
        h2 { "Linked companies" }
        @if customer.links.is_empty() {
            p { "No company is linked yet. " a href="/portal/catalog" { "Pick the companies you trust" } "." }
        } @else {
            ul {
                @for l in &customer.links {
                    li { (entity_name(entities, &l.entity_id)) span.hint { " since " (l.linked_at) } }
                }
            }
        }
        p { (rules.len()) " rule" @if rules.len() != 1 { "s" } " active. " a href="/portal/rules" { "Manage rules" } }
        section aria-labelledby="recs" {
            h2 id="recs" { "Recommended for you" }
            @if recs.items.is_empty() {
                p.hint { "Nothing to recommend yet: recommendations appear once enough customers with links like yours keep a rule (the vault never shows a pattern fewer than its minimum number of customers share)." }
            } @else {
                ul.cards {
                    @for r in &recs.items {
                        li {
                            h3 { (plain(&r.template.event_type)) " → " (plain(&r.template.command_type)) }
                            p { "When " (entity_name(entities, &r.template.when_entity)) " sends “" (plain(&r.template.event_type)) "”, ask "
                                (entity_name(entities, &r.template.then_entity)) " to “" (plain(&r.template.command_type)) "”." }
                            p.hint { (r.reason) }
                            // What accepting creates, in full: the condition and the data the
                            // command carries decide what of the customer's data is sent.
                            @if let Some(condition) = &r.rule.when.condition {
                                p { "Only when " code { (condition) } }
                            }
                            @if r.rule.then.data.as_object().is_some_and(|d| !d.is_empty()) {
                                p { "Sends " code { (r.rule.then.data.to_string()) } }
                            }
                            p { "Confidence " strong { (format!("{:.0}%", r.confidence * 100.0)) } }
                            @if let Some(missing) = &r.needs_link {
                                @if entities.iter().any(|e| &e.id == missing && e.oauth.is_some()) {
                                    p { "Needs " (entity_name(entities, missing)) " linked: you sign in there, then the rule is added." }
                                    form.inline method="post" action=(format!("/portal/recommendations/{}/link", r.id)) {
                                        (csrf_field(csrf)) button type="submit" { "Link " (entity_name(entities, missing)) " and add this rule" }
                                    }
                                } @else {
                                    // As in the catalog: without a sign-in there, only an
                                    // operator links it (a button would only fail).
                                    p { "Needs " (entity_name(entities, missing)) " linked, which links through your operator only; add the rule once it is linked." }
                                }
                            } @else {
                                form.inline method="post" action=(format!("/portal/recommendations/{}/accept", r.id)) {
                                    (csrf_field(csrf)) button type="submit" { "Add this rule" }
                                }
                            }
                            form.inline method="post" action=(format!("/portal/recommendations/{}/dismiss", r.id)) {
                                (csrf_field(csrf)) button.secondary type="submit" { "Not for me" }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The entity catalog, with link and unlink.
pub fn catalog(entities: &[Entity], customer: &Customer, query: &str, csrf: &str) -> Markup {
    let q = query.to_lowercase();
    let shown: Vec<&Entity> = entities
        .iter()
        .filter(|e| {
            q.is_empty()
                || e.name.to_lowercase().contains(&q)
                || e.id.to_lowercase().contains(&q)
                || e.event_types.iter().any(|t| t.type_name.contains(&q))
                || e.command_types.iter().any(|t| t.type_name.contains(&q))
        })
        .collect();
    html! {
        h1 { "Companies" }
        form method="get" action="/portal/catalog" role="search" {
            label for="q" { "Search companies" }
            input id="q" name="q" type="search" value=(query);
            button type="submit" { "Search" }
        }
        @if shown.is_empty() { p { "No company matches." } }
        ul.cards {
            @for e in shown {
                @let link = customer.links.iter().find(|l| l.entity_id == e.id);
                li {
                    h3 { (e.name) }
                    @if let Some(l) = link {
                        p { span.badge.ok { "Linked" } " as " code { (l.subject) } }
                    }
                    p { strong { "Tells the vault when: " } }
                    ul { @for t in &e.event_types { li { (plain(&t.type_name)) } } }
                    p { strong { "Can do for you: " } }
                    ul { @for t in &e.command_types { li { (plain(&t.type_name)) } } }
                    @if link.is_some() {
                        form.inline method="post" action=(format!("/portal/unlink/{}", e.id)) {
                            (csrf_field(csrf))
                            button.danger type="submit" aria-label=(format!("Unlink {}", e.name)) { "Unlink" }
                        }
                    } @else if e.oauth.is_some() {
                        form.inline method="post" action=(format!("/portal/link/{}", e.id)) {
                            (csrf_field(csrf))
                            button type="submit" aria-label=(format!("Link {}", e.name)) { "Link" }
                        }
                        p.hint { "You sign in at " (e.name) " itself; the vault never sees your password there." }
                    } @else {
                        p.hint { "Links through your operator only." }
                    }
                }
            }
        }
    }
}

/// The rule builder's current values.
#[derive(Debug, Clone, Default)]
pub struct RuleForm {
    /// Rule name.
    pub name: String,
    /// `entity|event_type`.
    pub trigger: String,
    /// CEL condition.
    pub condition: String,
    /// `entity|command_type`.
    pub target: String,
    /// (field, CEL expression) rows.
    pub mapping: Vec<(String, String)>,
    /// Past event to try on.
    pub event_id: String,
    /// Sample data to try on (JSON).
    pub sample: String,
}

/// Rows in the mapping table.
pub const MAPPING_ROWS: usize = 5;

/// Rules: the list and the builder.
pub fn rules(
    rules: &[Rule],
    entities: &[Entity],
    customer: &Customer,
    recent_events: &[(String, String)],
    form: &RuleForm,
    tried: Option<&TryOutcome>,
    csrf: &str,
) -> Markup {
    let linked: Vec<&Entity> = entities
        .iter()
        .filter(|e| customer.links.iter().any(|l| l.entity_id == e.id))
        .collect();
    let mut rows = form.mapping.clone();
    rows.resize(MAPPING_ROWS.max(rows.len()), (String::new(), String::new()));
    html! {
        h1 { "Rules" }
        @if rules.is_empty() { p { "No rules yet." } }
        ul.cards {
            @for r in rules {
                li {
                    h3 { (r.name) }
                    p { "When " (entity_name(entities, &r.when.entity)) " sends “" (plain(&r.when.event_type)) "”"
                        @if let Some(c) = &r.when.condition { " and " code { (c) } }
                        ", ask " (entity_name(entities, &r.then.entity)) " to “" (plain(&r.then.command_type)) "”." }
                    details { summary { "Data sent" } pre { (serde_json::to_string_pretty(&r.then.data).unwrap_or_default()) } }
                    form.inline method="post" action=(format!("/portal/rules/{}/delete", r.id)) {
                        (csrf_field(csrf))
                        button.danger type="submit" aria-label=(format!("Delete rule {}", r.name)) { "Delete" }
                    }
                }
            }
        }
        h2 id="new-rule" { "New rule" }
        @if linked.len() < 2 {
            p { "A rule connects two linked companies. " a href="/portal/catalog" { "Link companies" } " first." }
        } @else {
            form method="post" action="/portal/rules#try-result" aria-labelledby="new-rule" {
                (csrf_field(csrf))
                label for="name" { "Name" }
                input id="name" name="name" required maxlength="200" value=(form.name);
                label for="trigger" { "When this happens" }
                select id="trigger" name="trigger" required {
                    @for e in &linked { @for t in &e.event_types {
                        @let v = format!("{}|{}", e.id, t.type_name);
                        option value=(v) selected[v == form.trigger] { (e.name) ": " (plain(&t.type_name)) }
                    } }
                }
                label for="condition" { "Only if (optional)" }
                input id="condition" name="condition" value=(form.condition) placeholder="data.delay_minutes > 60";
                p.hint { "A CEL expression over the event: " code { "data" } ", " code { "type" } ", " code { "time" } ", " code { "subject" } "." }
                label for="target" { "Then ask" }
                select id="target" name="target" required {
                    @for e in &linked { @for t in &e.command_types {
                        @let v = format!("{}|{}", e.id, t.type_name);
                        option value=(v) selected[v == form.target] { (e.name) ": " (plain(&t.type_name)) }
                    } }
                }
                fieldset {
                    legend { "Data to send" }
                    p.hint { "Each field's value is a CEL expression, e.g. " code { "data.new_arrival" } " or " code { "'late by ' + string(data.delay_minutes)" } "." }
                    @for (i, (k, v)) in rows.iter().enumerate() {
                        div.maprow {
                            div {
                                label for=(format!("map_key_{i}")) { "Field " (i + 1) }
                                input id=(format!("map_key_{i}")) name=(format!("map_key_{i}")) value=(k);
                            }
                            div {
                                label for=(format!("map_expr_{i}")) { "Value " (i + 1) " (CEL)" }
                                input id=(format!("map_expr_{i}")) name=(format!("map_expr_{i}")) value=(v);
                            }
                        }
                    }
                }
                fieldset {
                    legend { "Try it on" }
                    label for="event_id" { "A past event" }
                    select id="event_id" name="event_id" {
                        option value="" { "— use the sample below —" }
                        @for (id, label) in recent_events {
                            option value=(id) selected[*id == form.event_id] { (label) }
                        }
                    }
                    label for="sample" { "Or sample event data (JSON)" }
                    textarea id="sample" name="sample" { (form.sample) }
                }
                button type="submit" name="action" value="try" class="secondary" { "Try it" }
                button type="submit" name="action" value="save" { "Save rule" }
            }
        }
        @if let Some(t) = tried {
            section aria-labelledby="try-result" {
                h2 id="try-result" { "Try it: result" }
                @if t.matched {
                    p { span.badge.ok { "Matches" } " Nothing was sent. This is the command the rule would send:" }
                    pre id="try-command" { (t.command.as_ref().and_then(|c| serde_json::to_string_pretty(c).ok()).unwrap_or_default()) }
                } @else {
                    p { span.badge.bad { "No command" } " " (t.reason.clone().unwrap_or_default()) }
                }
                details { summary { "The event it ran on" } pre { (serde_json::to_string_pretty(&t.event).unwrap_or_default()) } }
            }
        }
    }
}

/// Activity filters.
#[derive(Debug, Clone, Default)]
pub struct ActivityFilter {
    /// `events`, `commands`, `deliveries`, `changes` or empty for all.
    pub kind: String,
    /// Entity id or empty.
    pub entity: String,
}

impl ActivityFilter {
    /// Whether an item passes.
    pub fn keeps(
        &self,
        item: &ActivityItem,
        command_target: impl Fn(&str) -> Option<String>,
    ) -> bool {
        let (kind, entity) = match &item.kind {
            ActivityKind::EventReceived { source, .. } => ("events", Some(source.clone())),
            ActivityKind::RuleMatched { target, .. } => ("commands", Some(target.clone())),
            ActivityKind::RuleFailed { .. } => ("commands", None),
            ActivityKind::DeliveryAttempt { command_id, .. }
            | ActivityKind::DeliveryChanged { command_id, .. } => {
                ("deliveries", command_target(command_id))
            }
            ActivityKind::Linked { entity_id } | ActivityKind::Unlinked { entity_id } => {
                ("changes", Some(entity_id.clone()))
            }
            ActivityKind::RuleSaved { .. } | ActivityKind::RuleDeleted { .. } => ("changes", None),
        };
        (self.kind.is_empty() || self.kind == kind)
            && (self.entity.is_empty() || entity.as_deref() == Some(self.entity.as_str()))
    }
}

/// The lines of one page of activity that pass the filter, each with whether it carries a
/// Retry button: the newest line of a delivery whose newest state is failed or waiting for a
/// retry, and only on the newest page (an older page may not hold a delivery's latest state).
pub fn timeline(
    items: Vec<ActivityItem>,
    filter: &ActivityFilter,
    newest_page: bool,
) -> Vec<(ActivityItem, bool)> {
    let mut targets = std::collections::HashMap::new();
    let mut latest = std::collections::HashMap::new();
    for i in &items {
        match &i.kind {
            ActivityKind::RuleMatched {
                command_id, target, ..
            } => {
                targets.insert(command_id.clone(), target.clone());
            }
            ActivityKind::DeliveryAttempt {
                command_id, status, ..
            }
            | ActivityKind::DeliveryChanged {
                command_id, status, ..
            } => {
                // Newest first: the first state seen is the latest.
                latest.entry(command_id.clone()).or_insert(*status);
            }
            _ => {}
        }
    }
    let mut first_seen = std::collections::HashSet::new();
    items
        .into_iter()
        .filter(|i| filter.keeps(i, |c| targets.get(c).cloned()))
        .map(|i| {
            let retryable = match &i.kind {
                ActivityKind::DeliveryAttempt { command_id, .. }
                | ActivityKind::DeliveryChanged { command_id, .. } => {
                    newest_page
                        && first_seen.insert(command_id.clone())
                        && matches!(
                            latest.get(command_id),
                            Some(DeliveryStatus::Failed | DeliveryStatus::Pending)
                        )
                }
                _ => false,
            };
            (i, retryable)
        })
        .collect()
}

fn delivery_badge(s: &DeliveryStatus) -> Markup {
    match s {
        DeliveryStatus::Delivered => html! { span.badge.ok { "delivered" } },
        DeliveryStatus::Pending => html! { span.badge.wait { "will retry" } },
        DeliveryStatus::Failed => html! { span.badge.bad { "failed" } },
        DeliveryStatus::Cancelled => html! { span.badge.bad { "cancelled" } },
    }
}

/// The activity timeline.
pub fn activity(
    items: &[(ActivityItem, bool)],
    entities: &[Entity],
    rules: &[Rule],
    filter: &ActivityFilter,
    older: Option<&str>,
    csrf: &str,
) -> Markup {
    let kinds = [
        ("", "Everything"),
        ("events", "Events received"),
        ("commands", "Rules matched"),
        ("deliveries", "Deliveries"),
        ("changes", "Links and rules"),
    ];
    html! {
        h1 { "Activity" }
        form method="get" action="/portal/activity" {
            label for="kind" { "Show" }
            select id="kind" name="kind" {
                @for (v, l) in kinds { option value=(v) selected[v == filter.kind] { (l) } }
            }
            label for="entity" { "Company" }
            select id="entity" name="entity" {
                option value="" { "All companies" }
                @for e in entities { option value=(e.id) selected[e.id == filter.entity] { (e.name) } }
            }
            button type="submit" { "Filter" }
        }
        @if items.is_empty() { p { "Nothing yet." } }
        ol.timeline {
            @for (item, retryable) in items {
                li {
                    time datetime=(item.at) { (item.at) }
                    @match &item.kind {
                        ActivityKind::EventReceived { event_id, source, event_type, status, reason } => {
                            (entity_name(entities, source)) " sent “" (plain(event_type)) "” "
                            @match status {
                                EventStatus::Accepted => { span.badge.ok { "accepted" } }
                                EventStatus::Ignored => { span.badge.wait { "ignored" } }
                                EventStatus::Duplicate => { span.badge.wait { "duplicate" } }
                            }
                            @if let Some(r) = reason { " — " (r) }
                            span.hint { " (event " code { (event_id) } ")" }
                        }
                        ActivityKind::RuleMatched { rule_id, command_id, target, command_type, .. } => {
                            @match rules.iter().find(|r| &r.id == rule_id) {
                                Some(r) => { "Rule “" (r.name) "”" }
                                None => { "Rule " code { (rule_id) } }
                            }
                            " matched: asked " (entity_name(entities, target)) " to “" (plain(command_type)) "”"
                            span.hint { " (command " code { (command_id) } ")" }
                        }
                        ActivityKind::RuleFailed { rule_id, event_id, reason } => {
                            @match rules.iter().find(|r| &r.id == rule_id) {
                                Some(r) => { "Rule “" (r.name) "”" }
                                None => { "Rule " code { (rule_id) } }
                            }
                            " could not run: " (reason) " " span.badge.bad { "error" }
                            span.hint { " (event " code { (event_id) } ")" }
                        }
                        ActivityKind::DeliveryAttempt { command_id, attempt, status_code, error, status } => {
                            "Delivery attempt " (attempt) " of " code { (command_id) } ": "
                            @if let Some(c) = status_code { "HTTP " (c) " " }
                            @if let Some(e) = error { (e) " " }
                            (delivery_badge(status))
                        }
                        ActivityKind::DeliveryChanged { command_id, status, reason } => {
                            "Delivery of " code { (command_id) } " " (delivery_badge(status)) " — " (reason)
                        }
                        ActivityKind::Linked { entity_id } => { "Linked " (entity_name(entities, entity_id)) }
                        ActivityKind::Unlinked { entity_id } => { "Unlinked " (entity_name(entities, entity_id)) }
                        ActivityKind::RuleSaved { rule_id } => {
                            @match rules.iter().find(|r| &r.id == rule_id) {
                                Some(r) => { "Saved rule “" (r.name) "”" }
                                None => { "Saved rule " code { (rule_id) } }
                            }
                        }
                        ActivityKind::RuleDeleted { rule_id } => { "Deleted rule " code { (rule_id) } }
                    }
                    @if *retryable {
                        @if let ActivityKind::DeliveryAttempt { command_id, .. } | ActivityKind::DeliveryChanged { command_id, .. } = &item.kind {
                            " "
                            form.inline method="post" action=(format!("/portal/deliveries/{command_id}/retry")) {
                                (csrf_field(csrf)) button.secondary type="submit" { "Retry now" }
                            }
                        }
                    }
                }
            }
        }
        @if let Some(href) = older {
            p { a href=(href) { "Older activity" } }
        }
    }
}

/// Export, deletion, sessions.
pub fn data(csrf: &str, customer_id: &str) -> Markup {
    html! {
        h1 { "Your data" }
        p { "Your customer id is " code id="customer-id" { (customer_id) } ". The vault's API and command line name your profile by it (e.g. " code { "custos activity " (customer_id) } ")." }
        h2 { "Export" }
        p { "Everything the vault holds about you — links, rules, events, commands and every delivery attempt — as one JSON file." }
        p { a href="/portal/export.json" download="custos-export.json" { "Download my data" } }
        h2 { "Sessions" }
        form method="post" action="/portal/signout-everywhere" {
            (csrf_field(csrf))
            p { "Signs out every browser and device signed in to this account, this one included." }
            button.secondary type="submit" { "Sign out everywhere" }
        }
        h2 { "Delete your vault" }
        form method="post" action="/portal/delete" {
            (csrf_field(csrf))
            p { "Erases your profile, links, rules and history from every replica of the vault, and revokes the vault's access at each linked company. This cannot be undone." }
            label for="confirm" { "Type DELETE to confirm" }
            input id="confirm" name="confirm" required autocomplete="off";
            button.danger type="submit" { "Delete everything" }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use custos_api::types::{
        Action, OAuthEndpoints, Recommendation, RuleSpec, RuleTemplate, Trigger,
    };

    fn item(kind: ActivityKind) -> ActivityItem {
        ActivityItem {
            at: "2026-11-28T00:00:00Z".into(),
            kind,
        }
    }

    fn attempt(command: &str, status: DeliveryStatus) -> ActivityItem {
        item(ActivityKind::DeliveryAttempt {
            command_id: command.into(),
            attempt: 1,
            status_code: Some(500),
            error: None,
            status,
        })
    }

    #[test]
    fn retry_is_offered_once_per_failed_delivery_and_filters_apply() {
        let matched = |c: &str, target: &str| {
            item(ActivityKind::RuleMatched {
                rule_id: "r".into(),
                event_id: "e".into(),
                command_id: c.into(),
                target: target.into(),
                command_type: "room.hold".into(),
            })
        };
        // Newest first: c3 waits for a retry; c1 failed after a pending attempt; c2 was delivered.
        let items = vec![
            attempt("c3", DeliveryStatus::Pending),
            attempt("c1", DeliveryStatus::Failed),
            attempt("c2", DeliveryStatus::Delivered),
            attempt("c1", DeliveryStatus::Pending),
            matched("c1", "hotel"),
            matched("c2", "car"),
            matched("c3", "car"),
        ];
        let all = timeline(items.clone(), &ActivityFilter::default(), true);
        let retry: Vec<bool> = all.iter().map(|(_, r)| *r).collect();
        assert_eq!(retry, vec![true, true, false, false, false, false, false]);
        assert!(timeline(items.clone(), &ActivityFilter::default(), false)
            .iter()
            .all(|(_, r)| !r));
        let hotel = ActivityFilter {
            kind: "deliveries".into(),
            entity: "hotel".into(),
        };
        assert_eq!(timeline(items, &hotel, true).len(), 2);
    }

    #[test]
    fn a_recommendation_needing_an_operator_linked_entity_offers_no_link_button() {
        let entity = |id: &str, oauth: bool| Entity {
            id: id.into(),
            name: id.into(),
            command_url: "https://x.example/c".into(),
            endpoint_enabled: true,
            event_types: Vec::new(),
            command_types: Vec::new(),
            created_at: String::new(),
            secret: None,
            previous_secret_valid_until: None,
            oauth: oauth.then(OAuthEndpoints::default),
        };
        let customer = Customer {
            id: "cus_1".into(),
            created_at: String::new(),
            links: Vec::new(),
            group: 1,
        };
        let recs = RecommendationList {
            model_version: Some(1),
            threshold: 0.5,
            items: vec![Recommendation {
                id: "ab-0123456789ab".into(),
                template: RuleTemplate {
                    when_entity: "airline".into(),
                    event_type: "flight.delayed".into(),
                    then_entity: "hotel".into(),
                    command_type: "room.hold".into(),
                },
                confidence: 0.7,
                reason: "kept by about 70% of the 10+ customers who link airline".into(),
                rule: RuleSpec {
                    name: "r".into(),
                    when: Trigger {
                        entity: "airline".into(),
                        event_type: "flight.delayed".into(),
                        condition: Some("data.delay > 60".into()),
                    },
                    then: Action {
                        entity: "hotel".into(),
                        command_type: "room.hold".into(),
                        data: serde_json::json!({"flight": "data.flight"}),
                    },
                },
                needs_link: Some("hotel".into()),
                model_version: 1,
            }],
        };
        let page = |hotel_signs_in: bool| {
            let entities = [entity("airline", true), entity("hotel", hotel_signs_in)];
            home(&customer, &entities, &[], &recs, "tok").into_string()
        };
        let with_sign_in = page(true);
        assert!(with_sign_in.contains("/portal/recommendations/ab-0123456789ab/link"));
        // What accepting creates is shown in full.
        assert!(
            with_sign_in.contains("data.delay &gt; 60"),
            "{with_sign_in}"
        );
        assert!(with_sign_in.contains("data.flight"), "{with_sign_in}");
        let operator_only = page(false);
        assert!(
            !operator_only.contains("/recommendations/ab-0123456789ab/link"),
            "{operator_only}"
        );
        assert!(operator_only.contains("through your operator only"));
    }

    #[test]
    fn type_names_read_as_words_and_markup_escapes() {
        assert_eq!(plain("flight.delayed"), "Flight delayed");
        assert_eq!(plain("late.checkin_now"), "Late checkin now");
        let page = account_form(false, "tok", "<script>x</script>@a.b").into_string();
        assert!(!page.contains("<script>x"), "{page}");
        assert!(page.contains("name=\"csrf\" value=\"tok\""));
    }
}
