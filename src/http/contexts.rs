//! `/api/contexts`: contexts by state and workflow, and the stalled ones
//! (a timer past due), paged in `context_id` order and never the whole
//! store in one answer. Any pod answers: it asks every other member for
//! its own partitions and merges the pages.
//!
//! Each pod reads at most [`SCAN_BUDGET`] records per request, so a filter
//! that matches little returns a short (even empty) page with a `next`
//! cursor rather than scanning millions of records at once.

use serde::{Deserialize, Serialize};

use crate::state::{OpenStores, StateError, record};
use crate::workflow::WorkflowState;

/// Records one pod reads for one page.
pub const SCAN_BUDGET: usize = 10_000;
/// The largest page a caller may ask for.
pub const MAX_LIMIT: usize = 1_000;
const DEFAULT_LIMIT: usize = 100;

/// What a caller asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    pub state: Option<String>,
    pub workflow: Option<String>,
    /// Only contexts with a timer past due (nobody acted in time).
    pub stalled: bool,
    pub limit: usize,
    /// The page starts after this `context_id`.
    pub after: Option<String>,
}

impl ListQuery {
    /// From a request's query pairs; an unknown key or a bad value is an
    /// error naming it.
    pub fn parse(pairs: &[(String, String)]) -> Result<ListQuery, String> {
        let mut query = ListQuery {
            limit: DEFAULT_LIMIT,
            ..ListQuery::default()
        };
        for (key, value) in pairs {
            match key.as_str() {
                "state" => query.state = Some(value.clone()),
                "workflow" => query.workflow = Some(value.clone()),
                "after" => query.after = Some(value.clone()),
                "stalled" => {
                    query.stalled = match value.as_str() {
                        "" | "true" | "1" => true,
                        "false" | "0" => false,
                        other => return Err(format!("stalled: `{other}` is not true or false")),
                    }
                }
                "limit" => {
                    query.limit = value
                        .parse::<usize>()
                        .ok()
                        .filter(|limit| (1..=MAX_LIMIT).contains(limit))
                        .ok_or_else(|| {
                            format!("limit: `{value}` is not a number from 1 to {MAX_LIMIT}")
                        })?
                }
                other => {
                    return Err(format!(
                        "unknown parameter `{other}` (state, workflow, stalled, limit, after)"
                    ));
                }
            }
        }
        Ok(query)
    }

    /// As a query string, for asking the other pods.
    pub fn to_query_string(&self) -> String {
        let encode = |text: &str| {
            percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC)
                .to_string()
        };
        let mut pairs = vec![format!("limit={}", self.limit)];
        if let Some(state) = &self.state {
            pairs.push(format!("state={}", encode(state)));
        }
        if let Some(workflow) = &self.workflow {
            pairs.push(format!("workflow={}", encode(workflow)));
        }
        if self.stalled {
            pairs.push("stalled=true".into());
        }
        if let Some(after) = &self.after {
            pairs.push(format!("after={}", encode(after)));
        }
        pairs.join("&")
    }

    fn matches(&self, state: &WorkflowState, now_ms: i64) -> bool {
        self.state
            .as_ref()
            .is_none_or(|wanted| *wanted == state.state)
            && self
                .workflow
                .as_ref()
                .is_none_or(|wanted| *wanted == state.workflow)
            && (!self.stalled || overdue(state, now_ms))
    }
}

/// One context, as a list shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextSummary {
    pub context_id: String,
    pub workflow: String,
    pub state: String,
    pub locked_by: Option<String>,
    pub attempts: u32,
    pub tokens_left: u64,
    pub token_budget: u64,
    pub updated_at: i64,
    /// The earliest timer's due time, epoch milliseconds.
    pub next_due_at: Option<i64>,
    /// A timer is past due.
    pub overdue: bool,
    pub partition: i32,
}

/// A page: contexts in `context_id` order, and where the next one starts
/// (`None`: there is nothing after these).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    pub contexts: Vec<ContextSummary>,
    pub next: Option<String>,
}

fn overdue(state: &WorkflowState, now_ms: i64) -> bool {
    state.timers.iter().any(|timer| timer.due_at < now_ms)
}

