//! One stream entry as the worker received it, and how its `payload` field is read.

use std::sync::Arc;

use super::streams::id_ms;

/// One entry of `{prefix}:jobs:{job_type}`, delivered to this consumer.
#[derive(Debug, Clone)]
pub struct StreamEntry {
    /// The job type (stream suffix).
    pub job_type: Arc<str>,
    /// The stream key.
    pub stream: Arc<str>,
    /// The entry id (`<ms>-<seq>`).
    pub id: String,
    /// The raw fields (names and values are bytes: Redis accepts any), in entry order.
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
    /// How many times the entry has been delivered, this delivery included.
    pub deliveries: u64,
}

/// Why an entry cannot be handed to its handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    pub reason: String,
    /// The payload's `request_id`, when one could be read, so the caller still gets a reply.
    pub request_id: Option<String>,
}

/// A payload that is a JSON object.
#[derive(Debug, Clone)]
pub struct Payload {
    pub value: serde_json::Value,
    /// The payload's `request_id` when it is a UUID string: the reply goes to its list.
    pub request_id: Option<String>,
}

impl StreamEntry {
    /// The raw bytes of field `name` (the first, if the entry repeats it).
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    /// The raw bytes of the `payload` field when the entry has exactly one (the hot path's
    /// input); `None` when it has none or several, which [`StreamEntry::payload`] refuses.
    pub fn single_payload(&self) -> Option<&[u8]> {
        let mut payloads = self.fields.iter().filter(|(k, _)| k == b"payload");
        let (_, raw) = payloads.next()?;
        payloads.next().is_none().then_some(raw.as_slice())
    }

    /// Reads the `payload` field: it must exist exactly once, be UTF-8 JSON, and be an object.
    /// Two `payload` fields are refused: which one the caller meant cannot be known, and a
    /// dead letter retried later must replay what was refused, not pick a side.
    pub fn payload(&self) -> Result<Payload, Malformed> {
        let mut payloads = self.fields.iter().filter(|(k, _)| k == b"payload");
        let Some((_, raw)) = payloads.next() else {
            return Err(Malformed {
                reason: "stream entry has no `payload` field".into(),
                request_id: None,
            });
        };
        let repeats = payloads.count();
        if repeats > 0 {
            return Err(Malformed {
                reason: format!(
                    "stream entry has {} `payload` fields; an entry must have exactly one",
                    repeats + 1
                ),
                request_id: None,
            });
        }
        let mut value: serde_json::Value = match serde_json::from_slice(raw) {
            Ok(v) => v,
            Err(e) => {
                return Err(Malformed {
                    reason: format!("payload is not valid JSON: {e}"),
                    request_id: None,
                });
            }
        };
        integral_numbers(&mut value);
        let request_id = request_id_of(&value);
        if !value.is_object() {
            return Err(Malformed {
                reason: format!("payload must be a JSON object, got {}", json_kind(&value)),
                request_id,
            });
        }
        Ok(Payload { value, request_id })
    }

    /// When the job was enqueued (unix ms): the `enqueued_at` field when it is a number, else
    /// the time part of the entry id (set by Redis at XADD).
    pub fn enqueued_ms(&self) -> Option<u64> {
        self.field("enqueued_at")
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .or_else(|| id_ms(&self.id))
    }
}

/// Largest integer every f64 holds exactly (2^53).
const MAX_EXACT_FLOAT: f64 = 9_007_199_254_740_992.0;

/// JSON Schema's `integer` is any number without a fractional part, so `2.0` and `1e2` are
/// valid amounts, TTLs and block heights; serde's integer types refuse them. At the top level of
/// a payload, such a number becomes the integer it denotes, up to 2^53: above that an f64 may
/// already be a rounded neighbour of what the caller wrote, so it stays a float and the
/// handler refuses it (big integers must be written as integer literals). Nested values (e.g.
/// in `metadata`) are the caller's and stay as written.
fn integral_numbers(value: &mut serde_json::Value) {
    let Some(map) = value.as_object_mut() else {
        return;
    };
    for v in map.values_mut() {
        if let Some(f) = v.as_f64().filter(|_| v.is_f64())
            && f.fract() == 0.0
            && f.abs() <= MAX_EXACT_FLOAT
        {
            *v = serde_json::Value::from(f as i64);
        }
    }
}

/// The `request_id` of a payload, when it is a string holding a UUID in the hyphenated form
/// the schemas require (`8-4-4-4-12` hex digits, either case). Other spellings `uuid` accepts
/// (braced, `urn:uuid:`, 32 bare digits) are not request ids: the schemas refuse them, and a
/// reply keyed by one spelling while the ledger stores another would never be found.
pub fn request_id_of(value: &serde_json::Value) -> Option<String> {
    let s = value.get("request_id")?.as_str()?;
    is_hyphenated_uuid(s).then(|| s.to_string())
}

/// serde `deserialize_with` for the UUID fields of job payloads: only the hyphenated form the
/// schemas allow (see [`request_id_of`] for why).
pub fn hyphenated_uuid<'de, D: serde::Deserializer<'de>>(d: D) -> Result<uuid::Uuid, D::Error> {
    d.deserialize_str(HyphenatedUuid)
}

