//! Reassembles an Arrow IPC stream arriving in small HTTP chunks into whole messages.
//!
//! `arrow-ipc`'s `StreamDecoder` copies a message that spans chunks into a buffer that grows by
//! doubling: about nine reallocations and twice the bytes copied for a 7 MB batch, and a trail
//! of freed large blocks the allocator keeps (docs/performance.md, "Memory"). Here every message
//! is read once into one allocation of its exact size, placed so that its body starts 64-byte
//! aligned; the decoder then takes it zero-copy (no realignment copy for Decimal128 either).
//!
//! Framing (Arrow columnar format, "Encapsulated message format"): an optional continuation
//! marker `0xFFFFFFFF`, a little-endian u32 metadata length (0 marks the end of the stream), the
//! flatbuffer `Message` (padded to 8 bytes), then `bodyLength` bytes of body.

use arrow_buffer::{Buffer, MutableBuffer};

const CONTINUATION: [u8; 4] = [0xFF; 4];
/// Larger metadata or bodies are not something ClickHouse sends: the bytes are not an Arrow
/// stream (for example an error text written mid-stream), so fail instead of reserving memory.
const MAX_METADATA_BYTES: usize = 64 << 20;
const MAX_BODY_BYTES: usize = 2 << 30;
const BODY_ALIGNMENT: usize = 64;

#[derive(Default)]
pub struct MessageFramer {
    /// The message being assembled, from its first byte (after the alignment padding).
    frame: MutableBuffer,
    /// Padding bytes in front of `frame`'s first message byte.
    pad: usize,
    /// Total length of the current message once its metadata has been read.
    expected: Option<usize>,
}

impl MessageFramer {
    /// Consumes `chunk`, appending every message it completes to `out`.
    pub fn push(&mut self, mut chunk: &[u8], out: &mut Vec<Buffer>) -> Result<(), String> {
        while !chunk.is_empty() {
            let target = match self.expected {
                Some(total) => total,
                None => match self.header()? {
                    Header::Need(n) => n,
                    Header::Complete { total, body_offset } => {
                        self.start_message(total, body_offset);
                        total
                    }
                },
            };
            let have = self.frame.len() - self.pad;
            let take = chunk.len().min(target - have);
            self.frame.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if self.frame.len() - self.pad == target
                && let Header::Complete { total, body_offset } = self.header()?
            {
                if self.frame.len() - self.pad == total {
                    out.push(self.take());
                } else {
                    self.start_message(total, body_offset);
                }
            }
        }
        Ok(())
    }

    /// Bytes of an unfinished message (non-zero at the end of the HTTP body: a cut stream).
    pub fn pending(&self) -> usize {
        self.frame.len() - self.pad
    }

    /// The ClickHouse exception written into the body after output started (ClickHouse cuts
    /// the stream with `Code: N. DB::Exception: …`), if the unfinished message ends with one.
    pub fn server_exception(&self, unread: &[u8]) -> Option<(u32, String)> {
        let pending = &self.frame.as_slice()[self.pad..];
        let mut tail = pending[pending.len().saturating_sub(64 << 10)..].to_vec();
        tail.extend_from_slice(&unread[..unread.len().min(64 << 10)]);
        find_exception(&tail)
    }

    fn take(&mut self) -> Buffer {
        let frame = std::mem::take(&mut self.frame);
        let pad = std::mem::replace(&mut self.pad, 0);
        self.expected = None;
        let len = frame.len() - pad;
        Buffer::from(frame).slice_with_length(pad, len)
    }

