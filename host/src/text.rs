//! Text that comes from outside the host (plugins, producers) made safe to store and log.
//!
//! PostgreSQL's `text` and `jsonb` cannot hold a NUL character: a reason, log line or message
//! containing one would fail every attempt to write it and so block its stream for good.

/// `text` with every NUL character replaced by U+FFFD (the replacement character, which the
/// host also uses for bytes that are not UTF-8). Messages for people (failure reasons, trap
/// messages, log lines) go through here before they are stored or logged.
pub fn sanitize(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    }
}

/// `text` as one line with no control characters, for a log line or a one-line reason: a
/// plugin's newline could otherwise forge a log line of its own, and a terminal escape recolour
/// or rewrite an operator's screen. Newlines and carriage returns become `\n` and `\r`, other
/// control characters (C0 but tab, DEL, C1) `\u{..}`; NUL becomes U+FFFD as in [`sanitize`].
pub fn one_line(text: String) -> String {
    if !text.chars().any(|c| c.is_control() && c != '\t') {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\0' => out.push('\u{FFFD}'),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push('\t'),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// The URL (or any text containing it) without its password, for messages: the password of the
/// user part and any `password=` parameter become `***`. Errs on the side of hiding too much.
pub fn redact(url: &str) -> String {
    let mut out = url.to_string();
    // The user part: after `scheme://`, or after `//` in a URL too broken to have a scheme.
    let authority = out
        .find("://")
        .map(|i| i + 3)
        .or_else(|| out.find("//").map(|i| i + 2));
    if let (Some(start), Some(at)) = (authority, out.rfind('@'))
        && at > start
        && let Some(colon) = out[start..at].find(':')
    {
        out.replace_range(start + colon + 1..at, "***");
    }
    // `password=` (PostgreSQL), `pass=` (a Redis `redis+unix://` socket URL).
    for parameter in ["password=", "pass="] {
        let mut search = 0;
        while let Some(found) = out[search..].to_ascii_lowercase().find(parameter) {
            let value = search + found + parameter.len();
            let end = out[value..]
                .find(['&', ' ', '"', '\'', '#'])
                .map_or(out.len(), |i| value + i);
            out.replace_range(value..end, "***");
            search = value + 3;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{one_line, sanitize};

    #[test]
    fn one_line_escapes_line_breaks_and_terminal_escapes() {
        assert_eq!(
            one_line("a\nINFO forged\r\u{1b}[31mred\u{9b}\0\tok".into()),
            "a\\nINFO forged\\r\\u{1b}[31mred\\u{9b}\u{FFFD}\tok"
        );
        assert_eq!(one_line("plain ünïcode".into()), "plain ünïcode");
    }

    #[test]
    fn sanitize_replaces_nul_and_keeps_everything_else() {
        assert_eq!(sanitize("bad \0 reason".into()), "bad \u{FFFD} reason");
        assert_eq!(sanitize("ünïcode\n\t".into()), "ünïcode\n\t");
    }
}

/// `error` with its causes, each said once: `context: cause: cause`, like `{:#}`, but a cause
/// whose message the previous one already ends with (many errors repeat their source's message,
/// which made lines like "Connection refused (os error 111): Connection refused (os error 111)")
/// is left out.
pub fn causes(error: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut previous = String::new();
    for cause in error.chain() {
        let message = cause.to_string();
        if !previous.is_empty() && previous.ends_with(&message) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&message);
        previous = message;
    }
    out
}

#[cfg(test)]
mod causes_tests {
    use super::causes;

    #[test]
    fn causes_says_each_cause_once() {
        let io = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused (os error 111)",
        );
        let error = anyhow::Error::new(sqlx::Error::Io(io)).context("cannot connect");
        assert_eq!(
            causes(&error),
            "cannot connect: error communicating with database: refused (os error 111)"
        );
    }
}

#[cfg(test)]
mod redact_tests {
    use super::redact;

    #[test]
    fn redact_hides_passwords_in_the_user_part_and_in_parameters() {
        assert_eq!(
            redact("postgres://postgres:S3cret@db:5432/k?sslmode=bogus"),
            "postgres://postgres:***@db:5432/k?sslmode=bogus"
        );
        assert_eq!(
            redact("postgres://u@db/k?sslmode=require&password=S3cret&x=1"),
            "postgres://u@db/k?sslmode=require&password=***&x=1"
        );
        assert_eq!(
            redact("error in \"postgres://db/k?Password=S3cret\": bad"),
            "error in \"postgres://db/k?Password=***\": bad"
        );
        assert_eq!(
            redact("redis://:p@ss@host:6379/0"),
            "redis://:***@host:6379/0"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact("postgres//u:S3cret@db"), "postgres//u:***@db");
        assert_eq!(
            redact("redis+unix:///run/redis.sock?db=1&pass=S3cret"),
            "redis+unix:///run/redis.sock?db=1&pass=***"
        );
    }
}
