//! Durable records for the disk-spooled mode (`SimConfig.data_dir`).
//!
//! Every object a provider must keep across a restart (a file's metadata, a
//! batch and what its lifecycle needs to continue) is one small JSON file,
//! `<provider>/<kind>/<id>.json`. A record is written to a temporary file
//! in the same directory, synced and renamed over the old one, so a crash
//! leaves either the old record or the new one, never half of either.
//!
//! Several tasks may save the same batch (its lifecycle, a cancel), so
//! each save takes a ticket from the batch's [`Slot`] under the lock its
//! snapshot is taken under, and a snapshot only reaches the disk if no
//! newer one already did: the record on disk never goes back in time.
//!
//! Without a data directory nothing here touches the disk.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{lock, random_hex, Sim};

/// Suffix of a record being written.
const TEMP_SUFFIX: &str = ".tmp";
/// Suffix of a result file being written, published by a rename.
pub(crate) const PART_SUFFIX: &str = ".part";

/// One directory of records of one kind (`files`, `batches`), or nothing
/// at all when the simulator is not durable.
pub(crate) struct Records {
    dir: Option<PathBuf>,
}

impl Records {
    /// `<provider_dir>/<kind>`, created if missing; `None` inside unless
    /// the simulator keeps its state on disk.
    pub(crate) fn open(sim: &Sim, provider_dir: &Path, kind: &str) -> io::Result<Self> {
        if !sim.durable() {
            return Ok(Self { dir: None });
        }
        let dir = provider_dir.join(kind);
        fs::create_dir_all(&dir)?;
        Ok(Self { dir: Some(dir) })
    }

    /// Whether records are kept at all.
    pub(crate) fn durable(&self) -> bool {
        self.dir.is_some()
    }

    fn path(&self, id: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|dir| dir.join(format!("{id}.json")))
    }

    /// Writes one record (for records only one task ever writes at a time,
    /// such as a file's).
    pub(crate) fn write<T: Serialize>(&self, id: &str, value: &T) -> io::Result<()> {
        let Some(path) = self.path(id) else {
            return Ok(());
        };
        let bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
        write_atomic(&path, &bytes)
    }

    /// Removes one record; a missing one is not an error.
    pub(crate) fn remove(&self, id: &str) -> io::Result<()> {
        let Some(path) = self.path(id) else {
            return Ok(());
        };
        remove_if_present(&path)
    }

    /// A snapshot of record `id` to save through `slot`; call it under the
    /// lock `value` is read under, so tickets follow the order of changes.
    pub(crate) fn snapshot<T: Serialize>(
        &self,
        id: &str,
        slot: &Arc<Slot>,
        value: &T,
    ) -> io::Result<Option<Snapshot>> {
        let Some(path) = self.path(id) else {
            return Ok(None);
        };
        let bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
        Ok(Some(Snapshot {
            slot: Arc::clone(slot),
            ticket: slot.issue(),
            path,
            bytes,
        }))
    }

    /// Every record of this kind. Leftover temporary files are removed; a
    /// record that does not parse is skipped with a warning.
    pub(crate) fn load<T: DeserializeOwned>(&self) -> io::Result<Vec<T>> {
        let Some(dir) = &self.dir else {
            return Ok(Vec::new());
        };
        let mut records = Vec::new();
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|name| name.to_str())
                .unwrap_or_default();
            if name.ends_with(TEMP_SUFFIX) {
                remove_if_present(&path)?;
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            let bytes = fs::read(&path)?;
            match serde_json::from_slice(&bytes) {
                Ok(record) => records.push(record),
                Err(err) => {
                    tracing::warn!(path = %path.display(), error = %err, "sim: skipping an unreadable record");
                }
            }
        }
        Ok(records)
    }
}

/// Orders the saves of one record (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Slot {
    /// The last ticket handed out.
    issued: AtomicU64,
    /// The ticket of the snapshot on disk; `u64::MAX` once removed.
    written: Mutex<u64>,
}

