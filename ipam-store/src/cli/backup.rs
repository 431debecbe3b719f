//! The backup file `export` writes and `import` reads, streamed both ways so a backup of
//! millions of allocations never sits in memory as one string or one message.
//!
//! The file is the proto3 JSON of an `ExportResponse` (the same schema every version of
//! `export` wrote): `exportedAt`, then the `networks`, `allocations` and `quarantined`
//! arrays, one record per line. Any valid JSON of that schema is read back (older backups are
//! pretty-printed), with `exported_at`-style field names and `null` arrays accepted as proto3
//! JSON allows.

use std::{fmt, io::Write};

use cairn_proto::v1 as pb;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use tokio::sync::mpsc;

/// Most records in one ImportStream chunk the CLI sends.
const CHUNK_RECORDS: usize = 5_000;
/// About the most encoded bytes in one chunk the CLI sends.
const CHUNK_BYTES: usize = 1 << 20;

const SECTIONS: [&str; 3] = ["networks", "allocations", "quarantined"];

/// Writes an export stream to `w` chunk by chunk.
pub(super) struct BackupWriter<W: Write> {
    w: W,
    /// Sections opened so far (0..=3); the current one is `opened - 1`.
    opened: usize,
    /// Records written in the current section.
    in_section: usize,
    started: bool,
    last: bool,
    /// Records written per section.
    pub(super) counts: [usize; 3],
}

impl<W: Write> BackupWriter<W> {
    pub(super) fn new(w: W) -> Self {
        BackupWriter {
            w,
            opened: 0,
            in_section: 0,
            started: false,
            last: false,
            counts: [0; 3],
        }
    }

    fn start(&mut self, exported_at: Option<&cairn_proto::Timestamp>) -> anyhow::Result<()> {
        if !self.started {
            self.started = true;
            self.w.write_all(b"{\n")?;
            if let Some(t) = exported_at {
                writeln!(self.w, "  \"exportedAt\": {},", serde_json::to_string(t)?)?;
            }
        }
        Ok(())
    }

    /// Opens sections up to and including `k`; refuses to go back to an earlier one.
    fn section(&mut self, k: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            k + 1 >= self.opened,
            "the server sent {} after {} (expected networks, then allocations, then quarantined)",
            SECTIONS[k],
            SECTIONS[self.opened - 1]
        );
        while self.opened < k + 1 {
            if self.opened > 0 {
                self.w
                    .write_all(if self.in_section > 0 { b"\n  ],\n" } else { b"],\n" })?;
            }
            write!(self.w, "  \"{}\": [", SECTIONS[self.opened])?;
            self.opened += 1;
            self.in_section = 0;
        }
        Ok(())
    }

    fn records<T: serde::Serialize>(&mut self, k: usize, items: &[T]) -> anyhow::Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        self.section(k)?;
        for item in items {
            self.w.write_all(if self.in_section > 0 {
                b",\n    "
            } else {
                b"\n    "
            })?;
            serde_json::to_writer(&mut self.w, item)?;
            self.in_section += 1;
        }
        self.counts[k] += items.len();
        Ok(())
    }

    /// Appends one chunk.
    pub(super) fn chunk(&mut self, c: &pb::ExportChunk) -> anyhow::Result<()> {
        anyhow::ensure!(!self.last, "the server sent a chunk after the last one");
        self.start(c.exported_at.as_ref())?;
        self.records(0, &c.networks)?;
        self.records(1, &c.allocations)?;
        self.records(2, &c.quarantined)?;
        self.last = c.last;
        Ok(())
    }

    /// Closes the document; fails when the stream ended before its last chunk.
    pub(super) fn finish(mut self) -> anyhow::Result<W> {
        anyhow::ensure!(
            self.last,
            "the export stream ended before its last chunk; the backup is incomplete"
        );
        self.start(None)?;
        self.section(2)?;
        self.w.write_all(if self.in_section > 0 {
            b"\n  ]\n}\n"
        } else {
            b"]\n}\n"
        })?;
        self.w.flush()?;
        Ok(self.w)
    }
}

/// Sends chunks of a backup being parsed; counts what was sent.
struct Sink<'a> {
    tx: &'a mpsc::Sender<pb::ImportChunk>,
    cur: pb::ImportChunk,
    records: usize,
    bytes: usize,
    counts: [usize; 3],
}

