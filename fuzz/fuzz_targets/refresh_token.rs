//! The refresh-token parser and the refresh that follows it: any string is
//! a token with exactly one spelling or `refresh_token_malformed`; a parsed
//! token that is not the one issued is `refresh_token_invalid` and changes
//! no state (a forger cannot revoke a session), never a panic.

#![no_main]

use keenvpn_edge::domain::session::{RefreshError, RefreshToken};
use keenvpn_edge_fuzz::{NOW, PEPPER, sessions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let token = match RefreshToken::parse(&text) {
        Ok(token) => token,
        Err(e) => {
            assert_eq!(e, RefreshError::Malformed);
            return;
        }
    };
    assert_eq!(token.to_wire(), text, "a second spelling parsed");

    let (mut state, issued) = sessions();
    let before = state.clone();
    match state.refresh(&token, NOW + 10, PEPPER) {
        Ok(next) => {
            assert_eq!(
                text, issued.refresh_token,
                "a token we never issued refreshed"
            );
            assert_eq!(next.sid, issued.sid);
        }
        Err(e) => {
            assert_ne!(
                text, issued.refresh_token,
                "the issued token was refused: {e}"
            );
            assert_eq!(e, RefreshError::Invalid);
            assert!(state == before, "a refused token changed the state");
        }
    }
});
