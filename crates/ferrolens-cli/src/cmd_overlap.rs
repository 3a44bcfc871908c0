//! `ferrolens overlap`: heads shared by two circuits (Merullo et al. 2023 report 78% of the
//! in-circuit heads of GPT-2 Medium shared between IOI and Colored Objects).

use anyhow::{Context, Result};
use std::collections::BTreeSet;

/// Arguments of `ferrolens overlap`.
#[derive(clap::Args)]
pub struct Args {
    /// circuit.json of the first study (e.g. out/ioi/circuit.json).
    a: std::path::PathBuf,
    /// circuit.json of the second study.
    b: std::path::PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn heads(p: &std::path::Path) -> Result<(String, BTreeSet<String>)> {
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        .with_context(|| format!("{} is not a circuit.json written by ferrolens discover", p.display()))?;
    let task = j["task"].as_str().unwrap_or("?").to_string();
    let nodes = j["nodes"].as_array().with_context(|| format!("{} has no `nodes`", p.display()))?;
    Ok((task, nodes.iter().filter(|n| !n["head"].is_null()).filter_map(|n| n["node"].as_str().map(String::from)).collect()))
}

pub fn run(a: Args) -> Result<()> {
    let (ta, ha) = heads(&a.a)?;
    let (tb, hb) = heads(&a.b)?;
    let shared: Vec<&String> = ha.intersection(&hb).collect();
    let frac = |n: usize| {
        if n == 0 {
            f64::NAN
        } else {
            shared.len() as f64 / n as f64
        }
    };
    let union = ha.union(&hb).count();
    let out = serde_json::json!({
        "a": {"task": ta, "heads": ha.len()}, "b": {"task": tb, "heads": hb.len()},
        "shared": shared, "shared_count": shared.len(),
        "fraction_of_a": frac(ha.len()), "fraction_of_b": frac(hb.len()),
        "fraction_of_smaller": frac(ha.len().min(hb.len())), "jaccard": if union == 0 { f64::NAN } else { shared.len() as f64 / union as f64 },
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{ta}: {} heads; {tb}: {} heads; shared: {}", ha.len(), hb.len(), shared.len());
        println!(
            "shared / {ta} heads = {:.1}%, shared / {tb} heads = {:.1}%, Jaccard {:.1}%",
            100.0 * out["fraction_of_a"].as_f64().unwrap_or(f64::NAN),
            100.0 * out["fraction_of_b"].as_f64().unwrap_or(f64::NAN),
            100.0 * out["jaccard"].as_f64().unwrap_or(f64::NAN)
        );
        println!("shared heads: {}", shared.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "));
    }
    Ok(())
}
