"""Voxtral Realtime's log-mel features, for a whole clip and incrementally as audio arrives from a microphone.

The math is `VoxtralRealtimeFeatureExtractor`'s: Voxtral's STFT and mel filters (`features`), the last STFT frame
dropped, but the log floor is the fixed `GLOBAL_LOG_MEL_MAX` - 8 instead of the clip's maximum - 8, and nothing is
padded to 30 s. So a frame depends only on the 400 samples under its window, and features can stream.

Frames: N samples give N // 160 frames (torch.stft with center=True gives 1 + N // 160; the last is dropped).
Frame t is centred on sample 160 t and reads samples [160 t - 200, 160 t + 200); at the edges the STFT reflects the
clip (frames 0 and 1 read samples of x[1..200] mirrored, the last frame up to 40 mirrored samples at the end).
The encoder needs 8 frames per token (conv2's stride 2, then the projector's 4 frames): 1280 samples, 80 ms.

What `VoxtralRealtimeProcessor` adds (mistral-common's audio encoder, with the real model's tekken.json: 32 left-pad
tokens, a 480 ms delay = 6 tokens): the offline call pads the audio with 32 tokens of zeros on the left, and on the
right up to whole tokens plus 6 + 1 + 10 = 17 tokens (`processor_audio`); it also round-trips the audio through a
16-bit WAV, which changes nothing for audio read from 16-bit files. Its streaming call prepends the same 32 tokens of
zeros to the first chunk, so streamed frames are the offline frames of the left-padded audio.

Streaming look-ahead and latency (`StreamingLogMel`): frame t is final once sample 160 t + 199 has arrived (frame 0:
sample 200, which the left reflection reads). A token's last frame is centred 160 samples before the token's end, so
token j (frames 8j..8j+7) is final 40 samples (2.5 ms) after its 80 ms of audio ends: the STFT adds 2.5 ms of
latency, the `streaming_look_ahead_ms` of the model's tokenizer config. With microphone pieces of 1280 samples
aligned to tokens, that means token j is emitted when piece j + 1 arrives, 80 ms after its own audio; pieces of P
samples wait 40 samples rounded up to a whole piece. At the end of the stream `flush` mirrors the last samples, as
the whole-clip STFT does, for the last frame (when N % 160 < 40), and returns the frames short of a whole chunk.
"""

from __future__ import annotations

import numpy as np
import torch

from voxtral_coreml.features.logmel import (
    HOP_LENGTH,
    MIN_SAMPLES,
    N_FFT,
    mel_filters,
    normalized_log_mel,
    power_spectrogram,
)
from voxtral_coreml.pipeline.errors import VoxtralError

from .dims import MEL_FRAMES_PER_TOKEN as FRAMES_PER_TOKEN  # 8: conv2's stride 2, then 4 frames

GLOBAL_LOG_MEL_MAX = 1.5  # VoxtralRealtimeFeatureExtractor's fixed log ceiling: the floor is 1.5 - 8
SAMPLES_PER_TOKEN = FRAMES_PER_TOKEN * HOP_LENGTH  # 1280: 80 ms, one token
LOOKAHEAD = N_FFT // 2  # 200: a centred frame reads this many samples past its centre
LEFT_PAD_TOKENS = 32  # tekken.json `streaming_n_left_pad_tokens`: silence the processor puts before the audio
DELAY_TOKENS = 6  # tekken.json `transcription_delay_ms` 480 / 80 ms
RIGHT_PAD_TOKENS = DELAY_TOKENS + 1 + 10  # mistral-common: the delay, BOS, and 10 tokens for the longest word


def _mel_frames(power: torch.Tensor) -> torch.Tensor:
    """[201, n] STFT power -> [128, n] normalized log-mel frames."""
    # Never a one-column product: BLAS computes that as a matrix-vector product, which sums in another order than
    # the whole clip's matrix product (1 ulp apart). Two columns or more give the whole clip's values bit for bit.
    single = power.shape[1] == 1
    mel = mel_filters().T @ (power.repeat(1, 2) if single else power)
    return normalized_log_mel(mel[:, :1] if single else mel, log_max=GLOBAL_LOG_MEL_MAX)


def _checked(samples: np.ndarray) -> np.ndarray:
    samples = np.asarray(samples)
    if samples.ndim != 1:
        raise VoxtralError(f"audio must be mono samples [N], got shape {list(samples.shape)}")
    samples = samples.astype(np.float32, copy=False)
    if not np.isfinite(samples).all():
        raise VoxtralError("the audio contains NaN or Inf samples")
    return samples


def _too_short(n_samples: int) -> VoxtralError:
    return VoxtralError(f"{n_samples} samples is shorter than one {N_FFT}-sample frame")


