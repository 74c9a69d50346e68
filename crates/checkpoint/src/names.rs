//! Validation of the names that become parts of storage keys: run ids, frameworks, checkpoint names and
//! model ids. A name is one path segment: never empty, never `.` or `..`, no `/`, no control characters,
//! at most [`MAX_NAME_LEN`] bytes, and only `A-Z a-z 0-9 . _ -` (plus `=` is *not* allowed: it is the
//! layout's own separator in `framework=<name>`).

use std::fmt;
use std::str::FromStr;

use crate::error::{CheckpointError, Result};

/// The longest name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Checks that `value` is a safe single path segment; `what` names it in the error.
pub fn validate_name(what: &'static str, value: &str) -> Result<()> {
    let fail = |rule: &str| {
        Err(CheckpointError::InvalidName {
            what,
            value: value.to_string(),
            rule: rule.to_string(),
        })
    };
    if value.is_empty() {
        return fail("must not be empty");
    }
    if value.len() > MAX_NAME_LEN {
        return fail(&format!(
            "must be at most {MAX_NAME_LEN} bytes long (it is {})",
            value.len()
        ));
    }
    if value == "." || value == ".." || value.contains("..") {
        return fail("must not contain `..` or be `.`");
    }
    if value.contains('/') || value.contains('\\') {
        return fail("must not contain `/` or `\\` (it is a single path segment)");
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return fail(&format!(
            "must not contain control characters (found {:?})",
            c
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return fail(&format!(
            "may only use letters, digits, `.`, `_` and `-` (found {:?})",
            c
        ));
    }
    if value.starts_with('.') || value.starts_with('-') {
        return fail("must start with a letter, digit or `_`");
    }
    Ok(())
}

/// A checkpoint name, `step-` followed by at least six digits. Ordered by step number, never
/// lexicographically (`step-1000000` sorts after `step-999999`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StepName {
    step: u64,
}

impl StepName {
    /// The checkpoint name of `step`.
    pub fn new(step: u64) -> Self {
        Self { step }
    }

    /// The step number.
    pub fn step(&self) -> u64 {
        self.step
    }
}

impl fmt::Display for StepName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "step-{:06}", self.step)
    }
}

impl FromStr for StepName {
    type Err = CheckpointError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |rule: &str| CheckpointError::InvalidName {
            what: "checkpoint name",
            value: s.to_string(),
            rule: rule.to_string(),
        };
        let digits = s
            .strip_prefix("step-")
            .ok_or_else(|| bad("must start with `step-` (e.g. step-000100)"))?;
        if digits.len() < 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(
                "must be `step-` followed by at least 6 digits (e.g. step-000100)",
            ));
        }
        if digits.len() > 6 && digits.starts_with('0') {
            return Err(bad("must not have leading zeros beyond 6 digits"));
        }
        let step = digits
            .parse::<u64>()
            .map_err(|_| bad("step number does not fit in 64 bits"))?;
        Ok(Self { step })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for ok in ["meta_demo_001", "run-1", "Qwen3-8B", "a", "x.y_z-1"] {
            validate_name("run id", ok).unwrap();
        }
    }

    #[test]
    fn rejects_unsafe_names_with_the_rule() {
        let long = "a".repeat(MAX_NAME_LEN + 1);
        let cases = [
            ("", "empty"),
            ("..", "`..`"),
            ("a..b", "`..`"),
            ("a/b", "`/`"),
            ("a\\b", "`/`"),
            ("a\nb", "control"),
            ("a b", "letters"),
            ("a=b", "letters"),
            (".hidden", "start"),
            (long.as_str(), "at most"),
        ];
        for (bad, rule) in cases {
            let err = validate_name("run id", bad).unwrap_err().to_string();
            assert!(err.contains("run id"), "{err}");
            assert!(err.contains(rule), "{bad:?}: {err}");
        }
    }

    #[test]
    fn step_names_format_parse_and_order_numerically() {
        assert_eq!(StepName::new(100).to_string(), "step-000100");
        assert_eq!(StepName::new(1_234_567).to_string(), "step-1234567");
        let parsed: StepName = "step-1234567".parse().unwrap();
        assert_eq!(parsed.step(), 1_234_567);
        assert!(StepName::new(999_999) < StepName::new(1_000_000));
        for bad in [
            "step-1",
            "step-00001a",
            "steps-000001",
            "step-0000001",
            "step-",
            "000100",
        ] {
            assert!(bad.parse::<StepName>().is_err(), "{bad}");
        }
        for n in [0u64, 7, 999_999, 1_000_000, u64::MAX] {
            assert_eq!(
                StepName::new(n)
                    .to_string()
                    .parse::<StepName>()
                    .unwrap()
                    .step(),
                n
            );
        }
    }
}
