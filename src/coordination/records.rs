//! Small durable records with conditional writes: what containment jobs keep.
//!
//! A record is a name, a body, string metadata and an ETag. Writes are
//! conditional ([`WriteIf`]): "only if absent" is how the first outcome of a
//! device stands when two deliveries of one message race, and "only if
//! unchanged" is how one of several instances wins a repair or a cancel.
//! [`Records::list`] returns names and metadata in name order, a page at a
//! time, without reading bodies: a job's status is one listing of its
//! outcome records, not one read per device.
//!
//! Two implementations: [`BlobRecords`], blobs in the coordination container
//! of the app's storage account (`COORDINATION=storage`), and
//! [`MemoryRecords`], one process's memory (`--simulate`,
//! `COORDINATION=local`).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use async_trait::async_trait;

use super::{
    CoordinationError,
    store::{PutIf, Store},
};

/// A record as read.
#[derive(Debug, Clone)]
pub struct Record {
    pub body: Vec<u8>,
    pub metadata: HashMap<String, String>,
    pub etag: String,
}

/// A record as listed: its name and metadata.
#[derive(Debug, Clone)]
pub struct Listed {
    pub name: String,
    pub metadata: HashMap<String, String>,
}

/// When a write may happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteIf {
    /// Only if no record has the name yet.
    Absent,
    /// Only if the record still has this ETag.
    Matches(String),
    /// Whatever is there.
    Always,
}

/// What a conditional write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Written; the new ETag.
    Done(String),
    /// The condition did not hold: someone else wrote first.
    Lost,
}

/// Durable records, shared by every instance (storage) or by one process (memory).
#[async_trait]
pub trait Records: std::fmt::Debug + Send + Sync {
    /// The record, or `None` when there is none.
    async fn read(&self, name: &str) -> Result<Option<Record>, CoordinationError>;

    /// Write `body` and `metadata` (ASCII names and values) under `condition`.
    async fn write(
        &self,
        name: &str,
        body: Vec<u8>,
        metadata: HashMap<String, String>,
        condition: WriteIf,
    ) -> Result<Written, CoordinationError>;

    /// Up to `max` records whose names start with `prefix`, in name order,
    /// from the page `marker` points at; and the next page's marker.
    async fn list(
        &self,
        prefix: &str,
        max: usize,
        marker: Option<String>,
    ) -> Result<(Vec<Listed>, Option<String>), CoordinationError>;

    /// Every record whose name starts with `prefix`, page after page.
    async fn list_all(&self, prefix: &str) -> Result<Vec<Listed>, CoordinationError> {
        let mut all = Vec::new();
        let mut marker = None;
        loop {
            let (page, next) = self.list(prefix, LIST_PAGE, marker).await?;
            all.extend(page);
            match next {
                Some(next) => marker = Some(next),
                None => return Ok(all),
            }
        }
    }
}

/// The largest page blob storage lists at once.
pub const LIST_PAGE: usize = 5000;

/// Records as blobs in the coordination container.
#[derive(Debug, Clone)]
pub struct BlobRecords {
    store: Arc<Store>,
}

impl BlobRecords {
    pub(crate) fn new(store: Arc<Store>) -> Self {
        Self { store }
    }

    /// HTTP requests sent to storage so far (benchmarks count them per device).
    pub fn storage_operations(&self) -> u64 {
        self.store.operations().total()
    }
}

#[async_trait]
impl Records for BlobRecords {
    async fn read(&self, name: &str) -> Result<Option<Record>, CoordinationError> {
        match self.store.read_with_metadata(name).await? {
            Ok((body, metadata, etag)) => Ok(Some(Record {
                body,
                metadata,
                etag: etag.to_string(),
            })),
            Err(refusal) if refusal.status == 404 => Ok(None),
            Err(refusal) => Err(refused("reading a record", refusal.status)),
        }
    }

    async fn write(
        &self,
        name: &str,
        body: Vec<u8>,
        metadata: HashMap<String, String>,
        condition: WriteIf,
    ) -> Result<Written, CoordinationError> {
        let put_if = |condition: &WriteIf| match condition {
            WriteIf::Absent => PutIf::Absent,
            WriteIf::Matches(etag) => PutIf::Matches(etag.clone().into()),
            WriteIf::Always => PutIf::Always,
        };
        let mut created_container = false;
        loop {
            let answer = self
                .store
                .put(name, body.clone(), metadata.clone(), put_if(&condition))
                .await?;
            match answer {
                Ok(etag) => return Ok(Written::Done(etag.to_string())),
                // The container is made on first use, as the lock's is.
                Err(refusal) if refusal.is("ContainerNotFound") && !created_container => {
                    created_container = true;
                    match self.store.create_container().await? {
                        Ok(()) => {}
                        Err(r) if r.status == 409 => {}
                        Err(r) => return Err(refused("creating the container", r.status)),
                    }
                }
                Err(refusal) if matches!(refusal.status, 409 | 412) => return Ok(Written::Lost),
                // If-Match on a record that is gone.
                Err(refusal) if refusal.status == 404 => return Ok(Written::Lost),
                Err(refusal) => return Err(refused("writing a record", refusal.status)),
            }
        }
    }