impl Slot {
    fn issue(&self) -> u64 {
        self.issued.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Removes the record for good: later snapshots are dropped.
    pub(crate) fn remove(&self, records: &Records, id: &str) -> io::Result<()> {
        let mut written = lock(&self.written);
        *written = u64::MAX;
        records.remove(id)
    }
}

/// One state of a record, waiting to be written.
pub(crate) struct Snapshot {
    slot: Arc<Slot>,
    ticket: u64,
    path: PathBuf,
    bytes: Vec<u8>,
}

impl Snapshot {
    /// Writes the snapshot unless a newer one is already on disk.
    pub(crate) fn write(self) -> io::Result<()> {
        let mut written = lock(&self.slot.written);
        if *written >= self.ticket {
            return Ok(());
        }
        write_atomic(&self.path, &self.bytes)?;
        *written = self.ticket;
        Ok(())
    }
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or("record");
    let temp = dir.join(format!(".{name}.{}{TEMP_SUFFIX}", random_hex(8)));
    let written = (|| {
        let mut file = File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_data()?;
        fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written?;
    sync_dir(dir);
    Ok(())
}

/// Publishes a finished, synced result file by renaming it into place.
pub(crate) fn publish(part: &Path, path: &Path) -> io::Result<()> {
    fs::rename(part, path)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
    Ok(())
}

/// `path` with [`PART_SUFFIX`]: where a result file is written before it
/// is published.
pub(crate) fn part_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(PART_SUFFIX);
    PathBuf::from(name)
}

/// Removes result files a crash left half-written in `dir`.
pub(crate) fn remove_parts(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let is_part = path
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.ends_with(PART_SUFFIX));
        if is_part {
            remove_if_present(&path)?;
        }
    }
    Ok(())
}

/// Gives a batch its own copy of an input file, as a provider keeps one:
/// a hard link to `source` when it can, else a copy of the open `handle`
/// (the client may have deleted the file since it was opened).
pub(crate) fn keep_copy(source: &Path, handle: &File, copy: &Path) -> io::Result<()> {
    remove_if_present(copy)?;
    if fs::hard_link(source, copy).is_ok() {
        return Ok(());
    }
    let part = part_path(copy);
    let result = (|| {
        let mut reader = handle.try_clone()?;
        io::Seek::seek(&mut reader, io::SeekFrom::Start(0))?;
        let mut out = File::create(&part)?;
        io::copy(&mut reader, &mut out)?;
        out.sync_data()?;
        fs::rename(&part, copy)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&part);
    }
    result
}

pub(crate) fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
    }
}

/// Makes a rename in `dir` durable; best effort (not every platform lets a
/// directory be opened and synced).
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimConfig;

    #[test]
    fn a_newer_snapshot_is_never_overwritten_by_an_older_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sim = Sim::new(SimConfig {
            data_dir: Some(dir.path().to_path_buf()),
            ..SimConfig::default()
        })
        .expect("sim");
        let records = Records::open(&sim, dir.path(), "things").expect("records");
        let slot = Arc::new(Slot::default());
        let old = records
            .snapshot("a", &slot, &serde_json::json!({"v": 1}))
            .expect("snapshot")
            .expect("durable");
        let new = records
            .snapshot("a", &slot, &serde_json::json!({"v": 2}))
            .expect("snapshot")
            .expect("durable");
        new.write().expect("write");
        old.write().expect("write");
        let loaded: Vec<serde_json::Value> = records.load().expect("load");
        assert_eq!(loaded, [serde_json::json!({"v": 2})]);

        // Leftovers of a crash are cleaned up, not loaded.
        fs::write(dir.path().join("things/.a.json.1234.tmp"), "{\"v\":").expect("write");
        let loaded: Vec<serde_json::Value> = records.load().expect("load");
        assert_eq!(loaded.len(), 1);
        assert!(!dir.path().join("things/.a.json.1234.tmp").exists());

        slot.remove(&records, "a").expect("remove");
        let late = records
            .snapshot("a", &slot, &serde_json::json!({"v": 3}))
            .expect("snapshot")
            .expect("durable");
        late.write().expect("write");
        assert!(records
            .load::<serde_json::Value>()
            .expect("load")
            .is_empty());
    }

    #[test]
    fn nothing_is_written_without_a_data_dir() {
        let sim = Sim::new(SimConfig::default()).expect("sim");
        let dir = tempfile::tempdir().expect("tempdir");
        let records = Records::open(&sim, dir.path(), "things").expect("records");
        assert!(!records.durable());
        records.write("a", &1).expect("write");
        assert!(!dir.path().join("things").exists());
    }
}
