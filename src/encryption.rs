//! Client-side encryption: a stolen bucket reveals no rows.
//!
//! With `age:` on a replica, every object body (snapshots, segments,
//! compacted objects) is encrypted with age to the replica's X25519
//! recipients before it leaves the process, and decrypted with its
//! identities after it comes back. Server-side encryption does not help
//! against someone who reads the bucket with valid credentials; this does.
//!
//! What stays readable (see FORMAT.md): object keys (generation ids,
//! indexes and times), sizes, and each object's envelope: magic, format
//! version and JSON header (positions, page size and count, WAL salts and
//! checksums, timestamps), plus `"cipher": "age"` in the header. Readable
//! headers let a replicator that holds only the public recipients resume
//! its generation after a restart, and let tools list what is what; they
//! hold no row data. The body, the only place page contents live, is one
//! age stream (ChaCha20-Poly1305 in 64 KiB chunks, authenticated), and the
//! SHA-256 trailer covers the stored (encrypted) bytes, so corruption is
//! found without a key.
//!
//! The keys live in a [`Storage`] wrapper, so the engine never deals with
//! them: the replica's encoder seals segments and compacted objects as it
//! writes them and its decoders open bodies as they read them, with the
//! keys the storage gives ([`Storage::keys`]), in the same single pass as
//! compression and checksums; the wrapper seals what arrives plain
//! (snapshot files, written once for every replica of a database). Without
//! an identity an encrypted body is refused with an error that says a key
//! is required. Manifests, the lease and anything else stay as they are. A replica may hold plain and encrypted
//! generations side by side; each object says which it is.

use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use crate::format::Hashing;
use crate::storage::{Conditional, DynStorage, ObjectMeta, Storage, StorageError, Version};

/// The value of the header's `cipher` field in an encrypted object.
pub const CIPHER: &str = "age";

/// A replica's `age:` as configured: recipients (`age1...`) and identities
/// (files holding `AGE-SECRET-KEY-1...` lines, or such a key itself).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgeSettings {
    pub recipients: Vec<String>,
    pub identities: Vec<String>,
}

/// Parsed keys.
pub struct Keys {
    recipients: Vec<age::x25519::Recipient>,
    identities: Vec<age::x25519::Identity>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the identities.
        f.debug_struct("Keys")
            .field("recipients", &self.recipients.len())
            .field("identities", &self.identities.len())
            .finish()
    }
}

