//! Text we did not write, made safe to show: a caller's field names echoed in
//! an error, Defender's free text (device names, requestors, comments) in the
//! `text/plain` answers.
//!
//! A plain-text answer or a console has no markup to contain a string, so a
//! line break in it starts a new line that reads as ours (a forged
//! `Error:` line), an ESC starts a terminal escape sequence, and a
//! right-to-left override (U+202E) makes what follows read backwards. The
//! payload refuses these characters on input ([`is_layout_control`] and the
//! control characters); what arrives from elsewhere is escaped on output.

/// Characters that change how the text around them is displayed: line and
/// paragraph separators, and the bidirectional embeddings, overrides and
/// isolates. In Defender's audit trail or a console they could make a
/// comment or a name read as something else ("Trojan Source" spoofing).
pub fn is_layout_control(c: char) -> bool {
    matches!(c, '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// The invisible bidirectional marks: they reorder neutral characters next
/// to them. Refused nowhere (a name may need one), escaped when shown.
fn is_bidi_mark(c: char) -> bool {
    matches!(c, '\u{200E}' | '\u{200F}' | '\u{061C}')
}

/// Invisible characters that make two different names look the same
/// (`PC-1` and `PC\u{200B}-1`): zero-width spaces and joiners, word
/// joiner and invisible operators, the old format controls, the byte-order
/// mark, the soft hyphen, and the tag characters.
fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}'
        | '\u{200B}'..='\u{200D}'
        | '\u{2060}'..='\u{2064}'
        | '\u{206A}'..='\u{206F}'
        | '\u{FEFF}'
        | '\u{E0000}'..='\u{E007F}')
}

/// Whether `c` cannot be shown as itself in a line of text.
fn needs_escape(c: char) -> bool {
    c.is_control() || is_layout_control(c) || is_bidi_mark(c) || is_invisible(c)
}

/// Most characters of a caller's name echoed in an error: enough to
/// recognise a typo, never a caller's 60 KB key copied into the answer and
/// the log.
pub const MAX_ECHOED_CHARS: usize = 64;

/// A name the caller sent (an unknown or repeated field, a query
/// parameter), as an error echoes it: every control or layout character as
/// `\u{…}` and a backslash doubled, so the echo is one line that shows what
/// was sent; cut after [`MAX_ECHOED_CHARS`] characters with `…`.
pub fn echoed_name(raw: &str) -> String {
    let mut out = String::new();
    let mut shown = 0usize;
    for c in raw.chars() {
        let piece = escape(c);
        let width = piece.chars().count();
        if shown + width > MAX_ECHOED_CHARS {
            out.push('…');
            return out;
        }
        out.push_str(&piece);
        shown += width;
    }
    out
}

/// Defender's free text on one line of a `text/plain` answer: line breaks
/// and tabs become spaces (a comment written on two lines stays readable),
/// every other control or layout character is escaped as `\u{…}`.
pub fn one_line(raw: &str) -> String {
    if !raw.chars().any(needs_escape) {
        return raw.to_owned();
    }
    raw.chars()
        .map(|c| match c {
            '\n' | '\r' | '\t' | '\u{b}' | '\u{c}' => " ".to_owned(),
            c if needs_escape(c) => unicode_escape(c),
            c => c.to_string(),
        })
        .collect()
}

fn escape(c: char) -> String {
    match c {
        '\\' => "\\\\".to_owned(),
        c if needs_escape(c) => unicode_escape(c),
        c => c.to_string(),
    }
}

fn unicode_escape(c: char) -> String {
    format!("\\u{{{:04X}}}", u32::from(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_one_line_and_cut() {
        assert_eq!(echoed_name("relase"), "relase");
        assert_eq!(
            echoed_name("x\nError: forged\u{1b}[2J"),
            "x\\u{000A}Error: forged\\u{001B}[2J"
        );
        assert_eq!(echoed_name("a\\b\u{202E}c"), "a\\\\b\\u{202E}c");
        let long = "k".repeat(60 * 1024);
        let echoed = echoed_name(&long);
        assert_eq!(echoed.chars().count(), MAX_ECHOED_CHARS + 1);
        assert!(echoed.ends_with('…'));
        // An escape is never cut in half.
        let escapes = "\n".repeat(20);
        let echoed = echoed_name(&escapes);
        assert_eq!(echoed, format!("{}…", "\\u{000A}".repeat(8)));
    }

    #[test]
    fn defender_text_stays_on_its_line_and_in_its_order() {
        assert_eq!(one_line("PC-1"), "PC-1");
        assert_eq!(
            one_line("line one\nline two\r\tend"),
            "line one line two  end"
        );
        assert_eq!(
            one_line("evil\u{202E}exe.txt\u{2028}next\u{1b}[31m\u{200F}"),
            "evil\\u{202E}exe.txt\\u{2028}next\\u{001B}[31m\\u{200F}"
        );
    }

    #[test]
    fn invisible_characters_are_shown_escaped() {
        for c in ['\u{200B}', '\u{FEFF}', '\u{00AD}', '\u{2060}', '\u{E0041}'] {
            let shown = one_line(&format!("PC{c}-1"));
            assert!(!shown.contains(c), "{shown:?}");
            assert!(shown.starts_with("PC\\u{"), "{shown:?}");
        }
    }
}
