//! Batch compression for upstream sinks; pure, no I/O.
//!
//! `none` or `gzip` (RFC 1952): a single gzip member around a raw deflate stream
//! (`miniz_oxide`, pure Rust). gzip is what every subscriber can decode with its standard
//! library — Python's `gzip`, Node's `zlib`, Go's `compress/gzip`, Java's `GZIPInputStream`,
//! and HTTP's `Content-Encoding: gzip` — and it costs no C library on the Pi. The member is
//! the same bytes for the same batch on any machine: mtime 0, no file name, OS 255 (unknown).
//!
//! ```text
//! 1f 8b 08 00 | 00 00 00 00 | XFL FF | deflate … | CRC-32 (LE) | ISIZE (LE)
//! magic CM FLG   MTIME = 0     XFL OS              of the input   input len mod 2^32
//! ```

use std::fmt;

use miniz_oxide::deflate::core::{
    compress as deflate, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush,
    TDEFLStatus,
};
use miniz_oxide::inflate::core::{decompress as inflate, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;
use serde::Deserialize;

/// How a sink compresses each batch payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// The payload as encoded.
    #[default]
    None,
    /// One gzip member (RFC 1952) around the payload.
    Gzip,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
        })
    }
}

/// The default gzip level (1 fastest … 9 smallest). On simulator batches of 500 events,
/// level 3 is within a tenth of 6's size at half its CPU time, and 1 is almost half as large
/// again as 3 (`scripts/bench compress`; the figures are in the README).
pub const DEFAULT_LEVEL: u8 = 3;

/// The most [`decompress_gzip`] inflates: far above any batch (`batch_max_bytes`), low enough
/// that a hostile payload (a "zip bomb") cannot exhaust memory.
pub const MAX_DECOMPRESSED: usize = 64 << 20;

/// The gzip magic, the first two bytes of every member.
pub const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The HTTP `Content-Encoding` (and MQTT user property) naming `c`; `None` for no compression.
pub fn content_encoding(c: Compression) -> Option<&'static str> {
    match c {
        Compression::None => None,
        Compression::Gzip => Some("gzip"),
    }
}

/// `data` compressed as `c` says, at gzip `level` (clamped to 0–9; 0 stores).
pub fn compress(c: Compression, level: u8, data: &[u8]) -> Vec<u8> {
    match c {
        Compression::None => data.to_vec(),
        Compression::Gzip => gzip(level.min(9), data),
    }
}

