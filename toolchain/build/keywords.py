"""The built-in keyword-spotting data (`--data keywords`): spoken command words synthesized
with espeak-ng over many voices, speeds and pitches, placed at a random time in a 1 s clip at
16 kHz and mixed with background noise at a random SNR; plus "silence" (noise only) and
"unknown" (other words). Nothing is downloaded: espeak-ng is Debian's package.

A voice is an espeak-ng accent with a voice variant (en-gb-scotland+f2). A fixed share of
the voices is held out: their clips form the test split and are never trained or validated
on, so the test accuracy is the accuracy on voices the model has not heard.

Synthesis (espeak-ng in parallel processes, a deadline per call) is the slow part; its
result, the trimmed speech of every clip at 16 kHz, is cached in the user's data folder,
keyed by the generator's parameters and the espeak-ng version. Mixing with noise is cheap
and done on every load, from the seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from runtime import audio
from toolchain.errors import UsageError

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
LABELS = (*KEYWORDS, "silence", "unknown")
# other words, the "unknown" class (several sound like a keyword: the model must tell them)
OTHER_WORDS = ("bed", "bird", "cat", "dog", "happy", "house", "tree", "wow", "zero", "one",
               "two", "three", "four", "five", "six", "seven", "eight", "nine", "learn",
               "follow", "forward", "backward", "visual", "yellow", "dune", "top", "dawn",
               "light", "note", "of")
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp",
           "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
RATE = 16000
CLIP = 16000
CALL_DEADLINE_S = 20.0
WORKERS = 2


@dataclass(frozen=True)
class KeywordConfig:
    """What the synthesized speech depends on (the cache key, with espeak-ng's version)."""

    per_keyword: int = 220  # clips of each keyword
    unknown: int = 330  # clips of other words
    silence: int = 260  # noise-only clips (not synthesized)
    held_out_share: float = 0.2  # of the voices: their clips are the test split
    speed_wpm: tuple[int, int] = (110, 220)
    pitch: tuple[int, int] = (15, 85)
    seed: int = 1234


def voices() -> list[str]:
    return [f"{a}+{v}" for a in ACCENTS for v in VARIANTS]


def held_out_voices(cfg: KeywordConfig) -> list[str]:
    """A fixed, seeded share of the voices, drawn across accents and variants."""
    all_voices = voices()
    rng = np.random.default_rng([cfg.seed, 0x766F6963])
    n = max(1, round(len(all_voices) * cfg.held_out_share))
    return sorted(all_voices[i] for i in rng.choice(len(all_voices), n, replace=False))


def espeak_version(binary: str | None = None) -> str:
    binary = binary or shutil.which("espeak-ng")
    if binary is None:
        raise UsageError("--data keywords synthesizes its clips with espeak-ng, which is not "
                         "installed: `apt-get install espeak-ng` (Debian/Ubuntu), or run "
                         "`./dev setup`")
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=CALL_DEADLINE_S, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise UsageError(f"espeak-ng does not run ({exc}): reinstall it with "
                         "`apt-get install espeak-ng`") from exc
    found = re.search(r"text-to-speech:\s*(\S+)", out)
    return f"espeak-ng {found.group(1) if found else out.strip()[:60]}"


@dataclass
class Speech:
    """The synthesized words: trimmed int16 speech at 16 kHz, one clip per row of `meta`."""

    samples: np.ndarray  # int16, every clip's speech end to end
    offsets: np.ndarray  # int64 (n + 1,): clip i is samples[offsets[i]:offsets[i + 1]]
    word: np.ndarray  # int64: index into LABELS
    voice: np.ndarray  # int64: index into voices()


def plan(cfg: KeywordConfig) -> list[tuple[str, str, int, int, int]]:
    """Every clip to synthesize: (text, voice, speed, pitch, label index)."""
    rng = np.random.default_rng(cfg.seed)
    vs = voices()
    jobs = []
    words = [(w, i) for i, w in enumerate(KEYWORDS) for _ in range(cfg.per_keyword)]
    words += [(OTHER_WORDS[k % len(OTHER_WORDS)], LABELS.index("unknown"))
              for k in range(cfg.unknown)]
    for text, label in words:
        jobs.append((text, vs[int(rng.integers(len(vs)))],
                     int(rng.integers(cfg.speed_wpm[0], cfg.speed_wpm[1] + 1)),
                     int(rng.integers(cfg.pitch[0], cfg.pitch[1] + 1)), label))
    return jobs


def cache_path(cfg: KeywordConfig, version: str) -> Path:
    from toolchain.paths import user_data_dir

    key = json.dumps({"config": asdict(cfg), "espeak": version, "voices": voices(),
                      "words": [KEYWORDS, OTHER_WORDS], "format": 1}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return user_data_dir() / "keywords" / f"speech-{digest}.npz"


def _check_speech(speech: Speech, clips: int) -> None:
    """A cache file something else may have damaged: every clip's slice must exist."""
    o, n = speech.offsets, len(speech.samples)
    if not (o.ndim == 1 and len(o) == clips + 1 and o[0] == 0 and o[-1] == n
            and np.all(np.diff(o) >= 0) and len(speech.word) == len(speech.voice) == clips
            and speech.word.min(initial=0) >= 0 and speech.word.max(initial=0) < len(LABELS)
            and speech.voice.min(initial=0) >= 0
            and speech.voice.max(initial=0) < len(voices())):
        raise ValueError("its offsets, words or voices do not describe the planned clips")


def synthesize(cfg: KeywordConfig, log: Callable[[str], None] = print,
               binary: str | None = None) -> Speech:
    """The speech of every planned clip: from the cache when it is there, else synthesized
    (espeak-ng in WORKERS processes at a time) and cached."""
    binary = binary or shutil.which("espeak-ng")
    version = espeak_version(binary)
    path = cache_path(cfg, version)
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                speech = Speech(f["samples"], f["offsets"], f["word"], f["voice"])
            _check_speech(speech, len(plan(cfg)))
            return speech
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            log(f"keyword cache {path} unreadable ({exc}): synthesizing again")
    jobs = plan(cfg)
    log(f"synthesizing {len(jobs)} clips with {version} ({WORKERS} processes; cached in "
        f"{path.parent} for the next build)")
    vs = voices()
    with tempfile.TemporaryDirectory(prefix="edgepack-espeak-") as tmp:
        def one(k: int) -> np.ndarray:
            text, voice, speed, pitch, _ = jobs[k]
            wav = Path(tmp) / f"{k}.wav"
            try:
                subprocess.run([binary, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w",
                                str(wav), text], capture_output=True, timeout=CALL_DEADLINE_S,
                               check=True)
                samples, rate = audio.read_wav(wav.read_bytes(), f"espeak-ng output for {text!r}")
            except subprocess.TimeoutExpired as exc:
                raise UsageError(f"espeak-ng took over {CALL_DEADLINE_S:g} s for {text!r} "
                                 f"({voice})") from exc
            except (OSError, subprocess.CalledProcessError, ValueError) as exc:
                detail = getattr(exc, "stderr", b"") or b""
                raise UsageError(f"espeak-ng failed for {text!r} ({voice}): "
                                 f"{detail.decode(errors='replace').strip() or exc}") from exc
            finally:
                wav.unlink(missing_ok=True)
            return _trim(audio.resample(samples, rate, RATE))

        clips: list[np.ndarray] = []
        with ThreadPoolExecutor(WORKERS) as pool:  # each thread waits on its own process
            for k, clip in enumerate(pool.map(one, range(len(jobs)))):
                clips.append(clip)
                if (k + 1) % 250 == 0 or k + 1 == len(jobs):
                    log(f"  synthesized {k + 1}/{len(jobs)}")
    lengths = np.array([len(c) for c in clips], dtype=np.int64)
    speech = Speech(
        samples=np.concatenate(clips) if clips else np.zeros(0, np.int16),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        word=np.array([j[4] for j in jobs], dtype=np.int64),
        voice=np.array([vs.index(j[1]) for j in jobs], dtype=np.int64))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".speech-", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, samples=speech.samples, offsets=speech.offsets, word=speech.word,
                     voice=speech.voice)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return speech


def _trim(x: np.ndarray) -> np.ndarray:
    """Speech without espeak-ng's leading and trailing silence, as int16 (at most 1 s kept
    around the loudest part)."""
    loud = np.flatnonzero(np.abs(x) > 0.02 * max(float(np.abs(x).max()), 1e-6))
    if len(loud):
        x = x[loud[0]:loud[-1] + 1]
    x = audio.fit_clip(x, CLIP) if len(x) > CLIP else x
    return np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)


