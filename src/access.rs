//! Access to a chatflow, from the in-memory snapshot (no database): unknown
//! chatflow 404, not granted 403; admins may use every chatflow.

use crate::auth::{Identity, SnapshotStore};
use crate::errors::ApiError;

/// `who` may use `chatflow_id`. Routes open to anyone carry no identity and
/// no grant.
pub fn check_chatflow(
    snapshot: &SnapshotStore,
    who: Option<&Identity>,
    chatflow_id: &str,
) -> Result<(), ApiError> {
    let Some(who) = who else {
        return Ok(());
    };
    if who.is_admin() {
        return Ok(());
    }
    let snap = snapshot.get();
    if snap.chatflow(chatflow_id).is_none() {
        return Err(ApiError::not_found());
    }
    if !snap.is_granted(who.user_id, chatflow_id) {
        return Err(ApiError::forbidden());
    }
    Ok(())
}
