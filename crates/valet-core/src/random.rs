//! The one source of randomness: ring's system generator, behind functions that cannot be misused.

use ring::rand::{SecureRandom, SystemRandom};

/// Fills `buffer` with cryptographically secure random bytes.
///
/// The operating system's generator failing is not a condition valetd can continue under, and
/// ring reports it only on broken platforms; callers still get an error rather than a panic.
pub fn fill(buffer: &mut [u8]) -> Result<(), RandomnessUnavailable> {
    SystemRandom::new()
        .fill(buffer)
        .map_err(|_| RandomnessUnavailable)
}

/// `N` random bytes.
pub fn bytes<const N: usize>() -> Result<[u8; N], RandomnessUnavailable> {
    let mut buffer = [0u8; N];
    fill(&mut buffer)?;
    Ok(buffer)
}

/// A new request id: 64 random bits, hex; `unavailable` if the generator fails (a request id
/// only ties records together, so its absence must not stop the request).
pub fn request_id() -> String {
    bytes::<8>()
        .map(hex::encode)
        .unwrap_or_else(|_| "unavailable".to_string())
}

/// The system's random number generator failed.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the system random number generator failed")]
pub struct RandomnessUnavailable;

/// A new grant id: 48 bits of milliseconds then 80 random bits, in Crockford base32 (26
/// characters), so ids sort by issue time and listing in id order lists oldest first. Within one
/// process ids only grow: one issued in the same millisecond as the last (or after the clock went
/// back) is the last plus one, so two grants issued one after the other list in that order.
pub fn grant_id(now_millis: u64) -> Result<String, RandomnessUnavailable> {
    static LAST: std::sync::Mutex<u128> = std::sync::Mutex::new(0);
    let random: [u8; 10] = bytes()?;
    let mut value: u128 = u128::from(now_millis & 0xFFFF_FFFF_FFFF) << 80;
    for (index, byte) in random.iter().enumerate() {
        value |= u128::from(*byte) << (8 * (9 - index));
    }
    {
        let mut last = LAST
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if value >> 80 <= *last >> 80 {
            value = last.wrapping_add(1);
        }
        *last = value;
    }
    const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
    let mut text = [0u8; 26];
    for (index, slot) in text.iter_mut().enumerate() {
        let shift = 5 * (25 - index);
        *slot = ALPHABET[((value >> shift) & 0x1F) as usize];
    }
    Ok(String::from_utf8_lossy(&text).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_ids_are_unique_and_sort_by_time() {
        let early = grant_id(1_000).unwrap();
        let late = grant_id(2_000).unwrap();
        assert_eq!(early.len(), 26);
        assert!(early < late);
        assert_ne!(grant_id(1_000).unwrap(), grant_id(1_000).unwrap());
        let ids: Vec<String> = (0..100).map(|_| grant_id(5_000).unwrap()).collect();
        assert!(
            ids.windows(2).all(|pair| pair[0] < pair[1]),
            "ids issued in one millisecond grow"
        );
    }
}