def noise(n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """n clips of background noise, unit RMS: white, pink-ish, brown-ish or mains hum with
    hiss, chosen at random per clip."""
    white = rng.standard_normal((n, length)).astype(np.float32)
    kind = rng.integers(0, 4, n)
    out = white.copy()
    spectrum = np.fft.rfft(white, axis=1)
    f = np.maximum(np.arange(spectrum.shape[1]), 1.0)
    pink = np.fft.irfft(spectrum / np.sqrt(f), n=length, axis=1)
    brown = np.fft.irfft(spectrum / f, n=length, axis=1)
    t = np.arange(length) / RATE
    hum = (np.sin(2 * np.pi * rng.choice([50.0, 60.0], (n, 1)) * t)
           + 0.5 * np.sin(2 * np.pi * rng.choice([100.0, 120.0], (n, 1)) * t)) + 0.3 * white
    out[kind == 1] = pink[kind == 1]
    out[kind == 2] = brown[kind == 2]
    out[kind == 3] = hum[kind == 3]
    return (out / np.maximum(np.sqrt(np.mean(out ** 2, axis=1, keepdims=True)), 1e-9)).astype(
        np.float32)


def mix(speech: np.ndarray, rng: np.random.Generator, snr_db: tuple[float, float] = (5, 30),
        level_db: tuple[float, float] = (-40, -18), gain_db: float = 0.0) -> np.ndarray:
    """Clips (n, CLIP) of speech plus noise: the speech's RMS set to a random level (dBFS),
    noise added at a random SNR, `gain_db` applied (a microphone's gain), clipped to
    [-1, 1] and rounded to 16-bit steps, as a recording would be. An all-zero row is a
    silence clip: noise alone at a random level."""
    if len(speech) > 256:  # in blocks: the noise's spectra stay small
        return np.concatenate([mix(speech[i:i + 256], rng, snr_db, level_db, gain_db)
                               for i in range(0, len(speech), 256)])
    n = len(speech)
    rms = np.sqrt(np.mean(speech.astype(np.float64) ** 2, axis=1, keepdims=True))
    level = 10 ** (rng.uniform(*level_db, (n, 1)) / 20)
    clean = speech * (level / np.maximum(rms, 1e-9))
    noise_rms = np.where(rms > 0, level / 10 ** (rng.uniform(*snr_db, (n, 1)) / 20),
                         10 ** (rng.uniform(-70, -35, (n, 1)) / 20))
    x = (clean + noise(n, speech.shape[1], rng) * noise_rms) * 10 ** (gain_db / 20)
    return (np.round(np.clip(x, -1.0, 1.0) * 32767.0) / 32768.0).astype(np.float32)


def clips(speech: Speech, indices: np.ndarray, rng: np.random.Generator,
          max_shift: float = 0.25) -> np.ndarray:
    """The speech of `indices` placed in 1 s clips, centered and shifted by up to
    `max_shift` of a second either way (cut where it would leave the clip)."""
    out = np.zeros((len(indices), CLIP), dtype=np.float32)
    for row, i in enumerate(indices):
        s = speech.samples[speech.offsets[i]:speech.offsets[i + 1]].astype(np.float32) / 32768
        start = (CLIP - len(s)) // 2 + int(rng.integers(-max_shift * RATE, max_shift * RATE + 1))
        start = int(np.clip(start, min(0, CLIP - len(s)), max(0, CLIP - len(s))))
        lo, hi = max(0, start), min(CLIP, start + len(s))
        out[row, lo:hi] = s[lo - start:hi - start]
    return out


@dataclass
class KeywordData:
    x: np.ndarray  # (n, CLIP) float32 clips in [-1, 1]
    y: np.ndarray  # int64 labels (LABELS)
    voice: np.ndarray  # int64 voice index; -1 for silence
    held_out: np.ndarray  # bool: a held-out voice's clip (silence: a seeded share)


def make(cfg: KeywordConfig, seed: int, log: Callable[[str], None] = print) -> KeywordData:
    """The whole dataset: synthesized (or cached) speech, mixed with noise from `seed`."""
    speech = synthesize(cfg, log)
    rng = np.random.default_rng([seed, 0x6B7773])
    words = clips(speech, np.arange(len(speech.word)), rng)
    x = np.concatenate([words, np.zeros((cfg.silence, CLIP), np.float32)])
    x = mix(x, rng)
    y = np.concatenate([speech.word, np.full(cfg.silence, LABELS.index("silence"))])
    voice = np.concatenate([speech.voice, np.full(cfg.silence, -1)])
    held = set(held_out_voices(cfg))
    vs = voices()
    held_out = np.array([v >= 0 and vs[v] in held for v in voice])
    silence = voice < 0  # no voice: the same share as the voices goes to the test split
    held_out[silence] = np.random.default_rng([cfg.seed, 0x73696C]).random(silence.sum()) \
        < cfg.held_out_share
    return KeywordData(x, y.astype(np.int64), voice, held_out)


DRIFTS = ("none", "voice", "noise", "gain")


def drift_examples(kind: str, cfg: KeywordConfig, n: int, seed: int,
                   log: Callable[[str], None] = print) -> np.ndarray:
    """n clips for the fleet's drift checks, from the cached speech with a fresh mix:
    "none": the training voices, mixed as the build mixes (in distribution); "voice": the
    held-out voices only (a voice the model never heard); "noise": the training voices under
    background noise at -5 to 5 dB SNR; "gain": the training voices through a microphone
    with 12 dB more gain, clipping the loud ones. Silence clips (noise alone) take the
    share they have in the build, so the class mix stays the build's."""
    if kind not in DRIFTS:
        raise ValueError(f"drift kind {kind!r}: one of {', '.join(DRIFTS)}")
    speech = synthesize(cfg, log)
    held = {voices().index(v) for v in held_out_voices(cfg)}
    is_held = np.isin(speech.voice, list(held))
    pool = np.flatnonzero(is_held if kind == "voice" else ~is_held)
    rng = np.random.default_rng([seed, DRIFTS.index(kind), 0x647269])
    silent = round(n * cfg.silence / (len(speech.word) + cfg.silence))  # as in the build
    pick = rng.choice(pool, n - silent, replace=n - silent > len(pool))
    x = np.concatenate([clips(speech, pick, rng), np.zeros((silent, CLIP), np.float32)])
    x = x[rng.permutation(n)]
    if kind == "noise":
        return mix(x, rng, snr_db=(-5, 5))
    return mix(x, rng, gain_db=12.0 if kind == "gain" else 0.0)
