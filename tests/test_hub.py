"""fetch_tensors against a local Hub server, through the real huggingface_hub client."""

from __future__ import annotations

import json
import logging
import secrets
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hub_server import FakeRepo, Hit, HubServer, ranged
from huggingface_hub import constants, hf_hub_download
from safetensors.torch import load_file, save_file

from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.sources.hub import fetch_tensors
from voxtral_coreml.sources.ranges import ByteRange, RetryPolicy, merge_ranges

FAST = RetryPolicy(attempts=3, base_wait=0.01, max_wait=0.05, timeout=10)
SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def audio_or_projector(name: str) -> bool:
    return name.startswith(("audio_tower.", "multi_modal_projector."))


# ---------------------------------------------------------------- synthetic checkpoints


def _bf16(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(torch.bfloat16)


def voxtral_like(audio_dim: int = 32, audio_layers: int = 4, lm_dim: int = 64, vocab: int = 256) -> dict:
    """Names and shapes in the style of Voxtral's HF checkpoint, at toy sizes, in bf16 like the real one."""
    g = torch.Generator().manual_seed(0)
    t: dict[str, torch.Tensor] = {
        "audio_tower.conv1.weight": _bf16(g, audio_dim, 16, 3),
        "audio_tower.conv1.bias": _bf16(g, audio_dim),
        "audio_tower.embed_positions.weight": _bf16(g, 30, audio_dim),
        "audio_tower.layer_norm.weight": _bf16(g, audio_dim),
    }
    for i in range(audio_layers):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[f"audio_tower.layers.{i}.self_attn.{proj}.weight"] = _bf16(g, audio_dim, audio_dim)
        t[f"audio_tower.layers.{i}.fc1.weight"] = _bf16(g, 2 * audio_dim, audio_dim)
        t[f"audio_tower.layers.{i}.fc2.weight"] = _bf16(g, audio_dim, 2 * audio_dim)
    t["multi_modal_projector.linear_1.weight"] = _bf16(g, lm_dim, 4 * audio_dim)
    t["multi_modal_projector.linear_2.weight"] = _bf16(g, lm_dim, lm_dim)
    t["language_model.model.embed_tokens.weight"] = _bf16(g, vocab, lm_dim)
    for i in range(4):
        t[f"language_model.model.layers.{i}.mlp.up_proj.weight"] = _bf16(g, 4 * lm_dim, lm_dim)
        t[f"language_model.model.layers.{i}.mlp.down_proj.weight"] = _bf16(g, lm_dim, 4 * lm_dim)
    t["language_model.lm_head.weight"] = _bf16(g, vocab, lm_dim)
    return t


def shard_of(name: str) -> str:
    """Audio tower split across shards 1-2 (crossing the boundary), LM everywhere, projector last."""
    if name.startswith("audio_tower."):
        layer = name.split(".")[2]
        return SHARDS[1] if layer.isdigit() and int(layer) >= 2 else SHARDS[0]
    if name.startswith("multi_modal_projector.") or "lm_head" in name:
        return SHARDS[2]
    return SHARDS[0] if "embed_tokens" in name else SHARDS[1 if ".layers.0." in name or ".layers.1." in name else 2]


def write_sharded(root: Path, tensors: dict[str, torch.Tensor]) -> None:
    root.mkdir(parents=True)
    for shard in SHARDS:
        save_file({k: v for k, v in tensors.items() if shard_of(k) == shard}, root / shard)
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": {k: shard_of(k) for k in sorted(tensors)}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (root / "config.json").write_text(json.dumps({"model_type": "voxtral"}))
    (root / "preprocessor_config.json").write_text(json.dumps({"feature_size": 128}))


def assert_same_tensors(path: Path, expected: dict[str, torch.Tensor]) -> None:
    got = load_file(path)
    assert list(got) and set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name].view(torch.int16), tensor.view(torch.int16)), name  # bit-identical


def data_of(filename: str) -> Callable[[Hit], bool]:
    """The CDN's answers with tensor bytes of one file (header reads start at 0 or 8)."""
    return lambda hit: hit.server == "cdn" and ranged(hit) and hit.filename == filename and hit.range[0] > 8


def cdn_data(server: HubServer, filename: str) -> list[Hit]:
    return [h for h in server.hits(filename, "GET") if h.server == "cdn" and h.range and h.range[0] > 8]


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    return voxtral_like()


