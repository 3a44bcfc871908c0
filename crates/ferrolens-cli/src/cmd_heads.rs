//! `ferrolens heads detect`: previous-token, duplicate-token and induction scores.
//! `ferrolens heads retrieval`: retrieval-head scores from needle-in-a-haystack decoding, with the
//! masking experiment.

use crate::parts::{sha256, write_part, Manifest, Part};
use anyhow::{bail, Context, Result};
use ferrolens_methods::heads::{detect_heads, repeated_random_tokens, Detector};
use ferrolens_methods::retrieval::{default_needles, niah_sweep, random_heads, ranked_heads, Needle, NiahOptions, NiahRun, NiahSweep};
use ferrolens_methods::shard::Shard;
use ferrolens_report::{heatmap, write_table, Column, Heatmap, Report, Table};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The haystack shipped with ferrolens: World Factbook backgrounds (public domain).
pub(crate) const HAYSTACK: &str = include_str!("../../../fixtures/haystack/factbook-backgrounds.txt");

/// Arguments of `ferrolens heads`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Head-detector scores on repeated random tokens (TransformerLens `head_detector`, mul measure).
    Detect {
        /// Model.
        #[arg(long, default_value = ferrolens_model::registry::DEFAULT_MODEL)]
        model: String,
        /// Prompts.
        #[arg(long, default_value_t = 8)]
        n: usize,
        /// Random tokens per half (each prompt is them twice).
        #[arg(long, default_value_t = 24)]
        half: usize,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Put the BOS token first and exclude attention to it from the scores.
        #[arg(long)]
        bos: bool,
        /// Output directory.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Retrieval-head scores (Wu et al. 2024): needle-in-a-haystack decoding with a KV cache,
    /// per-head argmax inside attention, then accuracy with the top-K heads masked vs K random ones.
    Retrieval(Box<RetrievalArgs>),
}

/// Arguments of `ferrolens heads retrieval`.
#[derive(clap::Args)]
pub struct RetrievalArgs {
    /// Model.
    #[arg(long, default_value = ferrolens_model::registry::DEFAULT_MODEL)]
    model: String,
    /// Context lengths in tokens (whole prompt), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [512usize, 1024, 2048])]
    lengths: Vec<usize>,
    /// Needle depths in [0, 1], comma-separated (default: --n-depths evenly spaced from 0 to 1).
    #[arg(long, value_delimiter = ',')]
    depths: Vec<f64>,
    /// Number of evenly spaced depths when --depths is not given (Wu et al. use 10).
    #[arg(long, default_value_t = 5)]
    n_depths: usize,
    /// Needles as JSONL ({"needle", "question", "answer"} per line); default: three built-in ones.
    #[arg(long)]
    needles: Option<PathBuf>,
    /// Use only the first N needles.
    #[arg(long)]
    n_needles: Option<usize>,
    /// Haystack text file; default: the World Factbook backgrounds shipped in fixtures/haystack.
    #[arg(long)]
    haystack: Option<PathBuf>,
    /// Tokens decoded per run at most.
    #[arg(long, default_value_t = 50)]
    max_new_tokens: usize,
    /// Prefill block size (memory grows with chunk x context, not context squared).
    #[arg(long, default_value_t = 512)]
    chunk: usize,
    /// Retrieval head = mean score above this.
    #[arg(long, default_value_t = 0.1)]
    threshold: f64,
    /// A run counts when the answer's ROUGE-1 recall is above this.
    #[arg(long, default_value_t = 0.5)]
    rouge_threshold: f64,
    /// Masking experiment: numbers of heads K to mask (top-K retrieval heads vs K random
    /// non-retrieval heads), comma-separated; 0 to skip.
    #[arg(long, value_delimiter = ',', default_values_t = [5usize, 20])]
    mask_k: Vec<usize>,
    /// Context lengths of the masking runs (default: the scoring lengths).
    #[arg(long, value_delimiter = ',')]
    mask_lengths: Vec<usize>,
    /// Random draws per K for the random-heads baseline.
    #[arg(long, default_value_t = 1)]
    random_draws: usize,
    /// Seed of the random heads.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Run shard I of N (0-based) of the scoring runs (lengths x depths x needles, round robin)
    /// and write them with a manifest to OUT/shard.json; `ferrolens merge` joins the parts. The
    /// masking experiment needs the merged ranking, so shards take `--mask-k 0`.
    #[arg(long)]
    shard: Option<Shard>,
}

