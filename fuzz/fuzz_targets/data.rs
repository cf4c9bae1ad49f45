//! Data-plane messages: the first byte picks `ExpertBatch` (even) or `PartialSums` (odd), the
//! rest is the rkyv payload. Validated access plus the semantic checks must refuse it or yield a
//! message that validates, deserializes, and round-trips through `encode` unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moeshard_protocol::data::{
    access_expert_batch, access_partial_sums, aligned, decode_expert_batch, decode_partial_sums,
};

fuzz_target!(|data: &[u8]| {
    let Some((&which, payload)) = data.split_first() else { return };
    let buf = aligned(payload);
    if which % 2 == 0 {
        if let Ok(archived) = access_expert_batch(&buf) {
            archived.validate().expect("an accessed batch validates");
            let batch = decode_expert_batch(payload).expect("an accessed batch decodes");
            let encoded = batch.encode().expect("a decoded batch encodes");
            assert_eq!(decode_expert_batch(&encoded).expect("round trip"), batch);
        } else {
            assert!(decode_expert_batch(payload).is_err(), "decode accepts what access refused");
        }
    } else if let Ok(archived) = access_partial_sums(&buf) {
        archived.validate().expect("accessed sums validate");
        let sums = decode_partial_sums(payload).expect("accessed sums decode");
        let encoded = sums.encode().expect("decoded sums encode");
        assert_eq!(decode_partial_sums(&encoded).expect("round trip"), sums);
    } else {
        assert!(decode_partial_sums(payload).is_err(), "decode accepts what access refused");
    }
});
