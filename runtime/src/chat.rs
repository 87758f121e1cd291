//! Chat templates: `tokenizer_config.json`'s `chat_template` (Jinja) rendered with minijinja and
//! Python's string methods, as transformers' `apply_chat_template` renders it. Also the model
//! folder's special tokens (end of sequence) from `generation_config.json`, `config.json` and
//! `tokenizer_config.json`.

use serde_json::Value as Json;
use std::path::Path;

/// The roles a message may have.
pub const ROLES: &[&str] = &["system", "user", "assistant", "tool"];

/// What a tokenizer folder says about chat and special tokens.
#[derive(Clone, Debug, Default)]
pub struct TokenizerConfig {
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
}

/// A token given as a string or as `{"content": "..."}` (transformers' AddedToken form).
fn token_text(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl TokenizerConfig {
    /// `dir/tokenizer_config.json`, or an empty config when there is none.
    pub fn read(dir: &Path) -> Result<TokenizerConfig, String> {
        let path = dir.join("tokenizer_config.json");
        if !path.exists() {
            return Ok(TokenizerConfig::default());
        }
        let j = read_json(&path)?;
        let template = match j.get("chat_template") {
            Some(Json::String(s)) => Some(s.clone()),
            // a list of named templates: the "default" one
            Some(Json::Array(items)) => items
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        Ok(TokenizerConfig {
            chat_template: template,
            bos_token: token_text(j.get("bos_token")),
            eos_token: token_text(j.get("eos_token")),
            pad_token: token_text(j.get("pad_token")),
        })
    }
}

/// A JSON file, with a located error.
pub fn read_json(path: &Path) -> Result<Json, String> {
    let bytes = crate::files::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        format!(
            "{}:{}:{}: not valid JSON: {e}",
            path.display(),
            e.line(),
            e.column()
        )
    })
}

/// The end-of-sequence token ids of a model folder: `generation_config.json`'s
/// `eos_token_id` (a number or a list), else `config.json`'s, else the tokenizer's `eos_token`.
pub fn eos_ids(
    dir: &Path,
    cfg: &TokenizerConfig,
    tok: &tokenizers::Tokenizer,
) -> Result<Vec<i32>, String> {
    for name in ["generation_config.json", "config.json"] {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let j = read_json(&path)?;
        let ids: Vec<i32> = match j.get("eos_token_id") {
            Some(Json::Number(n)) => n.as_i64().map(|i| vec![i as i32]).unwrap_or_default(),
            Some(Json::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_i64())
                .map(|i| i as i32)
                .collect(),
            _ => Vec::new(),
        };
        if !ids.is_empty() {
            return Ok(ids);
        }
    }
    Ok(cfg
        .eos_token
        .as_ref()
        .and_then(|t| tok.token_to_id(t))
        .map(|i| vec![i as i32])
        .unwrap_or_default())
}

/// Checks a list of chat messages: `[{"role": "user", "content": "..."}, ...]`.
pub fn check_messages(messages: &Json) -> Result<(), String> {
    let Some(list) = messages.as_array() else {
        return Err(
            "a chat is a JSON list of messages: [{\"role\": \"user\", \"content\": \"...\"}]"
                .into(),
        );
    };
    if list.is_empty() {
        return Err("the chat has no messages".into());
    }
    for (i, m) in list.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(Json::as_str)
            .ok_or_else(|| format!("message {i} has no \"role\" (one of {})", ROLES.join(", ")))?;
        if !ROLES.contains(&role) {
            return Err(format!(
                "message {i} has the unknown role {role:?}; roles: {}",
                ROLES.join(", ")
            ));
        }
        match m.get("content") {
            Some(Json::String(_)) | Some(Json::Array(_)) => {}
            _ => return Err(format!("message {i} ({role}) has no \"content\" text")),
        }
    }
    Ok(())
}

/// Renders `template` with the messages, as `apply_chat_template(messages,
/// add_generation_prompt=...)` does (with `bos_token`, `eos_token` and `raise_exception`). An
/// error names the template's line.
pub fn render(
    template: &str,
    messages: &Json,
    add_generation_prompt: bool,
    cfg: &TokenizerConfig,
) -> Result<String, String> {
    check_messages(messages)?;
    let mut env = minijinja::Environment::new();
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    let located = |e: minijinja::Error| {
        let line = e
            .line()
            .map(|l| format!(" (template line {l})"))
            .unwrap_or_default();
        let detail = e.detail().map(|d| format!(": {d}")).unwrap_or_default();
        format!(
            "the chat template failed to render{line}: {}{detail}",
            e.kind()
        )
    };
    env.add_template("chat", template).map_err(located)?;
    let tmpl = env.get_template("chat").map_err(located)?;
    let ctx = minijinja::context! {
        messages => minijinja::Value::from_serialize(messages),
        add_generation_prompt => add_generation_prompt,
        bos_token => cfg.bos_token.clone().unwrap_or_default(),
        eos_token => cfg.eos_token.clone().unwrap_or_default(),
        pad_token => cfg.pad_token.clone().unwrap_or_default(),
    };
    tmpl.render(ctx).map_err(located)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml() {
        let m: Json = serde_json::from_str(r#"[{"role": "user", "content": "Hi"}]"#).unwrap();
        let out = render(CHATML, &m, true, &TokenizerConfig::default()).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn errors_name_the_line_and_role() {
        let m: Json = serde_json::from_str(r#"[{"role": "robot", "content": "Hi"}]"#).unwrap();
        let e = render(CHATML, &m, true, &TokenizerConfig::default()).unwrap_err();
        assert!(e.contains("unknown role \"robot\""), "{e}");
        let m: Json = serde_json::from_str(r#"[{"role": "user", "content": "Hi"}]"#).unwrap();
        let bad = "line one\n{{ raise_exception('roles must alternate') }}";
        let e = render(bad, &m, true, &TokenizerConfig::default()).unwrap_err();
        assert!(
            e.contains("template line 2") && e.contains("roles must alternate"),
            "{e}"
        );
        let e = render("{% for %}", &m, true, &TokenizerConfig::default()).unwrap_err();
        assert!(e.contains("template line 1"), "{e}");
    }
}
