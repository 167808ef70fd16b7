//! The layering `src/lib.rs` describes, checked against the imports: each
//! folder uses only the ones listed after it, and no import circle joins
//! files of different folders. Reads the sources; starts nothing.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// Top to bottom, as `src/lib.rs` lists them: a module may use only the ones
/// after it (and itself).
const ORDER: &[&str] = &[
    "main",
    "lib",
    "cli",
    "startup",
    "config",
    "telemetry",
    "host",
    "service",
    "coordination",
    "simulator",
    "defender",
];

/// Every library source file (path relative to `src/`, `/`-separated) and its
/// text without unit tests, comments and string literals.
fn sources() -> BTreeMap<String, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(root).unwrap().to_string_lossy();
                let rel = rel.replace('\\', "/");
                if rel.ends_with("tests.rs") {
                    continue;
                }
                out.insert(rel, code_only(&std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    walk(&root, &root, &mut out);
    out
}

/// The text up to its unit tests, without comments and string contents.
fn code_only(text: &str) -> String {
    let text = text.split("#[cfg(test)]\nmod ").next().unwrap();
    let mut out = String::new();
    for line in text.lines() {
        let mut in_string = false;
        let mut escaped = false;
        let mut prev = ' ';
        for c in line.chars() {
            if in_string {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    in_string = false;
                }
                continue;
            }
            if c == '/' && prev == '/' {
                out.pop();
                break;
            }
            if c == '"' {
                in_string = true;
            }
            out.push(c);
            prev = c;
        }
        out.push('\n');
    }
    out
}

/// The module path of a file: `host/functions/mod.rs` is `[host, functions]`.
fn module_of(file: &str) -> Vec<String> {
    let mut parts: Vec<String> = file
        .trim_end_matches(".rs")
        .split('/')
        .map(str::to_owned)
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) && parts.len() > 1
    {
        parts.pop();
    }
    parts
}

/// Every path a `use` tree names, braces expanded.
fn expand(tree: &str, prefix: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let base = tree[..open].trim_end_matches("::");
        let close = tree.rfind('}').filter(|c| *c > open).unwrap_or(tree.len());
        let inner = &tree[open + 1..close];
        let prefix = [prefix, base]
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join("::");
        let (mut depth, mut start) = (0, 0);
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&inner[start..i], &prefix, out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        expand(&inner[start..], &prefix, out);
    } else if !tree.is_empty() {
        let tree = tree.split(" as ").next().unwrap().trim();
        out.push(if prefix.is_empty() {
            tree.to_owned()
        } else {
            format!("{prefix}::{tree}")
        });
    }
}

/// The files each file uses, through `use` items and inline `crate::`,
/// `super::` and `self::` paths.
fn imports(files: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let resolve = |segments: &[String]| -> Option<String> {
        (1..=segments.len()).rev().find_map(|n| {
            let stem = segments[..n].join("/");
            [format!("{stem}.rs"), format!("{stem}/mod.rs")]
                .into_iter()
                .find(|f| files.contains_key(f))
        })
    };
    let mut edges = BTreeMap::new();
    for (file, code) in files {
        let here = module_of(file);
        let mut paths = Vec::new();
        for item in code.split("use ").skip(1) {
            let ours = ["crate", "super", "self"]
                .iter()
                .any(|s| item.starts_with(s));
            if let Some(end) = item.find(';').filter(|_| ours) {
                expand(&item[..end].replace('\n', " "), "", &mut paths);
            }
        }
        for start in ["crate::", "super::", "self::"] {
            for (i, _) in code.match_indices(start) {
                let before = code[..i].chars().last().unwrap_or(' ');
                if before.is_alphanumeric() || before == '_' || before == ':' {
                    continue;
                }
                let path: String = code[i..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                // `crate::{…}`: the `use` tree above has it.
                if !path.ends_with("::") {
                    paths.push(path);
                }
            }
        }
        let mut used = BTreeSet::new();
        for path in paths {
            let mut segments: Vec<String> = path
                .split("::")
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect();
            match segments.first().map(String::as_str) {
                Some("crate") => {
                    segments.remove(0);
                }
                Some("super") => {
                    let mut base = here.clone();
                    while segments.first().is_some_and(|s| s == "super") {
                        segments.remove(0);
                        base.pop();
                    }
                    segments.splice(0..0, base);
                }
                Some("self") => {
                    segments.splice(0..1, here.clone());
                }
                _ => continue,
            }
            if let Some(target) = resolve(&segments).filter(|t| t != file) {
                used.insert(target);
            }
        }
        edges.insert(file.clone(), used);
    }
    edges
}

fn layer(file: &str) -> &str {
    file.split('/').next().unwrap().trim_end_matches(".rs")
}

#[test]
fn each_layer_uses_only_the_layers_after_it() {
    let files = sources();
    let edges = imports(&files);
    let rank = |file: &str| {
        ORDER
            .iter()
            .position(|l| *l == layer(file))
            .unwrap_or_else(|| panic!("{file}: add its folder to ORDER and to src/lib.rs"))
    };
    let mut wrong = Vec::new();
    for (from, used) in &edges {
        for to in used {
            if rank(to) < rank(from) {
                wrong.push(format!("{from} uses {to}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layering:\n{wrong:#?}"
    );
    // The check sees the imports it is meant to see.
    assert!(edges["host/functions/restrict.rs"].contains("service/runbook/mod.rs"));
    assert!(edges["config.rs"].contains("coordination/settings.rs"));
}

#[test]
fn no_import_circle_joins_files_of_different_folders() {
    let edges = imports(&sources());
    let folder = |f: &str| f.rsplit_once('/').map_or("", |(d, _)| d).to_owned();
    // Files each file reaches, by a walk from it; a circle is two files that
    // reach each other.
    let reach = |from: &String| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(f) = todo.pop() {
            for next in &edges[&f] {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let reached: BTreeMap<&String, BTreeSet<String>> =
        edges.keys().map(|f| (f, reach(f))).collect();
    let mut circles = BTreeSet::new();
    for (a, from_a) in &reached {
        for b in from_a {
            if folder(a) != folder(b) && reached[b].contains(*a) {
                circles.insert(format!("{a} <-> {b}"));
            }
        }
    }
    assert!(
        circles.is_empty(),
        "import circles across folders:\n{circles:#?}"
    );
}
