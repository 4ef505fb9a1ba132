//! What the CLI prints: aligned tables for people, one JSON document for scripts.
//!
//! Owns formatting only. Binary values are printed as standard base64.

use base64::Engine;
use serde_json::{Value, json};

/// `println!` that stops quietly when the reader went away (`tresor key list | head`) instead
/// of panicking on a broken pipe.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

use super::Format;
use crate::proto;

pub(super) struct Output {
    format: Format,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn time(t: Option<&prost_types::Timestamp>) -> String {
    let Some(t) = t else { return String::new() };
    let nanos = i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn period(seconds: i64) -> String {
    match seconds {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s => format!("{s}s"),
    }
}

fn state(s: i32) -> &'static str {
    proto::KeyVersionState::try_from(s)
        .map(|s| s.as_str_name())
        .unwrap_or("UNKNOWN")
}

fn key_json(k: &proto::Key) -> Value {
    json!({
        "name": k.name,
        "description": k.description,
        "labels": k.labels,
        "create_time": time(k.create_time.as_ref()),
        "update_time": time(k.update_time.as_ref()),
        "primary_version": k.primary_version,
        "rotation_period_seconds": k.rotation_period.as_ref().map(|d| d.seconds),
        "next_rotation_time": k.next_rotation_time.as_ref().map(|t| time(Some(t))),
        "min_decryption_version": k.min_decryption_version,
        "usage": usage_name(k.usage),
        "versions": k.versions.iter().map(|v| json!({"name": v.name,
            "version": v.version,
            "state": state(v.state),
            "primary": v.primary,
            "create_time": time(v.create_time.as_ref()),
            "state_change_time": time(v.state_change_time.as_ref()),
            "destroy_time": v.destroy_time.as_ref().map(|t| time(Some(t))),
            "destroyed_time": v.destroyed_time.as_ref().map(|t| time(Some(t))),
            "lost_time": v.lost_time.as_ref().map(|t| time(Some(t))),
            "wraps_at_most": v.wraps_at_most,
        })).collect::<Vec<_>>(),
    })
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.trim_end().to_owned()
    };
    let mut out = line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.clone()));
    }
    out
}

impl Output {
    pub(super) fn new(format: Format) -> Self {
        Self { format }
    }

    fn print_json(v: &Value) {
        say!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    }

    pub(super) fn key(&self, k: &proto::Key) {
        if self.format == Format::Json {
            return Self::print_json(&key_json(k));
        }
        say!("name:            {}", k.name);
        if !k.description.is_empty() {
            say!("description:     {}", k.description);
        }
        if !k.labels.is_empty() {
            let mut labels: Vec<_> = k.labels.iter().map(|(a, b)| format!("{a}={b}")).collect();
            labels.sort();
            say!("labels:          {}", labels.join(", "));
        }
        say!("primary version: {}", k.primary_version);
        if let Some(p) = &k.rotation_period {
            say!(
                "rotation:        every {} (next {})",
                period(p.seconds),
                time(k.next_rotation_time.as_ref())
            );
        }
        if k.min_decryption_version > 1 {
            say!(
                "unwraps:         versions {} and later",
                k.min_decryption_version
            );
        }
        let usage = usage_name(k.usage);
        if usage != "encrypt-decrypt" {
            say!("usage:           {usage}");
        }
        say!("created:         {}", time(k.create_time.as_ref()));
        say!();
        let rows: Vec<Vec<String>> = k
            .versions
            .iter()
            .map(|v| {
                let mut s = state(v.state).to_owned();
                if v.lost_time.is_some() {
                    s.push_str(" (LOST)");
                }
                vec![
                    v.version.to_string(),
                    s,
                    if v.primary {
                        "yes".into()
                    } else {
                        String::new()
                    },
                    time(v.create_time.as_ref()),
                    v.wraps_at_most.to_string(),
                ]
            })
            .collect();
        say!(
            "{}",
            table(
                &["VERSION", "STATE", "PRIMARY", "CREATED", "WRAPS (AT MOST)"],
                &rows
            )
        );
    }

