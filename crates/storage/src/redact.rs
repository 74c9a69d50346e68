//! Redaction of secrets inside URIs, before anything is printed or persisted.
//!
//! A URI may carry credentials in its user-info (`s3://AKIA:secret@bucket/…`) or in its query
//! (`https://host/d.jsonl?token=…`, a presigned URL's `X-Amz-Signature=…`). [`redact_uri`] masks them
//! in one URI; [`redact_text`] masks them wherever a URI appears inside free text (an error message, a
//! log line). Every sink that prints or persists text (the log, `status.json`, the torchrun error
//! file, `config/run.json`) passes it through here.

/// What a masked secret is replaced with.
pub const MASK: &str = "***";

/// Query keys of the object-store APIs that never carry a secret (kept, for readable logs); every
/// other query value is masked.
const HARMLESS_QUERY_KEYS: &[&str] = &[
    "delimiter",
    "encoding-type",
    "list-type",
    "max-keys",
    "partNumber",
    "prefix",
    "start-after",
    "uploadId",
    "uploads",
    "versionId",
];

/// `uri` with the user-info and every query value masked; text without `://` comes back unchanged.
pub fn redact_uri(uri: &str) -> String {
    redact_text(uri)
}

/// `text` with the user-info, query values and fragment of every URI inside it masked: anything
/// from a `//` (with or without a scheme before it) to the next space or quote.
pub fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("//") {
        let after = pos + 2;
        out.push_str(&rest[..after]);
        // The URI runs until whitespace or a character that ends a quoted/bracketed URI.
        let end = rest[after..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>'))
            .map(|i| after + i)
            .unwrap_or(rest.len());
        out.push_str(&redact_after_slashes(&rest[after..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// One URI after its `//`: authority, path, query, fragment.
fn redact_after_slashes(body: &str) -> String {
    // The authority ends at the first `/`, `?` or `#`.
    let auth_end = body.find(['/', '?', '#']).unwrap_or(body.len());
    let (authority, tail) = body.split_at(auth_end);
    let authority = match authority.rfind('@') {
        Some(at) => format!("{MASK}@{}", &authority[at + 1..]),
        None => authority.to_string(),
    };
    // A fragment may carry a token too (`#access_token=…`): masked whole.
    let (tail, fragment) = match tail.find('#') {
        Some(h) if h + 1 < tail.len() => (&tail[..h], format!("#{MASK}")),
        Some(h) => (&tail[..h], "#".to_string()),
        None => (tail, String::new()),
    };
    let tail = match tail.find('?') {
        Some(q) => {
            let (path, query) = tail.split_at(q);
            let masked: Vec<String> = query[1..]
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if HARMLESS_QUERY_KEYS.contains(&k) => pair.to_string(),
                    Some((k, _)) => format!("{k}={MASK}"),
                    None if pair.is_empty() => String::new(),
                    None => MASK.to_string(),
                })
                .collect();
            format!("{path}?{}", masked.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{authority}{tail}{fragment}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_info_and_query_values_are_masked() {
        assert_eq!(
            redact_uri("s3://AKIA:PW@bucket/d.jsonl"),
            "s3://***@bucket/d.jsonl"
        );
        assert_eq!(
            redact_uri("https://h.example/d.jsonl?token=abc&x=1#f"),
            "https://h.example/d.jsonl?token=***&x=***#***"
        );
        assert_eq!(redact_uri("s3://bucket/p"), "s3://bucket/p");
        assert_eq!(
            redact_uri("http://h/b?list-type=2&prefix=r&X-Amz-Signature=abc"),
            "http://h/b?list-type=2&prefix=r&X-Amz-Signature=***"
        );
        assert_eq!(redact_uri("./runs/demo"), "./runs/demo");
    }

    #[test]
    fn uris_inside_text_are_masked_and_the_rest_kept() {
        let text = "opening \"s3://AKIA:PW@b/x\" failed; also see gs://u@b/y?sig=zz and more";
        let got = redact_text(text);
        assert_eq!(
            got,
            "opening \"s3://***@b/x\" failed; also see gs://***@b/y?sig=*** and more"
        );
        assert!(!got.contains("PW") && !got.contains("zz"));
        // Fragments, and authorities without a scheme (a URI split at its `:`), are masked too.
        assert_eq!(redact_text("s3://b/runs#SEKRET"), "s3://b/runs#***");
        assert_eq!(
            redact_text("name \"//AKIA:SEKRET@b/x:step-2\""),
            "name \"//***@b/x:step-2\""
        );
        // Non-ASCII text and a bare `://` survive.
        assert_eq!(redact_text("héllo :// wörld"), "héllo :// wörld");
    }
}
