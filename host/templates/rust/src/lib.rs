//! Handler for `{{stream}}`: one row per media in `{{table}}` (created by
//! `migrations/<time>_{{table}}.sql`).
//!
//! Fields: `mediaId` (integer, required), `label` (text, required). Setting `prefix`
//! (`[plugins.{{name}}.settings]`, default none): prepended to every label.

use kaleidoscope_plugin_sdk::{self as sdk, Command, Entry, Failure, Fields, Handler, Manifest, Value};

/// The stream this plugin handles.
pub const STREAM: &str = "{{stream}}";
/// The table it writes.
pub const TABLE: &str = "{{table}}";

struct Plugin;

impl Handler for Plugin {
    fn manifest() -> Manifest {
        sdk::manifest("{{name}}", env!("CARGO_PKG_VERSION"), &[STREAM])
    }

    fn handle(entry: Entry) -> Result<Vec<Command>, Failure> {
        let fields = Fields::new(&entry);
        let media_id = fields.required_i64("mediaId")?;
        let label = fields.required("label")?;
        let label = match sdk::config::get("prefix") {
            Some(prefix) => format!("{prefix}{label}"),
            None => label.to_string(),
        };
        sdk::log::info(format!("media {media_id} is labelled {label:?}"));
        Ok(vec![
            sdk::upsert(TABLE)
                .key("media_id", media_id)
                .set("label", label)
                .set("updated_at", Value::Now)
                .into(),
        ])
    }
}

sdk::export_handler!(Plugin);

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fields: &[(&str, &str)]) -> Entry {
        Entry {
            source: STREAM.to_string(),
            id: "1-0".to_string(),
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            deliveries: 1,
        }
    }

    #[test]
    fn a_labelled_media_becomes_one_upsert() {
        // Logging works natively too: the line goes to stderr.
        let commands = Plugin::handle(entry(&[("mediaId", "7"), ("label", "cat")])).unwrap();
        assert_eq!(commands.len(), 1);
        assert!(matches!(&commands[0], Command::Upsert(u) if u.table == TABLE));
    }

    #[test]
    fn the_prefix_setting_is_applied() {
        sdk::config::set("prefix", Some("ml:"));
        let commands = Plugin::handle(entry(&[("mediaId", "7"), ("label", "cat")])).unwrap();
        sdk::config::set("prefix", None);
        let Command::Upsert(upsert) = &commands[0] else {
            panic!("an upsert")
        };
        assert!(upsert.set.iter().any(|c| c.column == "label"
            && matches!(&c.op, sdk::ColumnOp::Assign(Value::Text(t)) if t == "ml:cat")));
    }

    #[test]
    fn a_missing_media_id_is_malformed() {
        let failure = Plugin::handle(entry(&[("label", "cat")])).unwrap_err();
        assert!(matches!(failure, Failure::Malformed(why) if why.contains("mediaId")));
    }
}
