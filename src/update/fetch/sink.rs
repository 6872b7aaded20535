//! What a download's bytes pass through on their way to the slot: as they
//! are (`RawSink`), or through zstd's decoder one whole frame at a time
//! (`ZstdSink`), so that a cut resumes at a frame boundary.

use crate::image::MAX_FRAME;
use crate::update::slot_writer::{SlotWriter, WriteError};
use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};

crate::error_name::named_error! {
    #[derive(Debug, thiserror::Error)]
    pub enum DecodeError {
        /// The bytes served are not the zstd the message promises.
        #[name = "image-decode"]
        #[error("{name}: at byte {offset} of the .zst: {detail}")]
        Corrupt { offset: u64, detail: String },
        #[name = "image-decode"]
        #[error("{name}: a frame decodes to more than {MAX_FRAME} bytes")]
        FrameTooLarge,
    }
}

/// The common side of both sinks, for `fetch_into`.
pub(super) trait Sink {
    fn writer(&mut self) -> &mut SlotWriter;
    fn writer_ref(&self) -> &SlotWriter;
    /// Where a resumed request starts, in the bytes the server holds.
    fn resume_at(&self) -> u64;
    /// `Some(n)`: the server's object is exactly `n` bytes (raw images).
    fn exact_source_size(&self) -> Option<u64>;
    /// The most bytes the server's object may hold.
    fn source_limit(&self) -> u64;
    fn push(&mut self, data: &[u8]) -> Result<(), SinkError>;
    /// An attempt was cut: keep what can be kept.
    fn interrupted(&mut self) -> Result<(), WriteError>;
    /// The source offset matching the writer's position (a frame boundary).
    fn source_offset(&self) -> u64;
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

pub(super) struct RawSink<'a> {
    pub writer: &'a mut SlotWriter,
}

impl Sink for RawSink<'_> {
    fn writer(&mut self) -> &mut SlotWriter {
        self.writer
    }
    fn writer_ref(&self) -> &SlotWriter {
        self.writer
    }
    fn resume_at(&self) -> u64 {
        self.writer.position()
    }
    fn exact_source_size(&self) -> Option<u64> {
        Some(self.writer.size())
    }
    fn source_limit(&self) -> u64 {
        self.writer.size()
    }
    fn push(&mut self, data: &[u8]) -> Result<(), SinkError> {
        Ok(self.writer.push(data)?)
    }
    fn interrupted(&mut self) -> Result<(), WriteError> {
        // Every byte that arrived is image: none is fetched again.
        self.writer.write_pending()
    }
    fn source_offset(&self) -> u64 {
        self.writer.position()
    }
}

/// zstd's worst case for `size` bytes, plus a seek table for frames of 4 KiB:
/// more than this from the server is not the image.
pub fn zstd_limit(size: u64) -> u64 {
    size.saturating_add(size / 128).saturating_add(size / 4096 * 8).saturating_add(1 << 20)
}

/// The largest zstd window accepted: one frame's worth.
pub const WINDOW_LOG_MAX: u32 = 23;

pub(super) struct ZstdSink<'a> {
    writer: &'a mut SlotWriter,
    decoder: Decoder<'static>,
    /// The current frame, decoded so far; handed to the writer when whole.
    frame: Vec<u8>,
    /// Source offset of the current frame's first byte.
    frame_start: u64,
    /// Source bytes consumed into the current frame.
    consumed: u64,
}

impl<'a> ZstdSink<'a> {
    /// `source_offset`: where in the `.zst` the frame at the writer's position starts.
    pub fn new(writer: &'a mut SlotWriter, source_offset: u64) -> Result<Self, DecodeError> {
        let corrupt =
            |e: std::io::Error| DecodeError::Corrupt { offset: source_offset, detail: e.to_string() };
        let mut decoder = Decoder::new().map_err(corrupt)?;
        decoder.set_parameter(DParameter::WindowLogMax(WINDOW_LOG_MAX)).map_err(corrupt)?;
        Ok(Self { writer, decoder, frame: Vec::new(), frame_start: source_offset, consumed: 0 })
    }

    fn end_frame(&mut self) -> Result<(), SinkError> {
        self.writer.push(&self.frame)?;
        self.frame.clear();
        self.frame_start += self.consumed;
        self.consumed = 0;
        Ok(())
    }
}

impl Sink for ZstdSink<'_> {
    fn writer(&mut self) -> &mut SlotWriter {
        self.writer
    }
    fn writer_ref(&self) -> &SlotWriter {
        self.writer
    }
    fn resume_at(&self) -> u64 {
        self.frame_start
    }
    fn exact_source_size(&self) -> Option<u64> {
        None
    }
    fn source_limit(&self) -> u64 {
        zstd_limit(self.writer.size())
    }
    fn push(&mut self, data: &[u8]) -> Result<(), SinkError> {
        let mut input = InBuffer::around(data);
        while input.pos() < data.len() {
            if self.writer.position() + self.frame.len() as u64 >= self.writer.size() && self.frame.is_empty()
            {
                // The image is whole: what follows is the seek table.
                return Ok(());
            }
            if self.frame.len() == self.frame.capacity() {
                if self.frame.len() >= MAX_FRAME as usize {
                    return Err(DecodeError::FrameTooLarge.into());
                }
                self.frame.reserve((128 << 10).min(MAX_FRAME as usize - self.frame.len()));
            }
            let before = input.pos();
            let filled = self.frame.len();
            let mut output = OutBuffer::around_pos(&mut self.frame, filled);
            let hint = self.decoder.run(&mut input, &mut output).map_err(|e| DecodeError::Corrupt {
                offset: self.frame_start + self.consumed,
                detail: e.to_string(),
            })?;
            self.consumed += (input.pos() - before) as u64;
            if self.writer.position() + self.frame.len() as u64 > self.writer.size() {
                return Err(WriteError::TooManyBytes { size: self.writer.size() }.into());
            }
            if hint == 0 {
                self.end_frame()?;
            }
        }
        Ok(())
    }
    fn interrupted(&mut self) -> Result<(), WriteError> {
        // A partial frame cannot be resumed: it is decoded again.
        self.frame.clear();
        self.consumed = 0;
        self.decoder.reinit().map_err(|e| WriteError::Io {
            path: "zstd".into(),
            offset: self.frame_start,
            source: e,
        })?;
        self.writer.write_pending()
    }
    fn source_offset(&self) -> u64 {
        self.frame_start
    }
}