/// Reads a UUID string without copying it (the queue's hot path decodes two per job); the
/// messages are those of deserializing a `String` then checking it.
struct HyphenatedUuid;

impl serde::de::Visitor<'_> for HyphenatedUuid {
    type Value = uuid::Uuid;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<uuid::Uuid, E> {
        parse_hyphenated_uuid(s).map_err(E::custom)
    }
}

/// `s` as a UUID when it is written as the schemas require, else why not.
pub fn parse_hyphenated_uuid(s: &str) -> Result<uuid::Uuid, String> {
    if !is_hyphenated_uuid(s) {
        return Err(format!(
            "`{s}` is not a UUID in the form 8-4-4-4-12 hex digits"
        ));
    }
    uuid::Uuid::parse_str(s).map_err(|e| e.to_string())
}

/// [`hyphenated_uuid`] for an optional field (absent or `null` is `None`).
pub fn hyphenated_uuid_opt<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<uuid::Uuid>, D::Error> {
    #[derive(serde::Deserialize)]
    struct Wrap(#[serde(deserialize_with = "hyphenated_uuid")] uuid::Uuid);
    Ok(<Option<Wrap> as serde::Deserialize>::deserialize(d)?.map(|w| w.0))
}

/// Whether `s` is a UUID written as the schemas' `pattern` requires:
/// `^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`.
pub fn is_hyphenated_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// One raw entry: id and fields.
pub type RawEntry = (String, Vec<(Vec<u8>, Vec<u8>)>);

/// Parses the entry list of an XCLAIM reply, or of one stream in an XREADGROUP reply:
/// `[[id, [field, value, ...]], ...]`. Entries deleted from the stream come back as `nil`
/// (or with `nil` fields) and are returned with no fields, ids kept, so they can be
/// acknowledged.
pub fn parse_entries(v: redis::Value) -> Vec<RawEntry> {
    let redis::Value::Array(items) = v else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let redis::Value::Array(mut pair) = item else {
            continue;
        };
        if pair.len() < 2 {
            continue;
        }
        let fields_v = pair.swap_remove(1);
        let Some(id) = text(pair.swap_remove(0)) else {
            continue;
        };
        let mut fields = Vec::new();
        if let redis::Value::Array(kv) = fields_v {
            let mut it = kv.into_iter();
            // Names are kept as bytes: a field name that is not UTF-8 must still reach the
            // dead letter.
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                fields.push((bytes(k), bytes(v)));
            }
        }
        out.push((id, fields));
    }
    out
}

/// Parses an XREADGROUP reply (one stream read): the entries of the first stream, or none
/// when the read timed out (`nil`).
pub fn parse_read_reply(v: redis::Value) -> Vec<RawEntry> {
    let redis::Value::Array(streams) = v else {
        return Vec::new();
    };
    for s in streams {
        if let redis::Value::Array(mut pair) = s
            && pair.len() == 2
        {
            return parse_entries(pair.swap_remove(1));
        }
    }
    Vec::new()
}

fn text(v: redis::Value) -> Option<String> {
    String::from_utf8(bytes(v)).ok()
}

fn bytes(v: redis::Value) -> Vec<u8> {
    match v {
        redis::Value::BulkString(b) => b,
        redis::Value::SimpleString(s) => s.into_bytes(),
        redis::Value::VerbatimString { text, .. } => text.into_bytes(),
        redis::Value::Int(i) => i.to_string().into_bytes(),
        redis::Value::Double(d) => d.to_string().into_bytes(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fields: &[(&str, &str)]) -> StreamEntry {
        StreamEntry {
            job_type: "t".into(),
            stream: "p:jobs:t".into(),
            id: "1700000000000-0".into(),
            fields: fields
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
            deliveries: 1,
        }
    }

    #[test]
    fn missing_payload_is_malformed() {
        let e = entry(&[("other", "x")]);
        let m = e.payload().unwrap_err();
        assert!(m.reason.contains("no `payload`"), "{}", m.reason);
        assert_eq!(m.request_id, None);
    }

    #[test]
    fn non_json_and_non_object_are_malformed() {
        assert!(
            entry(&[("payload", "{nope")])
                .payload()
                .unwrap_err()
                .reason
                .contains("not valid JSON")
        );
        let m = entry(&[("payload", "[1,2]")]).payload().unwrap_err();
        assert!(m.reason.contains("an array"), "{}", m.reason);
    }

    #[test]
    fn request_id_is_read_only_when_it_is_a_uuid() {
        let id = uuid::Uuid::new_v4().to_string();
        let p = entry(&[("payload", &format!(r#"{{"request_id":"{id}"}}"#))])
            .payload()
            .unwrap();
        assert_eq!(p.request_id.as_deref(), Some(id.as_str()));
        let p = entry(&[("payload", r#"{"request_id":"abc"}"#)])
            .payload()
            .unwrap();
        assert_eq!(p.request_id, None);
    }

    #[test]
    fn enqueued_at_field_wins_over_the_id() {
        assert_eq!(entry(&[]).enqueued_ms(), Some(1_700_000_000_000));
        assert_eq!(entry(&[("enqueued_at", "42")]).enqueued_ms(), Some(42));
    }
}