    pub(super) fn keys(&self, keys: &[proto::Key]) {
        if self.format == Format::Json {
            return Self::print_json(&Value::Array(keys.iter().map(key_json).collect()));
        }
        let rows: Vec<Vec<String>> = keys
            .iter()
            .map(|k| {
                vec![
                    k.name.clone(),
                    k.primary_version.to_string(),
                    k.versions.len().to_string(),
                    time(k.create_time.as_ref()),
                    k.description.clone(),
                ]
            })
            .collect();
        say!(
            "{}",
            table(
                &["NAME", "PRIMARY", "VERSIONS", "CREATED", "DESCRIPTION"],
                &rows
            )
        );
    }

    /// A wrap/unwrap/rewrap result; `show` is false when the bytes went to a file.
    pub(super) fn blob(
        &self,
        label: &str,
        bytes: &[u8],
        show: bool,
        key_version: &str,
        rewrapped: Option<bool>,
    ) {
        if self.format == Format::Json {
            let mut v = json!({ "key_version": key_version });
            if show {
                v[label] = json!(b64(bytes));
            }
            if let Some(r) = rewrapped {
                v["rewrapped"] = json!(r);
            }
            return Self::print_json(&v);
        }
        if show {
            say!("{label}: {}", b64(bytes));
        }
        say!("key_version: {key_version}");
        if let Some(r) = rewrapped {
            say!("rewrapped: {r}");
        }
    }

    pub(super) fn data_key(
        &self,
        plaintext: &[u8],
        ciphertext: &[u8],
        key_version: &str,
        with_plaintext: bool,
    ) {
        if self.format == Format::Json {
            let mut v = json!({ "ciphertext": b64(ciphertext), "key_version": key_version });
            if with_plaintext {
                v["plaintext"] = json!(b64(plaintext));
            }
            return Self::print_json(&v);
        }
        if with_plaintext {
            say!("plaintext: {}", b64(plaintext));
        }
        say!("ciphertext: {}", b64(ciphertext));
        say!("key_version: {key_version}");
    }
}

impl Output {
    /// A one-line result for people (scripts get `{"summary": …}`).
    pub(super) fn summary(&self, line: &str) {
        if self.format == Format::Json {
            return Self::print_json(&json!({ "summary": line }));
        }
        say!("{line}");
    }

    pub(super) fn text(&self, text: &str) {
        if self.format == Format::Json {
            return Self::print_json(&json!({ "pem": text }));
        }
        say!("{}", text.trim_end());
    }

    pub(super) fn hmac(&self, hmac: &str) {
        if self.format == Format::Json {
            return Self::print_json(&json!({ "aad_hmac": hmac }));
        }
        say!("aad_hmac: {hmac}");
    }

    pub(super) fn checkpoint(&self, c: &proto::AuditCheckpoint) {
        let hash = crate::model::to_hex(&c.chain_hash);
        let signature = crate::model::to_hex(&c.signature);
        if self.format == Format::Json {
            return Self::print_json(
                &json!({ "seq": c.sequence, "chain_hash": hash, "time": time(c.time.as_ref()), "time_ms": c.time_ms, "signature": signature }),
            );
        }
        say!("sequence:   {}", c.sequence);
        say!("chain hash: {hash}");
        say!("time:       {}", time(c.time.as_ref()));
        say!("signature:  {signature}");
    }

    /// What `audit verify` found; `extends` is the earlier checkpoint the export was shown to
    /// extend (`--since`).
    pub(super) fn verified(&self, v: &crate::audit_record::Verified, extends: Option<u64>) {
        let span = v.time_span.map(|(a, b)| {
            let t = |ms: i64| {
                time(Some(&prost_types::Timestamp {
                    seconds: ms.div_euclid(1000),
                    nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
                }))
            };
            (t(a), t(b))
        });
        if self.format == Format::Json {
            return Self::print_json(&json!({
                "verified": true,
                "records": v.records,
                "withheld": v.withheld,
                "checkpoints": v.checkpoints,
                "first_seq": v.seq_range.0,
                "last_seq": v.seq_range.1,
                "from": span.as_ref().map(|s| s.0.clone()),
                "to": span.as_ref().map(|s| s.1.clone()),
                "extends_checkpoint": extends,
            }));
        }
        let span = span
            .map(|(a, b)| format!(", {a} to {b}"))
            .unwrap_or_default();
        let extends = extends
            .map(|seq| {
                format!("; extends the earlier history (checkpoint at record {seq} unchanged)")
            })
            .unwrap_or_default();
        say!(
            "verified: {} records{span}, sequence {} to {} complete ({} withheld by tenant, range or filter), {} checkpoint signatures{extends}",
            v.records,
            v.seq_range.0,
            v.seq_range.1,
            v.withheld,
            v.checkpoints
        );
    }
}