impl Sink<'_> {
    fn flush(&mut self) -> Result<(), String> {
        let c = std::mem::take(&mut self.cur);
        self.records = 0;
        self.bytes = 0;
        self.tx
            .blocking_send(c)
            .map_err(|_| "the server ended the import".to_string())
    }

    fn add(&mut self, len: usize) -> Result<(), String> {
        self.records += 1;
        self.bytes += len;
        if self.records >= CHUNK_RECORDS || self.bytes >= CHUNK_BYTES {
            self.flush()?;
        }
        Ok(())
    }
}

/// Parses a backup from `r`, sending it as ImportStream chunks (the last one marked `last`).
/// Blocking: run it off the async runtime. On any error nothing marked `last` is sent, so the
/// server writes nothing.
pub(super) fn send_backup(
    r: impl std::io::Read,
    tx: &mpsc::Sender<pb::ImportChunk>,
) -> anyhow::Result<[usize; 3]> {
    let mut sink = Sink {
        tx,
        cur: pb::ImportChunk::default(),
        records: 0,
        bytes: 0,
        counts: [0; 3],
    };
    let mut de = serde_json::Deserializer::from_reader(std::io::BufReader::with_capacity(1 << 20, r));
    TopLevel(&mut sink).deserialize(&mut de)?;
    de.end()?;
    sink.cur.last = true;
    sink.flush().map_err(anyhow::Error::msg)?;
    Ok(sink.counts)
}

struct TopLevel<'s, 'a>(&'s mut Sink<'a>);

impl<'de> DeserializeSeed<'de> for TopLevel<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TopLevel<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a cairn-ipam backup (a JSON object with networks, allocations, quarantined)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
        while let Some(key) = m.next_key::<String>()? {
            match key.as_str() {
                "networks" => m.next_value_seed(Section::<pb::Network>::new(self.0, 0))?,
                "allocations" => m.next_value_seed(Section::<pb::Allocation>::new(self.0, 1))?,
                "quarantined" => m.next_value_seed(Section::<pb::QuarantinedAddress>::new(self.0, 2))?,
                "exportedAt" | "exported_at" => {
                    m.next_value::<Option<cairn_proto::Timestamp>>()?;
                }
                other => {
                    return Err(de::Error::unknown_field(
                        other,
                        &["networks", "allocations", "quarantined", "exportedAt"],
                    ));
                }
            }
        }
        Ok(())
    }
}

/// One array of the backup, sent on as it is parsed.
struct Section<'s, 'a, T> {
    sink: &'s mut Sink<'a>,
    k: usize,
    _t: std::marker::PhantomData<T>,
}

impl<'s, 'a, T> Section<'s, 'a, T> {
    fn new(sink: &'s mut Sink<'a>, k: usize) -> Self {
        Section {
            sink,
            k,
            _t: std::marker::PhantomData,
        }
    }
}

trait Record: prost::Message + for<'de> serde::Deserialize<'de> + Sized {
    fn put(self, c: &mut pb::ImportChunk);
}

impl Record for pb::Network {
    fn put(self, c: &mut pb::ImportChunk) {
        c.networks.push(self);
    }
}

impl Record for pb::Allocation {
    fn put(self, c: &mut pb::ImportChunk) {
        c.allocations.push(self);
    }
}

impl Record for pb::QuarantinedAddress {
    fn put(self, c: &mut pb::ImportChunk) {
        c.quarantined.push(self);
    }
}

impl<'de, T: Record> DeserializeSeed<'de> for Section<'_, '_, T> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        // proto3 JSON allows null for an empty repeated field.
        d.deserialize_option(self)
    }
}

impl<'de, T: Record> Visitor<'de> for Section<'_, '_, T> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an array of {}", SECTIONS[self.k])
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<(), A::Error> {
        let mut i = 0usize;
        loop {
            let item = s
                .next_element::<T>()
                .map_err(|e| de::Error::custom(format!("{}[{i}]: {e}", SECTIONS[self.k])))?;
            let Some(item) = item else { break };
            let len = item.encoded_len();
            item.put(&mut self.sink.cur);
            self.sink.add(len).map_err(de::Error::custom)?;
            self.sink.counts[self.k] += 1;
            i += 1;
        }
        Ok(())
    }
}

