//! Control commands as a pod (and the healer, from the retry topic) decodes
//! them: never a panic, and a decoded command encodes back to itself.
#![no_main]

use baton::control::ControlCommand;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(command) = ControlCommand::decode(data) {
        let again = ControlCommand::decode(&command.encode()).expect("an encoded command decodes");
        assert_eq!(again, command);
    }
});