fn approval_state(s: i32) -> &'static str {
    proto::ApprovalState::try_from(s)
        .map(|s| s.as_str_name())
        .unwrap_or("UNKNOWN")
}

fn approval_json(a: &proto::Approval) -> Value {
    json!({
        "id": a.id,
        "operation": a.operation,
        "key_version": a.key_version,
        "requested_by": a.requested_by,
        "state": approval_state(a.state),
        "create_time": time(a.create_time.as_ref()),
        "expire_time": time(a.expire_time.as_ref()),
        "decided_by": a.decided_by,
        "destroy_time": a.destroy_time.as_ref().map(|t| time(Some(t))),
    })
}

impl Output {
    pub(super) fn versions(&self, k: &proto::Key) {
        if self.format == Format::Json {
            return Self::print_json(&key_json(k)["versions"]);
        }
        let rows: Vec<Vec<String>> = k
            .versions
            .iter()
            .map(|v| {
                vec![
                    v.version.to_string(),
                    state(v.state).to_owned() + if v.lost_time.is_some() { " (LOST)" } else { "" },
                    if v.primary {
                        "yes".into()
                    } else {
                        String::new()
                    },
                    time(v.create_time.as_ref()),
                    time(v.destroy_time.as_ref().or(v.destroyed_time.as_ref())),
                    v.wraps_at_most.to_string(),
                ]
            })
            .collect();
        say!(
            "{}",
            table(
                &[
                    "VERSION",
                    "STATE",
                    "PRIMARY",
                    "CREATED",
                    "DESTROY TIME",
                    "WRAPS (AT MOST)"
                ],
                &rows
            )
        );
    }

    pub(super) fn approval(&self, a: &proto::Approval) {
        if self.format == Format::Json {
            return Self::print_json(&approval_json(a));
        }
        say!("approval:     {}", a.id);
        say!("key version:  {}", a.key_version);
        say!("state:        {}", approval_state(a.state));
        say!("requested by: {}", a.requested_by);
        say!("expires:      {}", time(a.expire_time.as_ref()));
        if !a.decided_by.is_empty() {
            say!("decided by:   {}", a.decided_by);
        }
        if let Some(t) = &a.destroy_time {
            say!(
                "destroyed at: {} (cancel before: tresor key cancel-destroy)",
                time(Some(t))
            );
        }
    }

    pub(super) fn approvals(&self, list: &[proto::Approval]) {
        if self.format == Format::Json {
            return Self::print_json(&Value::Array(list.iter().map(approval_json).collect()));
        }
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|a| {
                vec![
                    a.id.clone(),
                    a.key_version.clone(),
                    approval_state(a.state).into(),
                    a.requested_by.clone(),
                    time(a.expire_time.as_ref()),
                ]
            })
            .collect();
        say!(
            "{}",
            table(
                &["ID", "KEY VERSION", "STATE", "REQUESTED BY", "EXPIRES"],
                &rows
            )
        );
    }
}

impl Output {
    /// A service benchmark, with the raw HSM ceiling of the same run when measured.
    pub(super) fn bench(
        &self,
        report: &super::bench::BenchReport,
        plan: &super::bench::BenchPlan,
        raw: Option<(&crate::hsm::RawReport, usize)>,
    ) {
        if self.format == Format::Json {
            let mut v = report.to_json(plan);
            if let Some((r, threads)) = raw {
                let raw = raw_json(r, threads, Some(report.throughput()));
                v["raw_hsm"] = raw["raw_hsm"].clone();
                v["service_over_raw"] = raw["service_over_raw"].clone();
            }
            return Self::print_json(&v);
        }
        say!("{}", report.to_text(plan));
        if let Some((r, threads)) = raw {
            self.raw(r, threads, Some(report.throughput()));
        }
    }
}

