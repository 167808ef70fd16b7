//! The OData `$filter` subset the simulator understands.
//!
//! Modelled: `property eq literal` comparisons joined with `and`, with any
//! amount of whitespace between tokens. Literals are single-quoted strings
//! (`''` escapes a quote) or, for GUID properties, bare GUIDs: Defender accepts
//! `aadDeviceId eq 1234...` (what RealmJoin sends) as well as the quoted form.
//! `rbacGroupId` (a device group, a number) takes a bare integer, as Defender's
//! docs write it (`rbacGroupId eq 7`). The collection `machineTags` is only
//! reachable through the `any` lambda Defender documents for it
//! (`machineTags/any(tag: tag eq 'x')`, any variable name).
//!
//! Everything else that is valid OData (`or`, `not`, other operators,
//! functions, parentheses, other lambdas and paths, other properties, `null`) is reported
//! as [`FilterError::NotImplemented`], so a test hitting it fails loudly
//! instead of getting an invented answer. Text that is not a valid expression
//! is [`FilterError::Malformed`], like Defender's `400 ODataError`.

use std::fmt::Write as _;

/// Why a `$filter` was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FilterError {
    /// Not a valid filter expression (Defender: 400 `ODataError`).
    Malformed(String),
    /// Valid OData, but not modelled by the simulator (501).
    NotImplemented(String),
}

/// How a property's literal must look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FieldType {
    /// A GUID, bare or quoted.
    Guid,
    /// A quoted string.
    String,
    /// A quoted string, or a bare GUID (machine action ids are GUIDs).
    GuidOrString,
    /// A bare integer (`Edm.Int64`).
    Integer,
    /// A collection of strings: only `property/any(v: v eq 'x')` compares it.
    StringCollection,
}

/// A filterable property of an entity.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Field {
    pub(crate) name: &'static str,
    pub(crate) ty: FieldType,
}

pub(crate) const MACHINE_FIELDS: &[Field] = &[
    Field {
        name: "aadDeviceId",
        ty: FieldType::Guid,
    },
    Field {
        name: "id",
        ty: FieldType::String,
    },
    Field {
        name: "computerDnsName",
        ty: FieldType::String,
    },
    Field {
        name: "healthStatus",
        ty: FieldType::String,
    },
    Field {
        name: "rbacGroupId",
        ty: FieldType::Integer,
    },
    Field {
        name: "machineTags",
        ty: FieldType::StringCollection,
    },
];

pub(crate) const ACTION_FIELDS: &[Field] = &[
    Field {
        name: "machineId",
        ty: FieldType::String,
    },
    Field {
        name: "type",
        ty: FieldType::String,
    },
    Field {
        name: "status",
        ty: FieldType::String,
    },
    Field {
        name: "id",
        ty: FieldType::GuidOrString,
    },
    Field {
        name: "requestor",
        ty: FieldType::String,
    },
];

/// One accepted `field eq value` clause; `value` is unquoted and unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Condition {
    pub(crate) field: &'static str,
    pub(crate) value: String,
}

/// Parses `input` and checks it against the entity's `fields`. `entity` only
/// names the collection in error messages.
pub(crate) fn parse(
    input: &str,
    entity: &str,
    fields: &[Field],
) -> Result<Vec<Condition>, FilterError> {
    let comparisons = parse_syntax(&tokenize(input)?)?;
    comparisons
        .into_iter()
        .map(|c| check(c, entity, fields))
        .collect()
}

/// Case-insensitive check for the canonical `8-4-4-4-12` hex GUID form.
pub(crate) fn is_guid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    Quoted(String),
    Open,
    Close,
    Comma,
    Colon,
}

