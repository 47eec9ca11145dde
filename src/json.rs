//! JSON that is plain ASCII: every character outside ASCII written as a `\u` escape.
//!
//! For text that other tools split into lines: a reader that also breaks lines at U+2028, U+2029 or
//! U+0085 (Python's `splitlines`, some log shippers) must see one record where the proxy wrote one.

use std::io::{self, Write};

use serde::Serialize;

/// `value` as compact JSON, ASCII only.
pub fn to_ascii_string<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<String> {
    let mut out = Vec::with_capacity(128);
    value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, AsciiFormatter))?;
    // Only ASCII was written.
    Ok(String::from_utf8(out).unwrap_or_default())
}

/// serde_json's compact output with every non-ASCII character escaped (`\uXXXX`, as a surrogate pair
/// beyond the Basic Multilingual Plane).
struct AsciiFormatter;

impl serde_json::ser::Formatter for AsciiFormatter {
    fn write_string_fragment<W: ?Sized + Write>(&mut self, writer: &mut W, fragment: &str) -> io::Result<()> {
        let mut start = 0;
        for (i, c) in fragment.char_indices().filter(|(_, c)| !c.is_ascii()) {
            writer.write_all(&fragment.as_bytes()[start..i])?;
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                write!(writer, "\\u{unit:04x}")?;
            }
            start = i + c.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_everything_outside_ascii_and_reads_back_the_same() {
        let text = "a\u{2028}b\u{85}c\u{e9}\u{1f600}\n\"";
        let json = super::to_ascii_string(text).unwrap();
        assert_eq!(json, r#""a\u2028b\u0085c\u00e9\ud83d\ude00\n\"""#);
        assert_eq!(serde_json::from_str::<String>(&json).unwrap(), text);
    }
}
