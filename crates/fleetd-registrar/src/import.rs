//! `fleetctl registrar import`: the registry's CSV (`serial,project,
//! hardware,groups,pop_key`), validated row by row (pure), then applied in
//! ONE transaction: a new serial is created, the same row again is
//! unchanged, the same serial with other data is a conflict (never
//! overwritten), and an invalid row writes nothing.

use crate::audit;
use crate::db::Db;
use crate::error::{RegistrarError, Result};
use crate::names::{check_serial, MAX_NAME_LEN};
use fleetd_core::provision::enroll::EnrollmentKey;
use sqlx::Row;

pub const HEADER: &str = "serial,project,hardware,groups,pop_key";
pub const MAX_LINE_LEN: usize = 1024;
pub const MAX_GROUPS: usize = 32;
/// The most rows one import takes.
pub const MAX_ROWS: usize = 100_000;

/// A registry row, valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRow {
    pub serial: String,
    pub project: String,
    pub hardware: String,
    /// `;`-joined, as stored.
    pub groups: String,
    pub pop_key: Option<String>,
}

/// One line of the file: its line number (the header is line 1) and the
/// row, or why it is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedRow {
    pub line: usize,
    /// The serial as given, when it is a valid one (for the report).
    pub serial: Option<String>,
    pub row: Result<DeviceRow, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Unchanged,
    Conflict,
    Invalid,
}

/// One result line: `LINE SERIAL created|unchanged|conflict|invalid: reason`
/// (SERIAL is `-` when the row has no valid serial).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowResult {
    pub line: usize,
    pub serial: Option<String>,
    pub outcome: Outcome,
    pub reason: Option<String>,
}

impl std::fmt::Display for RowResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let serial = self.serial.as_deref().unwrap_or("-");
        match (self.outcome, &self.reason) {
            (Outcome::Created, _) => write!(f, "{} {serial} created", self.line),
            (Outcome::Unchanged, _) => write!(f, "{} {serial} unchanged", self.line),
            (Outcome::Conflict, _) => write!(f, "{} {serial} conflict", self.line),
            (Outcome::Invalid, reason) => {
                write!(f, "{} {serial} invalid: {}", self.line, reason.as_deref().unwrap_or("?"))
            }
        }
    }
}

fn check_word(what: &str, value: &str) -> Result<(), String> {
    let ok = (1..=MAX_NAME_LEN).contains(&value.len())
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    ok.then_some(()).ok_or_else(|| format!("{what} {value:?} is not 1-64 characters of A-Z a-z 0-9 . _ -"))
}

/// Validates one data line. Pure.
pub fn parse_row(line: &str) -> (Option<String>, Result<DeviceRow, String>) {
    let fields: Vec<&str> = line.split(',').collect();
    let serial = fields.first().filter(|s| check_serial(s).is_ok()).map(|s| s.to_string());
    let row = (|| {
        if line.len() > MAX_LINE_LEN {
            return Err(format!("longer than {MAX_LINE_LEN} bytes"));
        }
        if fields.len() != 5 {
            return Err(format!("{} columns, expected 5 ({HEADER})", fields.len()));
        }
        let serial = check_serial(fields[0]).map_err(|e| format!("serial {:?}: {e}", fields[0]))?;
        check_word("project", fields[1])?;
        check_word("hardware", fields[2])?;
        let groups: Vec<&str> = fields[3].split(';').filter(|g| !g.is_empty()).collect();
        if groups.len() > MAX_GROUPS {
            return Err(format!("more than {MAX_GROUPS} groups"));
        }
        for group in &groups {
            check_word("group", group)?;
        }
        let pop_key = match fields[4] {
            "" => None,
            key => Some(EnrollmentKey::parse(key).map_err(|e| e.to_string())?.to_text()),
        };
        Ok(DeviceRow {
            serial: serial.to_string(),
            project: fields[1].to_string(),
            hardware: fields[2].to_string(),
            groups: groups.join(";"),
            pop_key,
        })
    })();
    (serial, row)
}

/// The whole file: the header must be exactly [`HEADER`]; blank lines are
/// skipped. Pure.
pub fn parse_csv(text: &str) -> Result<Vec<ParsedRow>> {
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let header = lines.next().unwrap_or_default();
    if header.trim_start_matches('\u{feff}') != HEADER {
        return Err(RegistrarError::ImportInvalid(format!("the header must be exactly {HEADER:?}")));
    }
    let mut rows = Vec::new();
    for (i, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if rows.len() == MAX_ROWS {
            return Err(RegistrarError::ImportInvalid(format!("more than {MAX_ROWS} rows; split the file")));
        }
        let (serial, row) = parse_row(line);
        rows.push(ParsedRow { line: i + 2, serial, row });
    }
    Ok(rows)
}

