//! Cluster ids: the owner namespace of a cluster in the store (`cluster/<id>`), so the store
//! and the controller must agree on what one may be. A DNS subdomain of at most 63 characters:
//! dot-separated labels of lowercase letters, digits and '-', each starting and ending with a
//! letter or digit.

use crate::error::InvalidValue;

/// Longest cluster id.
pub const MAX_LEN: usize = 63;

/// Checks `id`; the error names `field` (a flag like `--cluster-id` or a request path) and
/// quotes the value.
pub fn check_cluster_id(field: &str, id: &str) -> Result<(), InvalidValue> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !id.is_empty() && id.len() <= MAX_LEN && id.split('.').all(label_ok) {
        return Ok(());
    }
    Err(InvalidValue {
        field: field.to_string(),
        message: format!(
            "{id:?} must be 1-63 lowercase letters, digits, '-' or '.', starting and ending alphanumeric"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids() {
        let max = "a".repeat(MAX_LEN);
        for id in ["a", "prod-1", "eu.west.prod-2", "0", "a-b.c-d", max.as_str()] {
            assert_eq!(check_cluster_id("--cluster-id", id), Ok(()), "{id:?}");
        }
    }

    #[test]
    fn invalid_ids_name_the_field_and_value() {
        let long = "a".repeat(MAX_LEN + 1);
        for id in [
            "",
            "Prod",
            "-a",
            "a-",
            "a..b",
            ".a",
            "a.",
            "a_b",
            "a b",
            "a.-b",
            "é",
            long.as_str(),
        ] {
            let e = check_cluster_id("owner.cluster_id", id).unwrap_err();
            assert_eq!(e.field, "owner.cluster_id");
            assert!(
                e.to_string()
                    .starts_with(&format!("owner.cluster_id: {id:?} must be")),
                "{id:?}: {e}"
            );
        }
    }
}
