//! AWS key-pair fingerprints of the dispatcher's public key (spec §3.4), used to find an
//! already-imported key pair: for RSA, MD5 then SHA-1 of the PKIX (DER) public key as
//! colon-separated hex; for other keys, the OpenSSH SHA256 fingerprint with and without its
//! base64 padding.

use russh::keys::PublicKey;
use russh::keys::ssh_key::HashAlg;
use russh::keys::ssh_key::public::KeyData;

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .iter()
            .copied()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

/// DER INTEGER content: big-endian, minimal, with a leading zero if the top bit is set.
fn der_uint(bytes: &[u8]) -> Vec<u8> {
    let trimmed: Vec<u8> = bytes.iter().copied().skip_while(|b| *b == 0).collect();
    let mut c = Vec::with_capacity(trimmed.len() + 1);
    if trimmed.first().is_none_or(|b| b & 0x80 != 0) {
        c.push(0);
    }
    c.extend(trimmed);
    der(0x02, &c)
}

/// The PKIX `SubjectPublicKeyInfo` DER of an RSA key.
fn rsa_pkix(e: &[u8], n: &[u8]) -> Vec<u8> {
    const RSA_ENCRYPTION: [u8; 11] = [
        0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
    ];
    let mut alg = RSA_ENCRYPTION.to_vec();
    alg.extend([0x05, 0x00]);
    let rsa_key = der(0x30, &[der_uint(n), der_uint(e)].concat());
    let mut bits = vec![0u8];
    bits.extend(rsa_key);
    der(0x30, &[der(0x30, &alg), der(0x03, &bits)].concat())
}

fn colon_hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The fingerprints AWS may have recorded for `key`, the one to name an import after first.
pub fn fingerprints(key: &PublicKey) -> Result<Vec<String>, String> {
    match key.key_data() {
        KeyData::Rsa(rsa) => {
            let pkix = rsa_pkix(rsa.e().as_bytes(), rsa.n().as_bytes());
            use md5::{Digest, Md5};
            let md5 = Md5::digest(&pkix);
            let sha1 =
                aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, &pkix);
            Ok(vec![colon_hex(&md5), colon_hex(sha1.as_ref())])
        }
        _ => {
            let fp = key.fingerprint(HashAlg::Sha256).to_string();
            Ok(vec![format!("{fp}="), fp])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PublicKey {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(name),
        )
        .unwrap();
        PublicKey::from_openssh(text.trim()).unwrap()
    }

    /// Expected values computed with `openssl pkey -pubout -outform DER | openssl md5 -c`
    /// (and `sha1`) and `ssh-keygen -l -E sha256`.
    #[test]
    fn ac_ec2_12_fingerprints_match_openssl_and_ssh_keygen() {
        assert_eq!(
            fingerprints(&fixture("test_rsa.pub")).unwrap(),
            [
                "e1:a0:c7:04:ae:ab:4c:bf:16:6b:03:cb:60:e9:7c:a3",
                "96:64:a1:a9:c8:23:60:f0:92:2e:20:49:06:69:44:fb:43:9b:eb:3a",
            ]
        );
        assert_eq!(
            fingerprints(&fixture("test_ed25519.pub")).unwrap(),
            [
                "SHA256:aVTVj5VZTWjTqPLrGVuwNVpxEXxQtbXQNwSkU4jwaCA=",
                "SHA256:aVTVj5VZTWjTqPLrGVuwNVpxEXxQtbXQNwSkU4jwaCA",
            ]
        );
    }
}