pub fn run(a: Args) -> Result<()> {
    let (model, n, half, seed, bos, out) = match a.cmd {
        Sub::Detect { model, n, half, seed, bos, out } => (model, n, half, seed, bos, out),
        Sub::Retrieval(r) => return retrieval(*r),
    };
    if n == 0 || half == 0 {
        bail!("--n {n} --half {half}: the detectors need at least one prompt of at least one repeated token; give --n 1.. and --half 1..");
    }
    let model = crate::load_model(&model)?;
    crate::in_new_dir(&out, || detect(&model, n, half, seed, bos, &out))
}

/// `heads detect` after the checks: scores, tables and heatmaps into `out`.
fn detect(model: &ferrolens_model::HookedTransformer, n: usize, half: usize, seed: u64, bos: bool, out: &Path) -> Result<()> {
    // Models that need a BOS token (Gemma) always get one.
    let bos = bos || model.cfg.prepend_bos;
    let bos_id = if bos { model.cfg.bos_token_id.or(model.tokenizer.as_ref().and_then(|t| t.bos_id())) } else { None };
    // Ordinary vocabulary ids (skip the first 1000, where special and byte tokens live).
    let lo = 1000.min(model.cfg.d_vocab as u32 / 2);
    let tokens = repeated_random_tokens(n, half, lo, model.cfg.d_vocab as u32, seed, bos_id);
    let (mut det, mut layer, mut head, mut score) = (vec![], vec![], vec![], vec![]);
    let mut summary = serde_json::Map::new();
    let all = detect_heads(model, &tokens, &Detector::ALL, bos, false)?;
    for (d, s) in Detector::ALL.into_iter().zip(all) {
        for (l, row) in s.iter().enumerate() {
            for (h, v) in row.iter().enumerate() {
                det.push(d.name().to_string());
                layer.push(Some(l as u64));
                head.push(Some(h as u64));
                score.push(*v);
            }
        }
        let best = ranked_heads(&s);
        summary.insert(d.name().into(), serde_json::json!(best.iter().take(5).map(|(l, h, v)| format!("L{l}H{h}={v:.3}")).collect::<Vec<_>>()));
        heatmap(
            &Heatmap { title: format!("{} score", d.name()), values: s, row_label: "layer".into(), col_label: "head".into(), col_ticks: vec![] },
            &out.join(d.name()),
        )?;
    }
    let t =
        Table::new().col("detector", Column::Str(det)).col("layer", Column::OptU64(layer)).col("head", Column::OptU64(head)).col("score", Column::F64(score));
    write_table(&t, &out.join("scores"))?;
    println!("{}", serde_json::to_string_pretty(&serde_json::Value::Object(summary))?);
    Ok(())
}

fn read_needles(path: &Path) -> Result<Vec<Needle>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading needles from {}", path.display()))?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let n: Needle = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: expected {{\"needle\": .., \"question\": .., \"answer\": ..}}", path.display(), i + 1))?;
        out.push(n);
    }
    if out.is_empty() {
        bail!("{} holds no needles", path.display());
    }
    Ok(out)
}

