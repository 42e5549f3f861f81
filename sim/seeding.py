"""Seeded generators in bulk: ``np.random.default_rng(seed)`` for many seeds at once, bit for bit.

The batched stepper starts dozens of episodes per control step, each from its scenario's seed, and
numpy builds a seeded generator in ~12 us (a SeedSequence object and its hash, a lock, the errstate
wrapper around ``default_rng``). :func:`reseed` gives each of many generators exactly the state
``np.random.default_rng(seed)`` has (the generator is kept, only its state set): numpy's SeedSequence
hash of all the seeds in a few vectorised uint32 operations, then PCG64's seeding step in Python
integers. Seeds outside [0, 2**32) (several entropy words) take numpy's own path.
tests/test_batched.py checks the states against ``default_rng`` over many seeds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# numpy/random/bit_generator.pyx (SeedSequence) and pcg64.h (pcg_setseq_128_srandom_r)
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R, _XSHIFT = 0xCA01F9DD, 0x4973F715, 16
_POOL_SIZE = 4
_PCG_MULT = (2549297995355413924 << 64) | 4865540595714422341
_M32, _M128 = (1 << 32) - 1, (1 << 128) - 1


def _hash_constants(start: int, mult: int, count: int) -> list[int]:
    """The hash constants SeedSequence multiplies in, in order (they do not depend on the seed)."""
    out, h = [], start
    for _ in range(count):
        out.append(h)
        h = (h * mult) & _M32
    return out


def _column(values: list[int]) -> np.ndarray:
    return np.asarray(values, np.uint32)[:, None]


def _hashmix_scalar(value: int, h: int) -> int:
    value = ((value ^ h) * ((h * _MULT_A) & _M32)) & _M32
    return value ^ (value >> _XSHIFT)


# mix_entropy hashes the seed word, then zeros up to the pool size, then mixes the pool words into each other;
# hashmix(value, h) = xorshift((value ^ h) * (h * MULT_A)), so each step is an xor and a multiply by constants
_MIX_HASH = _hash_constants(_INIT_A, _MULT_A, _POOL_SIZE * _POOL_SIZE)
_FIRST = (_MIX_HASH[0], (_MIX_HASH[0] * _MULT_A) & _M32)
_ZERO_WORDS = _column([_hashmix_scalar(0, h) for h in _MIX_HASH[1:_POOL_SIZE]])
_ROUNDS = []  # per source word: it, the other words, and the (xor, multiply) constants of its hashmix into each
for _src in range(_POOL_SIZE):
    _hashes = _MIX_HASH[_POOL_SIZE + (_POOL_SIZE - 1) * _src : _POOL_SIZE + (_POOL_SIZE - 1) * (_src + 1)]
    _dst = [d for d in range(_POOL_SIZE) if d != _src]
    _ROUNDS.append(([_src], _dst, _column(_hashes), _column([(h * _MULT_A) & _M32 for h in _hashes])))
_STATE_HASH = _hash_constants(_INIT_B, _MULT_B, 2 * _POOL_SIZE)  # generate_state(4, uint64): 8 words
_STATE_XOR, _STATE_MUL = _column(_STATE_HASH), _column([(h * _MULT_B) & _M32 for h in _STATE_HASH])
_STATE_SOURCE = np.arange(2 * _POOL_SIZE) % _POOL_SIZE
_SHIFT, _MIX_L, _MIX_R = np.uint32(_XSHIFT), np.uint32(_MIX_MULT_L), np.uint32(_MIX_MULT_R)


def _pcg64_words(seeds: np.ndarray) -> np.ndarray:
    """``SeedSequence(seed).generate_state(4, np.uint64)`` for each one-word seed (n,) uint32: (n, 4) uint64."""
    pool = np.empty((_POOL_SIZE, len(seeds)), np.uint32)
    first = (seeds ^ np.uint32(_FIRST[0])) * np.uint32(_FIRST[1])
    pool[0] = first ^ (first >> _SHIFT)
    pool[1:] = _ZERO_WORDS
    for src, dst, xor, mul in _ROUNDS:
        hashed = (pool[src] ^ xor) * mul
        hashed ^= hashed >> _SHIFT
        mixed = _MIX_L * pool[dst] - _MIX_R * hashed
        pool[dst] = mixed ^ (mixed >> _SHIFT)
    words = (pool[_STATE_SOURCE] ^ _STATE_XOR) * _STATE_MUL
    words ^= words >> _SHIFT
    wide = words.astype(np.uint64)
    return (wide[0::2] | (wide[1::2] << np.uint64(32))).T


def pcg64_states(seeds: Sequence[int]) -> list[tuple[int, int]]:
    """PCG64's (state, increment) after seeding with each seed in [0, 2**32), as default_rng does."""
    out = []
    for s0, s1, i0, i1 in _pcg64_words(np.asarray(seeds, np.uint32)).tolist():
        # srandom(initstate, initseq): inc = 2 initseq + 1; state = 0, step, += initstate, step (step: state * MULT + inc)
        inc = ((((i0 << 64) | i1) << 1) | 1) & _M128
        out.append(((((inc + (s0 << 64 | s1)) & _M128) * _PCG_MULT + inc) & _M128, inc))
    return out


def new_generator() -> np.random.Generator:
    """A PCG64 generator for :func:`reseed` to set (seeded with 0 until then)."""
    return np.random.Generator(np.random.PCG64(0))


def reseed(generators: Sequence[np.random.Generator], seeds: Sequence[int]) -> None:
    """Put ``generators[i]`` (PCG64) in the state ``np.random.default_rng(seeds[i])`` starts in."""
    if not all(0 <= s <= _M32 for s in seeds):  # several entropy words, or a seed numpy refuses (it says why)
        for generator, seed in zip(generators, seeds, strict=True):
            generator.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        return
    for generator, (state, inc) in zip(generators, pcg64_states(seeds), strict=True):
        generator.bit_generator.state = {"bit_generator": "PCG64", "state": {"state": state, "inc": inc}, "has_uint32": 0, "uinteger": 0}
