"""The keyword-spotting demo: WAV/PCM reading and log-mel features (runtime.audio, numpy
only), the 'log-mel' preprocessing record, espeak-ng synthesis, and (slow) a small keyword
bundle built end to end, run torch-free from WAV files, served, and watched for drift."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from runtime import audio, preprocess
from tests.conftest import REPO, assert_exit, run_cmd

RATE = 16000


def tone(freq: float, seconds: float = 1.0, rate: int = RATE, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(
        np.float32)


def wav_bytes(payload: bytes, *, tag: int = 1, channels: int = 1, rate: int = RATE,
              bits: int = 16, declared: int | None = None, extensible: bool = False) -> bytes:
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 0xFFFE if extensible else tag, channels, rate, rate * block,
                      block, bits)
    if extensible:
        fmt += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", tag) + b"\0" * 14
    size = len(payload) if declared is None else declared
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + \
        struct.pack("<I", size) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


# -- features ---------------------------------------------------------------------------------
def direct_log_mel(x: np.ndarray, p: dict) -> np.ndarray:
    """The features written out the slow way: frame by frame, band by band, from the HTK
    formula (float64)."""
    n_fft, win, hop, n_mels = p["n_fft"], p["win"], p["hop"], p["n_mels"]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    edges_mel = np.linspace(mel(p["fmin"]), mel(p["fmax"]), n_mels + 2)
    edges = 700 * (10 ** (edges_mel / 2595) - 1)
    freqs = np.arange(n_fft // 2 + 1) * p["sample_rate"] / n_fft
    frames = 1 + (len(x) - win) // hop
    out = np.zeros((n_mels, frames))
    for t in range(frames):
        power = np.abs(np.fft.rfft(x[t * hop:t * hop + win] * window, n=n_fft)) ** 2
        for m in range(n_mels):
            lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
            w = np.clip(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0, None)
            out[m, t] = np.log(max(float(power @ w), p["log_floor"]))
    return out


def test_log_mel_matches_a_direct_computation_and_a_tone_peaks_in_its_band():
    spec = preprocess.log_mel_record([0.0], [1.0])
    x = tone(1000.0) + 0.01 * np.random.default_rng(0).standard_normal(RATE).astype(np.float32)
    got = preprocess.features(spec)(x[None])
    assert got.shape == (1, 1, 40, 98) and got.dtype == np.float32
    want = direct_log_mel(x.astype(np.float64), spec)
    np.testing.assert_allclose(got[0, 0], want, atol=2e-3, rtol=1e-4)
    # 1 kHz is the peak of the band whose centre is nearest it on the mel scale
    centres = audio.mel_to_hz(np.linspace(audio.hz_to_mel(20), audio.hz_to_mel(8000), 42))[1:-1]
    assert got[0, 0].mean(axis=1).argmax() == np.abs(centres - 1000).argmin()
    # silence sits on the floor; batches give the same rows as single clips
    assert np.allclose(preprocess.features(spec)(np.zeros((1, RATE)))[0], np.log(1e-6))
    batch = np.stack([x, tone(300.0), tone(3000.0)])
    np.testing.assert_array_equal(preprocess.apply(spec, batch)[1:2],
                                  preprocess.apply(spec, batch[1:2]))


def test_resample_keeps_a_tone_and_removes_what_the_new_rate_cannot_hold():
    y = audio.resample(tone(440.0, rate=22050), 22050, RATE)
    assert len(y) == RATE
    assert np.abs(y[64:-64] - tone(440.0)[64:-64]).max() < 1e-3
    assert np.abs(audio.resample(tone(440.0, rate=8000), 8000, RATE)[64:-64]
                  - tone(440.0)[64:-64]).max() < 1e-3
    alias = audio.resample(tone(10000.0, rate=22050), 22050, RATE)  # above 8 kHz
    assert np.sqrt(np.mean(alias[64:-64] ** 2)) < 0.01


def test_fit_clip_centres_short_and_keeps_the_loudest_second_of_long():
    short = audio.fit_clip(np.ones(100, np.float32), 1000)
    assert short.shape == (1000,) and short[450:550].all() and not short[:450].any()
    long = np.zeros(5000, np.float32)
    long[3000:3200] = 1.0
    kept = audio.fit_clip(long, 1000)
    assert kept.shape == (1000,) and kept.sum() == 200


# -- WAV and PCM ------------------------------------------------------------------------------
@pytest.mark.parametrize("tag,bits,dtype,scale", [
    (1, 16, "<i2", 32767), (1, 32, "<i4", 2**31 - 1), (3, 32, "<f4", 1.0)])
def test_wav_formats_read_to_the_same_samples(tag, bits, dtype, scale):
    x = tone(500.0, 0.1)
    raw = (x.astype(np.float64) * scale).astype(dtype).tobytes()
    for extensible in (False, True):
        got, rate = audio.read_wav(wav_bytes(raw, tag=tag, bits=bits, extensible=extensible))
        assert rate == RATE
        np.testing.assert_allclose(got, x, atol=1e-4)


def test_wav_8_and_24_bit_and_stereo():
    x = tone(500.0, 0.1)
    u8 = np.round(x * 127 + 128).astype(np.uint8).tobytes()
    np.testing.assert_allclose(audio.read_wav(wav_bytes(u8, bits=8))[0], x, atol=0.01)
    v = np.round(x * (2**23 - 1)).astype(np.int64)
    b24 = np.stack([v & 255, (v >> 8) & 255, (v >> 16) & 255], axis=1).astype(np.uint8)
    np.testing.assert_allclose(audio.read_wav(wav_bytes(b24.tobytes(), bits=24))[0], x,
                               atol=1e-5)
    stereo = np.stack([x, x], axis=1)  # both channels the tone: their mean is the tone
    pcm = (stereo * 32767).astype("<i2").tobytes()
    np.testing.assert_allclose(audio.read_wav(wav_bytes(pcm, channels=2))[0], x, atol=1e-4)
    written = audio.write_wav(x, 22050)
    got, rate = audio.read_wav(written)
    assert rate == 22050 and np.abs(got - x).max() < 1e-4


@pytest.mark.parametrize("data,words", [
    (b"", "not a WAV file"),
    (b"RIFF\0\0\0\0WAVX" + b"\0" * 40, "not a WAV file"),
    (wav_bytes(b"\0" * 100, declared=2**31), "truncated"),
    (wav_bytes(b"\0" * 100)[:-50], "truncated"),
    (wav_bytes(b"\0" * 100, tag=2, bits=4), "format 2"),
    (wav_bytes(b"\0" * 100, channels=0), "0 channels"),
    (wav_bytes(b"\0" * 100, rate=10), "sample rate 10"),
    (wav_bytes(np.array([np.nan], "<f4").tobytes(), tag=3, bits=32), "NaN"),
    (b"RIFF\0\0\0\0WAVE" + b"junk\0\0\0\0" * 80, "no 'data' chunk"),
    (b"RIFF\0\0\0\0WAVEfmt \x04\0\0\0\0\0\0\0", "truncated 'fmt '"),
    (b"RIFF" + b"\0" * 4 + b"WAVE" + b"\0" * (audio.MAX_AUDIO_BYTES + 1), "at most"),
    (wav_bytes(b"\0" * 2 * RATE * 61), "at most 60 s"),
])
def test_hostile_wav_is_one_line_of_error(data, words):
    with pytest.raises(ValueError, match=words) as err:
        audio.read_wav(data, "clip.wav")
    assert "\n" not in str(err.value) and str(err.value).startswith("clip.wav")


def test_raw_pcm():
    x = tone(500.0, 0.1)
    pcm = (x * 32767).astype("<i2").tobytes()
    np.testing.assert_allclose(audio.read_pcm(pcm), x, atol=1e-4)
    np.testing.assert_allclose(audio.read_pcm((x * 32767).astype(">i2").tobytes(),
                                              big_endian=True), x, atol=1e-4)
    with pytest.raises(ValueError, match="whole number of 16-bit samples"):
        audio.read_pcm(b"\0\0\0")


# -- the preprocessing record -----------------------------------------------------------------
@pytest.mark.parametrize("change,words", [
    ({"sample_rate": 100}, "'sample_rate' must be an integer"),
    ({"n_fft": 500}, "power of two"),
    ({"hop": 500}, "hop <= win"),
    ({"n_mels": 1000}, "'n_mels' must be an integer"),
    ({"fmax": 9000.0}, "fmax <= sample_rate / 2"),
    ({"log_floor": 0}, "log_floor"),
    ({"win": True}, "'win' must be an integer"),
    ({"mean": [0.0] * 3}, "'mean' must be a list of 1 or 40"),
    ({"std": [0.0]}, "none zero"),
    ({"std": [float("nan")]}, "'std'"),
    ({"clip_samples": 192000, "hop": 1, "win": 16, "n_fft": 32}, "at most 65536"),
])
def test_log_mel_record_is_checked_as_hostile_input(change, words):
    spec = {**preprocess.log_mel_record([0.0], [1.0]), **change}
    with pytest.raises(ValueError, match=words):
        preprocess.check(spec, (spec["clip_samples"],))


def test_log_mel_record_fits_only_clips_of_its_length():
    spec = preprocess.log_mel_record([0.0] * 40, [1.0] * 40)
    preprocess.check(spec, (16000,))
    with pytest.raises(ValueError, match=r"clips of shape \(16000,\)"):
        preprocess.check(spec, (1, 16000))
    with pytest.raises(ValueError, match="unknown preprocessing 'mfcc'"):
        preprocess.check({"kind": "mfcc"}, (16000,))
    mean, std = preprocess.constants(spec)
    assert mean.shape == std.shape == (1, 1, 40, 1)
    assert preprocess.drift_view(spec, np.zeros((2, 16000))).shape == (2, 40, 98)


def test_audio_into_a_bundle_that_takes_images_is_refused():
    with pytest.raises(ValueError, match="takes 'normalize' inputs, not audio"):
        audio.clip_of(audio.write_wav(tone(500.0), RATE), preprocess.normalization([0], [1]),
                      wav=True, what="a.wav")


def test_serve_parses_wav_and_l16_bodies():
    from runtime.serve import InputError, parse_inputs

    spec = preprocess.log_mel_record([0.0], [1.0])
    x = tone(700.0, 0.5, rate=22050)
    got = parse_inputs(audio.write_wav(x, 22050), "audio/wav", spec)
    assert got.shape == (1, 16000)
    l16 = (tone(700.0, 1.0) * 32767).astype(">i2").tobytes()
    got = parse_inputs(l16, "audio/L16; rate=16000; channels=1", spec)
    np.testing.assert_allclose(got[0], tone(700.0), atol=1e-4)
    for body, ctype, words in ((l16, "audio/L16; rate=abc", "whole number of Hz"),
                               (l16, "audio/L16; channels=2", "one channel"),
                               (b"RIFFxxxx", "audio/wav", "not a WAV file"),
                               (l16, "audio/L16", None)):
        if words is None:
            assert parse_inputs(body, ctype, spec).shape == (1, 16000)
            continue
        with pytest.raises(InputError, match=words):
            parse_inputs(body, ctype, spec)
    with pytest.raises(InputError, match="not audio"):
        parse_inputs(l16, "audio/L16", preprocess.normalization([0], [1]))


# -- synthesis --------------------------------------------------------------------------------
def test_plan_and_held_out_voices_are_fixed_by_the_seed():
    from toolchain.build import keywords as kw

    cfg = kw.KeywordConfig(per_keyword=5, unknown=7, silence=3)
    assert kw.plan(cfg) == kw.plan(cfg) and len(kw.plan(cfg)) == 57
    held = kw.held_out_voices(cfg)
    assert held == kw.held_out_voices(cfg) and 0 < len(held) < len(kw.voices())
    assert kw.cache_path(cfg, "1.51") != kw.cache_path(cfg, "1.52")


def test_missing_espeak_is_a_usage_error_naming_the_package(monkeypatch):
    from toolchain.build import keywords as kw
    from toolchain.errors import UsageError

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UsageError, match="apt-get install espeak-ng"):
        kw.espeak_version()


def test_mix_levels_noise_and_gain():
    from toolchain.build import keywords as kw

    rng = np.random.default_rng(0)
    speech = np.zeros((4, RATE), np.float32)
    speech[:2, 4000:8000] = tone(300.0, 0.25)
    x = kw.mix(speech, rng)
    assert x.shape == (4, RATE) and np.abs(x).max() < 1.0
    assert np.allclose(x * 32768, np.round(x * 32768))  # 16-bit steps
    loud = kw.mix(speech, np.random.default_rng(0), gain_db=40.0)
    assert np.abs(loud).max() == pytest.approx(32767 / 32768)  # clipped


# -- end to end (slow) --------------------------------------------------------------------------
N_PER_KEYWORD = 24


@pytest.fixture(scope="module")
def kws_bundle(tmp_path_factory) -> tuple[Path, dict]:
    """A keyword bundle from a small synthesis (24 clips a keyword) and a short build."""
    out = tmp_path_factory.mktemp("kws")
    proc = run_cmd(sys.executable, "-m", "toolchain", "build", "--target", "smart-speaker",
                   "--data", f"keywords:{N_PER_KEYWORD}", "--epochs", "2",
                   "--set", "prune.finetune_epochs=1", "--set", "distill.epochs=1",
                   "--set", "prune.steps=1",
                   "--set", "quantize.qat_epochs=1", "--bench-runs", "10",
                   "--out", out / "bundles", "--json", out / "report.json", cwd=REPO)
    if proc.returncode != 3:  # a 2-epoch model on 150 clips may miss the accuracy gate
        assert_exit(proc.returncode, 0, out / "report.json", proc.stderr + proc.stdout)
    assert "synthesizing" in proc.stderr
    (bundle,) = (out / "bundles").iterdir()
    return bundle, json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_keyword_bundle_carries_audio_and_its_feature_parameters(kws_bundle):
    from runtime.model import load

    bundle, report = kws_bundle
    assert report["target"] == "smart-speaker" and report["precision"] == "int8"
    with load(bundle) as model:
        spec = model.manifest.input.preprocessing
        assert spec["kind"] == "log-mel" and spec["n_mels"] == 40 and len(spec["mean"]) == 40
        assert model.raw_shape == (16000,)
        assert model.golden[0].shape[1:] == (16000,)  # the golden inputs are audio
        assert model.manifest.model_file.endswith(".tflite")


@pytest.mark.slow
def test_runtime_runs_wav_files_without_torch(kws_bundle, runtime_venv, tmp_path):
    from toolchain.build import keywords as kw

    bundle, _ = kws_bundle
    x = kw.drift_examples("none", _config(), 3, seed=5)
    paths = []
    for i, clip in enumerate(x):
        paths.append(tmp_path / f"clip{i}.wav")
        paths[-1].write_bytes(audio.write_wav(audio.resample(clip, RATE, 22050), 22050))
    (tmp_path / "clip.pcm").write_bytes((x[0] * 32767).astype("<i2").tobytes())
    python = runtime_venv / "bin" / "python"
    code = ("import sys, runtime.model as m, numpy as np\n"
            f"model = m.load({str(bundle)!r})\n"
            "from runtime import audio\n"
            f"x = audio.clip_of(open({str(paths[0])!r}, 'rb').read(), "
            "model.manifest.input.preprocessing, wav=True, what='a')\n"
            "print(model.labels[int(model.classify(x)[0][0])])\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() in kw.LABELS
    proc = run_cmd(python, "-m", "runtime", "run", bundle, *paths, tmp_path / "clip.pcm",
                   "--json", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["count"] == 4 and all(label in kw.LABELS for label in result["labels"])
    assert result["labels"][3] == result["labels"][0]  # the same clip as PCM and as WAV
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\0\0\0\0WAVEfmt ")
    proc = run_cmd(python, "-m", "runtime", "run", bundle, bad, cwd=REPO)
    assert proc.returncode == 2 and "bad.wav" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_serve_takes_wav_and_pcm(kws_bundle):
    from runtime.device import Device
    from runtime.serve import make_server

    bundle, _ = kws_bundle
    with Device.open(bundle) as device:
        server = make_server(device, http="127.0.0.1:0")
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            url = "http://{}:{}/v1/predict".format(*server.server_address[:2])
            clip = tone(800.0)
            for body, ctype in ((audio.write_wav(clip, RATE), "audio/wav"),
                                ((clip * 32767).astype(">i2").tobytes(),
                                 "audio/L16; rate=16000")):
                req = urllib.request.Request(url, body, {"Content-Type": ctype})
                with urllib.request.urlopen(req, timeout=30) as r:
                    answer = json.loads(r.read())
                assert len(answer["labels"]) == 1 and answer["inference_ids"]
            req = urllib.request.Request(url, b"RIFF", {"Content-Type": "audio/wav"})
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(req, timeout=30)
            assert err.value.code == 400 and "not a WAV file" in err.value.read().decode()
        finally:
            server.shutdown()
            server.server_close()


def _config():
    from toolchain.build import keywords as kw

    base = kw.KeywordConfig()
    n = N_PER_KEYWORD
    return kw.KeywordConfig(per_keyword=n, unknown=round(n * base.unknown / base.per_keyword),
                            silence=round(n * base.silence / base.per_keyword))


@pytest.mark.slow
def test_device_reports_drift_for_a_new_microphone_gain_and_noise(kws_bundle, tmp_path):
    """Windows of 200 inferences through a Device: in-distribution audio (the training
    voices, mixed afresh) against the same voices through +12 dB of gain and under noise
    at -5..5 dB SNR, and a voice never trained on (reported, not asserted: a new voice moves
    the log-mel bands far less than gain or noise). The input statistics read the log-mel
    features of the audio, so they do not depend on how well the small model learned."""
    from runtime.device import Device
    from toolchain.build import keywords as kw

    bundle, _ = kws_bundle
    drift = {}
    for kind in kw.DRIFTS:
        x = kw.drift_examples(kind, _config(), 200, seed=11)
        with Device.open(bundle, device_id="kws", spool_dir=tmp_path / kind,
                         window_inferences=10_000) as dev:
            for row in x:
                dev.classify(row[None])
            seq = dev.telemetry.flush()
            (record,) = dev.telemetry.spool.read([seq])
        drift[kind] = json.loads(record.payload)["body"]["drift"]
    summary = {k: (d["input_psi"], d["input_ks_min_p"]) for k, d in drift.items()}
    print("input PSI and the smallest per-band KS p-value by drift kind:", summary)
    assert drift["none"]["input_ks_min_p"] > 1e-3
    for kind in ("gain", "noise"):
        # (the small build's reference is some 50 clips: in-distribution PSI is about 0.13
        # here, 0.03 against the full demo's 399)
        assert drift[kind]["input_psi"] > 1.5 * drift["none"]["input_psi"], summary
        assert drift[kind]["input_ks_min_p"] < 1e-5, summary


def test_resampling_without_a_phase_table_gives_the_same_samples(monkeypatch):
    """A rate pair whose phase table would be big (an odd rate in a hostile header) works out
    each block's weights as it goes: the same result, bounded memory."""
    import numpy as np

    from runtime import audio

    x = np.sin(np.arange(22050) * 2 * np.pi * 440 / 22050).astype(np.float32)
    with_table = audio.resample(x, 22050, 16000)
    monkeypatch.setattr(audio, "_MAX_TABLE", 64)
    assert np.array_equal(with_table, audio.resample(x, 22050, 16000))
