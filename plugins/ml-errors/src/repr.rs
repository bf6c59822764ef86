//! A small, safe reader for the one Python `repr` the real ML services write: `originalData` on
//! `ai-processing-dlq` is `repr()` of the original message's field dict, keys and values `bytes`
//! (`{b'postId': b'502', b'correlationId': b'c-1'}`), sometimes `str`. Only that literal shape
//! is read — a dict of string or bytes literals — and anything else yields `None`: nothing is
//! ever evaluated.

/// The `key: value` pairs of a dict literal of `str`/`bytes` literals, in order; `None` if the
/// text is not exactly that.
pub fn parse_dict(text: &str) -> Option<Vec<(String, String)>> {
    let mut reader = Reader {
        chars: text.trim().chars().collect(),
        at: 0,
    };
    reader.expect('{')?;
    let mut pairs = Vec::new();
    reader.skip_space();
    if reader.eat('}') {
        return reader.at_end().then_some(pairs);
    }
    loop {
        let key = reader.literal()?;
        reader.skip_space();
        reader.expect(':')?;
        let value = reader.literal()?;
        pairs.push((key, value));
        reader.skip_space();
        if reader.eat(',') {
            reader.skip_space();
            if reader.eat('}') {
                break;
            }
            continue;
        }
        reader.expect('}')?;
        break;
    }
    reader.at_end().then_some(pairs)
}

struct Reader {
    chars: Vec<char>,
    at: usize,
}

impl Reader {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: char) -> Option<()> {
        self.skip_space();
        self.eat(c).then_some(())
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.at += 1;
        }
    }

    fn at_end(&mut self) -> bool {
        self.skip_space();
        self.at == self.chars.len()
    }

    /// `'…'`, `"…"`, `b'…'` or `b"…"`, with Python's escapes; bytes are read as UTF-8 (lossy).
    fn literal(&mut self) -> Option<String> {
        self.skip_space();
        let bytes = self.eat('b') || self.eat('B');
        let quote = self.peek().filter(|q| *q == '\'' || *q == '"')?;
        self.at += 1;
        let mut out: Vec<u8> = Vec::new();
        loop {
            let c = self.peek()?;
            self.at += 1;
            if c == quote {
                break;
            }
            if c != '\\' {
                let mut buffer = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buffer).as_bytes());
                continue;
            }
            let escaped = self.peek()?;
            self.at += 1;
            match escaped {
                '\\' | '\'' | '"' => out.push(escaped as u8),
                'n' => out.push(b'\n'),
                't' => out.push(b'\t'),
                'r' => out.push(b'\r'),
                '0' => out.push(0),
                'x' => {
                    let hex: String = self.chars.get(self.at..self.at + 2)?.iter().collect();
                    self.at += 2;
                    let byte = u8::from_str_radix(&hex, 16).ok()?;
                    if bytes {
                        out.push(byte);
                    } else {
                        let mut buffer = [0u8; 4];
                        let c = char::from(byte);
                        out.extend_from_slice(c.encode_utf8(&mut buffer).as_bytes());
                    }
                }
                _ => return None,
            }
        }
        Some(String::from_utf8_lossy(&out).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::parse_dict;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn reads_the_services_bytes_dicts() {
        assert_eq!(
            parse_dict(
                "{b'postId': b'502', b'correlationId': b'c-1', b'mediaUrl': b'https://x/a b'}"
            ),
            Some(pairs(&[
                ("postId", "502"),
                ("correlationId", "c-1"),
                ("mediaUrl", "https://x/a b")
            ]))
        );
        assert_eq!(
            parse_dict(r#"{'a': "it's", b'b': b'\xc3\xa9\n', }"#),
            Some(pairs(&[("a", "it's"), ("b", "é\n")]))
        );
        assert_eq!(parse_dict("{}"), Some(Vec::new()));
    }

    #[test]
    fn refuses_anything_else() {
        for text in [
            "",
            "{b'a': 1}",
            "{b'a': b'1'",
            "{b'a': b'1'} trailing",
            "__import__('os')",
            "{b'a': b'\\q'}",
            "[b'a']",
        ] {
            assert_eq!(parse_dict(text), None, "{text}");
        }
    }
}
