//! The dispatcher's tags (spec §2.6), the InstanceSetID (§11.3), instance secrets and the
//! first-boot user data that plants them (Appendix D).

use md5::{Digest, Md5};
use rand::RngCore;

/// Tag keys under a `CloudVMs.TagKeyPrefix` (default `Arvados`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagKeys {
    pub prefix: String,
}

impl TagKeys {
    pub fn new(prefix: &str) -> TagKeys {
        TagKeys {
            prefix: prefix.to_string(),
        }
    }

    pub fn instance_set_id(&self) -> String {
        format!("{}InstanceSetID", self.prefix)
    }

    pub fn instance_type(&self) -> String {
        format!("{}InstanceType", self.prefix)
    }

    pub fn idle_behavior(&self) -> String {
        format!("{}IdleBehavior", self.prefix)
    }

    pub fn instance_secret(&self) -> String {
        format!("{}InstanceSecret", self.prefix)
    }

    pub fn cloud_test_pid(&self) -> String {
        format!("{}CloudTestPID", self.prefix)
    }
}

/// The InstanceSetID for a dispatcher token: the uuid of a v2 token, else the hex MD5 of the
/// token (unique per token without revealing it).
pub fn instance_set_id(token: &str) -> String {
    let parts: Vec<&str> = token.split('/').collect();
    if parts.len() == 3 && parts[0] == "v2" && !parts[1].is_empty() {
        return parts[1].to_string();
    }
    hex::encode(Md5::digest(token.as_bytes()))
}

/// A 64-bit hash of `s` that is the same in every process and every version of this program
/// (SipHash-2-4 with the fixed `keys`; std's hasher is randomly keyed): for provider request
/// tokens and names derived from a create request, so that a retried request is recognised
/// as the same one.
pub fn stable_hash(s: &str, keys: (u64, u64)) -> u64 {
    use std::hash::{Hash, Hasher};
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new_with_keys(keys.0, keys.1);
    s.hash(&mut h);
    h.finish()
}

/// 40 random lowercase hex digits (20 random bytes).
pub fn new_instance_secret() -> String {
    let mut b = [0u8; 20];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// First-boot user data: write the secret where the dispatcher will look for it, then run
/// the operator's init command.
pub fn user_data(secret: &str, init_command: &str) -> String {
    format!("#!/bin/sh\n{}\n", self::init_command(secret, init_command))
}

/// The init command the dispatcher passes to `InstanceSet::create`: write the secret (mode
/// 0600), then run `CloudVMs.InstanceInitCommand`. Drivers wrap it into user data.
pub fn init_command(secret: &str, instance_init_command: &str) -> String {
    format!("umask 0177 && echo -n \"{secret}\" >{INSTANCE_SECRET_PATH}\n{instance_init_command}")
}

/// Where the secret lives on the VM.
pub const INSTANCE_SECRET_PATH: &str = "/var/run/arvados-instance-secret";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_prefix() {
        let k = TagKeys::new("Arvados");
        assert_eq!(k.instance_set_id(), "ArvadosInstanceSetID");
        assert_eq!(k.instance_type(), "ArvadosInstanceType");
        assert_eq!(k.idle_behavior(), "ArvadosIdleBehavior");
        assert_eq!(k.instance_secret(), "ArvadosInstanceSecret");
        assert_eq!(TagKeys::new("x-").instance_type(), "x-InstanceType");
    }

    #[test]
    fn instance_set_id_from_token() {
        assert_eq!(
            instance_set_id("v2/zzzzz-gj3su-000000000000000/secret"),
            "zzzzz-gj3su-000000000000000"
        );
        // md5("xyzzy")
        assert_eq!(instance_set_id("xyzzy"), "1271ed5ef305aadabc605b1609e24c52");
        assert_eq!(
            instance_set_id("v2/only-two"),
            hex::encode(Md5::digest(b"v2/only-two"))
        );
    }

    #[test]
    fn secrets_and_user_data() {
        let s = new_instance_secret();
        assert_eq!(s.len(), 40);
        assert!(
            s.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(s, new_instance_secret());
        assert_eq!(
            user_data("abc", "echo hi"),
            "#!/bin/sh\numask 0177 && echo -n \"abc\" >/var/run/arvados-instance-secret\necho hi\n"
        );
    }
}
