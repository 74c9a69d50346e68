//! The sample order: a permutation of the `n` samples per epoch, a pure function of (seed, epoch)
//! computed per position (a Feistel network over the index), so resuming at any counter costs
//! nothing and needs no state but the counter.

/// The index of the sample visited `i`-th of `n` in `epoch`: a pseudo-random permutation of
/// `0..n` that is a pure function of (seed, epoch), computed per position in constant time and
/// memory (a four-round Feistel network over the next even power of two, cycle-walked into `0..n`;
/// at most four walks expected), so that resuming anywhere costs nothing that grows with the data.
pub fn permuted(seed: u64, epoch: u64, n: usize, i: usize) -> usize {
    assert!(i < n, "position {i} of {n} samples");
    if n == 1 {
        return 0;
    }
    let bits = (usize::BITS - (n - 1).leading_zeros()).max(2);
    let half = bits.div_ceil(2);
    let mask = (1u64 << half) - 1;
    let key = splitmix(seed ^ splitmix(epoch.wrapping_add(0x5EED)));
    let mut x = i as u64;
    loop {
        let (mut left, mut right) = (x >> half, x & mask);
        for round in 0..4u64 {
            let f = splitmix(key ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ right) & mask;
            (left, right) = (right, left ^ f);
        }
        x = (left << half) | right;
        if x < n as u64 {
            return x as usize;
        }
    }
}

/// SplitMix64's finalizer: a bijective 64-bit mixer.
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
