//! What free text a caller gives (a purpose, a note, a reason) may hold: it is shown to people,
//! in the CLI, logs, audit lines and consoles, so it must not be able to pass for something else.
//! Refused: control characters (Cc: escape sequences, line breaks), the line and paragraph
//! separators (Zl, Zp: a line break to most renderers), and the format characters (Cf: the
//! bidirectional overrides that reorder what is shown, zero-width characters that hide text).

/// Whether `c` may not appear in text shown to people.
pub fn is_deceptive(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            // Zl, Zp.
            '\u{2028}' | '\u{2029}'
            // Cf: soft hyphen, Arabic and Syriac marks, Mongolian vowel separator.
            | '\u{00AD}' | '\u{0600}'..='\u{0605}' | '\u{061C}' | '\u{06DD}' | '\u{070F}'
            | '\u{0890}'..='\u{0891}' | '\u{08E2}' | '\u{180E}'
            // Cf: zero-width space, joiners, direction marks, bidi embeddings and overrides.
            | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
            // Cf: word joiner, invisible operators, bidi isolates, deprecated format controls.
            | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206F}'
            // Cf: byte order mark, interlinear annotation.
            | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}'
            // Cf beyond the BMP: Kaithi, Egyptian, Brahmi, musical and shorthand format
            // controls, tags.
            | '\u{110BD}' | '\u{110CD}' | '\u{13430}'..='\u{1343F}' | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}' | '\u{E0001}' | '\u{E0020}'..='\u{E007F}'
        )
}

/// Whether `text` holds a character [`is_deceptive`] refuses.
pub fn has_deceptive(text: &str) -> bool {
    text.chars().any(is_deceptive)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_can_pass_for_something_else() {
        for bad in [
            "a\nb",
            "a\u{1b}[2Jb",
            "ok\u{2028}APPROVED by the CISO",
            "a\u{2029}b",
            "evil\u{202E}txt.exe",
            "a\u{200B}b",
            "\u{FEFF}a",
            "a\u{2066}b",
            "tag\u{E0041}",
        ] {
            assert!(has_deceptive(bad), "{bad:?}");
        }
        for good in [
            "rotate the staging DB",
            "täglich",
            "日本語の説明",
            "emoji 🚀",
            "a - b",
        ] {
            assert!(!has_deceptive(good), "{good:?}");
        }
    }
}