    async fn list(
        &self,
        prefix: &str,
        max: usize,
        marker: Option<String>,
    ) -> Result<(Vec<Listed>, Option<String>), CoordinationError> {
        match self.store.list_page(prefix, max, marker).await? {
            Ok((blobs, next)) => Ok((
                blobs
                    .into_iter()
                    .map(|b| Listed {
                        name: b.name,
                        metadata: b.metadata,
                    })
                    .collect(),
                next,
            )),
            // No container yet: nothing was ever written.
            Err(refusal) if refusal.status == 404 => Ok((Vec::new(), None)),
            Err(refusal) => Err(refused("listing records", refusal.status)),
        }
    }
}

fn refused(what: &str, status: u16) -> CoordinationError {
    CoordinationError::Unavailable {
        retry_after: std::time::Duration::from_secs(5),
        reason: format!("storage answered {status} while {what}"),
    }
}

/// Records in this process's memory.
#[derive(Debug, Default)]
pub struct MemoryRecords {
    records: Mutex<BTreeMap<String, Record>>,
    versions: AtomicU64,
}

impl MemoryRecords {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Records for MemoryRecords {
    async fn read(&self, name: &str) -> Result<Option<Record>, CoordinationError> {
        Ok(self
            .records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned())
    }

    async fn write(
        &self,
        name: &str,
        body: Vec<u8>,
        metadata: HashMap<String, String>,
        condition: WriteIf,
    ) -> Result<Written, CoordinationError> {
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let current = records.get(name).map(|r| r.etag.as_str());
        let allowed = match (&condition, current) {
            (WriteIf::Absent, None) | (WriteIf::Always, _) => true,
            (WriteIf::Matches(etag), Some(current)) => etag == current,
            _ => false,
        };
        if !allowed {
            return Ok(Written::Lost);
        }
        let etag = format!("\"{}\"", self.versions.fetch_add(1, Ordering::Relaxed) + 1);
        records.insert(
            name.to_owned(),
            Record {
                body,
                metadata,
                etag: etag.clone(),
            },
        );
        Ok(Written::Done(etag))
    }

    async fn list(
        &self,
        prefix: &str,
        max: usize,
        marker: Option<String>,
    ) -> Result<(Vec<Listed>, Option<String>), CoordinationError> {
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let start = marker.unwrap_or_else(|| prefix.to_owned());
        let mut page: Vec<Listed> = records
            .range(start..)
            .take_while(|(name, _)| name.starts_with(prefix))
            .take(max.max(1) + 1)
            .map(|(name, record)| Listed {
                name: name.clone(),
                metadata: record.metadata.clone(),
            })
            .collect();
        let next = (page.len() > max.max(1))
            .then(|| page.pop().map(|l| l.name))
            .flatten();
        Ok((page, next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_records_keep_the_first_write_and_page_in_name_order() {
        let records = MemoryRecords::new();
        let first = records
            .write("a/1", b"one".to_vec(), HashMap::new(), WriteIf::Absent)
            .await
            .unwrap();
        let Written::Done(etag) = first else {
            panic!("first write lost")
        };
        assert_eq!(
            records
                .write("a/1", b"two".to_vec(), HashMap::new(), WriteIf::Absent)
                .await
                .unwrap(),
            Written::Lost
        );
        assert_eq!(
            records
                .write(
                    "a/1",
                    b"x".to_vec(),
                    HashMap::new(),
                    WriteIf::Matches("\"9\"".into())
                )
                .await
                .unwrap(),
            Written::Lost
        );
        assert!(matches!(
            records
                .write(
                    "a/1",
                    b"three".to_vec(),
                    HashMap::new(),
                    WriteIf::Matches(etag)
                )
                .await
                .unwrap(),
            Written::Done(_)
        ));
        for name in ["a/2", "a/3", "b/1"] {
            records
                .write(name, Vec::new(), HashMap::new(), WriteIf::Always)
                .await
                .unwrap();
        }
        let (page, next) = records.list("a/", 2, None).await.unwrap();
        assert_eq!(
            page.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
            ["a/1", "a/2"]
        );
        let (page, next) = records.list("a/", 2, next).await.unwrap();
        assert_eq!(page.len(), 1);
        assert_eq!(page[0].name, "a/3");
        assert!(next.is_none());
        assert_eq!(records.list_all("a/").await.unwrap().len(), 3);
        assert_eq!(records.read("a/1").await.unwrap().unwrap().body, b"three");
    }
}
