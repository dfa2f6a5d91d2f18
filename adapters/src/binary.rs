//! Binary WebSocket frames: what a dialect's `[connect] binary` makes of them. Some providers
//! send every frame compressed (gzip, or deflate), others send UTF-8 text in binary frames,
//! most never send binary at all. Decompression is bounded: the output may not exceed the
//! frame-size limit, so a small compressed frame that inflates without end (a decompression
//! bomb) is refused after reading at most that many bytes, never allocated whole.

use std::io::Read;

/// What binary frames mean for a dialect (`[connect] binary`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryFrames {
    /// Binary frames are refused (counted and skipped).
    Reject,
    /// A binary frame holds UTF-8 text, read like a text frame.
    Text,
    /// A binary frame is gzip-compressed text (RFC 1952).
    Gzip,
    /// A binary frame is deflate-compressed text: raw deflate (RFC 1951), or with a zlib
    /// header (RFC 1950), told apart by the header.
    Deflate,
}

impl BinaryFrames {
    /// The names a dialect file may write, with their meaning.
    pub const NAMES: [(&'static str, BinaryFrames); 4] = [
        ("reject", BinaryFrames::Reject),
        ("text", BinaryFrames::Text),
        ("gzip", BinaryFrames::Gzip),
        ("deflate", BinaryFrames::Deflate),
    ];

    /// The mode named `name`, if it is one.
    pub fn parse(name: &str) -> Option<BinaryFrames> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, m)| *m)
    }
}

/// Why a binary frame could not be read as text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BinaryRefused {
    /// The dialect takes no binary frames.
    #[error("binary frame refused (the dialect's [connect] binary is \"reject\")")]
    Rejected,
    /// The frame inflates past the frame-size limit.
    #[error("binary frame inflates past the frame-size limit of {limit} bytes; refused")]
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The frame is not valid compressed data.
    #[error("binary frame does not decompress: {0}")]
    Corrupt(String),
    /// The (decompressed) frame is not UTF-8.
    #[error("binary frame is not UTF-8 text")]
    NotText,
}

impl BinaryRefused {
    /// Whether this refusal is a frame that would inflate past the limit (a likely bomb).
    pub fn is_too_large(&self) -> bool {
        matches!(self, BinaryRefused::TooLarge { .. })
    }
}

/// The text of a binary frame under `mode`, decompressed to at most `limit` bytes.
pub fn binary_text(
    bytes: &[u8],
    mode: BinaryFrames,
    limit: usize,
) -> Result<String, BinaryRefused> {
    let inflated = match mode {
        BinaryFrames::Reject => return Err(BinaryRefused::Rejected),
        BinaryFrames::Text => bytes.to_vec(),
        BinaryFrames::Gzip => inflate(flate2::read::GzDecoder::new(bytes), limit)?,
        BinaryFrames::Deflate if zlib_header(bytes) => {
            inflate(flate2::read::ZlibDecoder::new(bytes), limit)?
        }
        BinaryFrames::Deflate => inflate(flate2::read::DeflateDecoder::new(bytes), limit)?,
    };
    String::from_utf8(inflated).map_err(|_| BinaryRefused::NotText)
}

/// Reads `reader` to its end, refusing (after at most `limit + 1` bytes) output over `limit`.
fn inflate(reader: impl Read, limit: usize) -> Result<Vec<u8>, BinaryRefused> {
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    let mut out = Vec::new();
    reader
        .take(cap)
        .read_to_end(&mut out)
        .map_err(|e| BinaryRefused::Corrupt(e.to_string()))?;
    if out.len() > limit {
        return Err(BinaryRefused::TooLarge { limit });
    }
    Ok(out)
}

/// Whether `bytes` start with a zlib header (deflate method, a valid header check).
fn zlib_header(bytes: &[u8]) -> bool {
    match bytes {
        [cmf, flg, ..] => cmf & 0x0f == 8 && (u16::from(*cmf) * 256 + u16::from(*flg)) % 31 == 0,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).expect("compress");
        e.finish().expect("compress")
    }

    #[test]
    fn each_mode_reads_its_frames() {
        let text = br#"{"a":1}"#;
        let level = flate2::Compression::fast();
        let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), level);
        raw.write_all(text).expect("compress");
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), level);
        z.write_all(text).expect("compress");
        for (frame, mode) in [
            (gzip(text), BinaryFrames::Gzip),
            (raw.finish().expect("compress"), BinaryFrames::Deflate),
            (z.finish().expect("compress"), BinaryFrames::Deflate),
            (text.to_vec(), BinaryFrames::Text),
        ] {
            assert_eq!(
                binary_text(&frame, mode, 100).as_deref(),
                Ok(r#"{"a":1}"#),
                "{mode:?}"
            );
        }
        assert_eq!(
            binary_text(text, BinaryFrames::Reject, 100),
            Err(BinaryRefused::Rejected)
        );
        assert!(matches!(
            binary_text(text, BinaryFrames::Gzip, 100),
            Err(BinaryRefused::Corrupt(_))
        ));
        assert_eq!(
            binary_text(&gzip(&[0xff, 0xfe]), BinaryFrames::Gzip, 100),
            Err(BinaryRefused::NotText)
        );
    }

    #[test]
    fn a_decompression_bomb_is_refused_at_the_limit() {
        // 4 MiB of spaces compress to about 4 KiB; the limit is 1 KiB.
        let bomb = gzip(&vec![b' '; 4 << 20]);
        assert!(bomb.len() < 64 << 10);
        let refused = binary_text(&bomb, BinaryFrames::Gzip, 1024).expect_err("a bomb");
        assert!(refused.is_too_large(), "{refused}");
        // Exactly at the limit is fine.
        assert_eq!(
            binary_text(&gzip(&[b'7'; 1024]), BinaryFrames::Gzip, 1024).map(|t| t.len()),
            Ok(1024)
        );
    }
}
