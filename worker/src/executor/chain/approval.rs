//! An `approval` step: no call; a person decides (`llmq chain approve|reject`) by its
//! `timeout`.

use super::Prepared;
use super::kind::{Context, StepKind};

/// How long an approval waits when its step gives no `timeout`.
const APPROVAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

pub(super) struct Approval;

impl StepKind for Approval {
    fn prepare(&self, cx: Context<'_>, _prompt: String) -> Prepared {
        let wait = cx
            .env
            .timeout
            .map_or(APPROVAL_TIMEOUT, std::time::Duration::from_secs);
        Prepared::Await {
            deadline_ms: llmq_shared::queue::now_ms()
                .saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX)),
        }
    }
}
