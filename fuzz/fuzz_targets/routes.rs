//! See `previewd::fuzzing::routes`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| previewd::fuzzing::routes(data));