/// Peak resident memory of this process in bytes (Linux `VmHWM`), if known.
pub(crate) fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The retrieval arguments that can be checked without the model, checked before any work.
fn check_retrieval_args(a: &RetrievalArgs) -> Result<()> {
    let at_least_one = [
        ("--n-depths", a.n_depths),
        ("--n-needles", a.n_needles.unwrap_or(1)),
        ("--chunk", a.chunk),
        ("--max-new-tokens", a.max_new_tokens),
        ("--random-draws", a.random_draws),
    ];
    if let Some((flag, _)) = at_least_one.iter().find(|(_, v)| *v == 0) {
        bail!("{flag} 0 leaves nothing to run; give {flag} 1 or more");
    }
    for (flag, v) in [("--threshold", a.threshold), ("--rouge-threshold", a.rouge_threshold)] {
        if !(0.0..=1.0).contains(&v) {
            bail!("{flag} {v} is outside [0, 1] (it compares a score or a ROUGE-1 recall, both fractions); give a value in [0, 1]");
        }
    }
    if let Some(d) = a.depths.iter().find(|d| !(0.0..=1.0).contains(*d)) {
        bail!("--depths {d} is outside [0, 1] (0 = needle at the start of the haystack, 1 = at the end); give depths in [0, 1]");
    }
    if a.lengths.is_empty() {
        bail!("--lengths lists no context lengths; give e.g. --lengths 512,1024");
    }
    if a.shard.is_some() && a.mask_k.iter().any(|&k| k > 0) {
        bail!(
            "--shard splits the scoring runs, but the masking experiment (--mask-k) masks the top heads of the merged ranking, which no shard has; \
             add --mask-k 0 to the shards, merge them, and run the masking unsharded if you need it"
        );
    }
    if let Some(p) = a.haystack.as_ref().filter(|p| !p.is_file()) {
        bail!("--haystack {} is not a readable file; give a text file (or drop --haystack for the built-in World Factbook text)", p.display());
    }
    Ok(())
}

fn retrieval(a: RetrievalArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    check_retrieval_args(&a)?;
    let model = crate::load_model(&a.model)?;
    let total_heads = model.cfg.n_layers * model.cfg.n_heads;
    if let Some(k) = a.mask_k.iter().find(|&&k| k > total_heads / 2) {
        bail!(
            "--mask-k {k}: {} has {total_heads} heads, and the baseline masks {k} random heads that are not retrieval heads besides the top {k}; give K up to {} (0 skips masking)",
            model.cfg.name,
            total_heads / 2
        );
    }
    crate::in_new_dir(&a.out, || {
        let mut needles = match &a.needles {
            Some(p) => read_needles(p)?,
            None => default_needles(),
        };
        if let Some(k) = a.n_needles {
            if k > needles.len() {
                bail!("--n-needles {k}: there are only {} needles; give at most {} (or more needles with --needles FILE)", needles.len(), needles.len());
            }
            needles.truncate(k);
        }
        let haystack = match &a.haystack {
            Some(p) => std::fs::read_to_string(p).with_context(|| format!("reading the haystack {}", p.display()))?,
            None => HAYSTACK.to_string(),
        };
        let depths: Vec<f64> = if a.depths.is_empty() {
            let n = a.n_depths;
            (0..n).map(|i| if n == 1 { 0.5 } else { i as f64 / (n - 1) as f64 }).collect()
        } else {
            a.depths.clone()
        };
        let opts = NiahOptions {
            lengths: a.lengths.clone(),
            depths: depths.clone(),
            max_new_tokens: a.max_new_tokens,
            chunk: a.chunk,
            rouge_threshold: a.rouge_threshold,
            shard: a.shard,
        };
        let mask_opts =
            NiahOptions { lengths: if a.mask_lengths.is_empty() { a.lengths.clone() } else { a.mask_lengths.clone() }, shard: None, ..opts.clone() };
        let sweep = |what: &str, opts: &NiahOptions, masked: &[(usize, usize)]| -> Result<NiahSweep> {
            let bar = crate::progress_bar(a.quiet, what);
            let cb = |done: usize, total: usize| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            };
            let s = niah_sweep(&model, &haystack, &needles, opts, masked, &cb)?;
            bar.finish_and_clear();
            Ok(s)
        };
        let t_score = std::time::Instant::now();
        let base = sweep("retrieval scores", &opts, &[])?;
        let score_s = t_score.elapsed().as_secs_f64();
        let mut info = RetrievalInfo {
            model: model.cfg.name.clone(),
            n_layers: model.cfg.n_layers,
            lengths: a.lengths.clone(),
            mask_lengths: mask_opts.lengths.clone(),
            depths: depths.clone(),
            needles: needles.clone(),
            threshold: a.threshold,
            scoring_seconds: score_s,
        };
        if let Some(shard) = a.shard {
            let units = a.lengths.len() * depths.len() * needles.len();
            let options = serde_json::json!({
                "lengths": a.lengths, "depths": depths, "max_new_tokens": a.max_new_tokens, "chunk": a.chunk,
                "threshold": a.threshold, "rouge_threshold": a.rouge_threshold,
            });
            let inputs = serde_json::to_vec(&(&needles, &haystack))?;
            let manifest = Manifest {
                data: a.needles.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "built-in needles and haystack".into()),
                data_sha256: sha256(&inputs),
                options,
                ..Manifest::new("heads retrieval", shard, &model, units, "run % N == I over the runs in (length, depth, needle) order", score_s)?
            };
            let runs = base.runs.iter().map(|r| (r.clone(), r.scores.clone())).collect();
            write_part(&a.out, &Part { manifest, payload: RetrievalPayload { info, runs } })?;
            if !a.quiet {
                eprintln!("shard {shard}: {} of {units} runs in {score_s:.1} s; wrote {}", base.runs.len(), a.out.join(crate::parts::PART_FILE).display());
            }
            return Ok(());
        }
        let scores = base.head_scores();
        let ranked = ranked_heads(&scores);
        // Masking experiment: top-K retrieval heads vs K random heads scoring at most the threshold.
        // The unmasked runs at the masking lengths: taken from the scoring sweep when it has them.
        let mask_base = if a.mask_k.iter().all(|&k| k == 0) {
            base.clone()
        } else if mask_opts.lengths.iter().all(|l| opts.lengths.contains(l)) {
            NiahSweep { runs: base.runs.iter().filter(|r| mask_opts.lengths.contains(&r.length)).cloned().collect() }
        } else {
            sweep("masking baseline", &mask_opts, &[])?
        };
        let mut mask_rows: Vec<(String, usize, usize, f64, f64, String)> =
            vec![("none".into(), 0, 0, mask_base.accuracy(), mask_base.mean_rouge(), String::new())];
        for &k in a.mask_k.iter().filter(|&&k| k > 0) {
            let top: Vec<(usize, usize)> = ranked.iter().take(k).map(|x| (x.0, x.1)).collect();
            let s = sweep(&format!("mask top {k}"), &mask_opts, &top)?;
            mask_rows.push(("top".into(), k, 0, s.accuracy(), s.mean_rouge(), fmt_heads(&top)));
            for draw in 0..a.random_draws {
                let rnd = random_heads(&scores, a.threshold, k, a.seed + draw as u64);
                if rnd.len() < k {
                    bail!("only {} heads score at most {} : cannot draw {k} random non-retrieval heads", rnd.len(), a.threshold);
                }
                let s = sweep(&format!("mask random {k}"), &mask_opts, &rnd)?;
                mask_rows.push(("random".into(), k, draw, s.accuracy(), s.mean_rouge(), fmt_heads(&rnd)));
            }
        }
        info.scoring_seconds = score_s;
        write_retrieval(&a.out, &info, &base, &mask_rows, t0.elapsed().as_secs_f64(), None)
    })
}