def realtime_log_mel(audio: np.ndarray) -> torch.Tensor:
    """Mono 16 kHz samples -> [128, N // 160], as VoxtralRealtimeFeatureExtractor computes them (no padding added)."""
    audio = _checked(audio)
    if len(audio) < MIN_SAMPLES:
        raise _too_short(len(audio))
    power = power_spectrogram(torch.from_numpy(audio))[:, :-1].contiguous()  # the extractor drops the last frame
    return _mel_frames(power)


def processor_audio(
    audio: np.ndarray, left_pad_tokens: int = LEFT_PAD_TOKENS, right_pad_tokens: int = RIGHT_PAD_TOKENS
) -> np.ndarray:
    """The samples VoxtralRealtimeProcessor's offline call gives its feature extractor: zeros on the left, the audio,
    zeros up to whole tokens and `right_pad_tokens` more. Their features have 8 frames per token, as the encoder needs
    (with 0 and 0: the audio padded to whole tokens only)."""
    audio = _checked(audio)
    right = -len(audio) % SAMPLES_PER_TOKEN + right_pad_tokens * SAMPLES_PER_TOKEN
    return np.pad(audio, (left_pad_tokens * SAMPLES_PER_TOKEN, right))


def samples_until_final(frame: int) -> int:
    """How many samples must have arrived before frame `frame` of the stream is final (the STFT's look-ahead)."""
    return max(HOP_LENGTH * frame + LOOKAHEAD, LOOKAHEAD + 1)  # frame 0's left reflection reads sample 200


class StreamingLogMel:
    """Fed audio in pieces of any size, emits chunks of 8 x `tokens_per_chunk` frames as soon as they are final.

    The chunks, with what `flush` returns at the end, concatenate to `realtime_log_mel` of all the audio pushed.
    After `flush` the object starts a new stream.
    """

    def __init__(self, tokens_per_chunk: int = 1) -> None:
        if tokens_per_chunk < 1:
            raise VoxtralError(f"tokens_per_chunk must be at least 1, got {tokens_per_chunk}")
        self.chunk_frames = FRAMES_PER_TOKEN * tokens_per_chunk
        self._reset()

    def _reset(self) -> None:
        self.samples_received = 0
        self.frames_emitted = 0
        self._window = np.zeros(0, dtype=np.float32)  # the reflect-padded signal from the next frame's first sample
        self._frames: list[torch.Tensor] = []  # final frames not yet emitted, [128, n] each
        self._pending = 0  # how many frames self._frames holds

    def push(self, samples: np.ndarray) -> list[torch.Tensor]:
        """Append samples; returns the chunks [128, chunk_frames] that became final (possibly none)."""
        samples = _checked(samples)
        reflected = self.samples_received > LOOKAHEAD  # the left reflection (x[200] .. x[1]) is in place
        self.samples_received += len(samples)
        self._window = np.concatenate([self._window, samples])
        if self.samples_received > LOOKAHEAD:
            if not reflected:
                self._window = np.concatenate([self._window[1 : LOOKAHEAD + 1][::-1], self._window])
            self._take_frames((len(self._window) - N_FFT) // HOP_LENGTH + 1)
        return self._chunks(whole_only=True)

    def flush(self) -> list[torch.Tensor]:
        """End of stream: the remaining frames (the last one reads the mirrored end), in chunks, the last one short."""
        if self.samples_received < MIN_SAMPLES:
            error = _too_short(self.samples_received)
            self._reset()
            raise error
        self._window = np.concatenate([self._window, self._window[-LOOKAHEAD - 1 : -1][::-1]])
        self._take_frames(self.samples_received // HOP_LENGTH - self.frames_emitted - self._pending)
        chunks = self._chunks(whole_only=False)
        self._reset()
        return chunks

    def _take_frames(self, count: int) -> None:
        if count <= 0:
            return
        span = HOP_LENGTH * (count - 1) + N_FFT
        power = power_spectrogram(torch.from_numpy(self._window[:span]), center=False)
        self._frames.append(_mel_frames(power))
        self._pending += count
        self._window = self._window[HOP_LENGTH * count :]

    def _chunks(self, whole_only: bool) -> list[torch.Tensor]:
        cut = self._pending - self._pending % self.chunk_frames if whole_only else self._pending
        if cut == 0:
            return []
        frames = torch.cat(self._frames, dim=1)
        self._frames = [frames[:, cut:]] if cut < self._pending else []
        self._pending -= cut
        self.frames_emitted += cut
        return list(torch.split(frames[:, :cut], self.chunk_frames, dim=1))