impl Keys {
    /// Parses recipients and identities; the error names the one at fault
    /// (never a secret key's text).
    pub fn parse(s: &AgeSettings) -> Result<Keys, String> {
        let recipients = s
            .recipients
            .iter()
            .map(|r| {
                age::x25519::Recipient::from_str(r.trim()).map_err(|e| {
                    format!("recipient {r:?} is not an age X25519 recipient (age1...): {e}")
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut identities = Vec::new();
        for i in &s.identities {
            let i = i.trim();
            if i.starts_with("AGE-SECRET-KEY-") {
                identities.push(age::x25519::Identity::from_str(i).map_err(|e| {
                    format!("an identity given inline is not an age X25519 identity: {e}")
                })?);
                continue;
            }
            let text = std::fs::read_to_string(i)
                .map_err(|e| format!("identity file {i}: cannot read it: {e}"))?;
            let before = identities.len();
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                identities.push(age::x25519::Identity::from_str(line).map_err(|e| {
                    format!(
                        "identity file {i}, line {}: not an age X25519 identity: {e}",
                        n + 1
                    )
                })?);
            }
            if identities.len() == before {
                return Err(format!("identity file {i} holds no identity"));
            }
        }
        Ok(Keys {
            recipients,
            identities,
        })
    }

    pub fn encrypts(&self) -> bool {
        !self.recipients.is_empty()
    }

    pub fn decrypts(&self) -> bool {
        !self.identities.is_empty()
    }

    /// An age stream to the recipients, written into `out`.
    pub fn seal_stream<W: Write>(&self, out: W) -> io::Result<age::stream::StreamWriter<W>> {
        self.encryptor()?.wrap_output(out)
    }

    /// The plaintext of the age stream `input`, opened with the identities.
    pub fn open_stream<R: Read>(&self, input: R) -> io::Result<age::stream::StreamReader<R>> {
        self.decrypt(input)
    }

    fn encryptor(&self) -> io::Result<age::Encryptor> {
        age::Encryptor::with_recipients(self.recipients.iter().map(|r| r as &dyn age::Recipient))
            .map_err(io::Error::other)
    }

    fn decrypt<R: Read>(&self, input: R) -> io::Result<age::stream::StreamReader<R>> {
        let d = age::Decryptor::new(input)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        d.decrypt(self.identities.iter().map(|i| i as &dyn age::Identity))
            .map_err(|e| match e {
                age::DecryptError::NoMatchingKeys => io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "none of the given age identities opens it (it is encrypted to other keys)",
                ),
                e => io::Error::new(io::ErrorKind::InvalidData, e),
            })
    }
}

/// Objects whose bodies are encrypted: snapshots, segments and compacted
/// objects.
fn sealed_kind(key: &str) -> bool {
    key.ends_with(".segment") || key.ends_with(".snapshot")
}

/// An object's envelope: its first 16 bytes and its JSON header.
struct Envelope {
    prefix: [u8; 12],
    header: serde_json::Map<String, serde_json::Value>,
    /// Bytes before the body.
    body_at: u64,
}

fn bad(m: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m.into())
}

fn read_envelope<R: Read>(r: &mut R, len: u64) -> io::Result<Envelope> {
    let mut first = [0u8; 16];
    r.read_exact(&mut first)?;
    let hlen = u32::from_be_bytes(first[12..16].try_into().unwrap()) as u64;
    if 16 + hlen + 32 > len {
        return Err(bad(format!("object is truncated ({len} bytes)")));
    }
    let mut header = vec![0u8; hlen as usize];
    r.read_exact(&mut header)?;
    let header =
        serde_json::from_slice(&header).map_err(|e| bad(format!("invalid header: {e}")))?;
    Ok(Envelope {
        prefix: first[..12].try_into().unwrap(),
        header,
        body_at: 16 + hlen,
    })
}

/// Writes an envelope with `header` and returns the writer for the body.
fn write_envelope<W: Write>(
    w: &mut W,
    prefix: &[u8; 12],
    header: &serde_json::Map<String, serde_json::Value>,
) -> io::Result<()> {
    let h = serde_json::to_vec(header).expect("header serializes");
    w.write_all(prefix)?;
    w.write_all(&(h.len() as u32).to_be_bytes())?;
    w.write_all(&h)
}

/// Files are read through a buffer of this size (in-memory objects are
/// read in place).
const FILE_BUFFER: usize = 256 << 10;

fn buffered(path: &Path) -> io::Result<(BufReader<std::fs::File>, u64)> {
    let f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    Ok((BufReader::with_capacity(FILE_BUFFER, f), len))
}

/// Seals the plain object in `src` (`len` bytes) into `out`: the same
/// envelope with `cipher` added, the body encrypted, a new trailer.
fn seal<R: Read + Seek, W: Write>(keys: &Keys, src: &mut R, len: u64, out: W) -> io::Result<W> {
    src.seek(SeekFrom::Start(0))?;
    let mut env = read_envelope(src, len)?;
    if env.header.contains_key("cipher") {
        return Err(bad("object is encrypted already"));
    }
    env.header
        .insert("cipher".into(), serde_json::Value::String(CIPHER.into()));
    let mut w = Hashing {
        inner: out,
        hash: Sha256::new(),
    };
    write_envelope(&mut w, &env.prefix, &env.header)?;
    let body_len = len - env.body_at - 32;
    let mut enc = keys.encryptor()?.wrap_output(&mut w)?;
    io::copy(&mut src.take(body_len), &mut enc)?;
    enc.finish()?;
    let sum = w.hash.finalize_reset();
    w.inner.write_all(&sum)?;
    w.inner.flush()?;
    Ok(w.inner)
}

/// Whether the object (its first bytes) is sealed already: the replica
/// encodes segments and compacted objects sealed (see `format`); only what
/// arrives plain (snapshot files) is sealed here.
fn is_sealed<R: Read>(r: &mut R, len: u64) -> io::Result<bool> {
    let env = read_envelope(r, len)?;
    Ok(env.header.contains_key("cipher"))
}

/// The storage wrapper (see the module doc).
#[derive(Debug)]
pub struct Encrypted {
    inner: DynStorage,
    keys: Arc<Keys>,
}

impl Encrypted {
    /// `inner` behind `age` (as-is without it).
    pub fn wrap(inner: DynStorage, age: Option<&AgeSettings>) -> Result<DynStorage, String> {
        match age {
            None => Ok(inner),
            Some(a) => Ok(Arc::new(Encrypted {
                inner,
                keys: Arc::new(Keys::parse(a)?),
            })),
        }
    }

