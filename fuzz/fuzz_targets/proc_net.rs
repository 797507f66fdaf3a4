//! See `previewd::fuzzing::proc_net`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| previewd::fuzzing::proc_net(data));
