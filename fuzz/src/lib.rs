//! Shared by the fuzz targets: the tiny Mellum fixture (tokenizer and chat template), parsed once
//! from bytes compiled into the binary, so a target runs from any directory and on a machine
//! without the repository.

use std::sync::OnceLock;

use moeshard::chat::ChatTemplate;
use moeshard::gguf::GgufFile;
use moeshard::tokenizer::Tokenizer;

/// `tests/fixtures/tiny-mellum-q8_0.gguf`: Mellum2's real tokenizer and chat template.
const FIXTURE: &[u8] = include_bytes!("../../tests/fixtures/tiny-mellum-q8_0.gguf");

/// The fixture's tokenizer and chat template.
pub struct Fixture {
    /// `Tokenizer::from_gguf` of the fixture.
    pub tokenizer: Tokenizer,
    /// `ChatTemplate::from_gguf` of the fixture.
    pub template: ChatTemplate,
}

/// The fixture, loaded on first use.
pub fn fixture() -> &'static Fixture {
    static FIXTURE_CELL: OnceLock<Fixture> = OnceLock::new();
    FIXTURE_CELL.get_or_init(|| {
        let gguf = GgufFile::from_bytes("tiny-mellum-q8_0.gguf", FIXTURE.to_vec()).expect("fixture parses");
        Fixture {
            tokenizer: Tokenizer::from_gguf(&gguf).expect("fixture tokenizer"),
            template: ChatTemplate::from_gguf(&gguf).expect("fixture template").expect("fixture has a template"),
        }
    })
}
