//! Control messages: `Control::decode` of arbitrary bytes (bincode 2, every message kind: the
//! first byte is the variant) must return an error or a valid message that survives an
//! encode/decode round trip unchanged; never panic, never allocate past the frame limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moeshard_protocol::control::Control;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = Control::decode(data) {
        let encoded = msg.encode().expect("a decoded message is valid, so it encodes");
        let again = Control::decode(&encoded).expect("an encoded message decodes");
        assert_eq!(again, msg, "encode then decode is the identity");
    }
});
