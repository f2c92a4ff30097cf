"""Audio for keyword bundles: WAV and raw PCM reading, resampling, and log-mel features.
numpy only (no torch, no scipy): the build computes its training features with these same
functions, so a device feeds its model exactly what the build measured.

Every file is hostile: a WAV is parsed by our own RIFF reader with caps on its size, its
chunk count and its declared lengths, and anything wrong is one line of ValueError.

Features (the defaults of the keyword demo): 16 kHz mono clips of 1 s (16,000 samples),
frames of 25 ms (400 samples, a periodic Hann window) every 10 ms (160 samples), a 512-point
rFFT power spectrum, 40 triangular mel bands between 20 Hz and 8 kHz on the HTK mel scale
(mel = 2595 log10(1 + f / 700)), each band's power summed and then ln(max(power, 1e-6)):
98 frames, so one clip is a (1, 40, 98) model input.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

MAX_AUDIO_BYTES = 16 * 1024 * 1024  # a WAV file or a raw PCM body
MAX_CHUNKS = 64  # RIFF chunks read before giving up on finding 'data'
MIN_RATE, MAX_RATE = 1000, 384_000
MAX_CHANNELS = 16
MAX_SECONDS = 60.0  # a longer recording is refused (a clip is a second or two)
_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE


def read_wav(data: bytes, what: str = "WAV") -> tuple[np.ndarray, int]:
    """A WAV file's bytes -> (float32 mono samples in [-1, 1], sample rate). Integer PCM of
    8 (unsigned), 16, 24 or 32 bits and 32-bit float, plain or WAVE_FORMAT_EXTENSIBLE; several
    channels are averaged. ValueError (one line) for anything else."""
    if len(data) > MAX_AUDIO_BYTES:
        raise ValueError(f"{what}: {len(data)} bytes, at most {MAX_AUDIO_BYTES}")
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError(f"{what}: not a WAV file (no RIFF/WAVE header)")
    fmt: tuple[int, int, int, int] | None = None
    pos = 12
    for _ in range(MAX_CHUNKS):
        if pos + 8 > len(data):
            break
        cid, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if cid == b"fmt ":
            fmt = _read_fmt(data[body:body + size], size, what)
        elif cid == b"data":
            if fmt is None:
                raise ValueError(f"{what}: 'data' chunk before the 'fmt ' chunk")
            if body + size > len(data):
                raise ValueError(f"{what}: truncated: the data chunk declares {size} bytes, "
                                 f"{len(data) - body} are present")
            return _decode(data[body:body + size], fmt, what), fmt[1]
        pos = body + size + (size & 1)  # chunks are padded to an even size
    raise ValueError(f"{what}: no 'data' chunk" + ("" if fmt else " and no 'fmt ' chunk"))


def _read_fmt(chunk: bytes, size: int, what: str) -> tuple[int, int, int, int]:
    if size < 16 or len(chunk) < 16:
        raise ValueError(f"{what}: truncated 'fmt ' chunk")
    tag, channels, rate, _, block, bits = struct.unpack_from("<HHIIHH", chunk)
    if tag == _EXTENSIBLE:
        if len(chunk) < 26:
            raise ValueError(f"{what}: truncated WAVE_FORMAT_EXTENSIBLE 'fmt ' chunk")
        tag = struct.unpack_from("<H", chunk, 24)[0]  # the sub-format GUID's first field
    if not 1 <= channels <= MAX_CHANNELS:
        raise ValueError(f"{what}: {channels} channels, this runtime reads 1 to {MAX_CHANNELS}")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(f"{what}: sample rate {rate} Hz, expected {MIN_RATE} to {MAX_RATE}")
    if (tag, bits) not in ((_PCM, 8), (_PCM, 16), (_PCM, 24), (_PCM, 32), (_FLOAT, 32)):
        raise ValueError(f"{what}: format {tag} with {bits} bits per sample; this runtime reads "
                         "8/16/24/32-bit integer PCM and 32-bit float")
    if block != channels * bits // 8:
        raise ValueError(f"{what}: block size {block} does not match {channels} channel(s) of "
                         f"{bits} bits")
    return tag, rate, channels, bits


def _decode(raw: bytes, fmt: tuple[int, int, int, int], what: str) -> np.ndarray:
    tag, rate, channels, bits = fmt
    block = channels * bits // 8
    frames = len(raw) // block
    if frames > MAX_SECONDS * rate:
        raise ValueError(f"{what}: {frames / rate:.1f} s of audio, at most {MAX_SECONDS:g} s")
    raw = raw[:frames * block]
    if tag == _FLOAT:
        x = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        if not np.isfinite(x).all():
            raise ValueError(f"{what}: float samples hold NaN or infinity")
        x = np.clip(x, -1.0, 1.0)
    elif bits == 8:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif bits == 16:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif bits == 24:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    else:
        x = (np.frombuffer(raw, dtype="<i4").astype(np.float64) / 2.0**31).astype(np.float32)
    if not len(x):
        raise ValueError(f"{what}: no samples")
    return x.reshape(-1, channels).mean(axis=1, dtype=np.float32)


def read_pcm(data: bytes, what: str = "PCM", big_endian: bool = False) -> np.ndarray:
    """Raw PCM: 16-bit signed mono samples, little-endian (a .pcm/.raw file) or big-endian
    (`audio/L16`, RFC 2586) -> float32 in [-1, 1]."""
    if len(data) > MAX_AUDIO_BYTES:
        raise ValueError(f"{what}: {len(data)} bytes, at most {MAX_AUDIO_BYTES}")
    if not data or len(data) % 2:
        raise ValueError(f"{what}: raw PCM must be a whole number of 16-bit samples "
                         f"({len(data)} bytes)")
    return np.frombuffer(data, dtype=">i2" if big_endian else "<i2").astype(np.float32) / 32768.0


def write_wav(samples: np.ndarray, rate: int) -> bytes:
    """float samples in [-1, 1] -> a 16-bit PCM mono WAV file's bytes."""
    pcm = np.clip(np.round(np.asarray(samples, dtype=np.float64) * 32767.0), -32768, 32767)
    body = pcm.astype("<i2").tobytes()
    return (b"RIFF" + struct.pack("<I", 36 + len(body)) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, _PCM, 1, rate, rate * 2, 2, 16)
            + b"data" + struct.pack("<I", len(body)) + body)


