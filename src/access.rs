//! Access to a chatflow, from the in-memory snapshot (the database only on a
//! miss): unknown chatflow 404, not granted 403; admins may use every chatflow.

use crate::app::App;
use crate::auth::Identity;
use crate::errors::ApiError;

/// `who` may use `chatflow_id`. Routes open to anyone carry no identity and
/// no grant. A chatflow or grant the snapshot does not know yet (added a
/// moment ago elsewhere) is looked up in the database (see `auth::lookup`).
pub async fn check_chatflow(
    app: &App,
    who: Option<&Identity>,
    chatflow_id: &str,
) -> Result<(), ApiError> {
    let Some(who) = who else {
        return Ok(());
    };
    app.auth.check_chatflow(&app.db, who, chatflow_id).await
}
