//! Agent control protocol: arbitrary bytes as frames (whole-buffer and streaming decoders) and
//! as stream headers must give errors, never panics or unbounded allocations; whatever decodes
//! must re-encode and decode to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skiff_protocol::{decode, encode, read_message, StreamHeader};
use std::io::Cursor;

fuzz_target!(|data: &[u8]| {
    if let Ok((msg, used)) = decode(data) {
        assert!(used <= data.len());
        let again = encode(&msg).expect("a decoded message re-encodes");
        let (back, _) = decode(&again).expect("a re-encoded message decodes");
        assert_eq!(back, msg);
    }
    // The streaming reader over a sequence of frames.
    let mut cur = Cursor::new(data);
    for _ in 0..64 {
        if read_message(&mut cur).is_err() {
            break;
        }
    }
    let _ = StreamHeader::read_from(&mut Cursor::new(data));
});
