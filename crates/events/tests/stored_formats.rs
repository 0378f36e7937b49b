//! What is stored stays readable by every later release. `tests/stored/` holds one file per
//! event type and schema version ever written (`<Type>.v<N>.json`: the payload as it sits in
//! the `data` column), the metadata (`EventMetadata.json`) and the snapshot state of each
//! `STATE_SCHEMA_VERSION` (`OrderState.v<N>.json`). A file there is never edited or deleted
//! once committed, because what it shows is never rewritten in a database.
//!
//! - A payload at its type's current version decodes and encodes back to exactly the same
//!   JSON: renaming or retyping a field fails here, not in production on the stored events.
//! - A payload at an older version decodes, through its upcaster, to what
//!   `<Type>.v<N>.reads-as.json` beside it shows in the current shape.
//! - Every event type has a file at its current version, so a new type or version cannot be
//!   written without one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use events::codec::EVENT_TYPES;
use events::{EventMetadata, OrderState, STATE_SCHEMA_VERSION, current_schema_version, decode};

fn stored_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/stored")
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `(event type, schema version, path)` of every stored payload file.
fn stored_payloads() -> Vec<(String, i32, PathBuf)> {
    let mut found = Vec::new();
    for entry in fs::read_dir(stored_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let Some(stem) = name.strip_suffix(".json") else {
            continue;
        };
        if stem.ends_with(".reads-as") || !EVENT_TYPES.iter().any(|t| stem.starts_with(t)) {
            continue;
        }
        let (event_type, version) = stem
            .split_once(".v")
            .unwrap_or_else(|| panic!("{name}: expected <Type>.v<N>.json"));
        let version: i32 = version
            .parse()
            .unwrap_or_else(|_| panic!("{name}: expected <Type>.v<N>.json"));
        found.push((event_type.to_owned(), version, path));
    }
    found.sort();
    found
}

#[test]
fn every_stored_payload_of_every_version_is_read_by_this_release() {
    let payloads = stored_payloads();
    assert!(payloads.len() >= EVENT_TYPES.len(), "{payloads:?}");
    for (event_type, version, path) in payloads {
        let data = read_json(&path);
        let current = current_schema_version(&event_type).expect("a known type");
        assert!(
            version <= current,
            "{}: version {version} is newer than {event_type}'s current version {current}",
            path.display()
        );
        let decoded = decode(&event_type, version, &data).unwrap_or_else(|e| {
            panic!(
                "{event_type} v{version} as stored no longer decodes: {e}. Stored events are \
                 never rewritten: keep the stored shape, or write a new version and upcast \
                 this one to it (events::codec)"
            )
        });
        let expected = if version == current {
            data
        } else {
            read_json(&path.with_file_name(format!("{event_type}.v{version}.reads-as.json")))
        };
        assert_eq!(
            decoded.to_json(),
            expected,
            "{event_type} v{version} is not read as the stored file says (current version \
             {current}); a stored shape is never changed"
        );
        assert_eq!(decoded.event_type(), event_type);
        assert_eq!(decoded.schema_version(), current);
    }
}

#[test]
fn every_event_type_has_a_stored_payload_at_its_current_version() {
    let stored: BTreeSet<(String, i32)> = stored_payloads()
        .into_iter()
        .map(|(event_type, version, _)| (event_type, version))
        .collect();
    for event_type in EVENT_TYPES {
        let current = current_schema_version(event_type).unwrap();
        assert!(
            stored.contains(&(event_type.to_owned(), current)),
            "no tests/stored/{event_type}.v{current}.json: add the payload this release \
             writes, and keep the files of the older versions"
        );
    }
}

#[test]
fn stored_metadata_reads_and_writes_back_unchanged() {
    let stored = read_json(&stored_dir().join("EventMetadata.json"));
    let metadata: EventMetadata = serde_json::from_value(stored.clone()).unwrap();
    assert_eq!(serde_json::to_value(&metadata).unwrap(), stored);
    // Metadata written before a field existed lacks it.
    let sparse: EventMetadata = serde_json::from_value(serde_json::json!({})).unwrap();
    assert_eq!(sparse, EventMetadata::default());
}

#[test]
fn a_snapshot_of_the_current_state_schema_reads_and_writes_back_unchanged() {
    let path = stored_dir().join(format!("OrderState.v{STATE_SCHEMA_VERSION}.json"));
    let stored = read_json(&path);
    let state: OrderState = serde_json::from_value(stored.clone()).unwrap_or_else(|e| {
        panic!(
            "a snapshot of state schema {STATE_SCHEMA_VERSION} no longer reads ({e}): bump \
             STATE_SCHEMA_VERSION (snapshots of the old one are then ignored, never misread) \
             and add tests/stored/OrderState.v<new>.json"
        )
    });
    assert_eq!(
        serde_json::to_value(&state).unwrap(),
        stored,
        "OrderState no longer writes the shape of state schema {STATE_SCHEMA_VERSION}: bump \
         STATE_SCHEMA_VERSION and add tests/stored/OrderState.v<new>.json"
    );
    assert!(state.order.is_some() && state.version > 0);
}