fn tokenize(input: &str) -> Result<Vec<Token>, FilterError> {
    let mut tokens = Vec::new();
    let mut chars = input.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' | ')' | ',' | ':' => {
                chars.next();
                tokens.push(match c {
                    '(' => Token::Open,
                    ')' => Token::Close,
                    ':' => Token::Colon,
                    _ => Token::Comma,
                });
            }
            '\'' => {
                chars.next();
                let mut text = String::new();
                loop {
                    match chars.next() {
                        // '' inside a literal is an escaped quote.
                        Some('\'') if chars.peek() == Some(&'\'') => {
                            chars.next();
                            text.push('\'');
                        }
                        Some('\'') => break,
                        Some(other) => text.push(other),
                        None => {
                            return Err(FilterError::Malformed(format!(
                                "unterminated string literal '{text}"
                            )));
                        }
                    }
                }
                tokens.push(Token::Quoted(text));
            }
            _ => {
                let mut word = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() || matches!(c, '(' | ')' | ',' | ':' | '\'') {
                        break;
                    }
                    word.push(c);
                    chars.next();
                }
                tokens.push(Token::Word(word));
            }
        }
    }
    Ok(tokens)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Literal {
    Quoted(String),
    Bare(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Comparison {
    property: String,
    literal: Literal,
    /// Written as `property/any(v: v eq literal)`.
    any: bool,
}

const OTHER_OPERATORS: &[&str] = &[
    "ne", "gt", "ge", "lt", "le", "has", "in", "add", "sub", "mul", "div", "divby", "mod",
];

fn not_implemented(what: impl std::fmt::Display) -> FilterError {
    FilterError::NotImplemented(format!("{what} is not modelled in $filter"))
}

fn malformed(what: impl Into<String>) -> FilterError {
    FilterError::Malformed(what.into())
}

fn parse_syntax(tokens: &[Token]) -> Result<Vec<Comparison>, FilterError> {
    if tokens.is_empty() {
        return Err(malformed("the filter is empty"));
    }
    let mut rest = tokens;
    let mut comparisons = Vec::new();
    loop {
        let (comparison, after) = parse_comparison(rest)?;
        comparisons.push(comparison);
        rest = after;
        match rest.split_first() {
            None => return Ok(comparisons),
            Some((Token::Word(w), after)) if w == "and" => {
                if after.is_empty() {
                    return Err(malformed("'and' must be followed by a comparison"));
                }
                rest = after;
            }
            Some((Token::Word(w), _)) if w == "or" => {
                return Err(not_implemented("the 'or' operator"));
            }
            Some((other, _)) => {
                return Err(malformed(format!(
                    "expected 'and' or the end of the filter, found {}",
                    describe(other)
                )));
            }
        }
    }
}

/// Parses `property eq literal` from the front of `tokens`.
fn parse_comparison(tokens: &[Token]) -> Result<(Comparison, &[Token]), FilterError> {
    let (property, rest) = match tokens {
        [Token::Word(w), ..] if w == "not" => return Err(not_implemented("the 'not' operator")),
        [Token::Word(w), Token::Open, rest @ ..] if w.ends_with("/any") => {
            return parse_any(&w[..w.len() - "/any".len()], rest);
        }
        [Token::Word(w), Token::Open, ..] if w.contains('/') => {
            return Err(not_implemented(format_args!(
                "the property path or lambda '{w}()'"
            )));
        }
        [Token::Word(w), Token::Open, ..] => {
            return Err(not_implemented(format_args!("the function {w}()")));
        }
        [Token::Word(w), rest @ ..] => (w.clone(), rest),
        [Token::Open, ..] => return Err(not_implemented("grouping with parentheses")),
        [Token::Quoted(_), ..] => {
            return Err(not_implemented("a literal on the left of a comparison"));
        }
        [other, ..] => {
            return Err(malformed(format!(
                "expected a property name, found {}",
                describe(other)
            )));
        }
        [] => return Err(malformed("expected a comparison")),
    };
    if property.contains('/') {
        return Err(not_implemented(format_args!(
            "the property path or lambda '{property}'"
        )));
    }
    if !is_identifier(&property) {
        return Err(malformed(format!("'{property}' is not a property name")));
    }
    let rest = match rest {
        [Token::Word(op), rest @ ..] if op == "eq" => rest,
        [Token::Word(op), ..] if OTHER_OPERATORS.contains(&op.as_str()) => {
            return Err(not_implemented(format_args!("the '{op}' operator")));
        }
        [other, ..] => {
            return Err(malformed(format!(
                "expected an operator after '{property}', found {}",
                describe(other)
            )));
        }
        [] => {
            return Err(malformed(format!(
                "'{property}' must be followed by an operator and a value"
            )));
        }
    };
    let (literal, rest) = parse_literal(&property, rest)?;
    Ok((
        Comparison {
            property,
            literal,
            any: false,
        },
        rest,
    ))
}

/// The literal after `property eq`, and the tokens after it.
fn parse_literal<'t>(
    property: &str,
    rest: &'t [Token],
) -> Result<(Literal, &'t [Token]), FilterError> {
    Ok(match rest {
        [Token::Quoted(s), rest @ ..] => (Literal::Quoted(s.clone()), rest),
        [Token::Word(w), Token::Open, ..] => {
            return Err(not_implemented(format_args!("the function {w}()")));
        }
        [Token::Word(w), rest @ ..] if w != "and" && w != "or" => (Literal::Bare(w.clone()), rest),
        [Token::Open, ..] => return Err(not_implemented("grouping with parentheses")),
        [other, ..] => {
            return Err(malformed(format!(
                "expected a value after '{property} eq', found {}",
                describe(other)
            )));
        }
        [] => return Err(malformed(format!("missing value after '{property} eq'"))),
    })
}

/// `collection/any(v: v eq literal)`, from the tokens after `any(`. Only the
/// one comparison Defender documents is modelled inside the lambda.
fn parse_any<'t>(
    collection: &str,
    tokens: &'t [Token],
) -> Result<(Comparison, &'t [Token]), FilterError> {
    if !is_identifier(collection) {
        return Err(not_implemented(format_args!(
            "the property path '{collection}/any'"
        )));
    }
    let (variable, rest) = match tokens {
        [Token::Word(v), Token::Colon, rest @ ..] if is_identifier(v) => (v, rest),
        [Token::Close, ..] => {
            return Err(not_implemented(format_args!(
                "{collection}/any() without a lambda"
            )));
        }
        _ => {
            return Err(malformed(format!(
                "{collection}/any( must be followed by a variable and ':'"
            )));
        }
    };
    let rest = match rest {
        [Token::Word(v), Token::Word(op), rest @ ..] if v == variable && op == "eq" => rest,
        [Token::Word(v), Token::Word(op), ..] if v == variable => {
            return Err(not_implemented(format_args!(
                "the '{op}' operator inside {collection}/any()"
            )));
        }
        [Token::Word(v), Token::Open, ..] => {
            return Err(not_implemented(format_args!(
                "the function {v}() inside {collection}/any()"
            )));
        }
        [Token::Word(v), ..] => {
            return Err(malformed(format!(
                "'{v}' is not the lambda variable '{variable}' of {collection}/any()"
            )));
        }
        _ => {
            return Err(malformed(format!(
                "expected '{variable} eq <value>' inside {collection}/any()"
            )));
        }
    };
    let (literal, rest) = parse_literal(variable, rest)?;
    match rest {
        [Token::Close, rest @ ..] => Ok((
            Comparison {
                property: collection.to_owned(),
                literal,
                any: true,
            },
            rest,
        )),
        [Token::Word(w), ..] if w == "and" || w == "or" => Err(not_implemented(format_args!(
            "'{w}' inside {collection}/any()"
        ))),
        _ => Err(malformed(format!("{collection}/any( is not closed"))),
    }
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn describe(token: &Token) -> String {
    match token {
        Token::Word(w) => format!("'{w}'"),
        Token::Quoted(q) => format!("the string '{q}'"),
        Token::Open => "'('".to_owned(),
        Token::Close => "')'".to_owned(),
        Token::Comma => "','".to_owned(),
        Token::Colon => "':'".to_owned(),
    }
}

fn check(c: Comparison, entity: &str, fields: &[Field]) -> Result<Condition, FilterError> {
    let Some(field) = fields.iter().find(|f| f.name == c.property) else {
        let mut supported = String::new();
        for (i, f) in fields.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            let _ = write!(supported, "{sep}{}", f.name);
        }
        return Err(FilterError::NotImplemented(format!(
            "filtering {entity} on '{}' is not modelled in the simulator (modelled: {supported})",
            c.property
        )));
    };
    let prop = field.name;
    match (field.ty == FieldType::StringCollection, c.any) {
        (true, false) => {
            return Err(malformed(format!(
                "{prop} is a collection: compare its items with {prop}/any(tag: tag eq 'value')"
            )));
        }
        (false, true) => {
            return Err(malformed(format!(
                "{prop} is not a collection: any() needs one"
            )));
        }
        _ => {}
    }
    let value = match (field.ty, c.literal) {
        (_, Literal::Bare(b)) if b == "null" => {
            return Err(not_implemented(format_args!("comparing {prop} with null")));
        }
        (FieldType::Guid, Literal::Quoted(s) | Literal::Bare(s))
        | (FieldType::GuidOrString, Literal::Bare(s)) => {
            if !is_guid(&s) {
                return Err(malformed(format!(
                    "'{s}' is not a valid Guid literal for {prop}"
                )));
            }
            s
        }
        (FieldType::String | FieldType::GuidOrString, Literal::Quoted(s)) => s,
        (FieldType::String | FieldType::StringCollection, Literal::Bare(s)) => {
            return Err(malformed(format!(
                "{prop} must be compared with a quoted string literal, found {s}"
            )));
        }
        (FieldType::StringCollection, Literal::Quoted(s)) => s,
        (FieldType::Integer, Literal::Bare(s)) => match s.parse::<i64>() {
            Ok(n) => n.to_string(),
            Err(_) => {
                return Err(malformed(format!(
                    "'{s}' is not a valid Int64 literal for {prop}"
                )));
            }
        },
        (FieldType::Integer, Literal::Quoted(s)) => {
            return Err(malformed(format!(
                "{prop} is a number: compare it with a bare integer, not the string '{s}'"
            )));
        }
    };
    Ok(Condition { field: prop, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUID: &str = "3f1c7a52-8d4e-4b6a-9c21-5e7f0a1b2c3d";

    fn machines(input: &str) -> Result<Vec<Condition>, FilterError> {
        parse(input, "machines", MACHINE_FIELDS)
    }

    fn cond(field: &'static str, value: &str) -> Condition {
        Condition {
            field,
            value: value.to_owned(),
        }
    }

    fn is_malformed(r: Result<Vec<Condition>, FilterError>) -> bool {
        matches!(r, Err(FilterError::Malformed(_)))
    }

    fn is_not_implemented(r: Result<Vec<Condition>, FilterError>) -> bool {
        matches!(r, Err(FilterError::NotImplemented(_)))
    }

    #[test]
    fn aad_device_id_bare_and_quoted() {
        let expected = vec![cond("aadDeviceId", GUID)];
        assert_eq!(
            machines(&format!("aadDeviceId eq {GUID}")),
            Ok(expected.clone())
        );
        assert_eq!(machines(&format!("aadDeviceId eq '{GUID}'")), Ok(expected));
        let upper = GUID.to_ascii_uppercase();
        assert_eq!(
            machines(&format!("aadDeviceId eq {upper}")),
            Ok(vec![cond("aadDeviceId", &upper)])
        );
    }

    #[test]
    fn and_with_odd_spacing() {
        let input =
            format!("  aadDeviceId   eq\t'{GUID}'  and healthStatus eq 'Active'and id eq 'x'");
        // 'Active'and: a quote ends the literal, so no space is needed.
        assert_eq!(
            machines(&input),
            Ok(vec![
                cond("aadDeviceId", GUID),
                cond("healthStatus", "Active"),
                cond("id", "x")
            ])
        );
    }

    #[test]
    fn escaped_quote_in_string() {
        assert_eq!(
            machines("computerDnsName eq 'o''brien'"),
            Ok(vec![cond("computerDnsName", "o'brien")])
        );
    }

    #[test]
    fn malformed_filters() {
        for input in [
            "",
            "   ",
            "aadDeviceId",
            "aadDeviceId eq",
            "aadDeviceId eq ",
            "aadDeviceId equals 'x'",
            "aadDeviceId EQ 'x'",
            "aadDeviceId eq not-a-guid",
            "aadDeviceId eq '3f1c7a52-8d4e-4b6a-9c21'",
            "aadDeviceId eq 3f1c7a52-8d4e-4b6a-9c21-5e7f0a1b2c3dd",
            "id eq 'unterminated",
            "id eq bare",
            "id eq 'a' and",
            "id eq 'a' id eq 'b'",
            "id eq 'a')",
            "id 'a'",
            "9id eq 'a'",
            ", eq 'a'",
        ] {
            assert!(
                is_malformed(machines(input)),
                "{input:?} -> {:?}",
                machines(input)
            );
        }
    }

    #[test]
    fn unmodelled_filters_are_not_implemented() {
        for input in [
            "osPlatform eq 'Windows10'",
            "foo eq 'bar'",
            "id eq 'a' or id eq 'b'",
            "not (id eq 'a')",
            "startswith(computerDnsName,'DESK')",
            "(id eq 'a')",
            "id ne 'a'",
            "lastSeen gt 2024-01-01Z",
            "aadDeviceId eq null",
            "id eq tolower('A')",
            "'a' eq id",
        ] {
            assert!(
                is_not_implemented(machines(input)),
                "{input:?} -> {:?}",
                machines(input)
            );
        }
        let Err(FilterError::NotImplemented(message)) = machines("osPlatform eq 'Linux'") else {
            panic!("expected not implemented");
        };
        assert!(message.contains("osPlatform"), "{message}");
    }

    #[test]
    fn machine_tags_through_the_any_lambda() {
        let tag = |t: &str| Ok(vec![cond("machineTags", t)]);
        assert_eq!(
            machines("machineTags/any(tag: tag eq 'outbreak-42')"),
            tag("outbreak-42")
        );
        // Any variable name, any spacing; '' is an escaped quote.
        assert_eq!(
            machines("machineTags/any(t:t eq 'O''Brien lab')"),
            tag("O'Brien lab")
        );
        assert_eq!(
            machines(" machineTags/any( x : x eq 'a:b' ) and healthStatus eq 'Active'"),
            Ok(vec![
                cond("machineTags", "a:b"),
                cond("healthStatus", "Active")
            ])
        );
        for input in [
            "machineTags eq 'x'",
            "machineTags/any(tag: other eq 'x')",
            "machineTags/any(tag: tag eq 'x'",
            "machineTags/any(tag tag eq 'x')",
            "machineTags/any(tag: tag eq x)",
            "machineTags/any(tag: tag eq 'x') tag",
            "healthStatus/any(t: t eq 'Active')",
        ] {
            assert!(
                is_malformed(machines(input)),
                "{input:?} -> {:?}",
                machines(input)
            );
        }
        for input in [
            "machineTags/all(t: t eq 'x')",
            "machineTags/any()",
            "machineTags/any(t: startswith(t,'x'))",
            "machineTags/any(t: t ne 'x')",
            "machineTags/any(t: t eq 'a' or t eq 'b')",
            "machineTags/any(t: t eq 'a') or id eq 'b'",
            "vmMetadata/vmId eq 'x'",
        ] {
            assert!(
                is_not_implemented(machines(input)),
                "{input:?} -> {:?}",
                machines(input)
            );
        }
    }

    #[test]
    fn device_group_is_a_bare_integer() {
        assert_eq!(
            machines("rbacGroupId eq 7"),
            Ok(vec![cond("rbacGroupId", "7")])
        );
        assert_eq!(
            machines("rbacGroupId eq 0101 and machineTags/any(t: t eq 'x')"),
            Ok(vec![cond("rbacGroupId", "101"), cond("machineTags", "x")])
        );
        for input in [
            "rbacGroupId eq '7'",
            "rbacGroupId eq seven",
            "rbacGroupId eq 7.5",
            "rbacGroupId eq 99999999999999999999",
        ] {
            assert!(
                is_malformed(machines(input)),
                "{input:?} -> {:?}",
                machines(input)
            );
        }
        assert!(is_not_implemented(machines("rbacGroupId gt 7")));
    }

    #[test]
    fn action_fields() {
        let id = "5d1f6a3e-0000-4000-8000-000000000001";
        assert_eq!(
            parse(
                &format!("machineId eq 'abc' and type eq 'RestrictCodeExecution' and id eq {id}"),
                "machine actions",
                ACTION_FIELDS
            ),
            Ok(vec![
                cond("machineId", "abc"),
                cond("type", "RestrictCodeExecution"),
                cond("id", id)
            ])
        );
        assert!(matches!(
            parse(
                "creationDateTimeUtc gt 2024-01-01Z",
                "machine actions",
                ACTION_FIELDS
            ),
            Err(FilterError::NotImplemented(_))
        ));
    }

    #[test]
    fn guid_check() {
        assert!(is_guid(GUID));
        assert!(is_guid(&GUID.to_ascii_uppercase()));
        assert!(!is_guid("3f1c7a528d4e4b6a9c215e7f0a1b2c3d"));
        assert!(!is_guid("{3f1c7a52-8d4e-4b6a-9c21-5e7f0a1b2c3d}"));
        assert!(!is_guid("3f1c7a52-8d4e-4b6a-9c21-5e7f0a1b2c3g"));
        assert!(!is_guid("ééééééé-8d4e-4b6a-9c21-5e7f0a1b2c3"));
    }
}
