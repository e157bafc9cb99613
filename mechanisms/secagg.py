"""Secure aggregation (SecAgg+, Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead"; SecAgg, Bonawitz et al. 2017): the server learns the sum of the devices' vectors mod 2^b and
nothing else, even when some devices drop out.

The devices of a round are numbered 0 .. n-1 (their positions: the order in which their keys reached the server).
Each device u holds the secrets of one round (:class:`DeviceSecrets`): two X25519 key pairs (one to
encrypt shares, one to agree pairwise masks) and a 32-byte self-mask seed b_u, all from the secure
source. The round's four exchanges:

1. **keys**: u sends its two public keys.
2. **shares**: u splits b_u and its mask key into Shamir shares (threshold t, over its share set:
   itself and its neighbours in the server's ring graph of degree k, :func:`share_set`; every other
   device for SecAgg), encrypts each holder's pair with AES-GCM under a key agreed with that holder
   (X25519 + HKDF), and sends the ciphertexts; the server only routes them.
3. **masked input**: u sends ``y_u = x_u + PRG(b_u) + sum_{v in N(u)} sign(u, v) PRG(s_uv) mod 2^b``,
   s_uv agreed with v's mask key, sign +1 if u < v else -1 (the pairwise masks cancel in the sum).
4. **unmask**: each holder v of shares receives the survivors (whose masked input arrived) and the
   devices that dropped after sending shares, and returns its share of b_u for each survivor u and of
   the mask key for each dropped one, never both for one device (:func:`reveal` refuses). With t
   shares the server rebuilds b_u (removes u's self mask) and a dropped device's mask key (removes the
   pairwise masks its survivors added for it).

The server reaches the sum if at least t of every share set answer in step 4; with fewer it learns
nothing. With t above half the share set and above the tolerated drops, neither the server nor its
colluders can get both secrets of one device; with the ring's degree at least twice the tolerated
drops (:func:`ring_degree`), removing them never splits the survivors, so the server learns only
the sum of all of them (and it checks that before unmasking, :func:`connected`).
Model: honest-but-curious server and devices (keys are not signed; a malicious server could
impersonate devices, Bonawitz et al. 2017, Section 6). Shamir sharing is pycryptodome's
(``Crypto.Protocol.SecretSharing.Shamir``, GF(2^128), the library Flower's SecAgg+ uses); key
agreement, key derivation, encryption and the mask generator (AES-256 in counter mode keyed by the
seed) are ``cryptography``'s. The mask generator is cryptographic, so each masked vector is uniform
mod 2^b given everything else the server holds.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dp.secure_random import NoiseSource

_RAW = dict(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)
_PRIVATE_RAW = dict(encoding=serialization.Encoding.Raw, format=serialization.PrivateFormat.Raw,
                    encryption_algorithm=serialization.NoEncryption())


class Abandoned(RuntimeError):
    """The round's sum cannot be (or must not be) recovered: too many devices dropped out."""


@dataclass(frozen=True)
class DeviceSecrets:
    """One device's secrets of one round (never sent; the ClientApp keeps them between the round's
    exchanges in the node's state). Raw 32-byte X25519 private keys and the self-mask seed."""

    enc_key: bytes
    mask_key: bytes
    self_seed: bytes

    @classmethod
    def new(cls, noise: NoiseSource) -> "DeviceSecrets":
        """Fresh secrets from the secure source."""
        return cls(noise.bytes(32), noise.bytes(32), noise.bytes(32))

    def public_keys(self) -> tuple[bytes, bytes]:
        """(encryption public key, mask public key), 32 raw bytes each."""
        return (X25519PrivateKey.from_private_bytes(self.enc_key).public_key().public_bytes(**_RAW),
                X25519PrivateKey.from_private_bytes(self.mask_key).public_key().public_bytes(**_RAW))

    def to_bytes(self) -> bytes:
        """The 96 bytes the device keeps (:meth:`from_bytes` reads them)."""
        return self.enc_key + self.mask_key + self.self_seed

    @classmethod
    def from_bytes(cls, raw: bytes) -> "DeviceSecrets":
        if len(raw) != 96:
            raise ValueError(f"device secrets are 96 bytes, got {len(raw)}")
        return cls(raw[:32], raw[32:64], raw[64:])


# ---------------------------------------------------------------------------------- the graph
def ring_degree(n: int, neighbours: int | None, tolerated: int) -> int | None:
    """The ring's degree k for ``n`` positions when at most ``tolerated`` devices may drop out or collude: the
    requested ``neighbours`` raised to at least 2 * tolerated (even), or None (every position, SecAgg) when
    that reaches n - 1 or none was requested.

    With k >= 2 * tolerated the ring (a Harary graph, k-connected) stays connected when any ``tolerated``
    positions are removed, so the server can only unmask the sum of ALL the surviving honest devices, never
    of a part of them (whose noise would be below the calibrated variance); and every share set (k + 1
    holders) keeps t = k + 1 - tolerated > tolerated shares after the drops, more than the colluders hold.
    """
    if neighbours is None:
        return None
    k = max(int(neighbours), 2 * int(tolerated), 2)
    k += k % 2
    return None if k >= n - 1 else k


