//! OData system query options (`$filter`, `$top`, `$skip`, `$orderby`) and
//! server-driven paging with `@odata.nextLink`.
//!
//! Unknown `$` options are a `400 ODataError`, as Defender answers for the
//! docs' misspelt `$stop`; real OData options the simulator does not model
//! (`$select`, `$count`, ...) are `501`. Parameters without `$` are ignored
//! and carried over into `@odata.nextLink`.

use std::fmt::Write as _;

/// Why the query string was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum QueryError {
    /// 400 `ODataError`.
    Malformed(String),
    /// 501 `NotImplementedInSimulator`.
    NotImplemented(String),
}

/// What an endpoint accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// A single entity or an action call: no system query options.
    Single,
    /// `/api/machines`: `$filter`, `$top`, `$skip`.
    Machines,
    /// `/api/machineactions`: also `$orderby=creationDateTimeUtc desc`.
    Actions,
}

/// Real OData system query options the simulator does not model.
const UNMODELLED_OPTIONS: &[&str] = &[
    "$select",
    "$expand",
    "$count",
    "$search",
    "$format",
    "$skiptoken",
    "$deltatoken",
    "$apply",
    "$compute",
    "$index",
    "$schemaversion",
    "$levels",
    "$id",
];

/// The one `$orderby` the simulator honours; it is also the default order.
const NEWEST_FIRST: &str = "creationDateTimeUtc desc";

pub(crate) const MAX_TOP: usize = 10_000;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct QueryOptions {
    pub(crate) filter: Option<String>,
    pub(crate) top: Option<usize>,
    pub(crate) skip: usize,
    /// `$orderby=creationDateTimeUtc desc` was given.
    pub(crate) newest_first: bool,
    /// Every decoded parameter except `$top` and `$skip`, in order, for nextLink.
    carried: Vec<(String, String)>,
}

pub(crate) fn parse_query(raw: Option<&str>, shape: Shape) -> Result<QueryOptions, QueryError> {
    let mut options = QueryOptions::default();
    let mut seen: Vec<String> = Vec::new();
    for (key, value) in url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        let (key, value) = (key.into_owned(), value.into_owned());
        if !key.starts_with('$') {
            options.carried.push((key, value));
            continue;
        }
        if seen.contains(&key) {
            return Err(QueryError::Malformed(format!(
                "The query option {key} is specified more than once"
            )));
        }
        seen.push(key.clone());
        let known = matches!(key.as_str(), "$filter" | "$top" | "$skip" | "$orderby");
        if UNMODELLED_OPTIONS.contains(&key.as_str()) || (known && shape == Shape::Single) {
            return Err(QueryError::NotImplemented(format!(
                "The query option {key} is not modelled by the simulator on this endpoint"
            )));
        }
        match key.as_str() {
            "$filter" => {
                options.filter = Some(value.clone());
                options.carried.push((key, value));
            }
            "$top" => options.top = Some(parse_top(&value)?),
            "$skip" => {
                options.skip = value.trim().parse().map_err(|_| {
                    QueryError::Malformed(format!(
                        "Invalid value '{value}' for $skip: expected a non-negative integer"
                    ))
                })?;
            }
            "$orderby" if shape == Shape::Actions && value.trim() == NEWEST_FIRST => {
                options.newest_first = true;
                options.carried.push((key, value));
            }
            "$orderby" => {
                return Err(QueryError::NotImplemented(format!(
                    "$orderby={value} is not modelled by the simulator (only '{NEWEST_FIRST}' on machineactions)"
                )));
            }
            _ => {
                return Err(QueryError::Malformed(format!(
                    "The query parameter '{key}' is not supported"
                )));
            }
        }
    }
    Ok(options)
}

fn parse_top(value: &str) -> Result<usize, QueryError> {
    match value.trim().parse::<usize>() {
        Ok(top) if (1..=MAX_TOP).contains(&top) => Ok(top),
        _ => Err(QueryError::Malformed(format!(
            "Invalid value '{value}' for $top: expected an integer from 1 to {MAX_TOP}"
        ))),
    }
}

/// Applies `$skip`/`$top` and cuts the result into a page of at most
/// `page_size` rows. If more rows remain, also returns the absolute nextLink
/// (`base` + `path` + the same options, with `$skip` moved on and `$top`
/// reduced by what this page delivered). With `next_link_with_top` off, a
/// request with `$top` gets its whole window (up to `$top` rows) and never a
/// nextLink, as microsoft-365-docs#8489 reports of Defender.
pub(crate) fn page<T>(
    rows: Vec<T>,
    options: &QueryOptions,
    page_size: usize,
    next_link_with_top: bool,
    base: &str,
    path: &str,
) -> (Vec<T>, Option<String>) {
    let mut window: Vec<T> = rows
        .into_iter()
        .skip(options.skip)
        .take(options.top.unwrap_or(usize::MAX))
        .collect();
    if window.len() <= page_size || (options.top.is_some() && !next_link_with_top) {
        return (window, None);
    }
    window.truncate(page_size);
    let mut params = options.carried.clone();
    if let Some(top) = options.top {
        params.push(("$top".to_owned(), (top - page_size).to_string()));
    }
    params.push((
        "$skip".to_owned(),
        options.skip.saturating_add(page_size).to_string(),
    ));
    let query: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect();
    (window, Some(format!("{base}{path}?{}", query.join("&"))))
}

