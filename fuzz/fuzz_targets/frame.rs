//! Frame decoding: `decode_frame` and `FrameHeader::parse` on arbitrary bytes must return an error
//! or a frame that re-encodes to exactly the same bytes; never panic, never allocate from the
//! announced length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moeshard_protocol::frame::{FrameHeader, HEADER_LEN, decode_frame, encode_frame};

fuzz_target!(|data: &[u8]| {
    if let Some(head) = data.first_chunk::<HEADER_LEN>()
        && let Ok(header) = FrameHeader::parse(head)
    {
        assert_eq!(&header.to_bytes(), head, "a parsed header re-encodes to its bytes");
    }
    if let Ok((header, payload)) = decode_frame(data) {
        assert_eq!(header.len as usize, payload.len());
        let encoded = encode_frame(header.kind, payload).expect("a decoded frame re-encodes");
        assert_eq!(encoded, data, "decode then encode is the identity");
    }
});
