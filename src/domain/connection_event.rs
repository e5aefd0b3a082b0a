//! A connection event (who connected where, and whether they were admitted),
//! as the connect path sends it to the queue and the consumer reads it back
//! into a row of `connection_events`.
//!
//! A message carries one event, or several as `{"events": [..]}`. The
//! consumer reads each event on its own and drops (and logs) one it cannot
//! read or store: retrying it could never succeed, and failing the batch for
//! it would hold back every other event in the batch through all its
//! retries, and then send them to the dead-letter queue.

use crate::sql;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionEvent {
    pub event_id: String,
    pub occurred_at_ms: u64,
    pub user_id: String,
    pub device_id: String,
    pub region_id: String,
    pub server_id: Option<String>,
    /// `admitted`, `throttled` or `closed`.
    pub outcome: String,
}

/// How far ahead of the consumer's clock an event's time may be. The
/// producer's clock is the platform's, so an event further ahead was not
/// made by it: stored, it would sit in the default partition, past every
/// retention; and a time PostgreSQL cannot store would fail the insert of
/// the whole batch.
pub const MAX_AHEAD_MS: u64 = 24 * 3600 * 1000;

/// The events of one message body (JSON text): one event, or
/// `{"events": [..]}`; each an error of its own when it cannot be read, which
/// leaves the others. An error for the whole when the body is not JSON, or
/// `events` is not a list.
pub fn read_message(text: &str) -> Result<Vec<Result<ConnectionEvent, String>>, String> {
    let one = |v: &Value| ConnectionEvent::deserialize(v).map_err(|e| e.to_string());
    let mut body: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if !body.is_object() {
        return Err("the body is not an object".to_owned());
    }
    match body.get_mut("events").map(Value::take) {
        Some(Value::Array(events)) => Ok(events.iter().map(one).collect()),
        Some(_) => Err("`events` is not a list".to_owned()),
        None => Ok(vec![one(&body)]),
    }
}

impl ConnectionEvent {
    /// The event as a row of `connection_events`' multi-row `VALUES` (in the
    /// order `event_id, occurred_at, user_id, device_id, region_id,
    /// server_id, outcome`), or why it cannot be stored; `now_ms` is the
    /// consumer's clock (unix ms).
    pub fn values_row(&self, now_ms: u64) -> Result<String, String> {
        let bad = |field: &str| format!("{field} cannot be stored");
        if self.occurred_at_ms > now_ms.saturating_add(MAX_AHEAD_MS) {
            return Err(bad("occurred_at_ms"));
        }
        let outcome = match self.outcome.as_str() {
            o @ ("admitted" | "throttled" | "closed") => o,
            _ => return Err(bad("outcome")),
        };
        let text = |value: &str, field: &str| sql::literal(value).map_err(|_| bad(field));
        let uuid = |value: &str, field: &str| sql::uuid(value).ok_or_else(|| bad(field));
        let server = match &self.server_id {
            Some(s) => text(s, "server_id")?,
            None => "NULL".into(),
        };
        Ok(format!(
            "({}, to_timestamp({}::double precision / 1000), {}, {}, {}, {server}, '{outcome}')",
            uuid(&self.event_id, "event_id")?,
            self.occurred_at_ms,
            uuid(&self.user_id, "user_id")?,
            uuid(&self.device_id, "device_id")?,
            text(&self.region_id, "region_id")?,
        ))
    }
}

