//! `ferrolens merge`: join the parts of a sharded sweep (`--shard I/N`) into exactly the files an
//! unsharded run writes, after checking that they are every shard of one sweep, once each.

use crate::parts::{read_manifest, read_parts, read_parts_in};
use anyhow::{bail, Result};
use std::path::PathBuf;

/// Arguments of `ferrolens merge`.
#[derive(clap::Args)]
pub struct Args {
    /// The shards' output folders (each holds a shard.json).
    #[arg(required = true)]
    parts: Vec<PathBuf>,
    /// Output directory for the merged results.
    #[arg(long)]
    out: PathBuf,
    /// No messages.
    #[arg(long)]
    quiet: bool,
    /// Print the merged summary.json to stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    if a.parts.iter().any(|p| p == &a.out) {
        bail!("--out {} is one of the parts; write the merge to a folder of its own", a.out.display());
    }
    let first = read_manifest(&a.parts[0])?;
    match first.command.as_str() {
        "patch" => crate::cmd_patch::merge(read_parts(&a.parts)?, &a.out, a.json, a.quiet),
        "circuits eval" => crate::cmd_circuits::merge(read_parts(&a.parts)?, &a.out, a.quiet),
        "heads retrieval" => crate::cmd_heads::merge(read_parts(&a.parts)?, &a.out),
        "cache" => crate::cmd_cache::merge(read_parts_in(&a.parts)?, &a.out, a.quiet),
        "discover scores" | "discover faithfulness" => crate::cmd_discover::merge(read_parts(&a.parts)?, &a.out, a.quiet),
        other => bail!("{} is a part of `{other}`, which this version of ferrolens cannot merge", a.parts[0].display()),
    }
}
