//! Reading request bodies: JSON objects whose fields are read one at a time, so that every
//! error names the parameter at fault, and the sampling parameters shared by all endpoints.

use moeshard_kernels::sampling::SamplingParams;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::errors::ApiError;

/// A JSON object from a request, with the path of its parameters (`""` for the body itself,
/// `"options."` for Ollama's `options`).
pub struct Fields<'a> {
    map: &'a Map<String, Value>,
    prefix: &'a str,
}

/// Parses a request body: it must be a JSON object.
pub fn parse_body(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::invalid("the request body must be a JSON object")),
        Err(e) => Err(ApiError::invalid(format!("the request body is not valid JSON: {e}"))),
    }
}

impl<'a> Fields<'a> {
    /// The fields of `map`, whose parameters are named `{prefix}{name}` in errors.
    pub fn new(map: &'a Map<String, Value>, prefix: &'a str) -> Fields<'a> {
        Fields { map, prefix }
    }

    /// The full name of parameter `name`, for error messages.
    pub fn name(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The raw value of `name`; `null` counts as absent.
    pub fn raw(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    /// `name` converted to `T`; absent or `null`: `None`; of the wrong type: a 400 naming it.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, ApiError> {
        self.raw(name)
            .map(|v| {
                T::deserialize(v).map_err(|e| ApiError::param(self.name(name), format!("`{}`: {e}", self.name(name))))
            })
            .transpose()
    }

    /// A number parameter checked against a range (`what` describes it, e.g. `"in [0, 2]"`).
    pub fn number(&self, name: &str, ok: impl Fn(f64) -> bool, what: &str) -> Result<Option<f64>, ApiError> {
        match self.get::<f64>(name)? {
            Some(v) if !(v.is_finite() && ok(v)) => {
                Err(ApiError::param(self.name(name), format!("`{}` must be {what}, got {v}", self.name(name))))
            }
            v => Ok(v),
        }
    }

    /// An integer parameter of at least `min`.
    pub fn integer(&self, name: &str, min: i64) -> Result<Option<i64>, ApiError> {
        match self.get::<i64>(name)? {
            Some(v) if v < min => {
                Err(ApiError::param(self.name(name), format!("`{}` must be at least {min}, got {v}", self.name(name))))
            }
            v => Ok(v),
        }
    }

    /// The `stop` parameter: a string or a list of strings (empty strings ignored).
    pub fn stop(&self, name: &str) -> Result<Vec<String>, ApiError> {
        const MAX_STOPS: usize = 16;
        let stops = match self.raw(name) {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => {
                items.iter().map(|v| v.as_str().map(str::to_owned)).collect::<Option<Vec<_>>>().ok_or_else(|| {
                    ApiError::param(
                        self.name(name),
                        format!("`{}` must be a string or a list of strings", self.name(name)),
                    )
                })?
            }
            Some(_) => {
                return Err(ApiError::param(
                    self.name(name),
                    format!("`{}` must be a string or a list of strings", self.name(name)),
                ));
            }
        };
        if stops.len() > MAX_STOPS {
            return Err(ApiError::param(
                self.name(name),
                format!("`{}` has more than {MAX_STOPS} sequences", self.name(name)),
            ));
        }
        Ok(stops.into_iter().filter(|s| !s.is_empty()).collect())
    }

    /// The sampling parameters: `temperature` in [0, 2], `top_p` in (0, 1], `top_k` (0 or -1:
    /// off), `min_p` in [0, 1], `seed` (absent or negative: random), `presence_penalty` and
    /// `frequency_penalty` in [-2, 2], `repetition_penalty` / `repeat_penalty` > 0,
    /// `repeat_last_n` (-1: the whole context). Unset ones keep llama.cpp's defaults.
    pub fn sampling(&self) -> Result<SamplingParams, ApiError> {
        let mut p = SamplingParams::default();
        if let Some(t) = self.number("temperature", |v| (0.0..=2.0).contains(&v), "in [0, 2]")? {
            p.temperature = t as f32;
        }
        if let Some(v) = self.number("top_p", |v| v > 0.0 && v <= 1.0, "in (0, 1]")? {
            p.top_p = v as f32;
        }
        if let Some(k) = self.integer("top_k", -1)? {
            p.top_k = usize::try_from(k).unwrap_or(0);
        }
        if let Some(v) = self.number("min_p", |v| (0.0..=1.0).contains(&v), "in [0, 1]")? {
            p.min_p = v as f32;
        }
        p.seed = match self.get::<i128>("seed")? {
            Some(s) if s >= 0 => {
                u64::try_from(s).map_err(|_| ApiError::param(self.name("seed"), "`seed` does not fit in 64 bits"))?
            }
            _ => rand::random(),
        };
        let penalty = |v: f64| (-2.0..=2.0).contains(&v);
        if let Some(v) = self.number("presence_penalty", penalty, "in [-2, 2]")? {
            p.presence_penalty = v as f32;
        }
        if let Some(v) = self.number("frequency_penalty", penalty, "in [-2, 2]")? {
            p.frequency_penalty = v as f32;
        }
        for name in ["repetition_penalty", "repeat_penalty"] {
            if let Some(v) = self.number(name, |v| v > 0.0, "greater than 0")? {
                p.repeat_penalty = v as f32;
            }
        }
        if let Some(n) = self.integer("repeat_last_n", -1)? {
            p.repeat_last_n = usize::try_from(n).unwrap_or(usize::MAX);
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn sampling_errors_name_the_parameter() {
        for (body, param) in [
            (json!({"temperature": 3}), "temperature"),
            (json!({"temperature": "hot"}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"top_k": -2}), "top_k"),
            (json!({"min_p": 1.5}), "min_p"),
            (json!({"presence_penalty": 9}), "presence_penalty"),
            (json!({"repetition_penalty": 0}), "repetition_penalty"),
            (json!({"seed": "x"}), "seed"),
        ] {
            let map = fields(body);
            let err = Fields::new(&map, "").sampling().expect_err(param);
            assert_eq!(err.param.as_deref(), Some(param));
        }
        let map = fields(json!({"temperature": -1}));
        assert_eq!(
            Fields::new(&map, "options.").sampling().expect_err("range").param.as_deref(),
            Some("options.temperature")
        );
    }

    #[test]
    fn sampling_defaults_and_values() {
        let map = fields(json!({"temperature": 0, "top_k": -1, "seed": 7, "stop": ["a", ""]}));
        let f = Fields::new(&map, "");
        let p = f.sampling().expect("valid");
        assert_eq!((p.temperature, p.top_k, p.seed), (0.0, 0, 7));
        assert_eq!(f.stop("stop").expect("stop"), ["a"]);
        let map = fields(json!({"stop": [1]}));
        assert!(Fields::new(&map, "").stop("stop").is_err());
    }
}