fn gzip(level: u8, data: &[u8]) -> Vec<u8> {
    // XFL: 2 for the slowest, smallest level, 4 for the fastest (RFC 1952 §2.3.1).
    let xfl = match level {
        9 => 2,
        1 => 4,
        _ => 0,
    };
    let mut out = Vec::with_capacity(data.len() / 3 + 64);
    out.extend_from_slice(&[GZIP_MAGIC[0], GZIP_MAGIC[1], 8, 0, 0, 0, 0, 0, xfl, 255]);
    let mut c = CompressorOxide::new(create_comp_flags_from_zip_params(level.into(), 0, 0));
    let mut input = data;
    loop {
        let pos = out.len();
        if out.capacity() - pos < 64 {
            out.reserve(out.capacity());
        }
        out.resize(out.capacity(), 0);
        let (status, read, written) = deflate(&mut c, input, &mut out[pos..], TDEFLFlush::Finish);
        out.truncate(pos + written);
        input = &input[read..];
        match status {
            TDEFLStatus::Done => break,
            TDEFLStatus::Okay => {}
            // Only a bad parameter or a failing output callback, neither of which is used.
            other => unreachable!("deflate into a Vec failed: {other:?}"),
        }
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// The input of a gzip payload: every member inflated, header flags honoured, each CRC-32
/// and ISIZE checked; at most [`MAX_DECOMPRESSED`] bytes.
pub fn decompress_gzip(data: &[u8]) -> Result<Vec<u8>, String> {
    decompress_gzip_with_limit(data, MAX_DECOMPRESSED)
}

/// [`decompress_gzip`] with a limit of `max` bytes of output.
pub fn decompress_gzip_with_limit(data: &[u8], max: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut rest = data;
    loop {
        rest = member(rest, &mut out, max)?;
        // Members may follow each other (RFC 1952 §2.2); zero padding after the last is
        // tolerated, as gzip(1) and Python do; anything else is not a gzip payload.
        if rest.iter().all(|&b| b == 0) {
            return Ok(out);
        }
    }
}

/// Inflates the member at the start of `data` onto `out`; returns what follows it.
fn member<'a>(data: &'a [u8], out: &mut Vec<u8>, max: usize) -> Result<&'a [u8], String> {
    const FHCRC: u8 = 0x02;
    const FEXTRA: u8 = 0x04;
    const FNAME: u8 = 0x08;
    const FCOMMENT: u8 = 0x10;
    let truncated = || "truncated gzip header".to_string();
    if data.len() < 10 || data[..2] != GZIP_MAGIC {
        return Err("not gzip (no 1f 8b magic)".into());
    }
    if data[2] != 8 {
        return Err(format!("gzip method {} (only 8, deflate, exists)", data[2]));
    }
    let flags = data[3];
    if flags & 0xe0 != 0 {
        return Err(format!(
            "gzip header flags {flags:#04x} has reserved bits set"
        ));
    }
    let mut pos = 10;
    if flags & FEXTRA != 0 {
        let xlen = data.get(pos..pos + 2).ok_or_else(truncated)?;
        pos += 2 + usize::from(u16::from_le_bytes([xlen[0], xlen[1]]));
    }
    for flag in [FNAME, FCOMMENT] {
        if flags & flag != 0 {
            let end = data.get(pos..).ok_or_else(truncated)?;
            pos += end.iter().position(|&b| b == 0).ok_or_else(truncated)? + 1;
        }
    }
    if flags & FHCRC != 0 {
        let h = data.get(pos..pos + 2).ok_or_else(truncated)?;
        if u16::from_le_bytes([h[0], h[1]]) != crc32(&data[..pos]) as u16 {
            return Err("gzip header CRC mismatch".into());
        }
        pos += 2;
    }
    let body = data.get(pos..).ok_or_else(truncated)?;

    let start = out.len();
    let mut d = Box::<DecompressorOxide>::default();
    let mut input = body;
    let mut consumed = 0;
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    // The output so far is the window: the slice handed to inflate starts at this member.
    out.resize(
        start + (body.len() * 4).clamp(1024, max.saturating_sub(start).max(1)),
        0,
    );
    let mut written = 0;
    loop {
        let (status, read, wrote) = inflate(&mut d, input, &mut out[start..], written, flags);
        written += wrote;
        consumed += read;
        input = &input[read..];
        match status {
            TINFLStatus::Done => break,
            TINFLStatus::HasMoreOutput => {
                let have = out.len() - start;
                if start + have >= max {
                    out.truncate(start + written);
                    return Err(format!("gzip payload inflates past {max} bytes"));
                }
                out.resize(start + (have * 2).min(max - start), 0);
            }
            TINFLStatus::NeedsMoreInput | TINFLStatus::FailedCannotMakeProgress => {
                return Err("truncated gzip payload (deflate stream cut short)".into())
            }
            other => return Err(format!("corrupt deflate stream in gzip payload: {other:?}")),
        }
    }
    out.truncate(start + written);
    let trailer = body
        .get(consumed..consumed + 8)
        .ok_or("truncated gzip payload (no CRC-32 and size trailer)")?;
    let crc = u32::from_le_bytes(trailer[..4].try_into().expect("4 bytes"));
    let isize = u32::from_le_bytes(trailer[4..].try_into().expect("4 bytes"));
    if crc != crc32(&out[start..]) {
        return Err("gzip CRC-32 mismatch: the payload is corrupt".into());
    }
    if isize != written as u32 {
        return Err(format!(
            "gzip size mismatch: trailer says {isize} bytes, inflated {written}"
        ));
    }
    Ok(&body[consumed + 8..])
}

/// CRC-32 as gzip, zlib and PNG use it (IEEE 802.3, reflected polynomial 0xEDB88320).
///
/// Slicing-by-8: eight bytes per step through eight tables (8 KiB), about four times the
/// speed of the one-table loop, which would cost a fifth of the time of a level-3 gzip.
pub fn crc32(data: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut crc = !0u32;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let lo = crc ^ u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        crc = t[7][usize::from(lo as u8)]
            ^ t[6][usize::from((lo >> 8) as u8)]
            ^ t[5][usize::from((lo >> 16) as u8)]
            ^ t[4][usize::from((lo >> 24) as u8)]
            ^ t[3][usize::from(w[4])]
            ^ t[2][usize::from(w[5])]
            ^ t[1][usize::from(w[6])]
            ^ t[0][usize::from(w[7])];
    }
    for &b in words.remainder() {
        crc = t[0][usize::from(crc as u8 ^ b)] ^ (crc >> 8);
    }
    !crc
}