/// What the outputs of `heads retrieval` are written from, besides the runs (no model needed).
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct RetrievalInfo {
    model: String,
    n_layers: usize,
    lengths: Vec<usize>,
    mask_lengths: Vec<usize>,
    depths: Vec<f64>,
    needles: Vec<Needle>,
    threshold: f64,
    scoring_seconds: f64,
}

/// A `heads retrieval` shard's part: its scoring runs with their per-head scores.
#[derive(Serialize, Deserialize)]
pub(crate) struct RetrievalPayload {
    info: RetrievalInfo,
    runs: Vec<(NiahRun, Vec<Vec<f64>>)>,
}

/// Masking rows: (masked, k, draw, accuracy, mean ROUGE-1, heads).
type MaskRow = (String, usize, usize, f64, f64, String);

/// `ferrolens merge` of `heads retrieval` parts (every shard of one sweep, in shard order): the
/// runs back in (length, depth, needle) order, then the outputs of an unsharded `--mask-k 0` run.
pub(crate) fn merge(parts: Vec<Part<RetrievalPayload>>, out: &Path) -> Result<()> {
    let n = parts.len();
    let total = parts[0].manifest.units_total;
    let seconds: f64 = parts.iter().map(|p| p.manifest.seconds).sum();
    let mut info = parts[0].payload.info.clone();
    info.scoring_seconds = seconds;
    let mut iters: Vec<_> = parts.into_iter().map(|p| p.payload.runs.into_iter()).collect();
    let mut runs = Vec::with_capacity(total);
    for u in 0..total {
        let (mut r, scores) = iters[u % n].next().ok_or_else(|| anyhow::anyhow!("shard {}/{n} holds fewer runs than it owns; rerun it", u % n))?;
        r.scores = scores;
        runs.push(r);
    }
    let base = NiahSweep { runs };
    let mask_rows: Vec<MaskRow> = vec![("none".into(), 0, 0, base.accuracy(), base.mean_rouge(), String::new())];
    crate::in_new_dir(out, || write_retrieval(out, &info, &base, &mask_rows, seconds, Some(n)))
}