_MAX_TABLE = 1 << 18  # weights held at once by resample (floats): 1 MiB


def resample(x: np.ndarray, rate_in: int, rate_out: int, half_width: int = 16) -> np.ndarray:
    """Band-limited resampling by windowed-sinc interpolation: each output sample is the
    input's samples within `half_width` input periods (scaled when downsampling), weighed
    by a sinc low-pass at the lower Nyquist frequency times a Hann window. The weights
    depend only on an output's phase against the input grid, which repeats every
    rate_out / gcd(rate_in, rate_out) outputs: they are worked out once per phase. float32."""
    x = np.asarray(x, dtype=np.float32)
    if rate_in == rate_out or not len(x):
        return x.copy()
    g = math.gcd(rate_in, rate_out)
    up, down = rate_out // g, rate_in // g  # output k sits at input time k * down / up
    if up > 8192:
        raise ValueError(f"cannot resample {rate_in} Hz to {rate_out} Hz (ratio too fine)")
    cutoff = min(1.0, up / down)  # of the input's Nyquist frequency
    reach = int(np.ceil(half_width / cutoff))
    taps = np.arange(-reach + 1, reach + 1)

    def weights(phases: np.ndarray) -> np.ndarray:  # (phase, tap): output time - input sample
        d = (phases / up)[:, None] - taps
        return (cutoff * np.sinc(cutoff * d) * (0.5 + 0.5 * np.cos(np.pi * d / reach))).astype(
            np.float32)

    # one row per phase when that table is small; else (an odd rate pair, or a big ratio: a
    # hostile header can ask for both) the rows of each block, worked out as it goes
    table = weights(np.arange(up)) if up * len(taps) <= _MAX_TABLE else None
    n_out = len(x) * up // down
    k = np.arange(n_out, dtype=np.int64)
    base, phase = np.divmod(k * down, up)
    padded = np.concatenate([np.zeros(reach, np.float32), x, np.zeros(reach + 1, np.float32)])
    out = np.empty(n_out, dtype=np.float32)
    block = max(1, min(8192, _MAX_TABLE // len(taps)))  # (block, taps) arrays stay small
    for lo in range(0, n_out, block):
        idx = base[lo:lo + block, None] + (taps + reach)
        rows = table[phase[lo:lo + block]] if table is not None \
            else weights(phase[lo:lo + block])
        out[lo:lo + block] = np.einsum("ij,ij->i", padded[idx], rows)
    return out


def fit_clip(x: np.ndarray, clip_samples: int) -> np.ndarray:
    """A recording -> exactly `clip_samples` samples: a shorter one is centered in silence;
    of a longer one, the stretch of `clip_samples` with the most energy (where a word is)."""
    x = np.asarray(x, dtype=np.float32)
    if len(x) == clip_samples:
        return x
    if len(x) < clip_samples:
        out = np.zeros(clip_samples, dtype=np.float32)
        start = (clip_samples - len(x)) // 2
        out[start:start + len(x)] = x
        return out
    energy = np.concatenate([[0.0], np.cumsum(np.square(x, dtype=np.float64))])
    start = int(np.argmax(energy[clip_samples:] - energy[:-clip_samples]))
    return x[start:start + clip_samples].copy()


def to_clip(samples: np.ndarray, rate: int, spec: dict[str, Any]) -> np.ndarray:
    """Decoded samples at `rate` -> one clip as the bundle's log-mel record wants it:
    resampled to its sample rate and fitted to its length."""
    x = resample(samples, rate, int(spec["sample_rate"]))
    return fit_clip(x, int(spec["clip_samples"]))


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    """The HTK mel scale."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float,
                   fmax: float) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters, peaks 1, equally spaced on the HTK mel
    scale between fmin and fmax (no area normalization)."""
    freqs = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs - lo) / np.maximum(mid - lo, 1e-9)
    falling = (hi - freqs) / np.maximum(hi - mid, 1e-9)
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def frame_count(clip_samples: int, win: int, hop: int) -> int:
    return 1 + (clip_samples - win) // hop


_cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _tables(sample_rate: int, n_fft: int, win: int, n_mels: int, fmin: float,
            fmax: float) -> tuple[np.ndarray, np.ndarray]:
    """The Hann window and the filterbank (transposed), made once per parameter set."""
    key = (sample_rate, n_fft, win, n_mels, fmin, fmax)
    hit = _cache.get(key)  # one read: another thread may clear the cache at any time
    if hit is not None:
        return hit
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)).astype(np.float32)
    fb = np.ascontiguousarray(mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax).T)
    if len(_cache) >= 4:  # a device serves one bundle (two during a shadow run)
        _cache.clear()
    _cache[key] = (window, fb)
    return window, fb