def share_set(position: int, n: int, neighbours: int | None) -> tuple[int, ...]:
    """The positions holding shares of ``position``'s secrets (itself included), sorted: its ``neighbours``
    k nearest positions on the ring 0 .. n-1 (k/2 on each side; SecAgg+'s Harary graph; k from
    :func:`ring_degree`), or every position when ``neighbours`` is None or k >= n - 1 (SecAgg). The graph is
    symmetric: v holds u's shares exactly when u holds v's."""
    if neighbours is None or neighbours >= n - 1:
        return tuple(range(n))
    half = max(1, int(neighbours) // 2)
    return tuple(sorted({(position + j) % n for j in range(-half, half + 1)}))


def threshold(size: int, tolerated: int) -> int:
    """t, the shares that rebuild a secret of a share set of ``size``: size - tolerated (so that ``tolerated``
    missing holders still leave enough), and more than half the set and more than ``tolerated`` (so that
    neither colluders nor a server holding one secret's shares can rebuild the other); at least 1.

    Raises
    ------
    ValueError
        If no threshold meets both (size <= 2 * tolerated: the share set is too small for the tolerance).
    """
    t = max(1, size - int(tolerated))
    if size > 1 and (t <= size // 2 or t <= tolerated):
        raise ValueError(f"a share set of {size} cannot tolerate {tolerated} missing holders with a threshold above "
                         "half of it: lower --dropout-tolerance or raise --secagg-neighbours")
    return t


def connected(positions: set[int], n: int, neighbours: int | None) -> bool:
    """True when ``positions`` form one connected piece of the mask graph (:func:`share_set`) restricted to them."""
    if not positions:
        return False
    start = min(positions)
    seen, todo = {start}, [start]
    while todo:
        u = todo.pop()
        for v in share_set(u, n, neighbours):
            if v in positions and v not in seen:
                seen.add(v)
                todo.append(v)
    return seen == positions


# ---------------------------------------------------------------------------------- primitives
def _kdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _agree(private_raw: bytes, public_raw: bytes, label: bytes, round_: int, a: int, b: int) -> bytes:
    shared = X25519PrivateKey.from_private_bytes(private_raw).exchange(X25519PublicKey.from_public_bytes(public_raw))
    lo, hi = min(a, b), max(a, b)
    return _kdf(shared, b"dpfl secagg " + label + struct.pack("<qII", int(round_), lo, hi))


def prg(seed: bytes, dimension: int, bits: int) -> np.ndarray:
    """``dimension`` uniform integers mod 2^b (uint32; b <= 32) from a 32-byte ``seed``: AES-256-CTR keystream."""
    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    words = np.frombuffer(enc.update(bytes(4 * dimension)), dtype=np.uint32)
    return words & np.uint32((1 << bits) - 1) if bits < 32 else words.copy()


def _split(secret: bytes, t: int, n: int) -> list[bytes]:
    """Shamir shares (1 .. n) of a 32-byte secret, each 32 bytes (two 16-byte chunks in GF(2^128))."""
    from Crypto.Protocol.SecretSharing import Shamir

    parts = [Shamir.split(t, n, secret[i:i + 16], ssss=False) for i in range(0, len(secret), 16)]
    return [b"".join(p[j][1] for p in parts) for j in range(n)]


def _combine(shares: Mapping[int, bytes]) -> bytes:
    """The secret from ``{index (1-based): share}`` (at least t of them)."""
    from Crypto.Protocol.SecretSharing import Shamir

    chunks = len(next(iter(shares.values()))) // 16
    return b"".join(Shamir.combine([(i, s[16 * c:16 * (c + 1)]) for i, s in shares.items()], ssss=False)
                    for c in range(chunks))


# ---------------------------------------------------------------------------------- device side
def encrypt_shares(secrets: DeviceSecrets, me: int, enc_keys: Mapping[int, bytes], holders: Iterable[int],
                   t: int, round_: int, noise: NoiseSource) -> dict[int, bytes]:
    """Step 2: holder position -> AES-GCM ciphertext of (share of b_u, share of the mask key) for each of
    ``holders`` (the share set, :func:`share_set`), under the key agreed with the holder's encryption key.

    Raises
    ------
    ValueError
        If a holder's public key is missing.
    """
    holders = sorted(holders)
    seed_shares = _split(secrets.self_seed, t, len(holders))
    key_shares = _split(secrets.mask_key, t, len(holders))
    out = {}
    for j, v in enumerate(holders):
        if v not in enc_keys:
            raise ValueError(f"no encryption key of position {v}")
        key = _agree(secrets.enc_key, enc_keys[v], b"shares", round_, me, v)
        aad = struct.pack("<qII", int(round_), me, v)
        nonce = noise.bytes(12)
        out[v] = nonce + AESGCM(key).encrypt(nonce, struct.pack("<I", j + 1) + seed_shares[j] + key_shares[j], aad)
    return out


def masked_input(x: np.ndarray, secrets: DeviceSecrets, me: int, mask_keys: Mapping[int, bytes],
                 round_: int, bits: int) -> np.ndarray:
    """Step 3: ``y = x + PRG(b_u) + sum_v sign(u, v) PRG(s_uv) mod 2^b`` (uint32 [D]) over the neighbours v in
    ``mask_keys`` (position -> mask public key; those still in the round, ``me`` excluded)."""
    dim = int(np.asarray(x).shape[0])
    m = (1 << bits) - 1
    y = (np.asarray(x, dtype=np.int64) + prg(secrets.self_seed, dim, bits).astype(np.int64)) & m
    for v, pub in mask_keys.items():
        if v == me:
            continue
        pad = prg(_agree(secrets.mask_key, pub, b"mask", round_, me, v), dim, bits).astype(np.int64)
        y = (y + pad if me < v else y - pad) & m
    return y.astype(np.uint32)


def reveal(secrets: DeviceSecrets, me: int, ciphertexts: Mapping[int, bytes], enc_keys: Mapping[int, bytes],
           survivors: set[int], dropped: set[int], round_: int) -> dict[int, bytes]:
    """Step 4: owner position -> this device's share (4-byte index + 32 bytes) of the owner's self-mask seed
    (a survivor) or mask key (a dropped device).

    Raises
    ------
    ValueError
        If a device is named both a survivor and dropped (the server would get both of its secrets), or a
        ciphertext does not decrypt (tampered or misrouted).
    """
    if survivors & dropped:
        raise ValueError(f"positions {sorted(survivors & dropped)[:5]} are named both survivors and dropped: refusing to reveal")
    out = {}
    for u, ct in ciphertexts.items():
        if u not in survivors and u not in dropped:
            continue
        key = _agree(secrets.enc_key, enc_keys[u], b"shares", round_, u, me)
        plain = AESGCM(key).decrypt(ct[:12], ct[12:], struct.pack("<qII", int(round_), u, me))
        index, seed_share, key_share = plain[:4], plain[4:36], plain[36:68]
        out[u] = index + (seed_share if u in survivors else key_share)
    return out


# ---------------------------------------------------------------------------------- server side
def unmask(masked_total: np.ndarray, survivors: set[int], revealed: Mapping[int, Mapping[int, bytes]],
           mask_keys: Mapping[int, bytes], share_sets: Mapping[int, tuple[int, ...]], t: Mapping[int, int],
           dropped: set[int], round_: int, bits: int) -> np.ndarray:
    """The sum of the survivors' inputs mod 2^b (uint32 [D]) from the sum of their masked inputs and the revealed shares.

    Parameters
    ----------
    masked_total : int array [D]
        The sum mod 2^b of the survivors' masked inputs (the server folds each in as it arrives).
    survivors : set of int
        The positions whose masked input is in ``masked_total``.
    revealed : {holder position: {owner position: share}}
        What each answering holder returned in step 4.
    mask_keys : {position: mask public key}
        Of every device that sent shares (survivors and ``dropped``).
    share_sets, t : {position: ...}
        Each device's share set (:func:`share_set`, over the share stage's positions) and threshold.
    dropped : set of int
        Devices that sent shares but no masked input.
    round_, bits : int

    Raises
    ------
    Abandoned
        If nothing arrived, or fewer than t holders revealed a share of some secret that is needed.
    """
    if not survivors:
        raise Abandoned("no masked input arrived")
    m = (1 << bits) - 1
    total = np.asarray(masked_total, dtype=np.int64) & m

    def rebuild(owner: int) -> bytes:
        shares = {}
        for holder, given in revealed.items():
            if owner in given and holder in share_sets[owner]:
                raw = given[owner]
                shares[int(struct.unpack("<I", raw[:4])[0])] = raw[4:]
        if len(shares) < t[owner]:
            raise Abandoned(f"only {len(shares)} of the {t[owner]} shares needed to unmask position {owner} arrived")
        return _combine(dict(list(shares.items())[: t[owner]]))

    dim = total.shape[0]
    for u in survivors:
        total = (total - prg(rebuild(u), dim, bits).astype(np.int64)) & m
    for u in dropped:
        key = rebuild(u)
        for v in share_sets[u]:
            if v == u or v not in survivors:
                continue
            pad = prg(_agree(key, mask_keys[v], b"mask", round_, v, u), dim, bits).astype(np.int64)
            total = (total - pad if v < u else total + pad) & m  # v added sign(v, u) pad for its pair with u
    return total.astype(np.uint32)
