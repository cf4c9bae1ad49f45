//! Client JSON (`serde_json::Value`) as template values, keeping the order of object keys.
//!
//! minijinja's own maps are sorted unless its `preserve_order` feature is on, and the order of
//! keys in a tool's JSON schema is visible in the prompt (`tools | tojson`), so objects become a
//! small map object that remembers insertion order. The order itself comes from `serde_json`'s
//! `preserve_order` feature.

use std::collections::HashMap;
use std::sync::Arc;

use minijinja::Value;
use minijinja::value::{Enumerator, Object, ObjectExt, ObjectRepr};

/// A JSON object as a template mapping: keys iterate in insertion order.
#[derive(Debug)]
struct JsonObject {
    entries: Vec<(Value, Value)>,
    index: HashMap<String, usize>,
}

impl Object for JsonObject {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let i = *self.index.get(key.as_str()?)?;
        self.entries.get(i).map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        self.mapped_key_value_enumerator(|this| Box::new(this.entries.iter().cloned()))
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.entries.len())
    }
}

/// Converts client JSON to a template value: `null` to `none`, numbers to integers when they
/// are integers, objects to insertion-ordered mappings.
pub(super) fn from_json(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(items) => Value::from(items.iter().map(from_json).collect::<Vec<_>>()),
        serde_json::Value::Object(map) => {
            let mut entries = Vec::with_capacity(map.len());
            let mut index = HashMap::with_capacity(map.len());
            for (k, v) in map {
                index.insert(k.clone(), entries.len());
                entries.push((Value::from(k.as_str()), from_json(v)));
            }
            Value::from_object(JsonObject { entries, index })
        }
    }
}
