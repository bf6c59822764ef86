//! Which entries a rollout's candidate takes: by a key field of the entry, hashed, so a key's
//! version never flips back and forth, and a key that went to the candidate stays there as the
//! percentage grows (the buckets below the share only ever gain members).

/// How finely a share is cut: 10,000 buckets, so shares are exact to a hundredth of a percent.
pub const BUCKETS: u32 = 10_000;

/// The value an entry is routed by: the `key_field`'s value when the entry has that field, else
/// the entry's id (an entry without the key is its own key).
pub fn key_of<'a>(
    key_field: Option<&str>,
    fields: &'a [(String, String)],
    entry_id: &'a str,
) -> &'a str {
    key_field
        .and_then(|field| fields.iter().find(|(name, _)| name == field))
        .map_or(entry_id, |(_, value)| value.as_str())
}

/// The bucket of `key` in rollout `rollout_id`: the same on every host, in every version of the
/// host (FNV-1a and a SplitMix64 finaliser, not a hasher with a per-process seed). The rollout
/// is part of the hash, so each rollout draws its own keys rather than the same unlucky ones.
pub fn bucket(rollout_id: i64, key: &str) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in rollout_id.to_le_bytes().iter().chain(key.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^= hash >> 31;
    (hash % u64::from(BUCKETS)) as u32
}

/// Whether a key in `bucket` is within a share of `percent`.
pub fn within(bucket: u32, percent: f64) -> bool {
    f64::from(bucket) < percent * f64::from(BUCKETS) / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn an_entry_goes_by_its_key_field_else_by_its_id() {
        let with = fields(&[("mediaId", "42"), ("x", "y")]);
        assert_eq!(key_of(Some("mediaId"), &with, "1-0"), "42");
        assert_eq!(key_of(Some("postId"), &with, "1-0"), "1-0");
        assert_eq!(key_of(None, &with, "1-0"), "1-0");
    }

    #[test]
    fn a_share_takes_its_part_of_the_keys_and_a_larger_share_only_adds_keys() {
        let keys: Vec<String> = (0..20_000).map(|i| format!("media-{i}")).collect();
        let share = |percent: f64| -> Vec<bool> {
            keys.iter().map(|k| within(bucket(7, k), percent)).collect()
        };
        let quarter = share(25.0);
        let half = share(50.0);
        let taken = quarter.iter().filter(|t| **t).count() as f64 / keys.len() as f64;
        assert!((taken - 0.25).abs() < 0.015, "25% took {taken}");
        // Monotone: every key the candidate had at 25% it still has at 50%.
        assert!(quarter.iter().zip(&half).all(|(q, h)| !q || *h));
        assert!(share(0.0).iter().all(|t| !t));
        assert!(share(100.0).iter().all(|t| *t));
    }

    #[test]
    fn each_rollout_draws_its_own_keys_and_the_draw_never_changes() {
        let differ = (0..100)
            .filter(|i| bucket(1, &format!("m{i}")) != bucket(2, &format!("m{i}")))
            .count();
        assert!(differ > 90);
        // Pinned: a host of another version must route a key the same way, or a key would flip
        // versions while a fleet is upgraded.
        assert_eq!(bucket(1, "media-1"), 6708);
        assert_eq!(bucket(3, ""), 7643);
        assert_eq!(bucket(42, "1234"), 8324);
    }
}
