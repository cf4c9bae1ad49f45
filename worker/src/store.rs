//! Weight blobs (one expert matrix's bytes, named by their BLAKE3 hash) and where they come from.
//!
//! The [`BlobStore`] hands out `Arc<Blob>`s and remembers them by hash as long as any session
//! holds them, so two coordinators assigning the same model share one copy in memory. A blob not
//! in memory is looked for in the disk cache (`{cache_dir}/{hex(hash)}.bin`, verified against its
//! hash on every load; a corrupt file is deleted), then in the local model file given with
//! `--model` (the announced byte range, hashed; used in place through the file mapping).
//! Received blobs are written to the cache atomically (temporary file, then rename).

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use anyhow::Context;
use memmap2::Mmap;
use moeshard_protocol::control::{BlobHash, TensorBlob};

use crate::hex;

/// The bytes of one weight blob, verified against its hash.
pub struct Blob {
    /// BLAKE3 of the bytes, the key the store remembers the blob by.
    hash: BlobHash,
    bytes: BlobBytes,
}

enum BlobBytes {
    /// Received from a coordinator or read from the cache.
    Owned(Vec<u8>),
    /// A byte range of the mapped local model file.
    Mapped { map: Arc<Mmap>, start: usize, len: usize },
}

impl Blob {
    /// The blob's bytes.
    pub fn bytes(&self) -> &[u8] {
        match &self.bytes {
            BlobBytes::Owned(bytes) => bytes,
            BlobBytes::Mapped { map, start, len } => &map[*start..*start + *len],
        }
    }
}

/// Weight blobs in memory, the disk cache and the local model file. Shared by all sessions.
pub struct BlobStore {
    cache_dir: PathBuf,
    model: Option<Arc<Mmap>>,
    held: Mutex<HashMap<BlobHash, Weak<Blob>>>,
}

