//! The envelope every walstream object is stored in (see FORMAT.md).
//!
//! Segments and snapshots share one layout so that every object can be checked
//! end to end the same way before anything in it is trusted:
//!
//! ```text
//! magic (8 bytes) | format version (u32 BE) | header length (u32 BE)
//! | header (JSON) | body (LZ4 frame) | SHA-256 of everything before it (32 bytes)
//! ```
//!
//! The JSON header is self-describing so that fields can be added without a
//! version bump; the version changes only when a reader built for an older
//! version could misread the object.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use serde::{de::DeserializeOwned, Serialize};

use crate::encryption::Keys;
use sha2::{Digest, Sha256};

/// Current on-storage format version.
pub const FORMAT_VERSION: u32 = 1;

/// Why an object could not be decoded. The caller adds the object's key.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("object is truncated ({0} bytes)")]
    Truncated(usize),
    #[error("checksum mismatch: object is corrupted")]
    Checksum,
    #[error("not a walstream {expected} object (bad magic)")]
    Magic { expected: &'static str },
    #[error("unsupported format version {0} (this walstream reads version {FORMAT_VERSION})")]
    Version(u32),
    #[error("invalid header: {0}")]
    Header(String),
    #[error("invalid body: {0}")]
    Body(String),
    #[error("encrypted with age, and no identity to open it was given (the replica's `age: identities`, or --age-identity FILE)")]
    Encrypted,
    #[error("{0}")]
    Decrypt(String),
}

/// The header's `cipher` field, set while an object is still encrypted
/// (see `encryption`).
#[derive(serde::Deserialize)]
struct CipherField {
    #[serde(default)]
    cipher: Option<String>,
}

/// The keys to open an object's body with: `None` for a plain object, an
/// error for an encrypted one and no identity.
fn opener<'k>(
    data: &[u8],
    hlen: usize,
    keys: Option<&'k Keys>,
) -> Result<Option<&'k Keys>, FormatError> {
    match serde_json::from_slice::<CipherField>(&data[16..16 + hlen]) {
        Ok(CipherField { cipher: Some(c) }) if c == crate::encryption::CIPHER => {
            match keys.filter(|k| k.decrypts()) {
                Some(k) => Ok(Some(k)),
                None => Err(FormatError::Encrypted),
            }
        }
        Ok(CipherField { cipher: Some(c) }) => {
            Err(FormatError::Header(format!("unknown cipher {c:?}")))
        }
        _ => Ok(None),
    }
}

fn decrypt_err(e: io::Error) -> FormatError {
    FormatError::Decrypt(e.to_string())
}

/// Encodes `header` and `body` into an object with the given magic.
pub fn encode<H: Serialize>(magic: &[u8; 8], header: &H, body: &[u8]) -> Vec<u8> {
    encode_to(magic, header, Vec::new(), |w| w.write_all(body)).expect("encoding to memory")
}