/// Quantile lookup over the raw loop's latencies, and its throughput.
fn raw_stats(r: &crate::hsm::RawReport) -> (impl Fn(f64) -> u64 + '_, f64) {
    let rate = r.operations as f64 / r.elapsed.as_secs_f64().max(f64::EPSILON);
    let q = move |p: f64| {
        let l = &r.latencies_micros;
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    (q, rate)
}

fn raw_json(r: &crate::hsm::RawReport, threads: usize, service: Option<f64>) -> Value {
    let (q, rate) = raw_stats(r);
    json!({
        "raw_hsm": {
            "threads": threads,
            "operations": r.operations,
            "elapsed_seconds": r.elapsed.as_secs_f64(),
            "throughput_per_second": rate,
            "latency_micros": { "p50": q(0.5), "p99": q(0.99), "max": r.latencies_micros.last().copied().unwrap_or(0) },
        },
        "service_over_raw": service.map(|s| s / rate.max(f64::EPSILON)),
    })
}

impl Output {
    /// The raw HSM loop, and the service/raw ratio when there is a service figure.
    pub(super) fn raw(&self, r: &crate::hsm::RawReport, threads: usize, service: Option<f64>) {
        let (q, rate) = raw_stats(r);
        if self.format == Format::Json {
            return Self::print_json(&raw_json(r, threads, service));
        }
        say!(
            "raw HSM: {} AES-GCM encryptions in {:.1} s = {rate:.0}/s on {threads} threads; latency p50 {:.3} ms, p99 {:.3} ms",
            r.operations,
            r.elapsed.as_secs_f64(),
            q(0.5) as f64 / 1000.0,
            q(0.99) as f64 / 1000.0
        );
        if let Some(s) = service {
            say!("service / raw = {:.2}", s / rate.max(f64::EPSILON));
        }
    }
}

/// The CLI spelling of a key usage (as `tresor key update --usage` takes it).
fn usage_name(usage: i32) -> &'static str {
    match proto::KeyUsage::try_from(usage) {
        Ok(proto::KeyUsage::EncryptOnly) => "encrypt",
        Ok(proto::KeyUsage::DecryptOnly) => "decrypt",
        Ok(proto::KeyUsage::NoUse) => "none",
        _ => "encrypt-decrypt",
    }
}

impl Output {
    pub(super) fn managed_object(&self, o: &proto::ManagedObject) {
        if self.format == Format::Json {
            return Self::print_json(&managed_object_json(o));
        }
        say!("object:       {}", o.id);
        say!("name:         {}", o.name);
        say!("key:          {}-{}", o.algorithm, o.length_bits);
        say!("state:        {}", o.state);
        say!("created:      {}", time(o.create_time.as_ref()));
        for (label, t) in [
            ("activated:   ", &o.activation_time),
            ("deactivated: ", &o.deactivation_time),
            ("compromised: ", &o.compromise_time),
            ("destroyed:   ", &o.destroy_time),
        ] {
            if t.is_some() {
                say!("{label} {}", time(t.as_ref()));
            }
        }
        if !o.revocation_reason.is_empty() {
            say!(
                "revoked for:  {} {}",
                o.revocation_reason,
                o.revocation_message
            );
        }
        say!(
            "material:     {}",
            if o.has_material {
                "stored (sealed)"
            } else {
                "removed"
            }
        );
        let mut attributes: Vec<_> = o.attributes.iter().collect();
        attributes.sort();
        for (k, v) in attributes {
            say!("{k}: {v}");
        }
    }

    pub(super) fn managed_objects(&self, list: &[proto::ManagedObject]) {
        if self.format == Format::Json {
            return Self::print_json(&Value::Array(
                list.iter().map(managed_object_json).collect(),
            ));
        }
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|o| {
                vec![
                    o.id.clone(),
                    o.name.clone(),
                    format!("{}-{}", o.algorithm, o.length_bits),
                    o.state.clone(),
                    time(o.create_time.as_ref()),
                ]
            })
            .collect();
        say!(
            "{}",
            table(&["ID", "NAME", "KEY", "STATE", "CREATED"], &rows)
        );
    }
}

