//! Audit tables: records, checkpoints, and the ids of the HSM keys the log uses.
//!
//! Owns the audit SQL only. Sequence numbers, hashes and signatures are computed by
//! `crate::audit`; this module stores and reads them, appending a batch in one transaction.
//! On PostgreSQL several nodes append to one chain: a batch is chained and inserted under a
//! transaction-level advisory lock, against the head read inside that transaction.

use sqlx::Row;

use super::{Backend, Store, StoreError};
use crate::audit_record::{Checkpoint, Record, RecordBody};
use crate::model::{from_hex, from_hex_array, to_hex};

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt {
        table: "audit_records",
        what: what.to_owned(),
    }
}

fn hash32(s: &str) -> Result<[u8; 32], StoreError> {
    from_hex_array(s).ok_or_else(|| corrupt("hash is not 32 bytes of hex"))
}

fn record_row(r: &sqlx::any::AnyRow) -> Result<(Record, [u8; 32]), StoreError> {
    let seq: i64 = r.try_get("seq")?;
    Ok((
        Record {
            seq: u64::try_from(seq).map_err(|_| corrupt("negative sequence number"))?,
            prev_hash: hash32(&r.try_get::<String, _>("prev_hash")?)?,
            time_ms: r.try_get("time_ms")?,
            tenant: r.try_get("tenant")?,
            body: RecordBody {
                request_id: r.try_get("request_id")?,
                caller: r.try_get("caller")?,
                fingerprint: r.try_get("fingerprint")?,
                role: r.try_get("role")?,
                operation: r.try_get("operation")?,
                key: r.try_get("key_name")?,
                key_version: r.try_get("key_version")?,
                outcome: r.try_get("outcome")?,
                status_code: r.try_get("status_code")?,
                peer: r.try_get("peer")?,
                aad_hmac: r.try_get("aad_hmac")?,
                node: r.try_get("node")?,
                kms_request_id: r.try_get("kms_request_id")?,
                kms_operation: r.try_get("kms_operation")?,
                aws_principal_arn: r.try_get("aws_principal_arn")?,
                kms_key_arn: r.try_get("kms_key_arn")?,
                repeated: u64::try_from(r.try_get::<i64, _>("repeated")?)
                    .map_err(|_| corrupt("negative repeat count"))?,
                first_ms: r.try_get("first_ms")?,
                last_ms: r.try_get("last_ms")?,
                access_rule: r.try_get("access_rule")?,
                access_window: r.try_get("access_window")?,
                justification: r.try_get("justification")?,
                justification_reference: r.try_get("justification_reference")?,
                kms_via_service: r.try_get("kms_via_service")?,
                aws_source_vpc: r.try_get("aws_source_vpc")?,
                aws_source_vpce: r.try_get("aws_source_vpce")?,
            },
        },
        hash32(&r.try_get::<String, _>("hash")?)?,
    ))
}

fn checkpoint_row(r: &sqlx::any::AnyRow) -> Result<Checkpoint, StoreError> {
    let seq: i64 = r.try_get("seq")?;
    Ok(Checkpoint {
        seq: u64::try_from(seq).map_err(|_| corrupt("negative sequence number"))?,
        hash: hash32(&r.try_get::<String, _>("hash")?)?,
        time_ms: r.try_get("time_ms")?,
        signature: from_hex(&r.try_get::<String, _>("signature")?)
            .ok_or_else(|| corrupt("signature is not hex"))?,
    })
}

fn seq_i64(seq: u64) -> Result<i64, StoreError> {
    i64::try_from(seq).map_err(|_| corrupt("sequence number beyond i64"))
}

/// The advisory lock (PostgreSQL) under which a node extends the audit chain.
pub const AUDIT_CHAIN_LOCK: i64 = 0x7472_6573_6f72_0001;

const HEAD: &str = "SELECT seq, hash, time_ms FROM audit_records ORDER BY seq DESC LIMIT 1";

