//! A message parked under [`GapPolicy::Hold`](crate::GapPolicy::Hold), as stored and as taken back:
//! owned, with its headers encoded in one binary column.

use uuid::Uuid;

use crate::Incoming;

/// A parked message taken back from the database, to be applied now, or to be dead-lettered when
/// it failed every try ([`RunnerCore::dead_letter_parked`](crate::RunnerCore::dead_letter_parked)).
/// Owns what it read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parked {
    /// The message id.
    pub id: Uuid,
    /// The topic it was delivered on.
    pub topic: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// The headers as delivered, in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Parked {
    /// The message as the handler sees it: `key`, `seq` and `source` are the ones it was parked
    /// under.
    pub(crate) fn incoming<'a>(&'a self, key: &'a str, seq: i64, source: Option<&'a str>) -> Incoming<'a> {
        let mut msg = Incoming::new(self.id, &self.topic, &self.payload).keyed(key, seq);
        msg.source = source;
        msg.headers = self.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
        msg
    }
}

/// Encodes headers for the `headers` column of `outbox_inbox_parked`: per header, in order, the
/// name's length (4 bytes, big-endian), the name (UTF-8), the value's length, the value.
pub(crate) fn encode_headers(headers: &[(&str, &[u8])]) -> Vec<u8> {
    let size = headers.iter().map(|(n, v)| 8 + n.len() + v.len()).sum();
    let mut out = Vec::with_capacity(size);
    for (name, value) in headers {
        for part in [name.as_bytes(), value] {
            let len = u32::try_from(part.len()).expect("a header part is under 4 GiB");
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(part);
        }
    }
    out
}

/// Decodes what [`encode_headers`] wrote.
pub(crate) fn decode_headers(mut bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    fn part<'b>(bytes: &mut &'b [u8]) -> Result<&'b [u8], String> {
        let (len, rest) = bytes.split_first_chunk::<4>().ok_or("truncated header length")?;
        let len = u32::from_be_bytes(*len) as usize;
        if rest.len() < len {
            return Err(format!("header part of {len} bytes, {} left", rest.len()));
        }
        let (part, rest) = rest.split_at(len);
        *bytes = rest;
        Ok(part)
    }
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let name = std::str::from_utf8(part(&mut bytes)?).map_err(|e| format!("header name: {e}"))?;
        let value = part(&mut bytes)?;
        out.push((name.to_owned(), value.to_vec()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_survive_the_round_trip() {
        let headers: [(&str, &[u8]); 4] = [
            ("outbox-id", b"0191d3c4"),
            ("raw", b"\x00\xff\x01"),
            ("", b""),
            ("raw", b"again"),
        ];
        let bytes = encode_headers(&headers);
        let back = decode_headers(&bytes).unwrap();
        let expected: Vec<(String, Vec<u8>)> = headers.iter().map(|(n, v)| ((*n).to_owned(), v.to_vec())).collect();
        assert_eq!(back, expected);
        assert_eq!(decode_headers(&[]).unwrap(), []);
        assert!(decode_headers(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_headers(&[0, 0, 0]).is_err());
        assert!(decode_headers(&[0, 0, 0, 1, 0xff, 0, 0, 0, 0]).is_err());
    }
}