impl BlobStore {
    /// A store caching in `cache_dir` (created if missing) that also looks into `model`, a local
    /// copy of the model file, mapped read-only.
    pub fn open(cache_dir: PathBuf, model: Option<&Path>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&cache_dir)
            .with_context(|| format!("cannot create the cache directory {}", cache_dir.display()))?;
        let model = match model {
            Some(path) => {
                let file =
                    File::open(path).with_context(|| format!("cannot open the model file {}", path.display()))?;
                // SAFETY: the mapping is read-only and only ever read as plain bytes whose hash is
                // checked before use. Another process truncating or rewriting the model file while
                // the worker runs is outside what the worker supports, as for any mapped GGUF.
                let map = unsafe { Mmap::map(&file) }
                    .with_context(|| format!("cannot map the model file {}", path.display()))?;
                Some(Arc::new(map))
            }
            None => None,
        };
        Ok(BlobStore { cache_dir, model, held: Mutex::new(HashMap::new()) })
    }

    /// The cache file of the blob with hash `hash`.
    pub fn cache_path(&self, hash: &BlobHash) -> PathBuf {
        self.cache_dir.join(format!("{}.bin", hex(hash)))
    }

    /// The blob `want` describes (hash and length), from memory, the disk cache or the local model
    /// file, in that order; `None` when it must be shipped. Blocking: reads and hashes files.
    pub fn find(&self, want: &TensorBlob) -> Option<Arc<Blob>> {
        let len = usize::try_from(want.len).ok()?;
        if let Some(blob) = self.in_memory(&want.hash).filter(|b| b.bytes().len() == len) {
            return Some(blob);
        }
        if let Some(bytes) = self.read_cache(&want.hash, len) {
            return Some(self.remember(Blob { hash: want.hash, bytes: BlobBytes::Owned(bytes) }));
        }
        let map = self.model.as_ref()?;
        let start = usize::try_from(want.file_offset).ok()?;
        let range = map.get(start..start.checked_add(len)?)?;
        if blake3::hash(range).as_bytes() != &want.hash {
            tracing::debug!(blob = %hex(&want.hash), "the model file holds other bytes at offset {start}");
            return None;
        }
        Some(self.remember(Blob { hash: want.hash, bytes: BlobBytes::Mapped { map: Arc::clone(map), start, len } }))
    }

    /// [`BlobStore::find`] for every blob of `wants`, on `threads` threads (at least one) that each
    /// take the next blob not yet looked up; the answers are in the order of `wants`. Blocking.
    pub fn find_all(&self, wants: &[TensorBlob], threads: usize) -> Vec<Option<Arc<Blob>>> {
        let next = AtomicUsize::new(0);
        let found: Vec<OnceLock<Option<Arc<Blob>>>> = wants.iter().map(|_| OnceLock::new()).collect();
        std::thread::scope(|scope| {
            for _ in 0..threads.clamp(1, wants.len().max(1)) {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(want) = wants.get(i) else { break };
                        let _ = found[i].set(self.find(want));
                    }
                });
            }
        });
        found.into_iter().map(|f| f.into_inner().flatten()).collect()
    }

    /// Stores received bytes whose hash the caller verified: writes the cache file (a failure is
    /// logged, the blob is still used) and returns the shared blob.
    pub fn insert(&self, hash: BlobHash, bytes: Vec<u8>) -> Arc<Blob> {
        if let Some(blob) = self.in_memory(&hash).filter(|b| b.bytes() == bytes.as_slice()) {
            return blob;
        }
        if let Err(err) = self.write_cache(&hash, &bytes) {
            tracing::warn!(blob = %hex(&hash), "cannot cache a received blob: {err:#}");
        }
        self.remember(Blob { hash, bytes: BlobBytes::Owned(bytes) })
    }

    fn in_memory(&self, hash: &BlobHash) -> Option<Arc<Blob>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).get(hash).and_then(Weak::upgrade)
    }

    /// Registers `blob` by hash (forgetting blobs nobody holds any more) and returns it shared.
    fn remember(&self, blob: Blob) -> Arc<Blob> {
        let blob = Arc::new(blob);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.retain(|_, weak| weak.strong_count() > 0);
        held.insert(blob.hash, Arc::downgrade(&blob));
        blob
    }

    /// The cached bytes of `hash` if the cache file exists, has `len` bytes and hashes to `hash`;
    /// a file failing either check is deleted.
    fn read_cache(&self, hash: &BlobHash, len: usize) -> Option<Vec<u8>> {
        let path = self.cache_path(hash);
        let size = std::fs::metadata(&path).ok()?.len();
        let verified = if size == len as u64 {
            match std::fs::read(&path) {
                Ok(bytes) if blake3::hash(&bytes).as_bytes() == hash => return Some(bytes),
                Ok(_) => "its content does not match its hash",
                Err(err) => {
                    tracing::warn!("cannot read the cache file {}: {err}", path.display());
                    return None;
                }
            }
        } else {
            "it has the wrong size"
        };
        tracing::warn!("deleting the cache file {}: {verified}", path.display());
        if let Err(err) = std::fs::remove_file(&path) {
            tracing::warn!("cannot delete the cache file {}: {err}", path.display());
        }
        None
    }

    /// Writes `bytes` to the cache file of `hash` through a temporary file and a rename, so the
    /// cache never holds a partial file under a blob's name.
    fn write_cache(&self, hash: &BlobHash, bytes: &[u8]) -> anyhow::Result<()> {
        let path = self.cache_path(hash);
        let tmp = self.cache_dir.join(format!("{}.tmp-{:016x}", hex(hash), rand::random::<u64>()));
        let written =
            File::create(&tmp).and_then(|mut file| file.write_all(bytes)).and_then(|()| std::fs::rename(&tmp, &path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.with_context(|| format!("writing {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("moeshard-worker-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn describe(bytes: &[u8], file_offset: u64) -> TensorBlob {
        TensorBlob {
            ggml_type: 0,
            rows: 1,
            cols: bytes.len() as u32 / 4,
            hash: *blake3::hash(bytes).as_bytes(),
            len: bytes.len() as u64,
            file_offset,
        }
    }

    #[test]
    fn memory_then_cache_then_corrupt_cache() {
        let dir = temp_dir("cache");
        let bytes: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let want = describe(&bytes, 0);

        let store = BlobStore::open(dir.clone(), None).expect("store");
        assert!(store.find(&want).is_none());
        let blob = store.insert(want.hash, bytes.clone());
        assert!(Arc::ptr_eq(&blob, &store.find(&want).expect("in memory")), "one copy per hash");
        assert_eq!(std::fs::read(store.cache_path(&want.hash)).expect("cache file"), bytes);
        assert_eq!(std::fs::read_dir(&dir).expect("dir").count(), 1, "no temporary file left");

        let fresh = BlobStore::open(dir.clone(), None).expect("store");
        assert_eq!(fresh.find(&want).expect("from cache").bytes(), &bytes[..]);

        let mut corrupt = bytes.clone();
        corrupt[100] ^= 1;
        std::fs::write(fresh.cache_path(&want.hash), &corrupt).expect("corrupt");
        let fresh = BlobStore::open(dir.clone(), None).expect("store");
        assert!(fresh.find(&want).is_none());
        assert!(!fresh.cache_path(&want.hash).exists(), "a corrupt cache file is deleted");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn model_file_ranges_are_used_when_their_hash_matches() {
        let dir = temp_dir("model");
        std::fs::create_dir_all(&dir).expect("dir");
        let blob: Vec<u8> = (0..1024u32).map(|i| (i * 13 + 5) as u8).collect();
        let mut file = vec![0xeeu8; 300];
        file.extend_from_slice(&blob);
        file.extend_from_slice(&[1, 2, 3]);
        let model = dir.join("model.gguf");
        std::fs::write(&model, &file).expect("model file");

        let store = BlobStore::open(dir.join("cache"), Some(&model)).expect("store");
        assert_eq!(store.find(&describe(&blob, 300)).expect("found in the model").bytes(), &blob[..]);
        assert!(store.find(&describe(&blob, 299)).is_none(), "other bytes at that offset");
        assert!(store.find(&describe(&blob, u64::MAX - 10)).is_none(), "offset past the end");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn find_all_answers_in_order_on_any_thread_count() {
        let dir = temp_dir("find-all");
        let store = BlobStore::open(dir.clone(), None).expect("store");
        let blobs: Vec<Vec<u8>> = (0..7u8).map(|k| vec![k; 256 + usize::from(k)]).collect();
        let wants: Vec<TensorBlob> = blobs.iter().map(|b| describe(b, 0)).collect();
        for (i, b) in blobs.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
            store.insert(wants[i].hash, b.clone());
        }
        for threads in [0, 1, 3, 20] {
            let found = store.find_all(&wants, threads);
            assert_eq!(found.len(), wants.len());
            for (i, f) in found.iter().enumerate() {
                assert_eq!(
                    f.as_ref().map(|b| b.bytes().to_vec()),
                    (i % 2 == 0).then(|| blobs[i].clone()),
                    "{threads}: {i}"
                );
            }
        }
        assert!(store.find_all(&[], 4).is_empty());
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