/// Reads a backup fully into memory (for small files and tests).
#[cfg(test)]
fn parse_all(text: &str) -> anyhow::Result<(Vec<pb::ImportChunk>, [usize; 3])> {
    let (tx, mut rx) = mpsc::channel(1 << 16);
    let counts = anyhow::Context::context(send_backup(text.as_bytes(), &tx), "parsing")?;
    drop(tx);
    let mut out = Vec::new();
    while let Ok(c) = rx.try_recv() {
        out.push(c);
    }
    Ok((out, counts))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample() -> pb::ExportResponse {
        pb::ExportResponse {
            networks: vec![pb::Network {
                name: "a".into(),
                version: 3,
                ..Default::default()
            }],
            allocations: (0..12_001)
                .map(|i| pb::Allocation {
                    network: "a".into(),
                    addresses: vec![format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256)],
                    revision: i,
                    ..Default::default()
                })
                .collect(),
            quarantined: vec![pb::QuarantinedAddress {
                network: "a".into(),
                address: "10.9.9.9".into(),
                ..Default::default()
            }],
            exported_at: Some(cairn_proto::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
        }
    }

    /// What the writer produces from `b` split into chunks of `n` allocations.
    fn written(b: &pb::ExportResponse, n: usize) -> String {
        let mut w = BackupWriter::new(Vec::new());
        w.chunk(&pb::ExportChunk {
            networks: b.networks.clone(),
            exported_at: b.exported_at,
            ..Default::default()
        })
        .unwrap();
        for part in b.allocations.chunks(n) {
            w.chunk(&pb::ExportChunk {
                allocations: part.to_vec(),
                ..Default::default()
            })
            .unwrap();
        }
        w.chunk(&pb::ExportChunk {
            quarantined: b.quarantined.clone(),
            last: true,
            ..Default::default()
        })
        .unwrap();
        String::from_utf8(w.finish().unwrap()).unwrap()
    }

    #[test]
    fn written_file_is_an_export_response_and_reads_back_in_bounded_chunks() {
        let b = sample();
        let text = written(&b, 777);
        // The schema every export wrote: the whole file is an ExportResponse.
        let whole: pb::ExportResponse = serde_json::from_str(&text).unwrap();
        assert_eq!(whole, b);
        let (chunks, counts) = parse_all(&text).unwrap();
        assert_eq!(counts, [1, 12_001, 1]);
        assert!(chunks.iter().all(|c| c.allocations.len() <= CHUNK_RECORDS));
        assert_eq!(chunks.iter().filter(|c| c.last).count(), 1);
        assert!(chunks.last().unwrap().last);
        let got: Vec<_> = chunks.iter().flat_map(|c| c.allocations.clone()).collect();
        assert_eq!(got, b.allocations);
    }

    #[test]
    fn reads_old_pretty_backups_and_empty_stores() {
        let b = sample();
        let (_, counts) = parse_all(&serde_json::to_string_pretty(&b).unwrap()).unwrap();
        assert_eq!(counts, [1, 12_001, 1]);
        // An empty store: pbjson leaves the empty arrays out entirely.
        let empty = serde_json::to_string_pretty(&pb::ExportResponse::default()).unwrap();
        let (chunks, counts) = parse_all(&empty).unwrap();
        assert_eq!((counts, chunks.len()), ([0, 0, 0], 1));
        assert!(chunks[0].last);
        let text = written(&pb::ExportResponse::default(), 10);
        assert_eq!(
            serde_json::from_str::<pb::ExportResponse>(&text).unwrap(),
            pb::ExportResponse::default()
        );
        let (_, counts) = parse_all(r#"{"networks": null, "exported_at": null}"#).unwrap();
        assert_eq!(counts, [0, 0, 0]);
    }

    #[test]
    fn bad_files_name_the_record_and_never_send_last() {
        let mut text = written(&sample(), 5000);
        text = text.replacen("\"revision\":\"9000\"", "\"revision\":\"x\"", 1);
        let (tx, mut rx) = mpsc::channel(1 << 16);
        let e = send_backup(text.as_bytes(), &tx).unwrap_err();
        assert!(format!("{e:#}").contains("allocations[9000]"), "{e:#}");
        drop(tx);
        let mut any_last = false;
        while let Ok(c) = rx.try_recv() {
            any_last |= c.last;
        }
        assert!(!any_last, "a failed parse must not complete the stream");
        let e = parse_all(r#"{"networks": [], "allocation": []}"#).unwrap_err();
        assert!(format!("{e:#}").contains("allocation"), "{e:#}");
        assert!(parse_all(r#"{"networks": []} trailing"#).is_err());
        assert!(parse_all("").is_err());
    }
}