    /// How many bytes the message needs: the header so far tells either how much more to
    /// read before its length is known, or its total length.
    fn header(&self) -> Result<Header, String> {
        let bytes = &self.frame.as_slice()[self.pad..];
        if bytes.len() < 4 {
            return Ok(Header::Need(4));
        }
        let prefix = if bytes[..4] == CONTINUATION { 8 } else { 4 };
        if bytes.len() < prefix {
            return Ok(Header::Need(prefix));
        }
        let metadata_len = u32::from_le_bytes(bytes[prefix - 4..prefix].try_into().expect("4 bytes")) as usize;
        if metadata_len == 0 {
            return Ok(Header::Complete { total: prefix, body_offset: prefix }); // end-of-stream marker
        }
        if metadata_len > MAX_METADATA_BYTES {
            return Err(format!("message metadata of {metadata_len} bytes"));
        }
        if bytes.len() < prefix + metadata_len {
            return Ok(Header::Need(prefix + metadata_len));
        }
        let message = arrow_ipc::root_as_message(&bytes[prefix..prefix + metadata_len])
            .map_err(|e| format!("unreadable message header: {e}"))?;
        let body_len = usize::try_from(message.bodyLength()).map_err(|_| "negative body length".to_string())?;
        if body_len > MAX_BODY_BYTES {
            return Err(format!("message body of {body_len} bytes"));
        }
        let body_offset = prefix + metadata_len;
        Ok(Header::Complete { total: body_offset + body_len, body_offset })
    }

    /// Moves the bytes read so far into an allocation of the message's exact size, padded so
    /// that the body starts on a 64-byte boundary.
    fn start_message(&mut self, total: usize, body_offset: usize) {
        let pad = (BODY_ALIGNMENT - body_offset % BODY_ALIGNMENT) % BODY_ALIGNMENT;
        let mut frame = MutableBuffer::with_capacity(pad + total);
        frame.extend_zeros(pad);
        frame.extend_from_slice(&self.frame.as_slice()[self.pad..]);
        self.frame = frame;
        self.pad = pad;
        self.expected = Some(total);
    }
}

/// The last `Code: N. DB::Exception: text` in `bytes`: its code and its first line.
fn find_exception(bytes: &[u8]) -> Option<(u32, String)> {
    const MARKER: &[u8] = b". DB::Exception: ";
    let at = bytes.windows(MARKER.len()).rposition(|w| w == MARKER)?;
    let digits_start = bytes[..at].iter().rposition(|b| !b.is_ascii_digit()).map_or(0, |p| p + 1);
    if !bytes[..digits_start].ends_with(b"Code: ") {
        return None;
    }
    let code = std::str::from_utf8(&bytes[digits_start..at]).ok()?.parse().ok()?;
    let text = &bytes[at + MARKER.len()..];
    let line = text.split(|b| *b == b'\n').next().unwrap_or(text);
    Some((code, String::from_utf8_lossy(line).trim().to_string()))
}

