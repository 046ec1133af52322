//! 64-bit FNV-1a: stable, fast fingerprints (not a secure hash) of tuning keys, of weights and
//! of a run's settings. One definition, so that every fingerprint is the same function.

/// The offset basis: the fingerprint of nothing.
pub(crate) const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

/// `h` extended by one value, xored in whole (a byte for the standard FNV-1a; the weights
/// fingerprints fold a 32-bit word at a time).
pub(crate) fn step(h: u64, value: u64) -> u64 {
    (h ^ value).wrapping_mul(PRIME)
}

/// `h` extended by `bytes`, a byte at a time (the standard FNV-1a).
pub(crate) fn bytes(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| step(h, u64::from(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_published_test_vectors() {
        // FNV-1a 64 of "" and "a" (the reference's test suite).
        assert_eq!(bytes(OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(bytes(OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