/// Where the chain ends: the last record's sequence number, hash and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHead {
    /// Sequence number of the last record (0: none yet).
    pub seq: u64,
    /// Its hash ([`crate::audit_record::GENESIS`] before the first).
    pub hash: [u8; 32],
    /// Its time; the next records are not earlier.
    pub time_ms: i64,
}

impl ChainHead {
    /// The head of an empty log.
    pub const GENESIS: Self = Self {
        seq: 0,
        hash: crate::audit_record::GENESIS,
        time_ms: 0,
    };
}

fn head_row(r: &sqlx::any::AnyRow) -> Result<ChainHead, StoreError> {
    let seq: i64 = r.try_get("seq")?;
    Ok(ChainHead {
        seq: u64::try_from(seq).map_err(|_| corrupt("negative sequence number"))?,
        hash: hash32(&r.try_get::<String, _>("hash")?)?,
        time_ms: r.try_get("time_ms")?,
    })
}

/// Batches of up to this many records keep their prepared INSERT (one per size) in sqlx's
/// statement cache; larger ones are prepared each time. Parsing the statement was a sixth of
/// the audit connection's CPU; caching every size (up to a hundred 1,000-row statements per
/// connection) made the server's memory grow under load.
const CACHED_BATCH: usize = 16;

/// Inserts a batch with one multi-row INSERT.
async fn insert_records<'e, DB, E>(
    backend: Backend,
    batch: &[(Record, [u8; 32])],
    db: E,
) -> Result<(), StoreError>
where
    DB: sqlx::Database + sqlx::database::HasStatementCache,
    E: sqlx::Executor<'e, Database = DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i32: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> &'q String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
{
    let seqs = batch
        .iter()
        .map(|(r, _)| seq_i64(r.seq))
        .collect::<Result<Vec<_>, _>>()?;
    // PostgreSQL needs numbered placeholders. SQLite gets anonymous ones: it takes `$n` as a
    // named parameter, and sqlx then looks each one up by name, which made a 500-record batch
    // take 170 ms instead of 8 (quadratic in the number of parameters).
    let mut sql = format!("INSERT INTO audit_records ({RECORD_COLUMNS}) VALUES ");
    let mut n = 0;
    for i in 0..batch.len() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for c in 0..RECORD_COLUMN_COUNT {
            if c > 0 {
                sql.push_str(", ");
            }
            n += 1;
            match backend {
                Backend::Sqlite => sql.push('?'),
                Backend::Postgres => {
                    sql.push('$');
                    sql.push_str(&n.to_string());
                }
            }
        }
        sql.push(')');
    }
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for ((r, hash), seq) in batch.iter().zip(seqs) {
        query = query
            .bind(seq)
            .bind(to_hex(&r.prev_hash))
            .bind(r.time_ms)
            .bind(&r.tenant)
            .bind(&r.body.request_id)
            .bind(&r.body.caller)
            .bind(&r.body.fingerprint)
            .bind(&r.body.role)
            .bind(&r.body.operation)
            .bind(&r.body.key)
            .bind(&r.body.key_version)
            .bind(&r.body.outcome)
            .bind(r.body.status_code)
            .bind(&r.body.peer)
            .bind(&r.body.aad_hmac)
            .bind(&r.body.node)
            .bind(&r.body.kms_request_id)
            .bind(&r.body.kms_operation)
            .bind(&r.body.aws_principal_arn)
            .bind(&r.body.kms_key_arn)
            .bind(i64::try_from(r.body.repeated).unwrap_or(i64::MAX))
            .bind(r.body.first_ms)
            .bind(r.body.last_ms)
            .bind(&r.body.access_rule)
            .bind(&r.body.access_window)
            .bind(&r.body.justification)
            .bind(&r.body.justification_reference)
            .bind(&r.body.kms_via_service)
            .bind(&r.body.aws_source_vpc)
            .bind(&r.body.aws_source_vpce)
            .bind(to_hex(hash));
    }
    query
        .persistent(batch.len() <= CACHED_BATCH)
        .execute(db)
        .await?;
    Ok(())
}