/// This pod's page: its open partitions only.
pub fn local_page(stores: &OpenStores, query: &ListQuery, now_ms: i64) -> Result<Page, StateError> {
    let scan = stores.scan(query.after.as_deref(), SCAN_BUDGET)?;
    let mut contexts = Vec::new();
    let mut next = scan.scanned_to;
    for (partition, key, value) in scan.records {
        if next.as_ref().is_some_and(|cut| key > *cut) {
            break;
        }
        // A record that does not decode is not listed; `/contexts/{id}`
        // says why for one context.
        let Ok(Some(state)) = record::decode_workflow(&value) else {
            continue;
        };
        if !query.matches(&state, now_ms) {
            continue;
        }
        if contexts.len() == query.limit {
            next = contexts
                .last()
                .map(|last: &ContextSummary| last.context_id.clone());
            break;
        }
        contexts.push(summary(&state, partition, now_ms));
    }
    Ok(Page { contexts, next })
}

fn summary(state: &WorkflowState, partition: i32, now_ms: i64) -> ContextSummary {
    ContextSummary {
        context_id: state.context_id.clone(),
        workflow: state.workflow.clone(),
        state: state.state.clone(),
        locked_by: state.locked_by.clone(),
        attempts: state.attempts,
        tokens_left: state.tokens_left(),
        token_budget: state.token_budget,
        updated_at: state.updated_at,
        next_due_at: state.timers.iter().map(|timer| timer.due_at).min(),
        overdue: overdue(state, now_ms),
        partition,
    }
}

/// Merges the pages of every pod: a context at or before the smallest
/// `next` is complete everywhere; the page is cut there, or at `limit`.
pub fn merge(pages: Vec<Page>, limit: usize) -> Page {
    let frontier = pages.iter().filter_map(|page| page.next.clone()).min();
    let mut contexts: Vec<ContextSummary> = pages
        .into_iter()
        .flat_map(|page| page.contexts)
        .filter(|context| {
            frontier
                .as_ref()
                .is_none_or(|cut| context.context_id <= *cut)
        })
        .collect();
    contexts.sort_by(|a, b| a.context_id.cmp(&b.context_id));
    contexts.dedup_by(|a, b| a.context_id == b.context_id);
    if contexts.len() > limit {
        contexts.truncate(limit);
        let next = contexts.last().map(|last| last.context_id.clone());
        return Page { contexts, next };
    }
    Page {
        contexts,
        next: frontier,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(id: &str) -> ContextSummary {
        ContextSummary {
            context_id: id.into(),
            workflow: "w".into(),
            state: "S".into(),
            locked_by: None,
            attempts: 0,
            tokens_left: 0,
            token_budget: 0,
            updated_at: 0,
            next_due_at: None,
            overdue: false,
            partition: 0,
        }
    }

    fn page(ids: &[&str], next: Option<&str>) -> Page {
        Page {
            contexts: ids.iter().map(|id| context(id)).collect(),
            next: next.map(str::to_owned),
        }
    }

    fn ids(page: &Page) -> Vec<&str> {
        page.contexts
            .iter()
            .map(|c| c.context_id.as_str())
            .collect()
    }

    #[test]
    fn a_merged_page_is_complete_up_to_the_smallest_cursor() {
        // Pod a read up to "c" and stopped; pod b read everything.
        let merged = merge(
            vec![page(&["a", "c"], Some("c")), page(&["b", "d"], None)],
            10,
        );
        assert_eq!(ids(&merged), ["a", "b", "c"]);
        assert_eq!(merged.next.as_deref(), Some("c"));
        let all = merge(vec![page(&["a"], None), page(&["b"], None)], 10);
        assert_eq!(ids(&all), ["a", "b"]);
        assert_eq!(all.next, None);
    }

    #[test]
    fn a_merged_page_is_cut_at_its_limit() {
        let merged = merge(vec![page(&["a", "c"], None), page(&["b", "d"], None)], 3);
        assert_eq!(ids(&merged), ["a", "b", "c"]);
        assert_eq!(merged.next.as_deref(), Some("c"));
    }

    #[test]
    fn queries_round_trip_and_bad_ones_are_named() {
        let pairs = |text: &str| super::super::feed::form_pairs(Some(text));
        let query = ListQuery::parse(&pairs(
            "state=Researcher%20Queued&stalled&limit=5&after=a%2Fb",
        ))
        .expect("valid");
        assert_eq!(query.state.as_deref(), Some("Researcher Queued"));
        assert!(query.stalled);
        assert_eq!(query.limit, 5);
        assert_eq!(
            ListQuery::parse(&pairs(&query.to_query_string())),
            Ok(query)
        );
        assert!(
            ListQuery::parse(&pairs("limit=0"))
                .unwrap_err()
                .contains("limit")
        );
        assert!(ListQuery::parse(&pairs("limit=100000")).is_err());
        assert!(
            ListQuery::parse(&pairs("color=red"))
                .unwrap_err()
                .contains("color")
        );
    }
}
