//! `tresor rewrap --in FILE --out FILE`: re-wrap a file of blobs to their keys' primary
//! versions, in bounded parallel, resumable after an interruption.
//!
//! Owns the file protocol. Input: one JSON object per line with `ciphertext` (base64) and
//! optionally `aad` (base64); every other field is copied through. Output: the same objects
//! with `ciphertext` replaced and `key_version` and `rewrapped` set. Failed lines go to the
//! failures file with `line` (1-based) and `error`. Results are written strictly in input
//! order and flushed after each round, so the output and failures files always cover a prefix
//! of the input; a resumed run skips that prefix (dropping a torn last line first).

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use base64::Engine;
use serde_json::{Map, Value};

use super::{Exit, Failure};
use crate::client::Client;
use crate::proto;

/// How the run went.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Lines moved to a newer version.
    pub rewrapped: u64,
    /// Lines already under the primary version (copied unchanged).
    pub current: u64,
    /// Lines written to the failures file.
    pub failed: u64,
    /// Lines skipped because an earlier run had done them.
    pub resumed: u64,
}

fn io(path: &Path, e: impl std::fmt::Display) -> Failure {
    Failure::new(
        Exit::Other,
        format!("{}: {e}", path.display()),
        "check the path and free space",
    )
}

/// Complete lines of a file, after cutting off a torn last line (an interrupted write).
fn complete_lines(path: &Path) -> Result<u64, Failure> {
    let Ok(bytes) = std::fs::read(path) else {
        return Ok(0);
    };
    let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if complete < bytes.len() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| io(path, e))?;
        f.set_len(complete as u64).map_err(|e| io(path, e))?;
    }
    Ok(bytes[..complete].iter().filter(|b| **b == b'\n').count() as u64)
}

/// Default failures file: `OUT.failed.jsonl`.
pub fn default_failures(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".failed.jsonl");
    PathBuf::from(name)
}

/// One input line's outcome.
enum Outcome {
    Done(Value, bool),
    Failed(Value),
}

async fn rewrap_line(client: Client, line_no: u64, text: String, key: Option<String>) -> Outcome {
    let failed = |object: Option<Map<String, Value>>, error: String| {
        let mut o = object.unwrap_or_default();
        o.insert("line".into(), Value::from(line_no));
        o.insert("error".into(), Value::from(error));
        Outcome::Failed(Value::Object(o))
    };
    let mut object: Map<String, Value> = match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(o)) => o,
        Ok(_) => return failed(None, "not a JSON object".into()),
        Err(e) => return failed(None, format!("not JSON: {e}")),
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let Some(ciphertext) = object
        .get("ciphertext")
        .and_then(Value::as_str)
        .and_then(|c| b64.decode(c).ok())
    else {
        return failed(Some(object), "no base64 \"ciphertext\"".into());
    };
    let aad = match object.get("aad") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => match v.as_str().and_then(|a| b64.decode(a).ok()) {
            Some(a) => a,
            None => return failed(Some(object), "\"aad\" is not base64".into()),
        },
    };
    let request = proto::RewrapRequest {
        justification: client.justification(),
        ciphertext,
        aad,
        key: key.unwrap_or_default(),
    };
    match client.keys().rewrap(request).await {
        Ok(r) => {
            let r = r.into_inner();
            object.insert("ciphertext".into(), Value::from(b64.encode(&r.ciphertext)));
            object.insert("key_version".into(), Value::from(r.key_version));
            object.insert("rewrapped".into(), Value::from(r.rewrapped));
            Outcome::Done(Value::Object(object), r.rewrapped)
        }
        Err(s) => failed(Some(object), format!("{:?}: {}", s.code(), s.message())),
    }
}

/// Re-wraps `input` into `output`, resuming where an earlier run stopped.
pub async fn run(
    client: &Client,
    input: &Path,
    output: &Path,
    failures: &Path,
    parallel: usize,
    key: Option<String>,
) -> Result<Summary, Failure> {
    let total = {
        let f = std::fs::File::open(input).map_err(|e| {
            Failure::input(
                format!("cannot read {}: {e}", input.display()),
                "check --in",
            )
        })?;
        BufReader::new(f).lines().count() as u64
    };
    let done_before = complete_lines(output)? + complete_lines(failures)?;
    let open_append = |p: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map(BufWriter::new)
            .map_err(|e| io(p, e))
    };
    let mut out = open_append(output)?;
    let mut failed_out = open_append(failures)?;
    let mut summary = Summary {
        resumed: done_before,
        ..Summary::default()
    };

    let progress = indicatif::ProgressBar::new(total);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} blobs, {per_sec}, ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    progress.set_position(done_before);

    let reader = BufReader::new(std::fs::File::open(input).map_err(|e| io(input, e))?);
    let mut lines = reader
        .lines()
        .enumerate()
        .skip(usize::try_from(done_before).unwrap_or(usize::MAX));
    loop {
        // One round of up to `parallel` calls in flight; results are written in input order.
        let mut round = Vec::with_capacity(parallel);
        for (i, line) in lines.by_ref().take(parallel) {
            let text = line.map_err(|e| io(input, e))?;
            let (client, key) = (client.clone(), key.clone());
            round.push(tokio::spawn(rewrap_line(client, i as u64 + 1, text, key)));
        }
        if round.is_empty() {
            break;
        }
        for task in round {
            match task.await.map_err(|e| {
                Failure::new(
                    Exit::Other,
                    format!("rewrap task failed: {e}"),
                    "report this",
                )
            })? {
                Outcome::Done(v, rewrapped) => {
                    serde_json::to_writer(&mut out, &v).map_err(|e| io(output, e))?;
                    out.write_all(b"\n").map_err(|e| io(output, e))?;
                    if rewrapped {
                        summary.rewrapped += 1
                    } else {
                        summary.current += 1
                    }
                }
                Outcome::Failed(v) => {
                    serde_json::to_writer(&mut failed_out, &v).map_err(|e| io(failures, e))?;
                    failed_out.write_all(b"\n").map_err(|e| io(failures, e))?;
                    summary.failed += 1;
                }
            }
            progress.inc(1);
        }
        // Output before failures never matters for the prefix: both are flushed each round.
        out.flush().map_err(|e| io(output, e))?;
        failed_out.flush().map_err(|e| io(failures, e))?;
    }
    progress.finish_and_clear();
    if summary.failed == 0 && std::fs::metadata(failures).is_ok_and(|m| m.len() == 0) {
        let _ = std::fs::remove_file(failures);
    }
    Ok(summary)
}
