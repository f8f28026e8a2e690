//! Client input, checked in one place before it reaches the database (the
//! admin API, the login handler and the CLI all use these). A client's mistake
//! is a 422 `validation_error` naming the field, never a 503, and is not
//! counted as a database error. PostgreSQL refuses a NUL character in text, so
//! every text field refuses control characters here.

use crate::errors::ApiError;

fn invalid(detail: impl Into<String>) -> ApiError {
    ApiError::validation(detail)
}

/// Plain text: at most `max` bytes, no control characters (NUL included).
pub fn text(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.len() > max {
        return Err(invalid(format!("{field}: at most {max} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{field}: control characters are not allowed"
        )));
    }
    Ok(())
}

/// Like [`text`], and not empty.
pub fn required_text(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        return Err(invalid(format!("{field} is required")));
    }
    text(field, value, max)
}

pub fn username(u: &str) -> Result<(), ApiError> {
    let ok = !u.is_empty()
        && u.len() <= 64
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b));
    ok.then_some(())
        .ok_or_else(|| invalid("username: 1-64 characters of letters, digits, - _ . @"))
}

pub fn password(p: &str) -> Result<(), ApiError> {
    if p.len() < 8 || p.len() > 1024 {
        return Err(invalid("password must be 8 to 1024 characters"));
    }
    if p.contains('\0') {
        return Err(invalid("password: NUL characters are not allowed"));
    }
    Ok(())
}

pub fn role(r: &str) -> Result<(), ApiError> {
    match r {
        "admin" | "user" => Ok(()),
        _ => Err(invalid("role must be admin or user")),
    }
}

pub fn email(e: &str) -> Result<(), ApiError> {
    text("email", e, 254)?;
    let ok = e.split_once('@').is_some_and(|(local, domain)| {
        !local.is_empty() && !domain.is_empty() && !e.contains(char::is_whitespace)
    });
    ok.then_some(())
        .ok_or_else(|| invalid("email: not an email address"))
}

/// An API key's name (optional).
pub fn key_name(n: &str) -> Result<(), ApiError> {
    text("name", n, 100)
}

/// A credit change: a non-zero amount, a reason, an idempotency key.
pub fn credit_change(
    amount: i64,
    reason: &str,
    idempotency_key: Option<&str>,
) -> Result<(), ApiError> {
    if amount == 0 {
        return Err(invalid("amount must not be zero"));
    }
    text("reason", reason, 500)?;
    if let Some(k) = idempotency_key {
        required_text("idempotency_key", k, 200)?;
    }
    Ok(())
}

/// A chatflow id as Flowise makes them (and as paths accept them).
pub fn chatflow_id(id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && id != "."
        && id != "..";
    ok.then_some(())
        .ok_or_else(|| invalid("chatflow id: 1-128 letters, digits, - _ ."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_and_control_characters_are_refused_everywhere() {
        assert!(text("reason", "top-up\0", 500).is_err());
        assert!(email("a\0@b.c").is_err());
        assert!(username("ann\0").is_err());
        assert!(key_name("ci\u{7}").is_err());
        assert!(credit_change(5, "ok", Some("k\0")).is_err());
        assert!(chatflow_id("abc\0").is_err());
        assert!(password("long enough\0").is_err());
        assert_eq!(
            text("reason", "\0", 10).map_err(|e| (e.status, e.code)),
            Err((422, "validation_error"))
        );
    }

    #[test]
    fn ordinary_input_passes() {
        assert!(text("reason", "monthly top-up, März", 500).is_ok());
        assert!(email("ann@example.com").is_ok());
        assert!(username("ann.smith@corp").is_ok());
        assert!(credit_change(-3, "", None).is_ok());
        assert!(chatflow_id("da1d5da2-3232-4684-8e21-7df065e96599").is_ok());
    }
}
