//! See `previewd::fuzzing::h1_response`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| previewd::fuzzing::h1_response(data));