/// The statement that writes a batch's rows ([`ConnectionEvent::values_row`],
/// at least one). An event already written (a message delivered again, or
/// twice in one batch) is skipped: its id and time are those of its first
/// write, and they are the primary key.
pub fn insert_sql(rows: &[String]) -> String {
    format!(
        "INSERT INTO connection_events (event_id, occurred_at, user_id, device_id, region_id, server_id, outcome)
         VALUES {} ON CONFLICT DO NOTHING",
        rows.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The consumer's clock in these tests: the events' own time.
    const NOW: u64 = 1_795_533_362_000;

    fn event() -> Value {
        json!({
            "event_id": "0b6f7a8e-2f4c-4d7e-9a1b-3c5d7e9f1a2b",
            "occurred_at_ms": 1_795_533_362_000u64,
            "user_id": "4320c978-3f50-4492-8cb0-9346065d9183",
            "device_id": "dabe7892-946d-4d3f-b82b-36f508fa6a5c",
            "region_id": "eu-central",
            "server_id": null,
            "outcome": "throttled"
        })
    }

    #[test]
    fn a_message_of_one_event_or_of_several_is_read() {
        let one = read_message(&event().to_string()).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].as_ref().unwrap().region_id, "eu-central");
        let many = read_message(&json!({"events": [event(), event()]}).to_string()).unwrap();
        assert_eq!(many.len(), 2);
        assert!(many.iter().all(Result::is_ok));
    }

    #[test]
    fn an_event_that_cannot_be_read_or_stored_leaves_the_others() {
        let mut unreadable = event();
        unreadable["occurred_at_ms"] = json!("yesterday");
        let mut far_ahead = event();
        far_ahead["occurred_at_ms"] = json!(u64::MAX);
        let mut unknown = event();
        unknown["outcome"] = json!("maybe");
        let body = json!({"events": [event(), unreadable, far_ahead, unknown, event()]});
        let rows: Vec<Result<String, String>> = read_message(&body.to_string())
            .unwrap()
            .into_iter()
            .map(|e| e.and_then(|e| e.values_row(NOW)))
            .collect();
        assert_eq!(rows.len(), 5);
        assert!(rows[0].is_ok() && rows[4].is_ok(), "{rows:?}");
        assert!(
            rows[1].as_ref().unwrap_err().contains("invalid type"),
            "{rows:?}"
        );
        assert_eq!(rows[2], Err("occurred_at_ms cannot be stored".to_owned()));
        assert_eq!(rows[3], Err("outcome cannot be stored".to_owned()));
        // A day ahead of the consumer's clock is the most.
        let mut last = event();
        last["occurred_at_ms"] = json!(NOW + MAX_AHEAD_MS);
        let mut last: ConnectionEvent = serde_json::from_value(last).unwrap();
        assert!(last.values_row(NOW).is_ok());
        last.occurred_at_ms += 1;
        assert_eq!(
            last.values_row(NOW),
            Err("occurred_at_ms cannot be stored".to_owned())
        );
    }

    #[test]
    fn a_body_that_is_not_a_message_is_an_error_of_its_own() {
        for body in ["{not json", "[1, 2]", r#"{"events": {"a": 1}}"#, "7"] {
            assert!(read_message(body).is_err(), "{body}");
        }
    }

    #[test]
    fn a_row_quotes_its_values_and_refuses_what_sql_cannot_carry() {
        let e: ConnectionEvent = serde_json::from_value(event()).unwrap();
        assert_eq!(
            e.values_row(NOW).unwrap(),
            "('0b6f7a8e-2f4c-4d7e-9a1b-3c5d7e9f1a2b'::uuid, to_timestamp(1795533362000::double precision / 1000), \
             '4320c978-3f50-4492-8cb0-9346065d9183'::uuid, 'dabe7892-946d-4d3f-b82b-36f508fa6a5c'::uuid, \
             E'eu-central', NULL, 'throttled')"
        );
        let mut quoted = e.clone();
        quoted.server_id = Some("it's".into());
        assert!(quoted.values_row(NOW).unwrap().contains("E'it''s'"));
        let mut nul = e.clone();
        nul.region_id = "eu\0".into();
        assert_eq!(
            nul.values_row(NOW),
            Err("region_id cannot be stored".into())
        );
        let mut not_uuid = e;
        not_uuid.user_id = "x'); DROP TABLE users; --".into();
        assert_eq!(
            not_uuid.values_row(NOW),
            Err("user_id cannot be stored".into())
        );
    }
}