enum Header {
    /// The header is incomplete: read up to this many bytes of the message.
    Need(usize),
    /// The message's total length, and where its body starts.
    Complete { total: usize, body_offset: usize },
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, Decimal128Array, Int64Array, RecordBatch, StringArray};
    use arrow_ipc::CompressionType;
    use arrow_ipc::reader::StreamDecoder;
    use arrow_ipc::writer::{IpcWriteOptions, StreamWriter};
    use arrow_schema::{DataType, Field, Schema};

    use super::*;

    fn batches() -> Vec<RecordBatch> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("symbol", DataType::Utf8, true),
            Field::new("price", DataType::Decimal128(38, 8), true),
        ]));
        (0..3)
            .map(|b| {
                let n = 1000 * (b + 1);
                let cols: Vec<ArrayRef> = vec![
                    Arc::new(Int64Array::from_iter_values(0..n as i64)),
                    Arc::new(StringArray::from_iter_values((0..n).map(|i| format!("sym-{}", i % 7)))),
                    Arc::new(
                        Decimal128Array::from_iter_values((0..n).map(|i| i as i128 * 12_345))
                            .with_precision_and_scale(38, 8)
                            .unwrap(),
                    ),
                ];
                RecordBatch::try_new(schema.clone(), cols).unwrap()
            })
            .collect()
    }

    fn stream_bytes(batches: &[RecordBatch]) -> Vec<u8> {
        stream_bytes_with(batches, IpcWriteOptions::default())
    }

    fn stream_bytes_with(batches: &[RecordBatch], options: IpcWriteOptions) -> Vec<u8> {
        let mut out = vec![];
        let mut w = StreamWriter::try_new_with_options(&mut out, &batches[0].schema(), options).unwrap();
        for b in batches {
            w.write(b).unwrap();
        }
        w.finish().unwrap();
        drop(w);
        out
    }

    fn decode(bytes: &[u8], chunk: usize) -> (Vec<RecordBatch>, usize, usize) {
        let mut framer = MessageFramer::default();
        let mut decoder = StreamDecoder::new();
        let (mut out, mut messages) = (vec![], 0);
        for piece in bytes.chunks(chunk) {
            let mut frames = vec![];
            framer.push(piece, &mut frames).unwrap();
            for mut frame in frames {
                messages += 1;
                assert_eq!(frame.as_ptr() as usize % 8, 0, "messages start 8-byte aligned");
                while !frame.is_empty() {
                    if let Some(batch) = decoder.decode(&mut frame).unwrap() {
                        out.push(batch);
                    }
                }
            }
        }
        decoder.finish().unwrap();
        (out, messages, framer.pending())
    }

    #[test]
    fn any_chunking_yields_the_same_batches_one_message_per_frame() {
        let input = batches();
        let bytes = stream_bytes(&input);
        for chunk in [1, 3, 7, 64, 1000, 16 * 1024, bytes.len()] {
            let (out, messages, pending) = decode(&bytes, chunk);
            assert_eq!(out, input, "chunk size {chunk}");
            // schema + 3 batches + end-of-stream marker
            assert_eq!(messages, 5, "chunk size {chunk}");
            assert_eq!(pending, 0);
        }
    }

    #[test]
    fn compressed_streams_are_framed_and_decoded_too() {
        // ClickHouse's default output_format_arrow_compression_method is lz4_frame.
        let input = batches();
        for codec in [CompressionType::LZ4_FRAME, CompressionType::ZSTD] {
            let options = IpcWriteOptions::default().try_with_compression(Some(codec)).unwrap();
            let bytes = stream_bytes_with(&input, options);
            assert!(bytes.len() < stream_bytes(&input).len(), "{codec:?} compresses");
            for chunk in [5, 4096, bytes.len()] {
                let (out, messages, pending) = decode(&bytes, chunk);
                assert_eq!(out, input, "{codec:?}, chunk size {chunk}");
                assert_eq!((messages, pending), (5, 0));
            }
        }
    }

    #[test]
    fn a_cut_stream_leaves_a_pending_message() {
        let bytes = stream_bytes(&batches());
        let mut framer = MessageFramer::default();
        let mut frames = vec![];
        framer.push(&bytes[..bytes.len() / 2], &mut frames).unwrap();
        assert!(framer.pending() > 0, "half a stream must not look complete");
    }

    #[test]
    fn text_instead_of_arrow_is_an_error_not_a_huge_allocation() {
        let mut framer = MessageFramer::default();
        let text = b"Code: 241. DB::Exception: Memory limit (total) exceeded: would use 9.31 GiB";
        let err = framer.push(text, &mut vec![]).unwrap_err();
        assert!(err.contains("metadata") || err.contains("header"), "{err}");
        let (code, message) = framer.server_exception(text).expect("the exception is found");
        assert_eq!(code, 241);
        assert_eq!(message, "Memory limit (total) exceeded: would use 9.31 GiB");
    }

    #[test]
    fn finds_an_exception_written_inside_an_unfinished_message() {
        let stream = stream_bytes(&batches());
        let mut framer = MessageFramer::default();
        let cut = stream.len() - 20_000; // inside the last batch's body
        let mut body = stream[..cut].to_vec();
        body.extend_from_slice(b"\nCode: 70. DB::Exception: Value in column UInt64 cannot be safely converted into type Int64: while executing\n");
        let mut out = vec![];
        framer.push(&body, &mut out).unwrap();
        assert!(framer.pending() > 0);
        let (code, message) = framer.server_exception(&[]).expect("found");
        assert_eq!(code, 70);
        assert!(message.starts_with("Value in column UInt64 cannot be safely converted"), "{message}");
        assert_eq!(
            MessageFramer::default().server_exception(&stream[..cut]),
            None,
            "Arrow bytes alone are no exception"
        );
    }
}
