//! One record sent with a hand-written Kafka Produce request (v3, record batch v2), for what no
//! client at hand sends: rdkafka's producer takes header names as `&str`, Java's encodes them
//! from strings, so neither can send a name that is not UTF-8, which any other client can.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn varint(out: &mut Vec<u8>, v: i64) {
    // Zig-zag, then 7 bits a byte, low first.
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn bytes(out: &mut Vec<u8>, b: &[u8]) {
    varint(out, b.len() as i64);
    out.extend_from_slice(b);
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as i16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Sends one record (no key, `value`, `headers` as raw bytes) to partition 0 of `topic` on the
/// broker at `bootstrap` (its leader: a single-node cluster) and waits for its acknowledgement.
pub(crate) async fn produce(bootstrap: &str, topic: &str, value: &[u8], headers: &[(&[u8], &[u8])]) {
    let mut record = vec![0]; // attributes
    varint(&mut record, 0); // timestamp delta
    varint(&mut record, 0); // offset delta
    varint(&mut record, -1); // no key
    bytes(&mut record, value);
    varint(&mut record, headers.len() as i64);
    for (name, v) in headers {
        bytes(&mut record, name);
        bytes(&mut record, v);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // The part of the batch its CRC-32C covers: attributes to the end.
    let mut covered = Vec::new();
    covered.extend_from_slice(&0i16.to_be_bytes()); // attributes
    covered.extend_from_slice(&0i32.to_be_bytes()); // last offset delta
    covered.extend_from_slice(&now.to_be_bytes()); // first timestamp
    covered.extend_from_slice(&now.to_be_bytes()); // max timestamp
    covered.extend_from_slice(&(-1i64).to_be_bytes()); // producer id
    covered.extend_from_slice(&(-1i16).to_be_bytes()); // producer epoch
    covered.extend_from_slice(&(-1i32).to_be_bytes()); // base sequence
    covered.extend_from_slice(&1i32.to_be_bytes()); // records
    varint(&mut covered, record.len() as i64);
    covered.extend_from_slice(&record);
    let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI).checksum(&covered);
    let mut batch = Vec::new();
    batch.extend_from_slice(&0i64.to_be_bytes()); // base offset
    batch.extend_from_slice(&((4 + 1 + 4 + covered.len()) as i32).to_be_bytes()); // batch length
    batch.extend_from_slice(&(-1i32).to_be_bytes()); // partition leader epoch
    batch.push(2); // magic
    batch.extend_from_slice(&crc.to_be_bytes());
    batch.extend_from_slice(&covered);

    let mut request = Vec::new();
    request.extend_from_slice(&0i16.to_be_bytes()); // Produce
    request.extend_from_slice(&3i16.to_be_bytes()); // version 3
    request.extend_from_slice(&7i32.to_be_bytes()); // correlation id
    string(&mut request, "raw-test");
    request.extend_from_slice(&(-1i16).to_be_bytes()); // no transactional id
    request.extend_from_slice(&(-1i16).to_be_bytes()); // acks: all
    request.extend_from_slice(&10_000i32.to_be_bytes()); // timeout
    request.extend_from_slice(&1i32.to_be_bytes()); // one topic
    string(&mut request, topic);
    request.extend_from_slice(&1i32.to_be_bytes()); // one partition
    request.extend_from_slice(&0i32.to_be_bytes()); // partition 0
    request.extend_from_slice(&(batch.len() as i32).to_be_bytes());
    request.extend_from_slice(&batch);

    let mut conn = tokio::net::TcpStream::connect(bootstrap).await.unwrap();
    conn.write_all(&(request.len() as i32).to_be_bytes()).await.unwrap();
    conn.write_all(&request).await.unwrap();
    let size = conn.read_i32().await.unwrap();
    let mut response = vec![0; size as usize];
    conn.read_exact(&mut response).await.unwrap();
    // correlation id, one topic (count, name), one partition (count, index), then its error code.
    let at = 4 + 4 + 2 + topic.len() + 4 + 4;
    let error = i16::from_be_bytes([response[at], response[at + 1]]);
    assert_eq!(error, 0, "the broker refused the record (Kafka error code {error})");
}
