//! The notebooks in notebooks/ are generated from examples/ (one markdown cell from the `//!`
//! header, a `:dep` cell for the evcxr kernel, then the items and the body of `main` as code
//! cells, with the example's printed output saved under the last cell). This test fails when an
//! example changed and its notebook was not regenerated; regenerate (running each example for its
//! output) with `FERROLENS_BLESS_NOTEBOOKS=1 cargo test --release --test notebooks`.

use serde_json::{json, Value};
use std::path::PathBuf;

const EXAMPLES: [&str; 4] = ["logit_lens", "steering", "probe", "custom_metric"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// (markdown, code cells) of an example source.
fn cells(src: &str) -> (String, Vec<String>) {
    let mut doc = Vec::new();
    let mut rest = Vec::new();
    for line in src.lines() {
        match line.strip_prefix("//!") {
            Some(d) if rest.is_empty() => doc.push(d.strip_prefix(' ').unwrap_or(d).to_string()),
            _ => rest.push(line.to_string()),
        }
    }
    let body = rest.join("\n");
    let mut deps = ":dep ferrolens = { path = \"..\" }\n:dep candle-core = \"0.11\"\n:dep candle-nn = \"0.11\"\n:dep anyhow = \"1\"".to_string();
    if body.contains("linfa") {
        deps.push_str("\n:dep linfa = \"0.8\"\n:dep linfa-logistic = \"0.8\"");
    }
    let mut code = vec![deps];
    // Items before `fn main`, split at blank lines; then main's body without its wrapper.
    let (items, main) = body.split_once("fn main() -> anyhow::Result<()> {").expect("example has fn main() -> anyhow::Result<()>");
    for chunk in items.split("\n\n").map(str::trim).filter(|c| !c.is_empty()) {
        code.push(chunk.to_string());
    }
    let main = main.trim_end().strip_suffix('}').expect("main ends with }").trim_end();
    let main = main.strip_suffix("Ok(())").unwrap_or(main).trim_end();
    let lines: Vec<&str> = main.lines().map(|l| l.strip_prefix("    ").unwrap_or(l)).collect();
    code.push(lines.join("\n").trim().to_string());
    (doc.join("\n").trim().to_string(), code)
}

fn notebook(doc: &str, code: &[String], output: &str) -> Value {
    let src = |s: &str| -> Value {
        let lines: Vec<String> = s.split_inclusive('\n').map(String::from).collect();
        json!(lines)
    };
    let mut cs = vec![json!({"cell_type": "markdown", "metadata": {}, "source": src(doc)})];
    for (i, c) in code.iter().enumerate() {
        let outputs =
            if i + 1 == code.len() && !output.is_empty() { json!([{"output_type": "stream", "name": "stdout", "text": src(output)}]) } else { json!([]) };
        cs.push(json!({"cell_type": "code", "execution_count": null, "metadata": {}, "outputs": outputs, "source": src(c)}));
    }
    json!({"cells": cs, "metadata": {"kernelspec": {"display_name": "Rust", "language": "rust", "name": "rust"},
            "language_info": {"name": "Rust", "file_extension": ".rs", "mimetype": "text/rust"}}, "nbformat": 4, "nbformat_minor": 5})
}

fn code_of(nb: &Value) -> Vec<String> {
    nb["cells"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["cell_type"] == "code")
        .map(|c| c["source"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect::<String>())
        .collect()
}

fn example_binary(name: &str) -> PathBuf {
    // target/release/deps/notebooks-HASH -> target/release/examples/NAME
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("examples").join(name)
}

#[test]
fn notebooks_match_the_examples() {
    let bless = std::env::var("FERROLENS_BLESS_NOTEBOOKS").is_ok();
    for name in EXAMPLES {
        let src = std::fs::read_to_string(root().join("examples").join(format!("{name}.rs"))).unwrap();
        let (doc, code) = cells(&src);
        let path = root().join("notebooks").join(format!("{name}.ipynb"));
        if bless {
            let dir = std::env::temp_dir().join(format!("ferrolens-nb-{name}"));
            std::fs::create_dir_all(&dir).unwrap();
            let out = std::process::Command::new(example_binary(name))
                .current_dir(&dir)
                .output()
                .expect("build the examples first: cargo build --release --examples");
            assert!(out.status.success(), "{name} failed: {}", String::from_utf8_lossy(&out.stderr));
            let nb = notebook(&doc, &code, &String::from_utf8_lossy(&out.stdout));
            std::fs::write(&path, serde_json::to_string_pretty(&nb).unwrap() + "\n").unwrap();
        }
        let committed: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("{} is missing", path.display()))).unwrap();
        assert_eq!(code_of(&committed), code, "{} is out of date with examples/{name}.rs: regenerate it (see this test's header)", path.display());
        let last = committed["cells"].as_array().unwrap().last().unwrap();
        assert!(!last["outputs"].as_array().unwrap().is_empty(), "{name}: the saved output is missing");
    }
}

/// evcxr (the Rust Jupyter kernel) keeps every top-level variable of a cell between cells, and
/// cannot keep one that borrows or holds a closure ("contains a reference with a non-static
/// lifetime so can't be persisted"). The examples' main bodies therefore bind only owned values at
/// the top level (borrowing values live in blocks, closures become fn items) with types of their
/// own; this checks the patterns that broke them before (scripts/run_notebooks.py runs them in evcxr).
#[test]
fn notebook_cells_keep_only_owned_values() {
    for name in EXAMPLES {
        let src = std::fs::read_to_string(root().join("examples").join(format!("{name}.rs"))).unwrap();
        let (_, code) = cells(&src);
        for cell in &code[2..] {
            for line in cell.lines().filter(|l| l.starts_with("let ")) {
                let (lhs, rhs) = line.split_once('=').map(|(l, r)| (l, r.trim())).unwrap_or((line, ""));
                let bad = rhs.starts_with('|') || rhs.starts_with("move |") || rhs.starts_with('&')
                    || rhs.ends_with(".tokenizer()?;") || rhs.starts_with("PatchingData {")
                    // evcxr's REPL compiles statement by statement: no inference from later lines.
                    || (rhs.starts_with("Vec::new()") && !lhs.contains(':'));
                assert!(
                    !bad,
                    "{name}: top-level `{line}` cannot be kept by evcxr: bind an owned value with a known type (clone, a block, an fn item, an annotation)"
                );
            }
        }
    }
}
