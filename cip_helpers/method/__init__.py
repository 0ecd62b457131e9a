"""The paper's method: tensors in, tensors out (no profile, no file access, no caching).

Read in this order: ``scores`` (energy score, OE loss, E1/E2 thresholds, routing, reliability
score; paper Sec. III-B/III-C), ``poisoning`` (PPD variants, PBD's flipped answer, DAWN's
permutation), ``defenses`` (the defended APIs: NoDefense, OE only, DP, DAWN, CIP, and the trigger
set), ``verification`` (the ownership test). ``models`` holds the architectures and batched
inference, ``inputs`` the checks at the API boundary, ``digests`` the hashes the defenses key on.
"""
