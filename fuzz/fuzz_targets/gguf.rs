//! GGUF header, metadata and tensor-info parsing on arbitrary bytes (`GgufFile::from_bytes`, the
//! same reader as `GgufFile::open`), then what loading a model reads from them: the typed
//! getters, every tensor's data range, the model config, tokenizer and chat template. Errors are
//! fine; panics and allocations out of proportion to the input are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moeshard::chat::ChatTemplate;
use moeshard::gguf::GgufFile;
use moeshard::model::ModelConfig;
use moeshard::tokenizer::Tokenizer;

fuzz_target!(|data: &[u8]| {
    let Ok(gguf) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else { return };
    for t in gguf.tensors() {
        assert_eq!(gguf.tensor_data(t).len() as u64, t.n_bytes);
        assert_eq!(gguf.tensor(&t.name).expect("indexed"), t);
    }
    for key in gguf.metadata().keys() {
        let _ = gguf.get_str(key);
        let _ = gguf.get_u32(key);
        let _ = gguf.get_u64(key);
        let _ = gguf.get_f32(key);
        let _ = gguf.get_bool(key);
        let _ = gguf.get_str_array(key);
        let _ = gguf.get_i32_array(key);
        let _ = gguf.get_bool_array(key);
    }
    let _ = ModelConfig::from_gguf(&gguf);
    if let Ok(tokenizer) = Tokenizer::from_gguf(&gguf) {
        if let Ok(ids) = tokenizer.encode("<|im_start|>user\nhi 12 there<|im_end|>", true) {
            let _ = tokenizer.decode(&ids, false);
        }
    }
    let _ = ChatTemplate::from_gguf(&gguf);
});
