//! The stages' imports point one way: no import cycle between the top-level modules of
//! `agent/src` (a module's tests are left out; they may reach anywhere). An edge is any
//! `crate::<module>` path in a module's code.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("reading agent/src") {
        let p = e.expect("a directory entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Top-level module → the top-level modules its code names.
fn import_graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut g = Graph::new();
    for f in files {
        let rel = f.strip_prefix(src).expect("below src");
        let first = rel.components().next().expect("a path");
        let top = first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        let text = std::fs::read_to_string(&f).expect("reading a source file");
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        let deps = g.entry(top.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let name: String = code[i + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != top {
                deps.insert(name);
            }
        }
    }
    g
}

/// Every cycle, as the modules on it (one per strongly connected component of two or more).
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    // Reachability is enough at this size (a dozen modules): a and b share a cycle when each
    // reaches the other.
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_string()];
        while let Some(n) = todo.pop() {
            for d in g.get(&n).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    todo.push(d.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> = g.keys().map(|k| (k, reach(k))).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for a in g.keys() {
        if done.contains(a) || !reaches[a].contains(a) {
            continue;
        }
        let comp: Vec<String> = g
            .keys()
            .filter(|b| reaches[a].contains(*b) && reaches[*b].contains(a))
            .cloned()
            .collect();
        done.extend(comp.iter().cloned());
        out.push(comp);
    }
    out
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    let g = import_graph(&src());
    assert!(g.len() >= 10, "modules found: {:?}", g.keys());
    let found = cycles(&g);
    assert!(found.is_empty(), "import cycles: {found:?}\ngraph: {g:#?}");
}

#[test]
fn the_check_finds_a_cycle_when_one_is_added() {
    let mut g = import_graph(&src());
    // The pipeline imports no stage; one import of the store from it closes a cycle through
    // every stage that imports both.
    g.entry("pipeline".into())
        .or_default()
        .insert("store".into());
    let found = cycles(&g);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].contains(&"pipeline".to_string()) && found[0].contains(&"store".to_string()),
        "{found:?}"
    );
}
