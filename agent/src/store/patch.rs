//! Partial updates for the CRUD endpoints (rules, triggers): a PATCH body whose fields are
//! [`Patch`] tells "leave as is" (absent), "clear" (null) and "set" (a value) apart.

use serde::{Deserialize, Deserializer, Serialize};

/// One field of a PATCH body. Declare it `#[serde(default)]` so an absent field is `Keep`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Patch<T> {
    /// The field was absent: keep the stored value.
    #[default]
    Keep,
    /// The field was `null`: clear an optional value.
    Clear,
    /// The field carried a value: store it.
    Set(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Patch<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Only called when the field is present (absent fields take the default, Keep).
        Ok(match Option::<T>::deserialize(d)? {
            None => Patch::Clear,
            Some(v) => Patch::Set(v),
        })
    }
}

impl<T: Serialize> Serialize for Patch<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Patch::Keep | Patch::Clear => s.serialize_none(),
            Patch::Set(v) => v.serialize(s),
        }
    }
}

/// A PATCH of a required field tried to clear it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field {0} cannot be null")]
pub struct NotNullable(pub &'static str);

impl<T> Patch<T> {
    /// Applies to an optional field.
    pub fn apply_opt(self, field: &mut Option<T>) {
        match self {
            Patch::Keep => {}
            Patch::Clear => *field = None,
            Patch::Set(v) => *field = Some(v),
        }
    }

    /// Applies to a required field; `null` is refused with the field's name.
    pub fn apply(self, name: &'static str, field: &mut T) -> Result<(), NotNullable> {
        match self {
            Patch::Keep => Ok(()),
            Patch::Clear => Err(NotNullable(name)),
            Patch::Set(v) => {
                *field = v;
                Ok(())
            }
        }
    }

    /// Whether the body mentioned the field at all.
    pub fn is_keep(&self) -> bool {
        matches!(self, Patch::Keep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RulePatch {
        #[serde(default)]
        name: Patch<String>,
        #[serde(default)]
        cooldown_s: Patch<u64>,
    }

    #[test]
    fn absent_null_and_value_are_told_apart() {
        let p: RulePatch = serde_json::from_str(r#"{"cooldown_s": null}"#).unwrap();
        assert_eq!(
            (p.name.clone(), p.cooldown_s.clone()),
            (Patch::Keep, Patch::Clear)
        );
        let mut name = "old".to_string();
        let mut cooldown = Some(30);
        p.name.apply("name", &mut name).unwrap();
        p.cooldown_s.apply_opt(&mut cooldown);
        assert_eq!((name.as_str(), cooldown), ("old", None));

        let p: RulePatch = serde_json::from_str(r#"{"name": "new", "cooldown_s": 5}"#).unwrap();
        let mut name = "old".to_string();
        p.name.apply("name", &mut name).unwrap();
        assert_eq!(name, "new");
        assert_eq!(p.cooldown_s, Patch::Set(5));

        let p: RulePatch = serde_json::from_str(r#"{"name": null}"#).unwrap();
        assert_eq!(
            p.name.apply("name", &mut String::new()),
            Err(NotNullable("name"))
        );
        assert!(serde_json::from_str::<RulePatch>(r#"{"nam": "x"}"#).is_err());
    }
}
