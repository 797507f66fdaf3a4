//! See `previewd::fuzzing::shim_input`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| previewd::fuzzing::shim_input(data));
