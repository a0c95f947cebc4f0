//! The userspace relay's own record layer decodes whatever the peer agent's socket carries once
//! rustls is gone: it must never panic, must authenticate before it believes anything, and
//! must give back exactly what a sender sealed (content, type, padding stripped) or name why
//! not.
#![no_main]

use interceptor::relay::record::{
    HEADER_LEN, MAX_PLAINTEXT, MAX_RECORD, Opened, RecordLayer, record_len,
};
use libfuzzer_sys::fuzz_target;
use rustls::{
    ConnectionTrafficSecrets, ExtractedSecrets,
    crypto::cipher::{AeadKey, Iv},
};

/// Mirrored layers (sender, receiver) on fixed keys; `sel` picks the cipher, the starting
/// sequence numbers (rustls hands over mid-session) and the receiver's role.
fn pair(sel: u8) -> (RecordLayer, RecordLayer) {
    let secrets = |k: u8| {
        let key = AeadKey::from([k; 32]);
        let iv = Iv::new([k ^ 0x5a; 12]);
        if sel & 1 == 0 {
            ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        } else {
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv }
        }
    };
    let seq = u64::from(sel >> 2);
    let layer = |tx: u8, rx: u8, is_client: bool| {
        let s = ExtractedSecrets {
            tx: (seq, secrets(tx)),
            rx: (seq, secrets(rx)),
        };
        RecordLayer::new(s, is_client).expect("fixed keys are valid")
    };
    let receiver_is_client = sel & 2 != 0;
    (
        layer(1, 2, !receiver_is_client),
        layer(2, 1, receiver_is_client),
    )
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };

    // 1. The input as a byte stream from the peer: framing and authentication never panic, a
    //    whole record is never longer than the limit, and nothing unauthenticated opens.
    let (_, mut rx) = pair(sel);
    let mut stream = rest.to_vec();
    let mut at = 0;
    while let Ok(Some(len)) = record_len(&stream[at..]) {
        assert!(len <= MAX_RECORD);
        assert!(
            rx.open(&mut stream[at..at + len]).is_err(),
            "forged record opened"
        );
        at += len;
    }

    // 2. The input as a sealed TLSInnerPlaintext: the receiver finds the content type as the
    //    last non-zero byte, strips the padding, and returns the content unchanged.
    let (mut tx, mut rx) = pair(sel);
    let mut wire = Vec::new();
    if tx.seal_inner_plaintext(rest, &mut wire).is_ok() {
        assert_eq!(record_len(&wire), Ok(Some(wire.len())));
        for cut in (0..wire.len()).step_by(wire.len() / 8 + 1) {
            assert_eq!(record_len(&wire[..cut]), Ok(None), "cut at {cut}");
        }
        let result = rx.open(&mut wire);
        let type_at = rest.iter().rposition(|&b| b != 0);
        match result {
            Ok(Opened::Data(n)) => {
                assert!(n <= MAX_PLAINTEXT);
                assert_eq!(type_at, Some(n));
                assert_eq!(rest[n], 23);
                assert_eq!(&wire[HEADER_LEN..HEADER_LEN + n], &rest[..n]);
            }
            Ok(Opened::CloseNotify | Opened::Nothing) => {
                assert!(matches!(type_at.map(|t| rest[t]), Some(21 | 22)));
            }
            Err(_) => assert_eq!(rx.rx_seq(), tx.tx_seq(), "a failure after the AEAD"),
        }
    }

    // 3. The input as application data, in records, then one flipped byte: the data comes
    //    back unchanged, the flipped record fails.
    let (mut tx, mut rx) = pair(sel);
    let mut wire = Vec::new();
    for chunk in rest.chunks(MAX_PLAINTEXT) {
        tx.seal_data(chunk, &mut wire).expect("within limits");
    }
    let mut got = Vec::new();
    let mut at = 0;
    while let Ok(Some(len)) = record_len(&wire[at..]) {
        match rx.open(&mut wire[at..at + len]) {
            Ok(Opened::Data(n)) => got.extend_from_slice(&wire[at + HEADER_LEN..][..n]),
            other => panic!("own record came back as {other:?}"),
        }
        at += len;
    }
    assert_eq!(at, wire.len());
    assert_eq!(got, rest);
    let (mut tx, mut rx) = pair(sel);
    let mut wire = Vec::new();
    tx.seal_data(&rest[..rest.len().min(MAX_PLAINTEXT)], &mut wire)
        .expect("within limits");
    let flip = usize::from(sel) % (wire.len() - HEADER_LEN) + HEADER_LEN;
    wire[flip] ^= 0x01;
    assert!(rx.open(&mut wire).is_err(), "flipped byte {flip} opened");
});