@pytest.fixture
def sharded(hub: HubServer, tmp_path: Path, tensors: dict[str, torch.Tensor]) -> FakeRepo:
    write_sharded(tmp_path / "repos" / "sharded", tensors)
    return hub.add_repo(FakeRepo("mistralai/Voxtral-Tiny", tmp_path / "repos" / "sharded"))


def fetch(repo: FakeRepo, out: Path, wanted=audio_or_projector, **kwargs) -> dict:
    kwargs = {"progress": False, "retry": FAST, **kwargs}
    return fetch_tensors(repo.repo_id, kwargs.pop("revision", repo.commit), out, wanted, **kwargs)


# ---------------------------------------------------------------- ranges


def test_merge_ranges_joins_neighbours_within_the_gap() -> None:
    spans = [(100, 200), (0, 10), (10, 20), (30, 40), (200, 200)]
    assert merge_ranges(spans, max_gap=0) == [ByteRange(0, 20), ByteRange(30, 40), ByteRange(100, 200)]
    assert merge_ranges(spans, max_gap=10) == [ByteRange(0, 40), ByteRange(100, 200)]
    assert merge_ranges(spans, max_gap=1000) == [ByteRange(0, 200)]
    assert merge_ranges([], max_gap=10) == []


# ---------------------------------------------------------------- layouts


def test_sharded_fetch_is_bit_identical_for_the_wanted_tensors(
    hub: HubServer, sharded: FakeRepo, tensors: dict, tmp_path: Path
) -> None:
    out = tmp_path / "out" / "audio"
    record = fetch(sharded, out)

    wanted = {k: v for k, v in tensors.items() if audio_or_projector(k)}
    assert_same_tensors(out / "model.safetensors", wanted)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json", "source.json",
    ]  # fmt: skip
    assert (out / "config.json").read_text() == (sharded.root / "config.json").read_text()
    assert json.loads((out / "source.json").read_text()) == record
    assert record["commit"] == sharded.commit and record["layout"] == "sharded"
    assert sorted(record["files"]) == SHARDS  # the audio tower crosses shards 1-2, the projector is in 3
    assert record["tensor_bytes"] == sum(v.numel() * 2 for v in wanted.values())
    assert record["extra_files"] == ["config.json", "preprocessor_config.json"]
    assert str(tmp_path) not in (out / "source.json").read_text()
    assert not (out.parent / ".audio.download").exists()  # resume state is gone once published
    assert sorted(p.name for p in out.parent.iterdir()) == ["audio"]
    # The client's cache is the tmp one, and only small files went into it.
    cached = {p.name for p in (tmp_path / "hf_home" / "hub").rglob("*") if p.is_symlink()}
    assert cached == {"model.safetensors.index.json", "config.json", "preprocessor_config.json"}


def test_near_ranges_are_merged(hub: HubServer, sharded: FakeRepo, tmp_path: Path, tensors: dict) -> None:
    # Skipping a 64-byte tensor between wanted ones costs less than a second request.
    def wanted(name: str) -> bool:
        return audio_or_projector(name) and name != "audio_tower.layer_norm.weight"

    merged = fetch(sharded, tmp_path / "merged", wanted=wanted)
    split = fetch(sharded, tmp_path / "split", wanted=wanted, merge_gap=0)
    assert [len(f["ranges"]) for f in merged["files"].values()] == [1, 1, 1]
    assert [len(f["ranges"]) for f in split["files"].values()] == [2, 1, 1]
    expected = {k: v for k, v in tensors.items() if wanted(k)}
    assert_same_tensors(tmp_path / "merged" / "model.safetensors", expected)
    assert_same_tensors(tmp_path / "split" / "model.safetensors", expected)


def test_only_the_wanted_bytes_cross_the_wire(hub: HubServer, tmp_path: Path) -> None:
    # An LM ~16x bigger than the audio part: headers, index and configs must stay within the 2% budget.
    tensors = voxtral_like(audio_dim=96, audio_layers=4, lm_dim=256, vocab=8192)
    write_sharded(tmp_path / "big", tensors)
    repo = hub.add_repo(FakeRepo("mistralai/Voxtral-Big", tmp_path / "big"))
    record = fetch(repo, tmp_path / "out")

    wanted = sum(v.numel() * 2 for k, v in tensors.items() if audio_or_projector(k))
    total = sum(v.numel() * 2 for v in tensors.values())
    assert total > 10 * wanted
    assert record["tensor_bytes"] == wanted
    assert wanted <= hub.bytes_sent(repo.repo_id) <= 1.02 * wanted