def log_mel(x: np.ndarray, *, sample_rate: int, n_fft: int, win: int, hop: int, n_mels: int,
            fmin: float, fmax: float, log_floor: float) -> np.ndarray:
    """Clips (N, samples) -> log-mel features (N, n_mels, frames), float32: frames of `win`
    samples every `hop`, Hann-windowed, zero-padded to `n_fft`, power spectrum, mel bands,
    ln(max(band power, log_floor))."""
    x = np.asarray(x, dtype=np.float32)
    # in blocks of clips whose spectra together stay within about 4M values (32 MB)
    per_clip = (max(x.shape[-1] - win, 0) // hop + 1) * (n_fft // 2 + 1)
    block = max(1, min(64, (1 << 22) // per_clip))
    if len(x) > block:
        params = dict(sample_rate=sample_rate, n_fft=n_fft, win=win, hop=hop, n_mels=n_mels,
                      fmin=fmin, fmax=fmax, log_floor=log_floor)
        return np.concatenate([log_mel(x[i:i + block], **params)
                               for i in range(0, len(x), block)])
    window, fb = _tables(sample_rate, n_fft, win, n_mels, fmin, fmax)
    frames = np.lib.stride_tricks.sliding_window_view(x, win, axis=-1)[..., ::hop, :]
    spec = np.fft.rfft(frames * window, n=n_fft, axis=-1)
    power = (spec.real ** 2 + spec.imag ** 2).astype(np.float32)
    # einsum's own loops, not BLAS: a threaded BLAS on a busy device took 10 ms for this
    # 1 M-MAC product (threads spinning for cores), einsum 0.4 ms
    mel = np.einsum("nfk,km->nfm", power, fb)  # (N, frames, n_mels)
    return np.log(np.maximum(mel, np.float32(log_floor))).transpose(0, 2, 1).astype(np.float32)


AUDIO_SUFFIXES = (".wav", ".wave", ".pcm", ".raw")


def clip_of(data: bytes, spec: dict[str, Any], *, wav: bool, what: str,
            rate: int | None = None, big_endian: bool = False) -> np.ndarray:
    """A WAV file's (`wav`) or raw 16-bit mono PCM's bytes -> one clip for the bundle's
    log-mel record (resampled to its rate; raw PCM is at `rate`, by default the bundle's).
    ValueError (one line) when the bundle does not take audio or the bytes are not audio."""
    if spec.get("kind") != "log-mel":
        raise ValueError(f"{what}: this bundle takes {spec.get('kind')!r} inputs, not audio "
                         "(give a .npy or .npz)")
    if wav:
        samples, rate = read_wav(data, what)
    else:
        samples = read_pcm(data, what, big_endian)
        rate = int(spec["sample_rate"]) if rate is None else rate
        if not MIN_RATE <= rate <= MAX_RATE:
            raise ValueError(f"{what}: sample rate {rate} Hz, expected {MIN_RATE} to {MAX_RATE}")
        if len(samples) > MAX_SECONDS * rate:
            raise ValueError(f"{what}: {len(samples) / rate:.1f} s of audio, at most "
                             f"{MAX_SECONDS:g} s")
    return to_clip(samples, rate, spec)
