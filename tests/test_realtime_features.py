"""Realtime features are VoxtralRealtimeFeatureExtractor's, whole or streamed in pieces of any size, as the processor
pads and chunks them, and transformers' streaming encoder takes them chunk by chunk."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import pytest
import torch
from transformers import VoxtralRealtimeConfig, VoxtralRealtimeForConditionalGeneration
from transformers.models.voxtral_realtime.feature_extraction_voxtral_realtime import VoxtralRealtimeFeatureExtractor

from conftest import speech
from voxtral_coreml.encoders.realtime.features import (
    DELAY_TOKENS,
    FRAMES_PER_TOKEN,
    GLOBAL_LOG_MEL_MAX,
    LEFT_PAD_TOKENS,
    RIGHT_PAD_TOKENS,
    SAMPLES_PER_TOKEN,
    StreamingLogMel,
    processor_audio,
    realtime_log_mel,
    samples_until_final,
)
from voxtral_coreml.features.logmel import HOP_LENGTH, N_FFT, SAMPLE_RATE
from voxtral_coreml.pipeline.errors import VoxtralError

TOLERANCE = 1e-6  # measured here: 0 (bit for bit); BLAS libraries may differ in the last bit


@functools.cache
def _extractor() -> VoxtralRealtimeFeatureExtractor:
    return VoxtralRealtimeFeatureExtractor(
        sampling_rate=SAMPLE_RATE, hop_length=HOP_LENGTH, n_fft=N_FFT, global_log_mel_max=GLOBAL_LOG_MEL_MAX
    )


def extractor_features(audio: np.ndarray, center: bool = True) -> torch.Tensor:
    features = _extractor()(audio, sampling_rate=SAMPLE_RATE, center=center, return_tensors="pt")
    return features["input_features"][0]


def streamed(audio: np.ndarray, piece: int, tokens_per_chunk: int) -> list[torch.Tensor]:
    stream = StreamingLogMel(tokens_per_chunk)
    chunks = [chunk for start in range(0, len(audio), piece) for chunk in stream.push(audio[start : start + piece])]
    assert all(chunk.shape == (128, FRAMES_PER_TOKEN * tokens_per_chunk) for chunk in chunks)
    return chunks + stream.flush()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("seconds", [12, 70])
def test_whole_clip_is_the_extractors_on_real_speech(seconds: int) -> None:
    audio = speech(seconds)
    ours = realtime_log_mel(audio)
    diff = max_diff(ours, extractor_features(audio))
    print(f"{seconds} s of speech: {ours.shape[1]} frames, max abs diff vs VoxtralRealtimeFeatureExtractor {diff:.3g}")
    assert ours.shape == (128, seconds * 100) and diff <= TOLERANCE
    assert ours.min().item() == pytest.approx((GLOBAL_LOG_MEL_MAX - 8 + 4) / 4)  # the fixed floor, reached in pauses


@pytest.mark.parametrize("n_samples", [400, 1279, 1280, 1281, 1320, 12345])
def test_n_samples_give_n_over_160_frames(n_samples: int) -> None:
    audio = speech(1)[:n_samples]
    ours = realtime_log_mel(audio)
    assert ours.shape == (128, n_samples // HOP_LENGTH)
    assert max_diff(ours, extractor_features(audio)) <= TOLERANCE


def test_processor_padding_gives_whole_tokens_around_the_audio() -> None:
    audio = speech(3.3)
    padded = processor_audio(audio)
    tokens = -(-len(audio) // SAMPLES_PER_TOKEN)
    left = LEFT_PAD_TOKENS * SAMPLES_PER_TOKEN
    assert (LEFT_PAD_TOKENS, DELAY_TOKENS, RIGHT_PAD_TOKENS) == (32, 6, 17)
    assert len(padded) == (LEFT_PAD_TOKENS + tokens + RIGHT_PAD_TOKENS) * SAMPLES_PER_TOKEN
    np.testing.assert_array_equal(padded[left : left + len(audio)], audio)
    assert not padded[:left].any() and not padded[left + len(audio) :].any()
    features = realtime_log_mel(padded)
    assert features.shape[1] == (LEFT_PAD_TOKENS + tokens + RIGHT_PAD_TOKENS) * FRAMES_PER_TOKEN
    assert max_diff(features, extractor_features(padded)) <= TOLERANCE
    assert len(processor_audio(audio, 0, 0)) == tokens * SAMPLES_PER_TOKEN


@pytest.mark.parametrize(("seconds", "piece"), [(0.5, 1), (3, 7), (3, 160), (6, 1280), (6, 1281), (6, 4000)])
@pytest.mark.parametrize("tokens_per_chunk", [1, 4])
def test_streamed_pieces_concatenate_to_the_whole_clip(seconds: float, piece: int, tokens_per_chunk: int) -> None:
    audio = speech(seconds + 37 / SAMPLE_RATE)  # N % 160 = 37 < 40: the last frame reads the mirrored end
    whole = realtime_log_mel(audio)
    chunks = streamed(audio, piece, tokens_per_chunk)
    assert all(chunk.shape[1] == FRAMES_PER_TOKEN * tokens_per_chunk for chunk in chunks[:-1])
    assert max_diff(torch.cat(chunks, dim=1), whole) <= TOLERANCE


def test_a_token_is_final_40_samples_after_its_audio_ends() -> None:
    audio = speech(1)
    stream = StreamingLogMel()
    for token in range(3):
        ready = samples_until_final(FRAMES_PER_TOKEN * (token + 1) - 1)
        assert ready == SAMPLES_PER_TOKEN * (token + 1) + 40
        assert stream.push(audio[stream.samples_received : ready - 1]) == []
        (chunk,) = stream.push(audio[ready - 1 : ready])
        assert max_diff(chunk, realtime_log_mel(audio)[:, token * 8 : token * 8 + 8]) <= TOLERANCE
    assert samples_until_final(0) == N_FFT // 2 + 1  # the left reflection reads sample 200


def test_aligned_80_ms_pieces_emit_each_token_one_piece_later() -> None:
    audio = speech(2)
    stream = StreamingLogMel()
    emitted = [len(stream.push(audio[i : i + SAMPLES_PER_TOKEN])) for i in range(0, len(audio), SAMPLES_PER_TOKEN)]
    assert emitted == [0] + [1] * (len(emitted) - 1)
    assert [chunk.shape[1] for chunk in stream.flush()] == [FRAMES_PER_TOKEN]


def test_flush_starts_a_new_stream() -> None:
    audio = speech(1.01)
    stream = StreamingLogMel()
    first = stream.push(audio) + stream.flush()
    assert stream.samples_received == 0 and stream.frames_emitted == 0
    second = stream.push(audio) + stream.flush()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_the_processors_streaming_chunks_are_our_streams() -> None:
    """VoxtralRealtimeProcessor streaming, as transformers' model doc drives it: the first call gets the left-pad
    silence plus 9000 samples (center=True), every later call 1680 samples (center=False) for 8 frames."""
    audio = speech(6)
    first_frames = (DELAY_TOKENS + 1) * FRAMES_PER_TOKEN  # processor.num_mel_frames_first_audio_chunk
    first_samples = (first_frames - 1) * HOP_LENGTH + N_FFT // 2  # processor.num_samples_first_audio_chunk
    per_call = FRAMES_PER_TOKEN * HOP_LENGTH + N_FFT  # processor.num_samples_per_audio_chunk
    left_pad = np.zeros(LEFT_PAD_TOKENS * SAMPLES_PER_TOKEN, dtype=np.float32)
    theirs = [extractor_features(np.concatenate([left_pad, audio[:first_samples]]))]
    frame = first_frames
    while (start := frame * HOP_LENGTH - N_FFT // 2) + per_call < len(audio):
        theirs.append(extractor_features(audio[start : start + per_call], center=False))
        frame += FRAMES_PER_TOKEN
    assert theirs[0].shape[1] == (LEFT_PAD_TOKENS + DELAY_TOKENS + 1) * FRAMES_PER_TOKEN == 312
    assert {chunk.shape[1] for chunk in theirs[1:]} == {FRAMES_PER_TOKEN}
    ours = streamed(np.concatenate([left_pad, audio]), SAMPLES_PER_TOKEN, tokens_per_chunk=1)
    ours = [torch.cat(ours[: LEFT_PAD_TOKENS + DELAY_TOKENS + 1], dim=1), *ours[LEFT_PAD_TOKENS + DELAY_TOKENS + 1 :]]
    assert len(theirs) > 30
    for mine, reference in zip(ours, theirs, strict=False):
        assert max_diff(mine, reference) <= TOLERANCE


def test_transformers_streaming_encoder_takes_our_chunks() -> None:
    """get_audio_features with padding_cache and cache, fed our chunks (the first one 39 tokens as the processor's),
    gives the whole padded clip's embeddings."""
    torch.manual_seed(0)
    config = VoxtralRealtimeConfig(
        audio_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "head_dim": 16, "sliding_window": 750},
        text_config={"hidden_size": 48, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                     "num_key_value_heads": 1, "head_dim": 48, "vocab_size": 16},
    )  # fmt: skip
    model = VoxtralRealtimeForConditionalGeneration(config).eval()
    audio = processor_audio(speech(2))
    chunks = streamed(audio, SAMPLES_PER_TOKEN, tokens_per_chunk=1)
    first = LEFT_PAD_TOKENS + DELAY_TOKENS + 1
    chunks = [torch.cat(chunks[:first], dim=1), *chunks[first:]]
    with torch.no_grad():
        whole = model.get_audio_features(input_features=realtime_log_mel(audio)[None]).pooler_output
        cache = padding_cache = None
        steps = []
        for chunk in chunks:
            out = model.get_audio_features(
                input_features=chunk[None], cache=cache, padding_cache=padding_cache, use_cache=True
            )
            cache, padding_cache = out.cache, out.padding_cache
            steps.append(out.pooler_output)
    assert whole.shape == (1, len(audio) // SAMPLES_PER_TOKEN, 48)
    diff = max_diff(torch.cat(steps, dim=1), whole)
    print(f"streamed vs whole-clip embeddings: max abs diff {diff:.3g} (max |whole| {whole.abs().max().item():.3g})")
    assert diff <= 1e-5


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: realtime_log_mel(speech(1)[:399]), "399 samples is shorter than one 400-sample frame"),
        (lambda: realtime_log_mel(np.stack([speech(1)] * 2, axis=1)), r"mono samples \[N\], got shape \[16000, 2\]"),
        (lambda: StreamingLogMel().push(np.full(500, np.nan)), "NaN or Inf"),
        (lambda: StreamingLogMel(0), "tokens_per_chunk must be at least 1, got 0"),
    ],
)
def test_bad_input_is_one_clear_line(make: Callable[[], object], match: str) -> None:
    with pytest.raises(VoxtralError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


def test_a_stream_shorter_than_one_frame_is_refused_at_flush_and_reset() -> None:
    stream = StreamingLogMel()
    assert stream.push(speech(1)[:300]) == []
    with pytest.raises(VoxtralError, match="300 samples is shorter than one 400-sample frame"):
        stream.flush()
    assert stream.samples_received == 0