def test_single_file_repo(hub: HubServer, tmp_path: Path, tensors: dict) -> None:
    root = tmp_path / "single"
    root.mkdir()
    save_file(tensors, root / "model.safetensors")
    (root / "config.json").write_text("{}")
    repo = hub.add_repo(FakeRepo("org/single", root))
    record = fetch(repo, tmp_path / "out", wanted=lambda n: n.startswith("audio_tower."))

    assert record["layout"] == "single" and list(record["files"]) == ["model.safetensors"]
    assert_same_tensors(tmp_path / "out" / "model.safetensors", {k: v for k, v in tensors.items() if "audio" in k})


def test_mistral_consolidated_repo(hub: HubServer, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    tensors = {
        "mm_whisper_embeddings.whisper_encoder.conv_layers.0.conv.weight": _bf16(g, 32, 16, 3),
        "mm_whisper_embeddings.whisper_encoder.transformer.layers.0.attention.wq.weight": _bf16(g, 32, 32),
        "mm_whisper_embeddings.audio_language_projection.0.weight": _bf16(g, 64, 128),
        "layers.0.attention.wq.weight": _bf16(g, 64, 64),
        "tok_embeddings.weight": _bf16(g, 256, 64),
    }
    root = tmp_path / "mistral"
    root.mkdir()
    save_file(tensors, root / "consolidated.safetensors")
    (root / "params.json").write_text(json.dumps({"dim": 64, "multimodal": {}}))
    repo = hub.add_repo(FakeRepo("mistralai/Voxtral-Mistral", root))
    record = fetch(repo, tmp_path / "out", wanted=lambda n: n.startswith("mm_whisper_embeddings."))

    assert record["layout"] == "consolidated" and record["extra_files"] == ["params.json"]
    assert (tmp_path / "out" / "params.json").read_text() == (root / "params.json").read_text()
    expected = {k: v for k, v in tensors.items() if k.startswith("mm_whisper_embeddings.")}
    assert_same_tensors(tmp_path / "out" / "model.safetensors", expected)


def test_branch_revision_is_resolved_recorded_and_warned(
    hub: HubServer, sharded: FakeRepo, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="voxtral_coreml"):
        record = fetch(sharded, tmp_path / "out", revision="main")
    assert record["revision"] == "main" and record["commit"] == sharded.commit
    assert "'main' is not a commit hash" in caplog.text and sharded.commit in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="voxtral_coreml"):
        fetch(sharded, tmp_path / "out2")
    assert "not a commit hash" not in caplog.text


def test_shard_in_hf_cache_is_read_locally(hub: HubServer, sharded: FakeRepo, tmp_path: Path, tensors: dict) -> None:
    cache = tmp_path / "hf_home" / "hub"
    hf_hub_download(sharded.repo_id, SHARDS[1], revision=sharded.commit, endpoint=hub.endpoint, cache_dir=cache)
    hub.reset_log()
    fetch(sharded, tmp_path / "out")

    assert hub.hits(SHARDS[1]) == []  # no HEAD, no Range request
    assert len(cdn_data(hub, SHARDS[0])) == 1
    assert_same_tensors(
        tmp_path / "out" / "model.safetensors", {k: v for k, v in tensors.items() if audio_or_projector(k)}
    )


# ---------------------------------------------------------------- auth


@pytest.fixture
def gated(hub: HubServer, tmp_path: Path, tensors: dict) -> tuple[FakeRepo, str]:
    token = "hf_" + secrets.token_hex(16)
    write_sharded(tmp_path / "gated", tensors)
    return hub.add_repo(
        FakeRepo("mistralai/Voxtral-Gated", tmp_path / "gated", gated=True, tokens=frozenset({token}))
    ), token