fn managed_object_json(o: &proto::ManagedObject) -> Value {
    let t = |t: &Option<prost_types::Timestamp>| t.as_ref().map(|t| time(Some(t)));
    json!({
        "id": o.id,
        "tenant": o.tenant,
        "name": o.name,
        "algorithm": o.algorithm,
        "length_bits": o.length_bits,
        "usage_mask": o.usage_mask,
        "state": o.state,
        "create_time": time(o.create_time.as_ref()),
        "activation_time": t(&o.activation_time),
        "deactivation_time": t(&o.deactivation_time),
        "compromise_time": t(&o.compromise_time),
        "destroy_time": t(&o.destroy_time),
        "revocation_reason": o.revocation_reason,
        "revocation_message": o.revocation_message,
        "has_material": o.has_material,
        "attributes": o.attributes,
    })
}

fn window_json(w: &proto::AccessWindow) -> Value {
    let reason = w.reason.clone().unwrap_or_default();
    json!({
        "id": w.id,
        "tenant": w.tenant,
        "identity": w.identity,
        "key_pattern": w.key_pattern,
        "reason": reason.code,
        "reference": reason.reference,
        "duration_seconds": w.duration.as_ref().map_or(0, |d| d.seconds),
        "state": w.state,
        "requested_by": w.requested_by,
        "requested_at": time(w.requested_at.as_ref()),
        "approved_by": w.approved_by,
        "opened_at": w.opened_at.as_ref().map(|t| time(Some(t))),
        "expires_at": w.expires_at.as_ref().map(|t| time(Some(t))),
        "closed_by": w.closed_by,
        "closed_at": w.closed_at.as_ref().map(|t| time(Some(t))),
    })
}

impl Output {
    /// One break-glass access window.
    pub(super) fn window(&self, w: &proto::AccessWindow) {
        if self.format == Format::Json {
            return Self::print_json(&window_json(w));
        }
        let reason = w.reason.clone().unwrap_or_default();
        say!("window:       {}", w.id);
        say!("state:        {}", w.state);
        say!("identity:     {}", w.identity);
        say!("keys:         tenants/{}/keys/{}", w.tenant, w.key_pattern);
        say!("reason:       {} {}", reason.code, reason.reference);
        say!(
            "lasts:        {} minutes once approved",
            w.duration.as_ref().map_or(0, |d| d.seconds) / 60
        );
        say!("requested by: {}", w.requested_by);
        if !w.approved_by.is_empty() {
            say!("approved by:  {}", w.approved_by);
            say!("open until:   {}", time(w.expires_at.as_ref()));
        }
        if !w.closed_by.is_empty() {
            say!(
                "closed by:    {} at {}",
                w.closed_by,
                time(w.closed_at.as_ref())
            );
        }
        if w.state == "PENDING" {
            say!(
                "next:         a second officer runs: tresor access approve {}",
                w.id
            );
        }
    }

    /// The tenant's break-glass access windows.
    pub(super) fn windows(&self, list: &[proto::AccessWindow]) {
        if self.format == Format::Json {
            return Self::print_json(&Value::Array(list.iter().map(window_json).collect()));
        }
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|w| {
                vec![
                    w.id.clone(),
                    w.state.clone(),
                    w.identity.clone(),
                    w.key_pattern.clone(),
                    w.reason
                        .as_ref()
                        .map(|r| r.code.clone())
                        .unwrap_or_default(),
                    w.requested_by.clone(),
                    w.approved_by.clone(),
                    time(w.expires_at.as_ref()),
                ]
            })
            .collect();
        say!(
            "{}",
            table(
                &[
                    "ID",
                    "STATE",
                    "IDENTITY",
                    "KEYS",
                    "REASON",
                    "REQUESTED BY",
                    "APPROVED BY",
                    "OPEN UNTIL"
                ],
                &rows
            )
        );
    }
}