/// Columns per record: a batch's INSERT binds this many parameters per record, and SQLite takes
/// at most 32,766 in one statement (the audit writer's batch bound is checked against it).
pub const RECORD_COLUMN_COUNT: usize = 31;

const RECORD_COLUMNS: &str = "seq, prev_hash, time_ms, tenant, request_id, caller, fingerprint, role, operation, \
     key_name, key_version, outcome, status_code, peer, aad_hmac, node, kms_request_id, \
     kms_operation, aws_principal_arn, kms_key_arn, repeated, first_ms, last_ms, access_rule, \
     access_window, justification, justification_reference, kms_via_service, aws_source_vpc, \
     aws_source_vpce, hash";

impl Store {
    /// The last record's sequence number, hash and time, if any.
    pub async fn audit_head(&self) -> Result<Option<ChainHead>, StoreError> {
        let row = sqlx::query(HEAD).fetch_optional(&self.pool).await?;
        row.as_ref().map(head_row).transpose()
    }

    /// Appends a batch of records in one transaction: all or nothing. `chain` gets the head to
    /// continue from and returns the chained records with their hashes. On SQLite (one writer:
    /// this process) the head is `local`, the writer's own; on PostgreSQL it is read under
    /// [`AUDIT_CHAIN_LOCK`] inside the transaction, so nodes take turns extending one chain.
    /// Returns what `chain` returned, once committed.
    pub async fn append_audit<F>(
        &self,
        local: ChainHead,
        chain: F,
    ) -> Result<Vec<(Record, [u8; 32])>, StoreError>
    where
        F: FnOnce(ChainHead) -> Vec<(Record, [u8; 32])>,
    {
        if let Some(native) = &self.sqlite_audit {
            let batch = chain(local);
            // One multi-row INSERT is one statement, so atomic without an explicit
            // transaction, and one round trip to the database (BEGIN, a statement per row and
            // COMMIT were one each, and those round trips were most of what auditing cost).
            insert_records(self.backend, &batch, native).await?;
            return Ok(batch);
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(AUDIT_CHAIN_LOCK)
            .execute(&mut *tx)
            .await?;
        let head = match sqlx::query(HEAD).fetch_optional(&mut *tx).await? {
            Some(row) => head_row(&row)?,
            None => ChainHead::GENESIS,
        };
        let batch = chain(head);
        insert_records(self.backend, &batch, &mut *tx).await?;
        tx.commit().await?;
        Ok(batch)
    }

    /// Stores a checkpoint. A checkpoint of the same record already stored (another node signed
    /// the same head) is kept, and this one dropped: either verifies.
    pub async fn insert_checkpoint(&self, c: &Checkpoint) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO audit_checkpoints (seq, hash, time_ms, signature) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (seq) DO NOTHING",
        )
        .bind(seq_i64(c.seq)?)
        .bind(to_hex(&c.hash))
        .bind(c.time_ms)
        .bind(to_hex(&c.signature))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records with `from <= seq <= to`, in order, at most `limit`.
    pub async fn audit_records(
        &self,
        from: u64,
        to: u64,
        limit: u32,
    ) -> Result<Vec<(Record, [u8; 32])>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {RECORD_COLUMNS} FROM audit_records WHERE seq >= $1 AND seq <= $2 ORDER BY seq LIMIT $3"
        )))
        .bind(seq_i64(from)?)
        .bind(seq_i64(to)?)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(record_row).collect()
    }

    /// The chain links of records with `from <= seq <= to`, in order, at most `limit`:
    /// (sequence number, previous hash, stored hash), without the bodies.
    pub async fn audit_links(
        &self,
        from: u64,
        to: u64,
        limit: u32,
    ) -> Result<Vec<(u64, [u8; 32], [u8; 32])>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, prev_hash, hash FROM audit_records WHERE seq >= $1 AND seq <= $2 ORDER BY seq LIMIT $3",
        )
        .bind(seq_i64(from)?)
        .bind(seq_i64(to)?)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let seq: i64 = r.try_get("seq")?;
                Ok((
                    u64::try_from(seq).map_err(|_| corrupt("negative sequence number"))?,
                    hash32(&r.try_get::<String, _>("prev_hash")?)?,
                    hash32(&r.try_get::<String, _>("hash")?)?,
                ))
            })
            .collect()
    }

    /// Checkpoints with `from <= seq <= to`, in order.
    pub async fn audit_checkpoints(
        &self,
        from: u64,
        to: u64,
    ) -> Result<Vec<Checkpoint>, StoreError> {
        let rows = sqlx::query("SELECT seq, hash, time_ms, signature FROM audit_checkpoints WHERE seq >= $1 AND seq <= $2 ORDER BY seq")
            .bind(seq_i64(from)?)
            .bind(seq_i64(to)?)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(checkpoint_row).collect()
    }

    /// The last checkpoint with `seq < before`.
    pub async fn audit_checkpoint_before(
        &self,
        before: u64,
    ) -> Result<Option<Checkpoint>, StoreError> {
        let row = sqlx::query("SELECT seq, hash, time_ms, signature FROM audit_checkpoints WHERE seq < $1 ORDER BY seq DESC LIMIT 1")
            .bind(seq_i64(before)?)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(checkpoint_row).transpose()
    }

    /// The first checkpoint with `seq >= at`.
    pub async fn audit_checkpoint_from(&self, at: u64) -> Result<Option<Checkpoint>, StoreError> {
        let row = sqlx::query("SELECT seq, hash, time_ms, signature FROM audit_checkpoints WHERE seq >= $1 ORDER BY seq LIMIT 1")
            .bind(seq_i64(at)?)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(checkpoint_row).transpose()
    }

    /// The latest checkpoint.
    pub async fn audit_latest_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        self.audit_checkpoint_before(u64::try_from(i64::MAX).unwrap_or(u64::MAX))
            .await
    }

    /// The first and last sequence numbers of records with `from_ms <= time <= to_ms`.
    pub async fn audit_seq_range(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        let row = sqlx::query("SELECT MIN(seq) AS lo, MAX(seq) AS hi FROM audit_records WHERE time_ms >= $1 AND time_ms <= $2")
            .bind(from_ms)
            .bind(to_ms)
            .fetch_one(&self.pool)
            .await?;
        let lo: Option<i64> = row.try_get("lo")?;
        let hi: Option<i64> = row.try_get("hi")?;
        Ok(match (lo, hi) {
            (Some(lo), Some(hi)) => Some((
                u64::try_from(lo).map_err(|_| corrupt("negative sequence number"))?,
                u64::try_from(hi).map_err(|_| corrupt("negative sequence number"))?,
            )),
            _ => None,
        })
    }

    /// The HSM object id (hex) and public key (hex) of an audit key.
    pub async fn audit_key(&self, purpose: &str) -> Result<Option<(String, String)>, StoreError> {
        let row = sqlx::query("SELECT object_id, public_key FROM audit_keys WHERE purpose = $1")
            .bind(purpose)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((r.try_get("object_id")?, r.try_get("public_key")?)))
            .transpose()
    }

    /// Records an audit key. [`StoreError::AlreadyExists`] if another process won the race.
    pub async fn insert_audit_key(
        &self,
        purpose: &str,
        object_id: &str,
        public_key: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO audit_keys (purpose, object_id, public_key, created_at) VALUES ($1, $2, $3, $4)")
            .bind(purpose)
            .bind(object_id)
            .bind(public_key)
            .bind(crate::model::now_millis())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