def test_gated_repo_without_token_says_how_to_log_in(gated: tuple[FakeRepo, str], tmp_path: Path) -> None:
    repo, _ = gated
    with pytest.raises(VoxtralError) as err:
        fetch(repo, tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message and "gated" in message and "HF_TOKEN" in message and "hf auth login" in message
    assert repo.repo_id in message
    assert not (tmp_path / "out").exists()


def test_gated_repo_with_an_unauthorized_token(
    gated: tuple[FakeRepo, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, _ = gated
    monkeypatch.setenv("HF_TOKEN", "hf_not_granted")
    with pytest.raises(VoxtralError, match=r"gated repo and your token has no access"):
        fetch(repo, tmp_path / "out")


@pytest.mark.parametrize("via", ["HF_TOKEN", "login"])
def test_gated_repo_with_token_works_and_the_token_leaks_nowhere(
    via: str,
    hub: HubServer,
    gated: tuple[FakeRepo, str],
    tmp_path: Path,
    tensors: dict,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo, token = gated
    if via == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", token)
    else:  # what `hf auth login` leaves behind (the path is the fixture's tmp one)
        Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
        Path(constants.HF_TOKEN_PATH).write_text(token)
    with caplog.at_level(logging.DEBUG):
        fetch(repo, tmp_path / "out", revision="main", progress=True)

    assert_same_tensors(
        tmp_path / "out" / "model.safetensors", {k: v for k, v in tensors.items() if audio_or_projector(k)}
    )
    assert all(h.authorized for h in hub.log if h.server == "hub")
    assert not any(h.authorized for h in hub.log if h.server == "cdn")  # dropped on the cross-origin redirect
    captured = capsys.readouterr()
    assert token not in caplog.text + captured.out + captured.err
    for path in tmp_path.rglob("*"):
        if path.is_file() and not path.is_relative_to(repo.root) and path != Path(constants.HF_TOKEN_PATH):
            assert token.encode() not in path.read_bytes(), path


# ---------------------------------------------------------------- not found


def test_missing_repo(hub: HubServer, tmp_path: Path) -> None:
    with pytest.raises(VoxtralError, match=r"^repo nobody/nothing not found at http://127\.0\.0\.1:\d+ \(if"):
        fetch_tensors("nobody/nothing", "main", tmp_path / "out", audio_or_projector, progress=False, retry=FAST)


def test_missing_revision(sharded: FakeRepo, tmp_path: Path) -> None:
    with pytest.raises(VoxtralError, match=r"revision 'v9' not found"):
        fetch(sharded, tmp_path / "out", revision="v9")


def test_index_naming_a_shard_the_repo_lacks(sharded: FakeRepo, tmp_path: Path) -> None:
    (sharded.root / SHARDS[2]).unlink()
    with pytest.raises(VoxtralError, match=r"names shard 'model-00003-of-00003\.safetensors', which is not in"):
        fetch(sharded, tmp_path / "out")


def test_file_listed_but_missing_on_the_hub(hub: HubServer, sharded: FakeRepo, tmp_path: Path) -> None:
    sharded.hidden = frozenset({SHARDS[1]})
    with pytest.raises(VoxtralError, match=rf"file '{SHARDS[1]}' not found"):
        fetch(sharded, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_repo_without_safetensors_weights(hub: HubServer, tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"pickle")
    repo = hub.add_repo(FakeRepo("org/old", tmp_path / "bin"))
    with pytest.raises(VoxtralError, match=r"no model\.safetensors\.index\.json, model\.safetensors or consolidated"):
        fetch(repo, tmp_path / "out")


def test_no_tensor_matches(sharded: FakeRepo, tmp_path: Path) -> None:
    with pytest.raises(VoxtralError, match=r"no tensor matches"):
        fetch(sharded, tmp_path / "out", wanted=lambda name: False)


# ---------------------------------------------------------------- network faults


def test_5xx_is_retried(hub: HubServer, sharded: FakeRepo, tmp_path: Path, tensors: dict) -> None:
    hub.fail_next(1, 503, match=lambda h: h.path.startswith("/api/models/"))
    hub.fail_next(2, 502)  # ranged requests: header and tensor reads
    fetch(sharded, tmp_path / "out")
    assert [h.status for h in hub.log].count(502) == 2 and [h.status for h in hub.log].count(503) == 1
    assert_same_tensors(
        tmp_path / "out" / "model.safetensors", {k: v for k, v in tensors.items() if audio_or_projector(k)}
    )


def test_persistent_5xx_gives_up_with_one_line(hub: HubServer, sharded: FakeRepo, tmp_path: Path) -> None:
    hub.fail_next(100, 500, match=data_of(SHARDS[0]))
    with pytest.raises(VoxtralError) as err:
        fetch(sharded, tmp_path / "out")
    assert "\n" not in str(err.value) and f"{SHARDS[0]} bytes" in str(err.value)
    assert "giving up after 3 failed attempts" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_dropped_connection_resumes_mid_range(hub: HubServer, sharded: FakeRepo, tmp_path: Path, tensors: dict) -> None:
    hub.drop_next(1, after_bytes=5000, match=data_of(SHARDS[0]))
    record = fetch(sharded, tmp_path / "out")

    [(begin, end)] = record["files"][SHARDS[0]]["ranges"]
    first, second = cdn_data(hub, SHARDS[0])
    assert first.range == (begin, end - 1) and first.bytes_sent == 5000
    assert second.range == (begin + 5000, end - 1)  # continues, does not restart
    assert first.bytes_sent + second.bytes_sent == end - begin  # a restart would have sent 5000 more
    assert_same_tensors(
        tmp_path / "out" / "model.safetensors", {k: v for k, v in tensors.items() if audio_or_projector(k)}
    )


def test_stalled_transfer_times_out_and_is_retried(hub: HubServer, sharded: FakeRepo, tmp_path: Path) -> None:
    hub.stall_next(1, seconds=2.0, match=data_of(SHARDS[2]))
    fetch(sharded, tmp_path / "out", retry=RetryPolicy(attempts=3, base_wait=0.01, timeout=0.5))
    assert len(cdn_data(hub, SHARDS[2])) == 2


def test_killed_run_resumes_without_refetching(
    hub: HubServer, sharded: FakeRepo, tmp_path: Path, tensors: dict
) -> None:
    out = tmp_path / "out"
    # Run 1 dies in shard 2's range: 3000 bytes arrive, then the Hub fails until the fetcher gives up.
    hub.drop_next(1, after_bytes=3000, match=data_of(SHARDS[1]))
    hub.fail_next(100, 500, match=data_of(SHARDS[1]))
    with pytest.raises(VoxtralError, match="giving up"):
        fetch(sharded, out)
    assert not out.exists()
    parts = sorted((tmp_path / ".out.download").glob("*.part"))
    assert len(parts) == 2  # shard 1's range complete, shard 2's partial

    hub.clear_faults()
    hub.reset_log()
    record = fetch(sharded, out)
    assert cdn_data(hub, SHARDS[0]) == []  # finished range not sent again
    [(begin, end)] = record["files"][SHARDS[1]]["ranges"]
    [resumed] = cdn_data(hub, SHARDS[1])
    assert resumed.range == (begin + 3000, end - 1)
    assert len(cdn_data(hub, SHARDS[2])) == 1
    assert_same_tensors(out / "model.safetensors", {k: v for k, v in tensors.items() if audio_or_projector(k)})
    assert not (tmp_path / ".out.download").exists()


# ---------------------------------------------------------------- hostile or broken repos


@pytest.mark.parametrize(
    "shard",
    [
        "../evil.safetensors",
        "/etc/evil.safetensors",
        "sub\\evil.safetensors",
        "evil.bin",
        "a//b.safetensors",
        "./x.safetensors",
    ],
)
def test_index_with_a_bad_shard_name_is_refused(hub: HubServer, sharded: FakeRepo, tmp_path: Path, shard: str) -> None:
    index_path = sharded.root / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["audio_tower.conv1.bias"] = shard
    index_path.write_text(json.dumps(index))
    out = tmp_path / "work" / "out"
    with pytest.raises(VoxtralError) as err:
        fetch(sharded, out)
    assert repr(shard) in str(err.value) and "refusing shard name" in str(err.value)
    assert not (tmp_path / "work").exists() and not (tmp_path / "evil.safetensors").exists()
    assert not [h for h in hub.log if h.filename and "evil" in h.filename]


def _raw_safetensors(header: dict, data_size: int, claimed_length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", claimed_length or len(raw)) + raw + b"\0" * data_size


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (_raw_safetensors({}, 64, claimed_length=10**6), r"header length 1000000 runs past the file"),
        (
            _raw_safetensors(
                {
                    "audio_tower.a": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]},
                    "audio_tower.b": {"dtype": "BF16", "shape": [4], "data_offsets": [4, 12]},
                },
                12,
            ),
            r"tensors 'audio_tower.a' and 'audio_tower.b' overlap",
        ),
        (
            _raw_safetensors({"audio_tower.a": {"dtype": "BF16", "shape": [8], "data_offsets": [0, 16]}}, 8),
            r"run past the data",
        ),
    ],
)
def test_broken_shard_header_is_refused(hub: HubServer, tmp_path: Path, content: bytes, message: str) -> None:
    root = tmp_path / "broken"
    root.mkdir()
    (root / "model.safetensors").write_bytes(content)
    repo = hub.add_repo(FakeRepo("org/broken", root))
    out = tmp_path / "work" / "out"
    with pytest.raises(VoxtralError, match=rf"org/broken/model\.safetensors: .*{message}"):
        fetch(repo, out)
    assert not (tmp_path / "work").exists()