/// Percent-encodes everything except RFC 3986 unreserved characters and `$`
/// (so option names stay readable). Spaces become `%20`, not `+`.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'$') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_collection_options() {
        let opts = parse_query(
            Some("$filter=id%20eq%20%27a%27&$top=5&$skip=2&api-version=1"),
            Shape::Machines,
        )
        .expect("valid");
        assert_eq!(opts.filter.as_deref(), Some("id eq 'a'"));
        assert_eq!(opts.top, Some(5));
        assert_eq!(opts.skip, 2);
    }

    #[test]
    fn rejects_bad_options() {
        let malformed =
            |q: &str, shape| matches!(parse_query(Some(q), shape), Err(QueryError::Malformed(_)));
        let unmodelled = |q: &str, shape| {
            matches!(
                parse_query(Some(q), shape),
                Err(QueryError::NotImplemented(_))
            )
        };
        assert!(malformed("$stop=2", Shape::Actions));
        assert!(malformed("$top=0", Shape::Machines));
        assert!(malformed("$top=10001", Shape::Machines));
        assert!(malformed("$top=ten", Shape::Machines));
        assert!(malformed("$skip=-1", Shape::Machines));
        assert!(malformed("$top=1&$top=2", Shape::Machines));
        assert!(unmodelled("$select=id", Shape::Machines));
        assert!(unmodelled("$orderby=lastSeen%20desc", Shape::Machines));
        assert!(unmodelled(
            "$orderby=creationDateTimeUtc%20desc",
            Shape::Machines
        ));
        assert!(unmodelled(
            "$orderby=creationDateTimeUtc%20asc",
            Shape::Actions
        ));
        assert!(unmodelled("$top=1", Shape::Single));
        assert!(parse_query(Some("$orderby=creationDateTimeUtc%20desc"), Shape::Actions).is_ok());
        assert!(parse_query(Some("$top=10000"), Shape::Actions).is_ok());
        assert!(parse_query(None, Shape::Single).is_ok());
    }

    #[test]
    fn pages_with_next_link() {
        let opts = parse_query(
            Some("$filter=healthStatus%20eq%20%27Active%27"),
            Shape::Machines,
        )
        .expect("valid");
        let (rows, next) = page(
            (0..5).collect(),
            &opts,
            2,
            true,
            "http://sim",
            "/api/machines",
        );
        assert_eq!(rows, [0, 1]);
        let next = next.expect("more rows");
        assert_eq!(
            next,
            "http://sim/api/machines?$filter=healthStatus%20eq%20%27Active%27&$skip=2"
        );
        let query = next.split_once('?').map(|(_, q)| q);
        let opts = parse_query(query, Shape::Machines).expect("valid");
        assert_eq!(opts.filter.as_deref(), Some("healthStatus eq 'Active'"));
        let (rows, next) = page(
            (0..5).collect(),
            &opts,
            2,
            true,
            "http://sim",
            "/api/machines",
        );
        assert_eq!(rows, [2, 3]);
        let opts = parse_query(
            next.as_deref()
                .and_then(|n| n.split_once('?'))
                .map(|(_, q)| q),
            Shape::Machines,
        )
        .expect("valid");
        let (rows, next) = page(
            (0..5).collect(),
            &opts,
            2,
            true,
            "http://sim",
            "/api/machines",
        );
        assert_eq!(rows, [4]);
        assert_eq!(next, None);
    }

    #[test]
    fn top_limits_the_window_across_pages() {
        let opts = parse_query(Some("$top=3&$skip=1"), Shape::Actions).expect("valid");
        let (rows, next) = page(
            (0..10).collect(),
            &opts,
            2,
            true,
            "http://sim",
            "/api/machineactions",
        );
        assert_eq!(rows, [1, 2]);
        assert_eq!(
            next.as_deref(),
            Some("http://sim/api/machineactions?$top=1&$skip=3")
        );
        let (rows, next) = page(
            (0..10).collect(),
            &opts,
            5,
            true,
            "http://sim",
            "/api/machineactions",
        );
        assert_eq!(rows, [1, 2, 3]);
        assert_eq!(next, None);
    }
}