/// `CRC_TABLES[0][b]`: the CRC of byte `b`; `[k][b]`: of `b` followed by `k` zero bytes.
/// Computed at compile time.
static CRC_TABLES: [[u32; 256]; 8] = {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = t[0][(prev & 0xff) as usize] ^ (prev >> 8);
            i += 1;
        }
        k += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(data: &[u8]) -> Vec<u8> {
        let z = compress(Compression::Gzip, DEFAULT_LEVEL, data);
        assert_eq!(decompress_gzip(&z).unwrap(), data);
        z
    }

    /// A realistic batch: JSON sensor readings, repetitive in keys, varied in values.
    fn json_batch(n: usize) -> Vec<u8> {
        let mut s = String::from("{\"gateway\":\"gw\",\"batch\":1,\"events\":[");
        for i in 0..n {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&format!(
                "{{\"id\":{i},\"ts\":{},\"source\":\"mqtt\",\"topic\":\"sensors/{}/temperature\",\
                 \"payload\":{{\"celsius\":{}.{}}}}}",
                1_700_000_000_000u64 + i as u64 * 37,
                i % 20,
                18 + i % 7,
                i * 7919 % 100
            ));
        }
        s.push_str("]}");
        s.into_bytes()
    }

    fn noise(n: usize) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(7);
        (0..n).map(|_| rng.u8(..)).collect()
    }

    #[test]
    fn crc32_known_vectors() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b"a"), 0xe8b7_be43);
        assert_eq!(
            crc32(b"The quick brown fox jumps over the lazy dog"),
            0x414f_a339
        );
    }

    #[test]
    fn crc32_matches_the_bitwise_definition_at_every_length_and_offset() {
        fn bitwise(data: &[u8]) -> u32 {
            let mut crc = !0u32;
            for &b in data {
                crc ^= u32::from(b);
                for _ in 0..8 {
                    crc = if crc & 1 != 0 {
                        0xedb8_8320 ^ (crc >> 1)
                    } else {
                        crc >> 1
                    };
                }
            }
            !crc
        }
        let data = noise(300);
        for start in 0..9 {
            for end in start..data.len() {
                assert_eq!(crc32(&data[start..end]), bitwise(&data[start..end]));
            }
        }
    }

    #[test]
    fn round_trips_empty_small_large_and_incompressible() {
        round_trip(b"");
        round_trip(b"{\"id\":1}");
        let large = json_batch(5000);
        let z = round_trip(&large);
        assert!(z.len() * 4 < large.len(), "{} of {}", z.len(), large.len());
        let random = noise(100_000);
        let z = round_trip(&random);
        // Deflate falls back to stored blocks: 5 bytes per 64 KiB block plus the wrapper.
        assert!(z.len() <= random.len() + 18 + 5 * 4, "{}", z.len());
        for level in 0..=10 {
            let z = compress(Compression::Gzip, level, &large);
            assert_eq!(decompress_gzip(&z).unwrap(), large, "level {level}");
        }
    }

    #[test]
    fn header_is_a_plain_gzip_member() {
        let z = compress(Compression::Gzip, 6, b"hello");
        // magic, deflate, no flags, mtime 0, XFL 0, OS unknown.
        assert_eq!(z[..10], [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255]);
        assert_eq!(compress(Compression::Gzip, 1, b"x")[8], 4);
        assert_eq!(compress(Compression::Gzip, 9, b"x")[8], 2);
    }

    #[test]
    fn trailer_has_crc32_and_size() {
        let data = json_batch(100);
        let z = compress(Compression::Gzip, DEFAULT_LEVEL, &data);
        let n = z.len();
        assert_eq!(z[n - 8..n - 4], crc32(&data).to_le_bytes());
        assert_eq!(z[n - 4..], (data.len() as u32).to_le_bytes());
        // The check value of "123456789", little-endian, then its length.
        let z = compress(Compression::Gzip, 6, b"123456789");
        assert_eq!(z[z.len() - 8..], [0x26, 0x39, 0xf4, 0xcb, 9, 0, 0, 0]);
    }

    #[test]
    fn none_is_the_payload_as_is() {
        assert_eq!(compress(Compression::None, 6, b"abc"), b"abc");
        assert_eq!(content_encoding(Compression::None), None);
        assert_eq!(content_encoding(Compression::Gzip), Some("gzip"));
    }

    #[test]
    fn names_in_config_and_display() {
        #[derive(Deserialize)]
        struct Sink {
            compression: Compression,
        }
        for (name, c) in [("none", Compression::None), ("gzip", Compression::Gzip)] {
            let s: Sink = toml::from_str(&format!("compression = \"{name}\"")).unwrap();
            assert_eq!(s.compression, c);
            assert_eq!(c.to_string(), name);
        }
        let e = toml::from_str::<Sink>("compression = \"zstd\"")
            .err()
            .unwrap();
        assert!(e.to_string().contains("none"), "{e}");
        assert_eq!(Compression::default(), Compression::None);
    }

    #[test]
    fn decodes_what_other_gzip_writers_write() {
        // `printf 'hello\n' > hello; gzip -c hello`: a file name (FNAME), an mtime, OS 3.
        let z = [
            0x1f, 0x8b, 0x08, 0x08, 0x15, 0x3d, 0x0f, 0x6b, 0x00, 0x03, 0x68, 0x65, 0x6c, 0x6c,
            0x6f, 0x00, 0xcb, 0x48, 0xcd, 0xc9, 0xc9, 0xe7, 0x02, 0x00, 0x20, 0x30, 0x3a, 0x36,
            0x06, 0x00, 0x00, 0x00,
        ];
        assert_eq!(decompress_gzip(&z).unwrap(), b"hello\n");
        // Two members concatenated (`cat a.gz b.gz`) are one payload, zero padding ignored.
        let mut two = compress(Compression::Gzip, 1, b"ab");
        two.extend(compress(Compression::Gzip, 9, b"cd"));
        two.extend([0, 0, 0]);
        assert_eq!(decompress_gzip(&two).unwrap(), b"abcd");
        // FEXTRA, FCOMMENT and FHCRC.
        let mut h = vec![0x1f, 0x8b, 8, 0x04 | 0x10 | 0x02, 0, 0, 0, 0, 0, 255, 3, 0];
        h.extend_from_slice(b"xyz");
        h.extend_from_slice(b"a comment\0");
        h.extend_from_slice(&(crc32(&h) as u16).to_le_bytes());
        let plain = compress(Compression::Gzip, 6, b"flags");
        h.extend_from_slice(&plain[10..]);
        assert_eq!(decompress_gzip(&h).unwrap(), b"flags");
    }

    #[test]
    fn rejects_corrupt_truncated_and_oversized_payloads() {
        let data = json_batch(200);
        let z = compress(Compression::Gzip, DEFAULT_LEVEL, &data);
        let err = |z: &[u8]| decompress_gzip(z).unwrap_err();
        assert!(err(b"{\"json\":1}").contains("magic"));
        assert!(err(&z[..5]).contains("magic") || err(&z[..5]).contains("truncated"));
        assert!(err(&z[..z.len() / 2]).contains("truncated"));
        assert!(err(&z[..z.len() - 3]).contains("trailer"));
        let mut bad_crc = z.clone();
        let n = bad_crc.len();
        bad_crc[n - 8] ^= 1;
        assert!(err(&bad_crc).contains("CRC-32"));
        let mut bad_size = z.clone();
        bad_size[n - 1] ^= 1;
        assert!(err(&bad_size).contains("size mismatch"));
        let mut garbage_after = z.clone();
        garbage_after.push(b'x');
        assert!(err(&garbage_after).contains("magic"));
        let mut reserved = z.clone();
        reserved[3] = 0x80;
        assert!(err(&reserved).contains("reserved"));
        let mut bad_header_crc = z.clone();
        bad_header_crc[3] = 0x02;
        bad_header_crc.splice(10..10, [0, 0]);
        assert!(err(&bad_header_crc).contains("header CRC"));
        // A bomb: 10 MiB of zeros in about 10 KiB; a 1 MiB limit stops it there.
        let bomb = compress(Compression::Gzip, 9, &vec![0; 10 << 20]);
        assert!(bomb.len() < 64 << 10, "{}", bomb.len());
        let e = decompress_gzip_with_limit(&bomb, 1 << 20).unwrap_err();
        assert!(e.contains("past 1048576"), "{e}");
        assert_eq!(decompress_gzip(&bomb).unwrap().len(), 10 << 20);
    }
}
