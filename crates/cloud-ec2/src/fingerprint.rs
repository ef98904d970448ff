//! AWS key-pair fingerprints of the dispatcher's public key (spec §3.4), used to find an
//! already-imported key pair: for RSA, MD5 then SHA-1 of the PKIX (DER) public key as
//! colon-separated hex; for other keys, the OpenSSH SHA256 fingerprint with and without its
//! base64 padding.

use russh::keys::PublicKey;
use russh::keys::ssh_key::HashAlg;
use russh::keys::ssh_key::public::KeyData;

/// The PKIX `SubjectPublicKeyInfo` DER of an RSA key, encoded by the `rsa` crate (already in
/// the tree through russh) rather than by hand.
fn rsa_pkix(key: &russh::keys::ssh_key::public::RsaPublicKey) -> Result<Vec<u8>, String> {
    use rsa::pkcs8::EncodePublicKey;
    let key = rsa::RsaPublicKey::try_from(key).map_err(|e| format!("RSA public key: {e}"))?;
    let der = key
        .to_public_key_der()
        .map_err(|e| format!("encoding the RSA public key: {e}"))?;
    Ok(der.as_bytes().to_vec())
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
            let pkix = rsa_pkix(rsa)?;
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