/// Applies the rows in one transaction (rolled back for a dry run: the
/// answer is the same, nothing is written).
pub async fn apply(
    db: &Db,
    actor: &str,
    rows: &[ParsedRow],
    dry_run: bool,
    now: i64,
) -> Result<Vec<RowResult>> {
    let mut tx = db.begin().await?;
    let mut results = Vec::with_capacity(rows.len());
    for parsed in rows {
        let row = match &parsed.row {
            Ok(row) => row,
            Err(reason) => {
                results.push(RowResult {
                    line: parsed.line,
                    serial: parsed.serial.clone(),
                    outcome: Outcome::Invalid,
                    reason: Some(reason.clone()),
                });
                continue;
            }
        };
        let existing =
            sqlx::query("SELECT project, hardware, groups_list, pop_key FROM devices WHERE serial = $1")
                .bind(&row.serial)
                .fetch_optional(&mut *tx)
                .await?;
        let outcome = match existing {
            None => {
                sqlx::query(
                    "INSERT INTO devices (serial, project, hardware, groups_list, pop_key, state, created_at, enrolled_at) \
                     VALUES ($1, $2, $3, $4, $5, 'active', $6, NULL)",
                )
                .bind(&row.serial)
                .bind(&row.project)
                .bind(&row.hardware)
                .bind(&row.groups)
                .bind(row.pop_key.clone())
                .bind(now)
                .execute(&mut *tx)
                .await?;
                Outcome::Created
            }
            Some(r) => {
                let stored = DeviceRow {
                    serial: row.serial.clone(),
                    project: r.try_get(0)?,
                    hardware: r.try_get(1)?,
                    groups: r.try_get(2)?,
                    pop_key: r.try_get::<Option<String>, _>(3)?.filter(|k| !k.is_empty()),
                };
                if &stored == row {
                    Outcome::Unchanged
                } else {
                    Outcome::Conflict
                }
            }
        };
        results.push(RowResult {
            line: parsed.line,
            serial: Some(row.serial.clone()),
            outcome,
            reason: None,
        });
    }
    let count = |o: Outcome| results.iter().filter(|r| r.outcome == o).count();
    let detail = format!(
        "created={} unchanged={} conflict={} invalid={}",
        count(Outcome::Created),
        count(Outcome::Unchanged),
        count(Outcome::Conflict),
        count(Outcome::Invalid)
    );
    if dry_run {
        tx.rollback().await?;
    } else {
        audit::append(&mut tx, now, actor, "import", "-", &detail).await?;
        tx.commit().await?;
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

    #[test]
    fn rows_by_table() {
        let long = "x".repeat(65);
        let cases: Vec<(String, Result<(), &str>)> = vec![
            (format!("gw-1,proj,hw,a;b,{KEY}"), Ok(())),
            ("gw-1,proj,hw,,".into(), Ok(())),
            ("gw-1,proj,hw,a;;b,".into(), Ok(())),
            ("gw 1,proj,hw,,".into(), Err("serial")),
            ("gw-1'; DROP TABLE devices;--,proj,hw,,".into(), Err("serial")),
            ("gw-1,proj,hw,".into(), Err("columns")),
            ("gw-1,proj,hw,,,".into(), Err("columns")),
            ("gw-1,pr oj,hw,,".into(), Err("project")),
            (format!("gw-1,{long},hw,,"), Err("project")),
            ("gw-1,proj,hw,g'1,".into(), Err("group")),
            ("gw-1,proj,hw,,not-a-key".into(), Err("pop-key-malformed")),
            (format!("gw-1,proj,hw,{},", "g;".repeat(40)), Err("groups")),
            (format!("gw-1,proj,hw,,{}", "A".repeat(2000)), Err("longer")),
        ];
        for (line, expected) in cases {
            let (_, row) = parse_row(&line);
            match (row, expected) {
                (Ok(_), Ok(())) => {}
                (Err(reason), Err(part)) => assert!(reason.contains(part), "{line}: {reason}"),
                (got, want) => panic!("{line}: got {got:?}, want {want:?}"),
            }
        }
        let (_, row) = parse_row("gw-1,proj,hw,a;;b,");
        assert_eq!(row.unwrap().groups, "a;b");
    }

    #[test]
    fn the_header_is_exact_and_lines_are_numbered() {
        assert_eq!(parse_csv("serial,project\n").unwrap_err().name(), "import-invalid");
        let rows = parse_csv(&format!("{HEADER}\r\ngw-1,p,h,,\r\n\r\nbad row\n")).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].line, rows[0].row.is_ok()), (2, true));
        assert_eq!((rows[1].line, rows[1].row.is_ok(), rows[1].serial.as_deref()), (4, false, None));
    }
}