/// The outputs of `heads retrieval`: scores, runs, masking tables, heatmap, summary.json, report.html.
fn write_retrieval(out: &Path, info: &RetrievalInfo, base: &NiahSweep, mask_rows: &[MaskRow], total_s: f64, shards: Option<usize>) -> Result<()> {
    let scores = base.head_scores();
    let ranked = ranked_heads(&scores);
    let n_heads = ranked.len();
    let retrieval_heads: Vec<&(usize, usize, f64)> = ranked.iter().filter(|x| x.2 > info.threshold).collect();
    let (mut layer, mut head, mut score) = (vec![], vec![], vec![]);
    for (l, row) in scores.iter().enumerate() {
        for (h, v) in row.iter().enumerate() {
            layer.push(Some(l as u64));
            head.push(Some(h as u64));
            score.push(*v);
        }
    }
    write_table(&Table::new().col("layer", Column::OptU64(layer)).col("head", Column::OptU64(head)).col("score", Column::F64(score)), &out.join("scores"))?;
    let runs = Table::new()
        .col("needle", Column::OptU64(base.runs.iter().map(|r| Some(r.needle as u64)).collect()))
        .col("length", Column::OptU64(base.runs.iter().map(|r| Some(r.length as u64)).collect()))
        .col("depth", Column::F64(base.runs.iter().map(|r| r.depth).collect()))
        .col("actual_depth", Column::F64(base.runs.iter().map(|r| r.actual_depth).collect()))
        .col("needle_tokens", Column::OptU64(base.runs.iter().map(|r| Some(r.needle_tokens as u64)).collect()))
        .col("answer_tokens", Column::OptU64(base.runs.iter().map(|r| Some(r.answer_tokens as u64)).collect()))
        .col("rouge1", Column::F64(base.runs.iter().map(|r| r.rouge1).collect()))
        .col("correct", Column::Str(base.runs.iter().map(|r| r.correct.to_string()).collect()))
        .col("answer", Column::Str(base.runs.iter().map(|r| r.answer.clone()).collect()));
    write_table(&runs, &out.join("runs"))?;
    heatmap(
        &Heatmap {
            title: format!("retrieval score ({} of {} runs correct)", base.runs.iter().filter(|r| r.correct).count(), base.runs.len()),
            values: scores.clone(),
            row_label: "layer".into(),
            col_label: "head".into(),
            col_ticks: vec![],
        },
        &out.join("retrieval_heatmap"),
    )?;
    let masking = Table::new()
        .col("masked", Column::Str(mask_rows.iter().map(|r| r.0.clone()).collect()))
        .col("k", Column::OptU64(mask_rows.iter().map(|r| Some(r.1 as u64)).collect()))
        .col("draw", Column::OptU64(mask_rows.iter().map(|r| Some(r.2 as u64)).collect()))
        .col("accuracy", Column::F64(mask_rows.iter().map(|r| r.3).collect()))
        .col("mean_rouge1", Column::F64(mask_rows.iter().map(|r| r.4).collect()))
        .col("heads", Column::Str(mask_rows.iter().map(|r| r.5.clone()).collect()));
    write_table(&masking, &out.join("masking"))?;

    // A merge did not run the sweep: no peak memory of it to report.
    let peak = if shards.is_some() { None } else { peak_rss() };
    let mut summary = serde_json::json!({
        "model": info.model,
        "n_layers": info.n_layers,
        "n_heads": n_heads,
        "lengths": info.lengths,
        "mask_lengths": info.mask_lengths,
        "depths": info.depths,
        "needles": info.needles,
        "runs": base.runs.len(),
        "runs_correct": base.runs.iter().filter(|r| r.correct).count(),
        "accuracy": base.accuracy(),
        "threshold": info.threshold,
        "n_retrieval_heads": retrieval_heads.len(),
        "fraction_retrieval_heads": retrieval_heads.len() as f64 / n_heads.max(1) as f64,
        "top_heads": ranked.iter().take(10).map(|(l, h, s)| serde_json::json!({"layer": l, "head": h, "score": s})).collect::<Vec<_>>(),
        "masking": mask_rows.iter().map(|r| serde_json::json!({"masked": r.0, "k": r.1, "draw": r.2, "accuracy": r.3, "mean_rouge1": r.4})).collect::<Vec<_>>(),
        "scoring_seconds": info.scoring_seconds,
        "total_seconds": total_s,
        "peak_rss_bytes": peak,
    });
    if let Some(n) = shards {
        summary["shards"] = n.into();
        summary["seconds_note"] = "scoring_seconds and total_seconds: summed over the shards; masking is not run on shards (--mask-k 0)".into();
    }
    std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;

    let mut r = Report::new(&format!("ferrolens retrieval heads: {}", info.model));
    r.para("Needle-in-a-haystack decoding with a KV cache; at each generated token, a head scores a copy hit when its most-attended key lies in the answer's span inside the needle and holds the token just generated (Wu et al. 2024). Score = hits / span length, averaged over the runs answered correctly (ROUGE-1 recall above the threshold).");
    r.kv(&[
        ("model", info.model.clone()),
        ("context lengths", format!("{:?}", info.lengths)),
        ("depths", format!("{:?}", info.depths)),
        ("needles", info.needles.len().to_string()),
        ("runs correct", format!("{} of {} ({:.1}%)", base.runs.iter().filter(|r| r.correct).count(), base.runs.len(), 100.0 * base.accuracy())),
        (
            "retrieval heads (score > threshold)",
            format!("{} of {} ({:.2}%)", retrieval_heads.len(), n_heads, 100.0 * retrieval_heads.len() as f64 / n_heads.max(1) as f64),
        ),
        ("top heads", ranked.iter().take(5).map(|(l, h, s)| format!("L{l}H{h} {s:.3}")).collect::<Vec<_>>().join(", ")),
        ("peak memory", peak.map(|b| format!("{:.0} MiB", b as f64 / 1048576.0)).unwrap_or_else(|| "unknown".into())),
        ("time", if let Some(n) = shards { format!("{total_s:.0} s (summed over {n} shards)") } else { format!("{total_s:.0} s") }),
    ]);
    r.heading("Retrieval scores");
    r.figure(&out.join("retrieval_heatmap.svg"), "Retrieval score per head (mean over correct runs).")?;
    r.heading("Masking experiment");
    r.para("Needle-in-a-haystack accuracy with the top-K retrieval heads made to attend uniformly, against K random heads scoring at most the threshold.");
    r.html(&masking.to_html(100));
    r.heading("Runs");
    r.html(&runs.to_html(500));
    r.write(&out.join("report.html"))?;

    println!(
        "{} of {} heads ({:.2}%) score above {} over {} of {} correct runs; top: {}. Wrote {}",
        retrieval_heads.len(),
        n_heads,
        100.0 * retrieval_heads.len() as f64 / n_heads.max(1) as f64,
        info.threshold,
        base.runs.iter().filter(|r| r.correct).count(),
        base.runs.len(),
        ranked.iter().take(3).map(|(l, h, s)| format!("L{l}H{h}={s:.3}")).collect::<Vec<_>>().join(" "),
        out.join("report.html").display()
    );
    Ok(())
}

fn fmt_heads(h: &[(usize, usize)]) -> String {
    h.iter().map(|(l, h)| format!("L{l}H{h}")).collect::<Vec<_>>().join(" ")
}