    fn err(&self, op: &'static str, key: &str, e: io::Error) -> StorageError {
        StorageError::Backend {
            op,
            location: self.inner.location(),
            key: key.to_string(),
            message: e.to_string(),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: &'static str,
        key: &str,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> Result<T, StorageError> {
        tokio::task::spawn_blocking(f)
            .await
            .expect("encryption task")
            .map_err(|e| self.err(op, key, e))
    }

    /// Whether `data`, stored at `key`, is to be sealed here.
    fn to_seal(&self, key: &str, data: &[u8]) -> bool {
        sealed_kind(key)
            && self.keys.encrypts()
            && !is_sealed(&mut io::Cursor::new(data), data.len() as u64).unwrap_or(false)
    }

    fn seal_bytes(&self, data: &[u8]) -> io::Result<Vec<u8>> {
        seal(
            &self.keys,
            &mut io::Cursor::new(data),
            data.len() as u64,
            Vec::with_capacity(data.len() + 256),
        )
    }

    /// Whether the file at `path`, stored at `key`, is to be sealed here.
    fn file_to_seal(&self, key: &str, path: &Path) -> bool {
        sealed_kind(key)
            && self.keys.encrypts()
            && !buffered(path)
                .and_then(|(mut f, len)| is_sealed(&mut f, len))
                .unwrap_or(false)
    }

    /// A sealed copy of the file at `path`, beside it.
    async fn seal_file(&self, key: &str, path: &Path) -> Result<TempPath, StorageError> {
        let sealed = TempPath::beside(path);
        let (keys, src, dst) = (self.keys.clone(), path.to_path_buf(), sealed.0.clone());
        self.blocking("encrypt", key, move || {
            let (mut f, len) = buffered(&src)?;
            let out = io::BufWriter::with_capacity(FILE_BUFFER, std::fs::File::create(&dst)?);
            seal(&keys, &mut f, len, out)?
                .into_inner()
                .map_err(|e| e.into_error())?;
            Ok(())
        })
        .await?;
        Ok(sealed)
    }
}

/// A temporary file removed when dropped.
struct TempPath(PathBuf);

impl TempPath {
    fn beside(path: &Path) -> TempPath {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        TempPath(path.with_file_name(format!(".{name}.age.{:08x}", rand::random::<u32>())))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[async_trait]
impl Storage for Encrypted {
    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StorageError> {
        if !self.to_seal(key, &data) {
            return self.inner.put(key, data).await;
        }
        let sealed = self
            .seal_bytes(&data)
            .map_err(|e| self.err("encrypt", key, e))?;
        // Not held through the upload.
        drop(data);
        self.inner.put(key, sealed).await
    }

    /// Objects come back as stored: they are opened as they are decoded
    /// (see `format`), with the keys from [`Storage::keys`].
    async fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        self.inner.get(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        self.inner.list(prefix).await
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.inner.delete(key).await
    }

    fn location(&self) -> String {
        self.inner.location()
    }

    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StorageError> {
        if !self.file_to_seal(key, path) {
            return self.inner.put_file(key, path).await;
        }
        let sealed = self.seal_file(key, path).await?;
        self.inner.put_file(key, &sealed.0).await
    }

    fn local_path(&self, key: &str) -> Option<PathBuf> {
        self.inner.local_path(key)
    }

    async fn get_file(&self, key: &str, path: &Path) -> Result<u64, StorageError> {
        self.inner.get_file(key, path).await
    }

    async fn create_new(&self, key: &str, data: Vec<u8>) -> Result<Conditional, StorageError> {
        if !self.to_seal(key, &data) {
            return self.inner.create_new(key, data).await;
        }
        let sealed = self
            .seal_bytes(&data)
            .map_err(|e| self.err("encrypt", key, e))?;
        // Not held through the upload.
        drop(data);
        let digest: [u8; 32] = Sha256::digest(&sealed).into();
        match self.inner.create_new(key, sealed).await? {
            // Encryption is randomized: the stored object is this one's own
            // earlier attempt (a retried request) only if it is these bytes.
            Conditional::Conflict => {
                let there: [u8; 32] = Sha256::digest(self.inner.get(key).await?).into();
                Ok(if there == digest {
                    Conditional::Done(String::new())
                } else {
                    Conditional::Conflict
                })
            }
            c => Ok(c),
        }
    }

    async fn create_new_file(&self, key: &str, path: &Path) -> Result<Conditional, StorageError> {
        if !self.file_to_seal(key, path) {
            return self.inner.create_new_file(key, path).await;
        }
        let sealed = self.seal_file(key, path).await?;
        match self.inner.create_new_file(key, &sealed.0).await? {
            Conditional::Conflict => {
                let there = TempPath::beside(path);
                self.inner.get_file(key, &there.0).await?;
                let (a, b) = (sealed.0.clone(), there.0.clone());
                let same = self
                    .blocking("compare", key, move || {
                        Ok(std::fs::read(a)? == std::fs::read(b)?)
                    })
                    .await?;
                Ok(if same {
                    Conditional::Done(String::new())
                } else {
                    Conditional::Conflict
                })
            }
            c => Ok(c),
        }
    }

    async fn get_versioned(&self, key: &str) -> Result<(Vec<u8>, Version), StorageError> {
        self.inner.get_versioned(key).await
    }

    async fn replace_if(
        &self,
        key: &str,
        data: Vec<u8>,
        version: &str,
    ) -> Result<Conditional, StorageError> {
        self.inner.replace_if(key, data, version).await
    }

    fn keys(&self) -> Option<Arc<Keys>> {
        Some(self.keys.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (Keys, String) {
        let id = age::x25519::Identity::generate();
        let secret = {
            use age::secrecy::ExposeSecret;
            id.to_string().expose_secret().to_string()
        };
        let k = Keys::parse(&AgeSettings {
            recipients: vec![id.to_public().to_string()],
            identities: vec![secret.clone()],
        })
        .unwrap();
        (k, secret)
    }

    #[test]
    fn sealed_objects_open_to_the_same_content() {
        let (k, _) = keys();
        let pages: Vec<u8> = b"MARKER-ROW-".repeat(5000);
        let header = serde_json::json!({"index": 3});
        let len = |_: &serde_json::Value| Ok(pages.len() as u64);
        let decode = |obj: &[u8], keys: Option<&Keys>| {
            crate::format::decode_with(b"WSSEGMNT", "segment", obj, keys, len)
        };
        // Sealed as encoded, and sealed here from a plain object: both open.
        let direct = crate::format::encode_with(b"WSSEGMNT", &header, Vec::new(), Some(&k), |w| {
            w.write_all(&pages)
        })
        .unwrap();
        let plain = crate::format::encode(b"WSSEGMNT", &header, &pages);
        let wrapped = seal(
            &k,
            &mut io::Cursor::new(&plain),
            plain.len() as u64,
            Vec::new(),
        )
        .unwrap();
        for sealed in [&direct, &wrapped] {
            assert!(
                !sealed.windows(11).any(|w| w == b"MARKER-ROW-"),
                "plaintext in the sealed object"
            );
            let (h, body): (serde_json::Value, Vec<u8>) = decode(sealed, Some(&k)).unwrap();
            assert_eq!(h["index"], 3);
            assert_eq!(body, pages);
            // No key: refused as encrypted; a plain object needs none.
            assert!(matches!(
                decode(sealed, None),
                Err(crate::format::FormatError::Encrypted)
            ));
            // Altered or cut: refused.
            let mut bad = sealed.clone();
            let at = bad.len() / 2;
            bad[at] ^= 1;
            assert!(decode(&bad, Some(&k)).is_err());
            assert!(decode(&sealed[..sealed.len() - 40], Some(&k)).is_err());
            // Another key: refused, saying so.
            let (other, _) = keys();
            let e = decode(sealed, Some(&other)).unwrap_err().to_string();
            assert!(e.contains("none of the given age identities"), "{e}");
        }
        assert!(decode(&plain, None).is_ok());
        assert!(is_sealed(&mut io::Cursor::new(&direct), direct.len() as u64).unwrap());
        assert!(!is_sealed(&mut io::Cursor::new(&plain), plain.len() as u64).unwrap());
    }

    #[test]
    fn bad_keys_are_named() {
        let e = Keys::parse(&AgeSettings {
            recipients: vec!["age1nope".into()],
            identities: vec![],
        })
        .unwrap_err();
        assert!(e.contains("age1nope"), "{e}");
        let e = Keys::parse(&AgeSettings {
            recipients: vec![],
            identities: vec!["/no/such/key.txt".into()],
        })
        .unwrap_err();
        assert!(e.contains("/no/such/key.txt"), "{e}");
        let e = Keys::parse(&AgeSettings {
            recipients: vec![],
            identities: vec!["AGE-SECRET-KEY-1NOTAKEY".into()],
        })
        .unwrap_err();
        assert!(!e.contains("NOTAKEY"), "a secret's text in an error: {e}");
    }
}