/// A writer that hashes everything written through it.
pub(crate) struct Hashing<W: Write> {
    pub(crate) inner: W,
    pub(crate) hash: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Streams an object into `out` without holding its body in memory:
/// `body` writes the uncompressed body into the compressor.
pub fn encode_to<H: Serialize, W: Write>(
    magic: &[u8; 8],
    header: &H,
    out: W,
    body: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<W> {
    encode_with(magic, header, out, None, body)
}

/// [`encode_to`], sealed when `keys` encrypt: the header says `cipher`,
/// and the compressed body is one age stream (see `encryption`).
pub fn encode_with<H: Serialize, W: Write>(
    magic: &[u8; 8],
    header: &H,
    out: W,
    keys: Option<&Keys>,
    body: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<W> {
    let keys = keys.filter(|k| k.encrypts());
    let header = match keys {
        None => serde_json::to_vec(header).expect("header serializes"),
        Some(_) => {
            let mut v = serde_json::to_value(header).expect("header serializes");
            if let Some(m) = v.as_object_mut() {
                m.insert("cipher".into(), crate::encryption::CIPHER.into());
            }
            serde_json::to_vec(&v).expect("header serializes")
        }
    };
    let mut w = Hashing {
        inner: out,
        hash: Sha256::new(),
    };
    w.write_all(magic)?;
    w.write_all(&FORMAT_VERSION.to_be_bytes())?;
    w.write_all(&(header.len() as u32).to_be_bytes())?;
    w.write_all(&header)?;
    let mut w = match keys {
        None => {
            let mut enc = lz4_flex::frame::FrameEncoder::new(w);
            body(&mut enc)?;
            enc.finish().map_err(io::Error::other)?
        }
        Some(k) => {
            let mut enc = lz4_flex::frame::FrameEncoder::new(k.seal_stream(w)?);
            body(&mut enc)?;
            enc.finish().map_err(io::Error::other)?.finish()?
        }
    };
    let sum = w.hash.finalize_reset();
    w.inner.write_all(&sum)?;
    w.inner.flush()?;
    Ok(w.inner)
}

/// Verifies an object stored in a file (streaming, so any size works), then
/// returns its header and a reader of the decompressed body.
pub fn decode_file<H: DeserializeOwned>(
    magic: &[u8; 8],
    kind: &'static str,
    path: &Path,
) -> Result<(H, Box<dyn Read + Send>), FormatError> {
    decode_file_with(magic, kind, path, None)
}

/// [`decode_file`], opening an encrypted body with `keys`.
pub fn decode_file_with<H: DeserializeOwned>(
    magic: &[u8; 8],
    kind: &'static str,
    path: &Path,
    keys: Option<&Keys>,
) -> Result<(H, Box<dyn Read + Send>), FormatError> {
    let (f, len, head) = verified_head(path)?;
    let hlen = (head.len() - 16 - 32) as u64;
    let header = decode_header_unverified::<H>(magic, kind, &head)?;
    let opener = opener(&head, hlen as usize, keys)?;
    let body = BufReader::with_capacity(1 << 20, f.take(len - 32 - 16 - hlen));
    let body: Box<dyn Read + Send> = match opener {
        None => Box::new(lz4_flex::frame::FrameDecoder::new(body)),
        Some(k) => Box::new(lz4_flex::frame::FrameDecoder::new(BufReader::new(
            k.open_stream(body).map_err(decrypt_err)?,
        ))),
    };
    Ok((header, body))
}

/// Verifies an object stored in a file and returns its header only: what
/// a replicator needs of the newest object to resume (its body may be
/// encrypted to keys this process does not hold).
pub fn decode_file_header<H: DeserializeOwned>(
    magic: &[u8; 8],
    kind: &'static str,
    path: &Path,
) -> Result<H, FormatError> {
    let (_, _, head) = verified_head(path)?;
    decode_header_unverified::<H>(magic, kind, &head)
}

/// Checks the SHA-256 trailer of the object in the file at `path`
/// (streaming), then reads its first 16 bytes and header. Returns the file
/// (positioned at the body), its length, and those bytes followed by 32
/// zero bytes (the shape `decode_header_unverified` takes).
fn verified_head(path: &Path) -> Result<(File, u64, Vec<u8>), FormatError> {
    let io_err = |e: io::Error| FormatError::Body(format!("{}: {e}", path.display()));
    let mut f = File::open(path).map_err(io_err)?;
    let len = f.metadata().map_err(io_err)?.len();
    if len < 16 + 32 {
        return Err(FormatError::Truncated(len as usize));
    }
    let mut hash = Sha256::new();
    let mut reader = BufReader::with_capacity(1 << 20, (&mut f).take(len - 32));
    io::copy(&mut reader, &mut hash).map_err(io_err)?;
    let mut sum = [0u8; 32];
    f.seek(SeekFrom::Start(len - 32)).map_err(io_err)?;
    f.read_exact(&mut sum).map_err(io_err)?;
    if hash.finalize().as_slice() != sum {
        return Err(FormatError::Checksum);
    }
    let mut prefix = [0u8; 16];
    f.seek(SeekFrom::Start(0)).map_err(io_err)?;
    f.read_exact(&mut prefix).map_err(io_err)?;
    let hlen = u32::from_be_bytes(prefix[12..16].try_into().unwrap()) as u64;
    if 16 + hlen + 32 > len {
        return Err(FormatError::Truncated(len as usize));
    }
    let mut head = prefix.to_vec();
    head.resize(16 + hlen as usize, 0);
    f.read_exact(&mut head[16..]).map_err(io_err)?;
    head.extend_from_slice(&[0u8; 32]);
    Ok((f, len, head))
}

/// Buffered file writer for `encode_to`.
pub fn file_writer(path: &Path) -> io::Result<BufWriter<File>> {
    Ok(BufWriter::with_capacity(1 << 20, File::create(path)?))
}

/// Verifies the checksum and magic, then returns the parsed header and the
/// decompressed body. `body_len` says from the header how long the body must
/// be: decompression stops one byte past it, so a hostile object cannot make
/// a reader allocate more than its header admits (LZ4 expands up to 255x).
pub fn decode<H: DeserializeOwned>(
    magic: &[u8; 8],
    kind: &'static str,
    data: &[u8],
    body_len: impl FnOnce(&H) -> Result<u64, FormatError>,
) -> Result<(H, Vec<u8>), FormatError> {
    decode_with(magic, kind, data, None, body_len)
}

/// [`decode`], opening an encrypted body with `keys`.
pub fn decode_with<H: DeserializeOwned>(
    magic: &[u8; 8],
    kind: &'static str,
    data: &[u8],
    keys: Option<&Keys>,
    body_len: impl FnOnce(&H) -> Result<u64, FormatError>,
) -> Result<(H, Vec<u8>), FormatError> {
    let header = decode_header_unverified::<H>(magic, kind, data)?;
    let (content, sum) = data.split_at(data.len() - 32);
    if Sha256::digest(content).as_slice() != sum {
        return Err(FormatError::Checksum);
    }
    let hlen = u32::from_be_bytes(data[12..16].try_into().unwrap()) as usize;
    let opener = opener(data, hlen, keys)?;
    let expected = body_len(&header)?;
    // Sized up front (growing by doubling copies the body again and again),
    // but never beyond what the compressed bytes could expand to.
    let compressed = &content[16 + hlen..];
    let mut body = Vec::with_capacity(expected.min(compressed.len() as u64 * 256) as usize);
    match opener {
        None => lz4_flex::frame::FrameDecoder::new(compressed)
            .take(expected.saturating_add(1))
            .read_to_end(&mut body),
        Some(k) => lz4_flex::frame::FrameDecoder::new(BufReader::new(
            k.open_stream(compressed).map_err(decrypt_err)?,
        ))
        .take(expected.saturating_add(1))
        .read_to_end(&mut body),
    }
    .map_err(|e| match e.kind() {
        io::ErrorKind::InvalidData if opener.is_some() => {
            FormatError::Decrypt(format!("its encrypted body does not open: {e}"))
        }
        _ => FormatError::Body(e.to_string()),
    })?;
    if body.len() as u64 != expected {
        return Err(FormatError::Body(format!(
            "{} bytes{}, the header says {expected}",
            body.len(),
            if body.len() as u64 > expected {
                " or more"
            } else {
                ""
            }
        )));
    }
    Ok((header, body))
}

/// Parses the header without checking the object's checksum (for listings).
pub fn decode_header_unverified<H: DeserializeOwned>(
    magic: &[u8; 8],
    kind: &'static str,
    data: &[u8],
) -> Result<H, FormatError> {
    if data.len() < 16 + 32 {
        return Err(FormatError::Truncated(data.len()));
    }
    if &data[0..8] != magic {
        return Err(FormatError::Magic { expected: kind });
    }
    let version = u32::from_be_bytes(data[8..12].try_into().unwrap());
    if version != FORMAT_VERSION {
        return Err(FormatError::Version(version));
    }
    let hlen = u32::from_be_bytes(data[12..16].try_into().unwrap()) as usize;
    if data.len() < 16 + hlen + 32 {
        return Err(FormatError::Truncated(data.len()));
    }
    serde_json::from_slice(&data[16..16 + hlen]).map_err(|e| FormatError::Header(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct H {
        a: u32,
    }

    #[test]
    fn round_trip_and_corruption() {
        let body: Vec<u8> = (0..10_000u32).flat_map(|i| (i % 7).to_be_bytes()).collect();
        let obj = encode(b"TESTOBJ1", &H { a: 7 }, &body);
        let len = |_: &H| Ok(40_000);
        let (h, b): (H, Vec<u8>) = decode(b"TESTOBJ1", "test", &obj, len).unwrap();
        assert_eq!(h, H { a: 7 });
        assert_eq!(b, body);
        for at in [0, 9, 20, obj.len() / 2, obj.len() - 1] {
            let mut bad = obj.clone();
            bad[at] ^= 1;
            assert!(
                decode::<H>(b"TESTOBJ1", "test", &bad, len).is_err(),
                "flip at {at}"
            );
        }
        assert!(decode::<H>(b"TESTOBJ1", "test", &obj[..obj.len() - 5], len).is_err());
        assert!(matches!(
            decode::<H>(b"OTHEROBJ", "other", &obj, len),
            Err(FormatError::Magic { .. })
        ));
        // The streaming encoder writes exactly the same bytes, and the
        // streaming decoder reads them back and detects corruption.
        let streamed =
            encode_to(b"TESTOBJ1", &H { a: 7 }, Vec::new(), |w| w.write_all(&body)).unwrap();
        assert_eq!(streamed, obj);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("obj");
        std::fs::write(&path, &obj).unwrap();
        let (h, mut r): (H, _) = decode_file(b"TESTOBJ1", "test", &path).unwrap();
        let mut b = Vec::new();
        r.read_to_end(&mut b).unwrap();
        assert_eq!((h, b), (H { a: 7 }, body.clone()));
        let mut bad = obj.clone();
        bad[obj.len() / 2] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(
            decode_file::<H>(b"TESTOBJ1", "test", &path),
            Err(FormatError::Checksum)
        ));
    }
}
